"""Pipeline commands: features, unlearn, eval, compare, demo, export, concept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sae_unlearn.cli.app import DeviceOpt, DtypeOpt, ModelOpt, SaeOpt, app
from sae_unlearn.cli.common import console, friendly_errors, progress_bar, stdout, table
from sae_unlearn.errors import UserError

ConceptOpt = Annotated[
    str, typer.Option("--concept", "-c", help="a built-in pack name (harry-potter) or a pack directory")
]
OverwriteOpt = Annotated[bool, typer.Option(help="write into an --out that already holds files")]
concept_app = typer.Typer(
    help="Concept packs: list, validate, grow a forget corpus from the model.", no_args_is_help=True
)
app.add_typer(concept_app, name="concept")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """--set key=value pairs (values parsed as JSON when they can be: 3, 0.5, true, [3,4])."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set {pair!r} is not KEY=VALUE", "e.g. --set steps=100 --set lora_r=8")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


def _refuse_existing_file(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists", "pass --overwrite, or choose another --out")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file", "choose a directory for --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already holds files", "pass --overwrite, or choose another --out")


@app.command()
@friendly_errors
def features(
    out: Annotated[Path, typer.Option("--out", help="directory for features.json, stats.safetensors, report.html")],
    concept: ConceptOpt = "harry-potter",
    model: ModelOpt = "embedded",
    sae: SaeOpt = "shipped",
    strategy: Annotated[str, typer.Option(help="crisp, inlp or saebench")] = "crisp",
    k: Annotated[int, typer.Option(help="features per layer")] = 10,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="strategy parameter KEY=VALUE (e.g. min_ratio=3)")
    ] = None,
    batch: int = 8,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="recompute statistics even if cached")] = False,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Find the SAE features that carry a concept and write a report."""
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.features import find_features, make_strategy
    from sae_unlearn.models import load_model
    from sae_unlearn.saes import load_saes_for

    _check_out(out, overwrite)
    pack = load_pack(concept)
    chosen = make_strategy(strategy, k=k, **parse_options(set_))
    loaded = load_model(model, dtype=dtype, device=device)
    saes = load_saes_for(loaded, sae)
    for s in saes:
        if k > s.d_sae:
            raise UserError(
                f"--k {k} is larger than the SAE width {s.d_sae} at layer {s.layer}", "choose a smaller --k"
            )
    with progress_bar("feature statistics", total=1) as update:
        selection = find_features(
            loaded,
            saes,
            pack,
            chosen,
            use_cache=not no_cache,
            batch_size=batch,
            progress=lambda done, total: update(done, total),
        )
    selection.write(out)
    rows = [[f.layer, f.index, f.score, f.forget_rate, f.retain_rate, f.relative] for f in selection.features]
    stdout.print(
        table(
            f"{len(rows)} features for {pack.name} ({selection.strategy})",
            ["layer", "index", "score", "forget rate", "retain rate", "ratio"],
            rows,
        )
    )
    stdout.print(f"wrote {out / 'features.json'} and {out / 'report.html'}")


@app.command()
@friendly_errors
def unlearn(
    method: Annotated[str, typer.Option(help="crisp, clamp, ablate or rmu")],
    out: Annotated[Path, typer.Option("--out", help="the run directory to write")],
    concept: ConceptOpt = "harry-potter",
    model: ModelOpt = "embedded",
    sae: SaeOpt = "shipped",
    features_from: Annotated[Path | None, typer.Option("--features", help="features.json (or its dir) to use")] = None,
    strategy: Annotated[str, typer.Option(help="feature selection when --features is not given")] = "crisp",
    k: int = 10,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="method option KEY=VALUE, e.g. steps=200, objective=published")
    ] = None,
    refusal_feature: Annotated[str | None, typer.Option(help="clamp: LAYER:INDEX of a refusal feature")] = None,
    scale: Annotated[float | None, typer.Option(help="ablate: multiply firing features by this")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Run an unlearning method and write a run directory."""
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.features import find_features, load_features
    from sae_unlearn.methods import METHODS, method_config
    from sae_unlearn.methods import unlearn as run_unlearn
    from sae_unlearn.models import load_model
    from sae_unlearn.saes import load_saes_for

    options = parse_options(set_)
    if refusal_feature is not None:
        options["refusal_feature"] = refusal_feature
    if scale is not None:
        options["scale"] = scale
    method_config(method, options)  # unknown method / option that does not apply: fail before loading anything
    if not resume:
        _check_out(out, overwrite)
    pack = load_pack(concept)
    loaded = load_model(model, dtype=dtype, device=device)
    saes, selection = [], None
    if METHODS[method].needs_saes:
        saes = load_saes_for(loaded, sae)
        selection = load_features(features_from) if features_from else find_features(loaded, saes, pack, strategy, k=k)
        if selection.model not in (loaded.spec,) and selection.model_source != loaded.source:
            raise UserError(
                f"the features were selected on model {selection.model!r}", f"pass --model {selection.model}"
            )
    with progress_bar(f"unlearn ({method})", total=1) as update:

        def progress(step: int, total: int, terms: dict[str, float]) -> None:
            update(step, total, info=" ".join(f"{k}={v:.3g}" for k, v in terms.items()))

        run_unlearn(
            method,
            loaded,
            pack,
            out,
            options=options,
            saes=saes,
            sae_spec=sae,
            features=selection,
            resume=resume,
            progress=progress,
        )
    stdout.print(
        f"run written to {out} (evaluate: sae-unlearn eval --run {out} --concept {concept} --out results.json)"
    )


