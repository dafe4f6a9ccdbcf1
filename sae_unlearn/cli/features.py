"""`sae-unlearn features`: find the SAE features that carry a concept and write their report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sae_unlearn.cli.app import ConceptOpt, DeviceOpt, DtypeOpt, ModelOpt, OverwriteOpt, RevisionOpt, SaeOpt, app
from sae_unlearn.cli.common import (
    Reporter,
    check_device,
    check_out_dir,
    friendly_errors,
    split_options,
    stdout,
    table,
)
from sae_unlearn.errors import UserError


@app.command()
@friendly_errors
def features(
    out: Annotated[Path, typer.Option("--out", help="directory for features.json, stats.safetensors, report.html")],
    concept: ConceptOpt = "harry-potter",
    model: ModelOpt = "embedded",
    revision: RevisionOpt = None,
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
        loaded = load_model(model, dtype=dtype, device=device, revision=revision)
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
