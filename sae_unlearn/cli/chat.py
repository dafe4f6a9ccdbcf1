"""`sae-unlearn chat`: talk to the model with a run's unlearning on or off, or both side by side."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.columns import Columns
from rich.panel import Panel
from rich.prompt import Prompt

from sae_unlearn.cli.app import DeviceOpt, DtypeOpt, ModelOpt, RevisionOpt, app
from sae_unlearn.cli.common import friendly_errors, stdout

HELP = "[dim]/toggle: unlearning on/off   /side: side-by-side on/off   /quit[/]"


class ChatSession:
    """A run's unlearning kept installed for the whole chat, so its adapter or SAEs are read from disk once.

    Base replies with an adapter run switch the adapter off in place; interventions and swapped
    weights live on the model itself, so those are undone for a base reply and installed again
    on the next unlearned one.
    """

    def __init__(self, loaded: Any, run: Path | None) -> None:
        self.loaded, self.run = loaded, run
        self._stack = contextlib.ExitStack()
        self._unlearned: Any = None

    def _unlearned_model(self) -> Any:
        from sae_unlearn.methods import apply

        if self._unlearned is None:
            assert self.run is not None
            self._unlearned = self._stack.enter_context(apply(self.loaded, self.run))
        return self._unlearned

    @contextlib.contextmanager
    def model(self, unlearned: bool) -> Iterator[Any]:
        if self.run is None:
            yield self.loaded.model
        elif unlearned:
            yield self._unlearned_model()
        elif self._unlearned is not None and hasattr(self._unlearned, "disable_adapter"):
            with self._unlearned.disable_adapter():
                yield self._unlearned
        else:
            self.close()
            yield self.loaded.model

    def reply(self, prompt: str, unlearned: bool, max_new_tokens: int, temperature: float) -> str:
        from sae_unlearn.models.generation import generate

        with self.model(unlearned) as model:
            return generate(model, self.loaded.tokenizer, [prompt], max_new_tokens, temperature=temperature)[0]

    def close(self) -> None:
        self._stack.close()
        self._unlearned = None


@app.command()
@friendly_errors
def chat(
    run: Annotated[Path | None, typer.Option(help="a run directory whose unlearning can be toggled")] = None,
    model: ModelOpt = "embedded",
    revision: RevisionOpt = None,
    max_new_tokens: int = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="start in side-by-side mode")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """A terminal chat; toggle the run's unlearning with /toggle, compare base and unlearned with /side."""
    from sae_unlearn.models import load_model
    from sae_unlearn.runs import read_config

    if run is not None:
        model = read_config(run)["model"] if model == "embedded" else model
    loaded = load_model(model, dtype=dtype, device=device, revision=revision)
    stdout.print(f"[bold]{loaded.spec}[/] {'with ' + str(run) if run else '(no run: base model only)'}  {HELP}")
    session = ChatSession(loaded, run)
    try:
        _loop(session, run is not None, side_by_side, max_new_tokens, temperature)
    finally:
        session.close()


def _loop(session: ChatSession, has_run: bool, side_by_side: bool, max_new_tokens: int, temperature: float) -> None:
    unlearned, side = has_run, side_by_side and has_run
    while True:
        try:
            text = Prompt.ask(f"[bold]{'side-by-side' if side else ('unlearned' if unlearned else 'base')}[/]")
        except (EOFError, KeyboardInterrupt):
            break
        command = text.strip().lower()
        if command in ("/quit", "/exit"):
            break
        if command == "/toggle":
            unlearned = has_run and not unlearned
            stdout.print(f"unlearning {'on' if unlearned else 'off'}")
            continue
        if command == "/side":
            side = has_run and not side
            stdout.print(f"side-by-side {'on' if side else 'off'}")
            continue
        if not text.strip():
            continue
        if side:
            base = session.reply(text, False, max_new_tokens, temperature)
            new = session.reply(text, True, max_new_tokens, temperature)
            stdout.print(Columns([Panel(base, title="base", width=60), Panel(new, title="unlearned", width=60)]))
        else:
            stdout.print(
                Panel(
                    session.reply(text, unlearned, max_new_tokens, temperature),
                    title="unlearned" if unlearned else "base",
                )
            )
