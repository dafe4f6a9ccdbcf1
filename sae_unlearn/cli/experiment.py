"""`sae-unlearn compare` and `demo`: an experiment (evaluation/experiment.py) from the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sae_unlearn.cli.app import DeviceOpt, DtypeOpt, OverwriteOpt, app
from sae_unlearn.cli.common import (
    MODEL_HELP,
    SAE_HELP,
    Reporter,
    check_device,
    check_out_dir,
    clock,
    console,
    format_terms,
    friendly_errors,
    stdout,
)
from sae_unlearn.cli.evaluate import print_summary
from sae_unlearn.errors import UserError
from sae_unlearn.options import parse_options

if TYPE_CHECKING:
    from sae_unlearn.evaluation.experiment import Experiment


def experiment_overrides(
    *,
    concept: str | None = None,
    model: str | None = None,
    sae: str | None = None,
    methods: str | None = None,
    k: int | None = None,
    strategy: str | None = None,
    attack: str | None = None,
    set_: list[str] | None = None,
) -> dict[str, Any]:
    """The experiment settings the command line gives: flags that were passed, then --set values.

    --set takes METHOD.OPTION (method_options), features.OPTION (the strategy; features.k is k),
    eval.OPTION (EvalConfig) and bare top-level settings (max_length=128, k=5).
    """
    top: dict[str, Any] = {}
    for key, value in {"concept": concept, "model": model, "sae": sae, "k": k, "strategy": strategy}.items():
        if value is not None:
            top[key] = value
    if methods is not None:
        top["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    if attack is not None:
        attacked = None if attack == "all" else [m.strip() for m in attack.split(",") if m.strip()]
        top.setdefault("eval", {}).update(robustness_for=attacked, relearn_for=None)  # both attacks on these
    scalar = {"concept", "model", "sae", "k", "strategy", "max_length", "examples_from", "methods"}
    for key, value in parse_options(set_).items():
        group, _, name = key.partition(".")
        if not name:
            if key not in scalar:
                raise UserError(
                    f"--set {key}=... needs a method prefix or features.",
                    "e.g. --set crisp.steps=100 or --set features.max_retain_rate=0.02",
                )
            top[key] = value
        elif group == "features" and name in ("k", "strategy"):
            top[name] = value
        elif group == "features":
            top.setdefault("strategy_options", {})[name] = value
        elif group == "eval":
            top.setdefault("eval", {})[name] = value
        else:
            top.setdefault("method_options", {}).setdefault(group, {})[name] = value
    return top


def load_cli_experiment(config: str | None, fast: bool, overrides: dict[str, Any]) -> Experiment:
    """The experiment a compare/demo command line describes, checked before anything loads: the same
    as `load_experiment` from Python with the same options."""
    from sae_unlearn.evaluation.experiment import load_experiment

    return load_experiment(config, fast=fast, overrides=overrides)


def stage_estimates(loaded: Any, experiment: Experiment, out: Path) -> dict[str, float]:
    """Measured seconds per stage of `experiment.stage_plan()` (evaluation/estimate.py: a few seconds of
    throughput probing on this model, device and compute dtype), also kept in OUT/estimate.json."""
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.evaluation.estimate import estimate_compare, estimate_to_dict
    from sae_unlearn.io import atomic_write_json

    stages, rates = estimate_compare(loaded, load_pack(experiment.concept), experiment.compare)
    out.mkdir(parents=True, exist_ok=True)
    compute = loaded.compute_dtype.to_dict()
    atomic_write_json(out / "estimate.json", {"compute_dtype": compute, **estimate_to_dict(stages, rates)})
    return {s.stage.replace("_", " "): s.seconds for s in stages}


def _run_experiment(
    out: Path,
    experiment: Experiment,
    *,
    title: str,
    overwrite: bool,
    dtype: str,
    device: str,
    estimate_only: bool = False,
) -> dict[str, Any] | None:
    from sae_unlearn.evaluation.experiment import run_experiment
    from sae_unlearn.models import load_model

    check_out_dir(out, overwrite)
    check_device(device)
    started = time.perf_counter()
    loaded = load_model(experiment.model, dtype=dtype, device=device)
    compute = loaded.compute_dtype
    console.print(f"compute dtype {compute.name} ({compute.reason}); measuring throughput for the time estimate")
    estimates = {"load model": time.perf_counter() - started, **stage_estimates(loaded, experiment, out)}
    reporter = Reporter(title, experiment.stage_plan(), estimates=estimates)
    reporter.print_plan()
    if estimate_only:
        stdout.print(f"estimate only: nothing run; per stage in {out / 'estimate.json'}")
        return None
    with reporter:
        results = run_experiment(
            experiment,
            out,
            loaded=loaded,
            stage=reporter.message,
            progress=lambda step, total, terms: reporter.update(step, total, info=format_terms(terms)),
        )
    print_summary(results["methods"])
    print_estimate_check(out, results, load_seconds=estimates["load model"])
    stdout.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.html'} (open it in a browser)")
    return results


def print_estimate_check(out: Path, results: dict[str, Any], load_seconds: float) -> None:
    """The measured stage times beside the estimate printed at the start, kept in OUT/estimate.json "measured"."""
    from sae_unlearn.evaluation.estimate import estimate_against_measured, measured_stage_seconds
    from sae_unlearn.io import atomic_write_json

    saved = json.loads((out / "estimate.json").read_text(encoding="utf-8"))
    measured = measured_stage_seconds(results) | {"load_model": load_seconds}
    check = estimate_against_measured(saved["stages"] | {"load_model": load_seconds}, measured)
    atomic_write_json(out / "estimate.json", saved | {"measured": check})
    if check["total"]:
        total = check["total"]
        stdout.print(
            f"time: {clock(total['measured'])} against ~{clock(total['estimated'])} estimated "
            f"(measured / estimated {total['ratio']:.2f}; per stage in {out / 'estimate.json'})"
        )


MethodsOpt = Annotated[
    str | None, typer.Option(help="comma-separated methods (default: the experiment's; crisp,clamp,ablate,rmu)")
]


SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="METHOD.OPTION=VALUE, features.OPTION=VALUE or eval.OPTION=VALUE, e.g. crisp.steps=100"),
]


AttackOpt = Annotated[
    str | None,
    typer.Option(
        help="models that get the adversarial and relearning attacks: all, or e.g. base,crisp "
        "(default: the experiment's; all, or crisp with --fast)"
    ),
]


EstimateOnlyOpt = Annotated[
    bool, typer.Option(help="print the measured time estimate per stage (and write OUT/estimate.json), run nothing")
]


ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="an experiment file (.toml), a results.json to re-run, or a built-in (demo, demo-fast, fast); "
        "flags and --set override it",
    ),
]


@app.command("compare")
@friendly_errors
def compare_cmd(
    out: Annotated[Path, typer.Option("--out", help="directory for results.json and report.html")],
    config: ConfigOpt = None,
    concept: Annotated[
        str | None, typer.Option("--concept", "-c", help="pack name or directory (default: harry-potter)")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    sae: Annotated[str | None, typer.Option("--sae", help=SAE_HELP)] = None,
    methods: MethodsOpt = None,
    k: Annotated[int | None, typer.Option(help="features per layer (default 10)")] = None,
    strategy: Annotated[str | None, typer.Option(help="feature selection: crisp, inlp or saebench")] = None,
    set_: SetOpt = None,
    fast: Annotated[bool, typer.Option(help="reduced steps and probes (the settings of the built-in fast)")] = False,
    attack: AttackOpt = None,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    estimate_only: EstimateOnlyOpt = False,
) -> None:
    """Run several methods on one concept pack and evaluate them beside the base model."""
    overrides = experiment_overrides(
        concept=concept, model=model, sae=sae, methods=methods, k=k, strategy=strategy, attack=attack, set_=set_
    )
    experiment = load_cli_experiment(config, fast, overrides)
    _run_experiment(
        out, experiment, title="compare", overwrite=overwrite, dtype=dtype, device=device, estimate_only=estimate_only
    )


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="directory for results.json and report.html")] = Path("demo-out"),
    fast: Annotated[bool, typer.Option(help="the reduced version CI runs")] = False,
    methods: MethodsOpt = None,
    set_: SetOpt = None,
    attack: AttackOpt = None,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    estimate_only: EstimateOnlyOpt = False,
) -> None:
    """compare on the embedded model with the built-in harry-potter pack and the shipped SAEs
    (the built-in experiment demo, or demo-fast with --fast); prints a measured time estimate per stage."""
    experiment = load_cli_experiment(
        "demo-fast" if fast else "demo", False, experiment_overrides(methods=methods, attack=attack, set_=set_)
    )
    console.print(
        f"[bold]sae-unlearn demo[/]: {experiment.model}, concept {experiment.concept}, "
        f"methods {','.join(experiment.compare.methods)}"
    )
    _run_experiment(
        out, experiment, title="demo", overwrite=overwrite, dtype=dtype, device=device, estimate_only=estimate_only
    )