def _eval_config(
    fast: bool,
    letter: bool,
    adversarial: bool,
    relearn: bool,
    lm_eval_tasks: str | None,
    lm_eval_include: str | None,
    lm_eval_limit: int | None,
) -> Any:
    from sae_unlearn.evaluation.evaluate import EvalConfig

    cfg = EvalConfig(
        letter=letter,
        adversarial=adversarial,
        relearn=relearn,
        lm_eval_tasks=[t.strip() for t in lm_eval_tasks.split(",") if t.strip()] if lm_eval_tasks else [],
        lm_eval_include=lm_eval_include,
        lm_eval_limit=lm_eval_limit,
    )
    if fast:  # the CI-sized demo: fewer probes and texts; attacks only on CRISP
        cfg.max_probes_per_ring, cfg.relearn_steps, cfg.relearn_eval_at, cfg.max_ppl_texts = 25, 5, [0, 5], 8
        cfg.fluency_tokens, cfg.robustness_for = 20, ["crisp"]
    return cfg


def _print_summary(results: dict[str, Any]) -> None:
    rows = []
    for name, r in results.items():
        rings = r["probes"]["rings"]
        flu = (r.get("fluency") or {}).get("forget_prompts") or {}
        relearn = r.get("relearning") or {}
        rows.append(
            [name]
            + [rings[ring]["logprob"]["acc"] if ring in rings else "—" for ring in ("target", "near", "mid", "far")]
            + [
                r["retention"]["retain_heldout_ppl"] or "—",
                flu.get("base_ppl", "—"),
                (r.get("reactivation") or {}).get("fraction", "—"),
                (r.get("adversarial") or {}).get("worst_case", {}).get("acc", "—"),
                relearn["curve"][-1]["target_acc"] if relearn else "—",
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
                "adversarial",
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
    probes: Annotated[list[Path] | None, typer.Option(help="probe JSONL files (instead of a pack's)")] = None,
    run: Annotated[Path | None, typer.Option(help="a run directory to apply (default: the base model)")] = None,
    model: ModelOpt = "embedded",
    probe_split: Annotated[str, typer.Option(help="report (held out from tuning), tune or all")] = "report",
    letter: Annotated[bool, typer.Option(help="also score by answer letter (and all permutations)")] = True,
    adversarial: Annotated[bool, typer.Option(help="re-ask target probes under adversarial templates")] = True,
    relearn: Annotated[bool, typer.Option(help="run the relearning attack")] = True,
    lm_eval_tasks: Annotated[str | None, typer.Option(help="comma-separated lm-eval tasks, e.g. wmdp_bio,mmlu")] = None,
    lm_eval_include: Annotated[str | None, typer.Option(help="directory of local lm-eval task YAMLs")] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(help="lm-eval: at most this many examples per task")] = None,
    fast: Annotated[bool, typer.Option(help="fewer probes and steps")] = False,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Evaluate the base model, or the base model with a run applied."""
    from sae_unlearn.concepts.pack import load_pack, load_probes
    from sae_unlearn.evaluation.evaluate import evaluate
    from sae_unlearn.io import atomic_write_json
    from sae_unlearn.models import load_model
    from sae_unlearn.runs import read_config

    _refuse_existing_file(out, overwrite)
    if concept is None and not probes:
        raise UserError("nothing to evaluate on", "pass --concept PACK or --probes FILE")
    pack = load_pack(concept) if concept else None
    given = [p for f in probes for p in load_probes(f)] if probes else None
    if run is not None:
        read_config(run)
    cfg = _eval_config(fast, letter, adversarial, relearn, lm_eval_tasks, lm_eval_include, lm_eval_limit)
    cfg.probe_split = probe_split
    loaded = load_model(model, dtype=dtype, device=device)
    with console.status("evaluating") as status:
        result = evaluate(
            loaded, pack, run, probes=given, cfg=cfg, progress=lambda m: status.update(f"evaluating: {m}")
        )
    atomic_write_json(out, result)
    _print_summary({result["name"]: result})
    stdout.print(f"wrote {out}")


def _run_compare(
    out: Path,
    *,
    concept: str,
    model: str,
    sae: str,
    methods: str,
    k: int,
    fast: bool,
    overwrite: bool,
    dtype: str,
    device: str,
    set_: list[str] | None,
    letter: bool = True,
    max_length: int = 256,
    attack: str = "all",
    print_estimate: bool = False,
) -> None:
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.evaluation.compare import CompareConfig, compare
    from sae_unlearn.models import load_model

    _check_out(out, overwrite)
    method_options: dict[str, dict[str, Any]] = {}
    for key, value in parse_options(set_).items():
        if "." not in key:
            raise UserError(
                f"--set {key}=... needs a method prefix or features.",
                "e.g. --set crisp.steps=100 or --set features.max_retain_rate=0.02",
            )
        m, opt = key.split(".", 1)
        method_options.setdefault(m, {})[opt] = value
    strategy_options = method_options.pop("features", {})
    names = [m.strip() for m in methods.split(",") if m.strip()]
    # the published clamp value (-100) is for GemmaScope's activation scale; the shipped SAEs' latents
    # peak at ~3-13, where -100 wipes out the residual stream (measured: every ring at chance); -5 above
    # an activation of 2 was the least damaging setting tried on the tune split (README)
    if sae == "shipped":
        for key, value in {"value": -5.0, "threshold": 2.0}.items():
            method_options.setdefault("clamp", {}).setdefault(key, value)
    if fast:
        for m, opts in {"crisp": {"steps": 40, "max_length": 64}, "rmu": {"steps": 20}}.items():
            for key, value in opts.items():
                method_options.setdefault(m, {}).setdefault(key, value)
    cfg = CompareConfig(
        max_length=max_length,
        examples_from=64 if fast else None,
        methods=names,
        sae=sae,
        k=k,
        strategy_options=strategy_options,
        method_options=method_options,
        eval=_eval_config(fast, letter, True, True, None, None, None),
    )
    if not fast and attack != "all":
        cfg.eval.robustness_for = [m.strip() for m in attack.split(",") if m.strip()]
        cfg.validate()
    pack = load_pack(concept)
    loaded = load_model(model, dtype=dtype, device=device)
    if print_estimate:
        _print_estimate(loaded, pack, cfg, out)
    with console.status("compare") as status, progress_bar("training", total=1) as update:

        def progress(step: int, total: int, terms: dict[str, float]) -> None:
            update(step, total, info=" ".join(f"{k}={v:.3g}" for k, v in terms.items()))

        results = compare(loaded, pack, out, cfg, stage=lambda m: status.update(m), progress=progress)
    _print_summary(results["methods"])
    stdout.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.html'} (open it in a browser)")


def _print_estimate(loaded: Any, pack: Any, cfg: Any, out: Path) -> None:
    """Measured per-stage time estimate (evaluation/estimate.py), printed and kept in OUT/estimate.json."""
    import torch

    from sae_unlearn.evaluation.estimate import estimate_compare, estimate_to_dict
    from sae_unlearn.io import atomic_write_json

    with console.status("measuring throughput for the time estimate"):
        stages, rates = estimate_compare(loaded, pack, cfg)
    total = sum(s.seconds for s in stages)
    compute = loaded.compute_dtype
    console.print(
        table(
            f"estimated time: {total / 60:.1f} minutes ({compute.name}: {compute.reason}; "
            f"{torch.get_num_threads()} threads)",
            ["stage", "seconds"],
            [[s.stage, round(s.seconds)] for s in stages],
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "estimate.json", {"compute_dtype": compute.to_dict(), **estimate_to_dict(stages, rates)})


MethodsOpt = Annotated[str, typer.Option(help="comma-separated methods")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="METHOD.OPTION=VALUE, e.g. crisp.steps=100")]
AttackOpt = Annotated[
    str,
    typer.Option(
        help="models that get the adversarial and relearning attacks: all, or e.g. base,crisp (--fast: crisp)"
    ),
]


@app.command("compare")
@friendly_errors
def compare_cmd(
    out: Annotated[Path, typer.Option("--out", help="directory for results.json and report.html")],
    concept: ConceptOpt = "harry-potter",
    model: ModelOpt = "embedded",
    sae: SaeOpt = "shipped",
    methods: MethodsOpt = "crisp,clamp,ablate,rmu",
    k: int = 10,
    set_: SetOpt = None,
    fast: Annotated[bool, typer.Option(help="reduced steps and probes")] = False,
    attack: AttackOpt = "all",
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Run several methods on one concept pack and evaluate them beside the base model."""
    _run_compare(
        out,
        concept=concept,
        model=model,
        sae=sae,
        methods=methods,
        k=k,
        fast=fast,
        overwrite=overwrite,
        dtype=dtype,
        device=device,
        set_=set_,
        attack=attack,
    )


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="directory for results.json and report.html")] = Path("demo-out"),
    fast: Annotated[bool, typer.Option(help="the reduced version CI runs")] = False,
    methods: MethodsOpt = "crisp,clamp,ablate,rmu",
    set_: SetOpt = None,
    # ablate is the same kind of hook edit as clamp; leaving its attacks out keeps the demo near 30 minutes
    attack: AttackOpt = "base,crisp,clamp,rmu",
    overwrite: OverwriteOpt = False,
) -> None:
    """compare on the embedded model with the built-in harry-potter pack and the shipped SAEs."""
    console.print(
        f"[bold]sae-unlearn demo[/]: Gemma 3 270M, concept harry-potter, methods {methods}; "
        "measuring this machine's throughput for a time estimate"
    )
    # statistics over the first 128 tokens of each paragraph: the setting the defaults were tuned with
    _run_compare(
        out,
        concept="harry-potter",
        model="embedded",
        sae="shipped",
        methods=methods,
        k=10,
        fast=fast,
        overwrite=overwrite,
        dtype="auto",
        device="cpu",
        set_=set_,
        letter=not fast,
        max_length=128,
        attack=attack,
        print_estimate=True,
    )


