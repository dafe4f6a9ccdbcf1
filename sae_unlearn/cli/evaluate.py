"""`sae-unlearn eval`: evaluate the base model, or the base model with a run applied."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from sae_unlearn.cli.app import DeviceOpt, DtypeOpt, ModelOpt, OverwriteOpt, RevisionOpt, app
from sae_unlearn.cli.common import (
    Reporter,
    check_device,
    check_out_file,
    friendly_errors,
    stdout,
    table,
)
from sae_unlearn.errors import UserError


def _eval_config(
    fast: bool,
    letter: bool,
    adversarial: bool,
    relearn: bool,
    lm_eval_tasks: str | None,
    lm_eval_include: str | None,
    lm_eval_limit: int | None,
) -> Any:
    """EvalConfig for `eval`: the --fast sizes come from the built-in experiment `fast`, as for compare."""
    from sae_unlearn.evaluation.evaluate import EvalConfig
    from sae_unlearn.evaluation.experiment import load_experiment

    base = load_experiment("fast").compare.eval if fast else EvalConfig()
    return dataclasses.replace(
        base,
        letter=letter,
        adversarial=adversarial,
        relearn=relearn,
        lm_eval_tasks=[t.strip() for t in lm_eval_tasks.split(",") if t.strip()] if lm_eval_tasks else [],
        lm_eval_include=lm_eval_include,
        lm_eval_limit=lm_eval_limit,
    )


def _any_template(adv: dict[str, Any]) -> str:
    acc, chance = adv.get("any_template_accuracy", {}).get("acc"), adv.get("chance", {}).get("any_template")
    if acc is None:
        return "—"
    return f"{acc:.3g}" + (f" ({chance:.2g})" if chance is not None else "")


def print_summary(results: dict[str, Any]) -> None:
    rows = []
    for name, r in results.items():
        rings = r["probes"]["rings"]
        flu = (r.get("fluency") or {}).get("concept_prompts") or {}
        relearn = r.get("relearning") or {}
        rows.append(
            [name]
            + [rings[ring]["logprob"]["acc"] if ring in rings else "—" for ring in ("target", "near", "mid", "far")]
            + [
                r["retention"]["retain_heldout_ppl"] or "—",
                flu.get("base_model_ppl", "—"),
                (r.get("reactivation") or {}).get("fraction", "—"),
                _any_template(r.get("adversarial") or {}),
                relearn["curve"][-1]["target_acc"] if relearn.get("curve") else "—",
            ]
        )
    stdout.print(
        table(
            "evaluation (log-prob accuracy, report split)",
            [
                "method",
                "target",
                "near",
                "mid",
                "far",
                "retain ppl",
                "forget-prompt ppl",
                "re-activation",
                "any-template adv. (chance)",
                "after relearn",
            ],
            rows,
        )
    )


@app.command("eval")
@friendly_errors
def eval_(
    out: Annotated[Path, typer.Option("--out", help="results.json to write")],
    concept: Annotated[str | None, typer.Option("--concept", "-c", help="pack name or directory")] = None,
    probes: Annotated[
        list[Path] | None, typer.Option(help="probe files instead of a pack's: pack or WMDP/MMLU JSONL, column JSON")
    ] = None,
    ring: Annotated[str | None, typer.Option(help="ring of --probes rows without one: target, near, mid, far")] = None,
    run: Annotated[Path | None, typer.Option(help="a run directory to apply (default: the base model)")] = None,
    model: ModelOpt = "embedded",
    revision: RevisionOpt = None,
    probe_split: Annotated[str, typer.Option(help="report (held out from tuning), tune or all")] = "report",
    letter: Annotated[bool, typer.Option(help="also score by answer letter (under every rotation)")] = True,
    adversarial: Annotated[bool, typer.Option(help="re-ask target probes under adversarial templates")] = True,
    relearn: Annotated[bool, typer.Option(help="run the relearning attack")] = True,
    lm_eval_tasks: Annotated[str | None, typer.Option(help="comma-separated lm-eval tasks, e.g. wmdp_bio,mmlu")] = None,
    lm_eval_include: Annotated[str | None, typer.Option(help="directory of local lm-eval task YAMLs")] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(help="lm-eval: at most this many examples per task")] = None,
    fast: Annotated[bool, typer.Option(help="fewer probes and steps")] = False,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Evaluate the base model, or the base model with a run applied."""
    from sae_unlearn.concepts.pack import load_pack, load_probes
    from sae_unlearn.evaluation.evaluate import evaluate, select_probes
    from sae_unlearn.io import atomic_write_json
    from sae_unlearn.models import load_model
    from sae_unlearn.runs import read_config

    check_out_file(out, overwrite)
    if concept is None and not probes:
        raise UserError("nothing to evaluate on", "pass --concept PACK or --probes FILE")
    pack = load_pack(concept) if concept else None
    given = [p for f in probes for p in load_probes(f, ring=ring)] if probes else None
    if run is not None:
        read_config(run)
    cfg = _eval_config(fast, letter, adversarial, relearn, lm_eval_tasks, lm_eval_include, lm_eval_limit)
    cfg.probe_split = probe_split
    select_probes(pack, given, cfg)  # no probes to score: say so before loading anything
    check_device(device)
    with Reporter("eval") as reporter:
        reporter.stage("load model")
        loaded = load_model(model, dtype=dtype, device=device, revision=revision)
        result = evaluate(loaded, pack, run, probes=given, cfg=cfg, progress=reporter.stage)
    atomic_write_json(out, result)
    print_summary({result["name"]: result})
    stdout.print(f"wrote {out}")
