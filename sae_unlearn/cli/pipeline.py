"""Pipeline commands: features, unlearn, eval, compare, demo, export, concept."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sae_unlearn.cli.app import DeviceOpt, DtypeOpt, ModelOpt, SaeOpt, app
from sae_unlearn.cli.common import (
    MODEL_HELP,
    SAE_HELP,
    Reporter,
    check_device,
    check_out_dir,
    check_out_file,
    console,
    friendly_errors,
    stdout,
    table,
)
from sae_unlearn.errors import UserError
from sae_unlearn.options import parse_options

if TYPE_CHECKING:
    from sae_unlearn.evaluation.experiment import Experiment

ConceptOpt = Annotated[
    str, typer.Option("--concept", "-c", help="a built-in pack name (harry-potter) or a pack directory")
]
OverwriteOpt = Annotated[bool, typer.Option(help="write into an --out that already holds files")]
concept_app = typer.Typer(
    help="Concept packs: list, validate, grow a forget corpus from the model.", no_args_is_help=True
)
app.add_typer(concept_app, name="concept")


def split_options(pairs: list[str] | None, own: str, allowed_prefixes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """--set pairs grouped by prefix: `own` for bare keys, else the part before the first dot.

    `allowed_prefixes` are the groups this command takes; any other prefix is a one-line error.
    """
    groups: dict[str, dict[str, Any]] = {}
    for key, value in parse_options(pairs).items():
        group, name = key.split(".", 1) if "." in key else (own, key)
        if group not in allowed_prefixes:
            raise UserError(
                f"--set {key}=...: this command takes no {group}. options",
                "use "
                + " or ".join(
                    f"--set {p}.OPTION=VALUE" if p != own else "--set OPTION=VALUE" for p in allowed_prefixes
                ),
            )
        groups.setdefault(group, {})[name] = value
    return groups


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
    device: DeviceOpt = "auto",
) -> None:
    """Find the SAE features that carry a concept and write a report."""
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.features import find_features, make_strategy
    from sae_unlearn.models import load_model
    from sae_unlearn.saes import load_saes_for

    check_out_dir(out, overwrite)
    # bare keys and features.KEY are both strategy parameters here; --set k=5 is --k 5
    groups = split_options(set_, "features", ("features",))
    chosen = make_strategy(strategy, **{"k": k, **groups.get("features", {})})
    check_device(device)
    pack = load_pack(concept)
    with Reporter("features", ["load model", "feature statistics"]) as reporter:
        reporter.stage("load model")
        loaded = load_model(model, dtype=dtype, device=device)
        saes = load_saes_for(loaded, sae)
        for s in saes:
            if chosen.k > s.d_sae:
                raise UserError(
                    f"--k {chosen.k} is larger than the SAE width {s.d_sae} at layer {s.layer}",
                    "choose a smaller --k",
                )
        reporter.stage("feature statistics")
        selection = find_features(
            loaded,
            saes,
            pack,
            chosen,
            use_cache=not no_cache,
            batch_size=batch,
            progress=lambda done, total: reporter.update(done, total, info="paragraphs"),
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
    device: DeviceOpt = "auto",
    preset: Annotated[
        str | None, typer.Option(help="published settings: crisp-paper or clamp-paper (its SAEs, k and options)")
    ] = None,
) -> None:
    """Run an unlearning method and write a run directory."""
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.features import find_features, load_features, make_strategy
    from sae_unlearn.methods import METHODS, method_config
    from sae_unlearn.methods import unlearn as run_unlearn
    from sae_unlearn.models import load_model
    from sae_unlearn.options import field_names
    from sae_unlearn.saes import load_saes_for

    groups = split_options(set_, method, (method, "features"))
    options = groups.get(method, {})
    if refusal_feature is not None:
        options["refusal_feature"] = refusal_feature
    if scale is not None:
        options["scale"] = scale
    if "k" in options and method in METHODS and "k" not in field_names(METHODS[method].Config):
        raise UserError(
            f"--set k=...: k is the number of features per layer, not an option of method {method}",
            f"pass --k {options['k']} or --set features.k={options['k']}",
        )
    # unknown method, option that does not apply, value of the wrong type: fail before loading anything
    method_config(method, options)
    chosen = make_strategy(strategy, **{"k": k, **groups.get("features", {})})
    if not resume:
        check_out_dir(out, overwrite)
    check_device(device)
    pack = load_pack(concept)
    needs_saes = METHODS[method].needs_saes
    plan = ["load model", *(["feature selection"] if needs_saes and not features_from else []), f"unlearn {method}"]
    with Reporter("unlearn", plan) as reporter:
        reporter.stage("load model")
        loaded = load_model(model, dtype=dtype, device=device)
        if preset is not None:  # the preset's SAEs and k unless given; its options go to run_unlearn below
            from sae_unlearn.methods.preset import load_preset, model_family

            paper = load_preset(preset, model_family(loaded.model))
            sae = paper.sae if sae == "shipped" else sae
            if k == 10 and "k" not in groups.get("features", {}):
                chosen = make_strategy(strategy, **{"k": paper.k, **groups.get("features", {})})
        saes, selection = [], None
        if needs_saes:
            saes = load_saes_for(loaded, sae)
            if features_from:
                selection = load_features(features_from)
            else:
                reporter.stage("feature selection")
                selection = find_features(
                    loaded, saes, pack, chosen, progress=lambda done, total: reporter.update(done, total)
                )
        reporter.stage(f"unlearn {method}")
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
            progress=lambda step, total, terms: reporter.update(step, total, info=_terms(terms)),
            preset=preset,
        )
    stdout.print(
        f"run written to {out} (evaluate: sae-unlearn eval --run {out} --concept {concept} --out results.json)"
    )


def _terms(terms: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in terms.items())


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
        loaded = load_model(model, dtype=dtype, device=device)
        result = evaluate(loaded, pack, run, probes=given, cfg=cfg, progress=reporter.stage)
    atomic_write_json(out, result)
    _print_summary({result["name"]: result})
    stdout.print(f"wrote {out}")


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
        top.setdefault("eval", {})["robustness_for"] = (
            None if attack == "all" else [m.strip() for m in attack.split(",") if m.strip()]
        )
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
    """The experiment a compare/demo command line describes, checked before anything loads.

    When --methods is given without --attack, the file's attack list keeps only the methods that run.
    """
    from sae_unlearn.evaluation.experiment import load_experiment
    from sae_unlearn.methods import METHODS

    if "methods" in overrides and "robustness_for" not in overrides.get("eval", {}):
        every_method = {"methods": sorted(METHODS)}  # read the file's list without checking it against its methods
        attacked = load_experiment(config, fast=fast, overrides=every_method).compare.eval.robustness_for
        if attacked is not None:
            keep = [m for m in attacked if m in ("base", *overrides["methods"])]
            overrides = {**overrides, "eval": {**overrides.get("eval", {}), "robustness_for": keep}}
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
    out: Path, experiment: Experiment, *, title: str, overwrite: bool, dtype: str, device: str
) -> dict[str, Any]:
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
    with reporter:
        results = run_experiment(
            experiment,
            out,
            loaded=loaded,
            stage=reporter.message,
            progress=lambda step, total, terms: reporter.update(step, total, info=_terms(terms)),
        )
    _print_summary(results["methods"])
    stdout.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.html'} (open it in a browser)")
    return results


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
) -> None:
    """Run several methods on one concept pack and evaluate them beside the base model."""
    overrides = experiment_overrides(
        concept=concept, model=model, sae=sae, methods=methods, k=k, strategy=strategy, attack=attack, set_=set_
    )
    experiment = load_cli_experiment(config, fast, overrides)
    _run_experiment(out, experiment, title="compare", overwrite=overwrite, dtype=dtype, device=device)


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
    _run_experiment(out, experiment, title="demo", overwrite=overwrite, dtype=dtype, device=device)


@app.command()
@friendly_errors
def export(
    run: Annotated[Path, typer.Argument(help="a crisp or rmu run directory")],
    merged: Annotated[Path, typer.Option("--merged", help="directory for the merged HF model")],
    model: ModelOpt = "embedded",
    overwrite: OverwriteOpt = False,
    dtype: Annotated[str | None, typer.Option(help="default: the dtype the run was trained in")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Write a merged full model (HF safetensors) that loads with plain AutoModelForCausalLM."""
    from sae_unlearn.methods import export_merged
    from sae_unlearn.models import load_model
    from sae_unlearn.runs import read_config

    config = read_config(run)
    check_device(device)
    with Reporter("export", ["load model", "merge and write"]) as reporter:
        reporter.stage("load model")
        loaded = load_model(
            model if model != "embedded" else config["model"], dtype=dtype or config.get("dtype"), device=device
        )
        reporter.stage("merge and write")
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
    device: DeviceOpt = "auto",
) -> None:
    """Grow a forget corpus from the model's own continuations of concept prompts (de-duplicated, filtered)."""
    from sae_unlearn.concepts.generate import generate_corpus
    from sae_unlearn.io import atomic_write_text
    from sae_unlearn.models import load_model

    check_out_file(out, overwrite)
    if not prompts.exists():
        raise UserError(f"prompt file not found: {prompts}")
    lines = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{prompts} has no prompts", "one prompt per line")
    check_device(device)
    with Reporter("concept generate", ["load model", "generate"]) as reporter:
        reporter.stage("load model")
        loaded = load_model(model, dtype=dtype, device=device)
        reporter.stage("generate")
        paragraphs = generate_corpus(
            loaded, lines, n, max_new_tokens=max_new_tokens, seed=seed, progress=lambda done: reporter.update(done, n)
        )
    atomic_write_text(out, "\n\n".join(paragraphs) + "\n")
    stdout.print(f"wrote {len(paragraphs)} paragraphs to {out}")
