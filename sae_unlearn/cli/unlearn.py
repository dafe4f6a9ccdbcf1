"""`sae-unlearn unlearn`: run a method and write its run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sae_unlearn.cli.app import ConceptOpt, DeviceOpt, DtypeOpt, ModelOpt, OverwriteOpt, RevisionOpt, SaeOpt, app
from sae_unlearn.cli.common import (
    Reporter,
    check_device,
    check_out_dir,
    format_terms,
    friendly_errors,
    split_options,
    stdout,
)
from sae_unlearn.errors import UserError


@app.command()
@friendly_errors
def unlearn(
    method: Annotated[str, typer.Option(help="crisp, clamp, ablate or rmu")],
    out: Annotated[Path, typer.Option("--out", help="the run directory to write")],
    concept: ConceptOpt = "harry-potter",
    model: ModelOpt = "embedded",
    revision: RevisionOpt = None,
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
        loaded = load_model(model, dtype=dtype, device=device, revision=revision)
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
            progress=lambda step, total, terms: reporter.update(step, total, info=format_terms(terms)),
            preset=preset,
        )
    stdout.print(
        f"run written to {out} (evaluate: sae-unlearn eval --run {out} --concept {concept} --out results.json)"
    )
