"""Shared CLI plumbing: one-line errors, logging, tables, progress bars."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sae_unlearn.errors import UserError

console = Console(stderr=True)
stdout = Console()
F = TypeVar("F", bound=Callable[..., Any])

MODEL_HELP = (
    "embedded (Gemma 3 270M, default), embedded-small (SmolLM2-135M), a hub id, a local directory or a .gguf file"
)
SAE_HELP = "shipped (the SAEs shipped for the embedded model), a SAELens directory, or RELEASE:SAE_ID; comma-separated"


# Warnings a user of the CLI cannot act on: the libraries' deprecation notices among themselves and
# transformers' generation-config remarks. Everything else (numerical warnings from torch and
# SAELens, our own) stays visible.
_LIBRARIES = r"(transformers|transformer_lens|sae_lens|peft|torch|accelerate|huggingface_hub|datasets)(\.|$)"
NOISY_WARNINGS: list[tuple[type[Warning], str]] = [
    (DeprecationWarning, _LIBRARIES),
    (FutureWarning, _LIBRARIES),
    (UserWarning, r"transformers\.generation(\.|$)"),
]


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("transformers", "httpx", "urllib3", "datasets", "sae_lens", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        for category, module in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", category=category, module=module)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def friendly_errors(fn: F) -> F:
    """Turn UserError (and a few environment errors) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: partial results were not written (checkpoints, if any, are kept)")
            raise typer.Exit(130) from None
        except MemoryError:
            console.print("[bold red]error:[/] out of memory (use a smaller --batch or --max-tokens)")
            raise typer.Exit(2) from None
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                console.print("[bold red]error:[/] out of memory (use a smaller --batch or --max-tokens)")
                raise typer.Exit(2) from None
            raise

    return wrapper  # type: ignore[return-value]


def parse_layers(text: str) -> list[int]:
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as e:
        raise UserError(f"--layers {text!r} is not a comma-separated list of integers", "e.g. --layers 3,6,9,12") from e
    if not layers:
        raise UserError("--layers is empty", "e.g. --layers 3,6,9,12")
    return layers


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c not in ("model", "method", "metric", "name", "layer(s)") else "left")
    for row in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return t


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield update(completed, total=None, **fields) for a rich progress bar on stderr."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not sys.stderr.isatty() and os.environ.get("CI") == "true") as p:
        task = p.add_task(description, total=total, info="")

        def update(completed: int, total: int | None = None, info: str = "") -> None:
            p.update(task, completed=completed, total=total if total is not None else p.tasks[0].total, info=info)

        yield update
