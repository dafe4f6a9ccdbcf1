"""`sae-unlearn concept`: list, validate and grow concept packs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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

concept_app = typer.Typer(
    help="Concept packs: list, validate, grow a forget corpus from the model.", no_args_is_help=True
)


app.add_typer(concept_app, name="concept")


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
    revision: RevisionOpt = None,
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
        loaded = load_model(model, dtype=dtype, device=device, revision=revision)
        reporter.stage("generate")
        paragraphs = generate_corpus(
            loaded, lines, n, max_new_tokens=max_new_tokens, seed=seed, progress=lambda done: reporter.update(done, n)
        )
    atomic_write_text(out, "\n\n".join(paragraphs) + "\n")
    stdout.print(f"wrote {len(paragraphs)} paragraphs to {out}")
