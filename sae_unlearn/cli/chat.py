"""`sae-unlearn chat`: talk to the model with a run's unlearning on or off, or both side by side."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.columns import Columns
from rich.panel import Panel
from rich.prompt import Prompt

from sae_unlearn.cli.app import DeviceOpt, DtypeOpt, ModelOpt, app
from sae_unlearn.cli.common import friendly_errors, stdout

HELP = "[dim]/toggle: unlearning on/off   /side: side-by-side on/off   /quit[/]"


def reply(loaded: Any, run: Path | None, prompt: str, unlearned: bool, max_new_tokens: int, temperature: float) -> str:
    from sae_unlearn.methods import apply
    from sae_unlearn.models.generation import generate

    ctx = apply(loaded, run) if unlearned and run is not None else contextlib.nullcontext(loaded.model)
    with ctx as model:
        return generate(model, loaded.tokenizer, [prompt], max_new_tokens, temperature=temperature)[0]


@app.command()
@friendly_errors
def chat(
    run: Annotated[Path | None, typer.Option(help="a run directory whose unlearning can be toggled")] = None,
    model: ModelOpt = "embedded",
    max_new_tokens: int = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="start in side-by-side mode")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """A terminal chat; toggle the run's unlearning with /toggle, compare base and unlearned with /side."""
    from sae_unlearn.models import load_model
    from sae_unlearn.runs import read_config

    if run is not None:
        model = read_config(run)["model"] if model == "embedded" else model
    loaded = load_model(model, dtype=dtype, device=device)
    unlearned, side = run is not None, side_by_side and run is not None
    stdout.print(f"[bold]{loaded.spec}[/] {'with ' + str(run) if run else '(no run: base model only)'}  {HELP}")
    while True:
        try:
            text = Prompt.ask(f"[bold]{'side-by-side' if side else ('unlearned' if unlearned else 'base')}[/]")
        except (EOFError, KeyboardInterrupt):
            break
        command = text.strip().lower()
        if command in ("/quit", "/exit"):
            break
        if command == "/toggle":
            unlearned = run is not None and not unlearned
            stdout.print(f"unlearning {'on' if unlearned else 'off'}")
            continue
        if command == "/side":
            side = run is not None and not side
            stdout.print(f"side-by-side {'on' if side else 'off'}")
            continue
        if not text.strip():
            continue
        if side:
            base = reply(loaded, run, text, False, max_new_tokens, temperature)
            new = reply(loaded, run, text, True, max_new_tokens, temperature)
            stdout.print(Columns([Panel(base, title="base", width=60), Panel(new, title="unlearned", width=60)]))
        else:
            stdout.print(
                Panel(
                    reply(loaded, run, text, unlearned, max_new_tokens, temperature),
                    title="unlearned" if unlearned else "base",
                )
            )
