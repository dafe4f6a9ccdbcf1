"""The typer app and the option types shared by every command."""

from __future__ import annotations

from typing import Annotated

import typer

from sae_unlearn.cli.common import MODEL_HELP, SAE_HELP

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Remove a concept from a language model by suppressing the SAE features that carry it.",
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
RevisionOpt = Annotated[
    str | None,
    typer.Option(help="a hub model's revision (commit, tag or branch); the same as --model ORG/NAME@REVISION"),
]
SaeOpt = Annotated[str, typer.Option("--sae", help=SAE_HELP)]
DtypeOpt = Annotated[
    str,
    typer.Option(help="auto (the dtype that fits the device: bf16 where the CPU/GPU supports it), float32 or bfloat16"),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N")]

ConceptOpt = Annotated[
    str, typer.Option("--concept", "-c", help="a built-in pack name (harry-potter) or a pack directory")
]
OverwriteOpt = Annotated[bool, typer.Option(help="write into an --out that already holds files")]
