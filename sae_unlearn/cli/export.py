"""`sae-unlearn export`: a run merged into a full model that loads with plain transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sae_unlearn.cli.app import DeviceOpt, ModelOpt, OverwriteOpt, app
from sae_unlearn.cli.common import (
    Reporter,
    check_device,
    friendly_errors,
    stdout,
)


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