@app.command()
@friendly_errors
def export(
    run: Annotated[Path, typer.Argument(help="a crisp or rmu run directory")],
    merged: Annotated[Path, typer.Option("--merged", help="directory for the merged HF model")],
    model: ModelOpt = "embedded",
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a merged full model (HF safetensors) that loads with plain AutoModelForCausalLM."""
    from sae_unlearn.methods import export_merged
    from sae_unlearn.models import load_model
    from sae_unlearn.runs import read_config

    config = read_config(run)
    loaded = load_model(model if model != "embedded" else config["model"], dtype=config.get("dtype"))
    export_merged(loaded, run, merged, overwrite=overwrite)
    stdout.print(f"merged model written to {merged}")


@concept_app.command("list")
@friendly_errors
def concept_list() -> None:
    """List the built-in concept packs."""
    from sae_unlearn.concepts.pack import list_packs, load_pack

    rows = []
    for name in list_packs():
        pack = load_pack(name)
        rows.append([name, len(pack.forget), len(pack.retain), len(pack.coherence), len(pack.probes), pack.description])
    stdout.print(table("concept packs", ["name", "forget", "retain", "coherence", "probes", "description"], rows))


@concept_app.command("validate")
@friendly_errors
def concept_validate(pack_dir: Annotated[str, typer.Argument(help="pack name or directory")]) -> None:
    """Check every file of a pack (errors name the file, line and field)."""
    from sae_unlearn.concepts.pack import RINGS, load_pack

    pack = load_pack(pack_dir)
    rings = {ring: len(pack.probes_in(ring)) for ring in RINGS}
    stdout.print(
        f"{pack.name}: {len(pack.forget)} forget, {len(pack.retain)} retain paragraphs, "
        f"{len(pack.coherence)} coherence prompts, probes {rings}: OK"
    )


@concept_app.command("generate")
@friendly_errors
def concept_generate(
    prompts: Annotated[Path, typer.Option(help="text file, one concept prompt per line")],
    out: Annotated[Path, typer.Option("--out", help="forget-corpus .txt to write")],
    model: ModelOpt = "embedded",
    n: Annotated[int, typer.Option(help="paragraphs to keep")] = 100,
    max_new_tokens: int = 96,
    seed: int = 0,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Grow a forget corpus from the model's own continuations of concept prompts (de-duplicated, filtered)."""
    from sae_unlearn.concepts.generate import generate_corpus
    from sae_unlearn.io import atomic_write_text
    from sae_unlearn.models import load_model

    _refuse_existing_file(out, overwrite)
    if not prompts.exists():
        raise UserError(f"prompt file not found: {prompts}")
    lines = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{prompts} has no prompts", "one prompt per line")
    loaded = load_model(model, dtype=dtype, device=device)
    with progress_bar("generate", total=n) as update:
        paragraphs = generate_corpus(
            loaded, lines, n, max_new_tokens=max_new_tokens, seed=seed, progress=lambda done: update(done)
        )
    atomic_write_text(out, "\n\n".join(paragraphs) + "\n")
    stdout.print(f"wrote {len(paragraphs)} paragraphs to {out}")
