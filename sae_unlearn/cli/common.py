"""Shared CLI plumbing: one-line errors, logging, tables, progress bars."""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sae_unlearn.errors import UserError
from sae_unlearn.options import parse_options


def _width(stream: Any) -> int | None:
    """Rich's own width on a terminal or with $COLUMNS set; 160 columns in a file or pipe, where rich's
    default of 80 would cut the results table's headers and figures."""
    return None if stream.isatty() or "COLUMNS" in os.environ else 160


console = Console(stderr=True, width=_width(sys.stderr))
stdout = Console(width=_width(sys.stdout))
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


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    """`quiet`: warnings only (the other ranks of a data-parallel run: the main rank reports)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:  # a file, a pipe, CI: whole lines with a date, never wrapped at 80 columns
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
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


def check_device(device: str) -> str:
    """Fail on a bad --device (or cuda without a GPU) before anything slow runs."""
    from sae_unlearn.models.loading import resolve_device

    resolve_device(device)
    return device


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an --out directory that is a file, or that already holds files unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file", "choose a directory for --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already holds files", "pass --overwrite, or choose another --out")


def check_out_file(out: Path, overwrite: bool) -> None:
    """Refuse an --out file that already exists unless --overwrite."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists", "pass --overwrite, or choose another --out")


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


def format_terms(terms: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in terms.items())


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


def clock(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_interval() -> float:
    """Seconds between plain progress lines within a stage (SAE_UNLEARN_PROGRESS_SECONDS, default 30)."""
    try:
        return max(0.05, float(os.environ.get("SAE_UNLEARN_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


class Reporter:
    """Progress of a long command, as rich bars in a terminal and as plain log lines elsewhere.

    Without a terminal (a file, a pipe, CI, a cluster job) it logs one line when a stage starts and
    one at least every `interval` seconds within it, from a heartbeat thread, so stages that report
    no counts still show they are alive: stage i/n, done/total, elapsed, ETA, and the running total.
    `plan` (the stage names expected, in order) numbers the stages; `estimates` (seconds per stage
    name, where known) adds the expected time to the plan and to each stage line.
    """

    def __init__(
        self,
        title: str,
        plan: list[str] | None = None,
        *,
        estimates: dict[str, float] | None = None,
        plain: bool | None = None,
        interval: float | None = None,
    ) -> None:
        self.title, self.plan, self.estimates = title, list(plan or []), dict(estimates or {})
        self.plain = not console.is_terminal if plain is None else plain
        self.interval = progress_interval() if interval is None else interval
        self._log = logging.getLogger("sae_unlearn.progress")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bars: Progress | None = None
        self._task: Any = None
        self._started = self._stage_started = self._last_line = time.monotonic()
        self._stage, self._detail, self._info = "", "", ""
        self._done: int | None = None
        self._total: int | None = None
        self._count_started = self._started
        self._index = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> Reporter:
        self._started = self._last_line = time.monotonic()
        if self.plain:
            self._thread = threading.Thread(target=self._heartbeat, name="progress", daemon=True)
            self._thread.start()
        else:
            self._bars = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._bars.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bars is not None:
            self._bars.__exit__(exc_type, exc, tb)
        if exc_type is None and self.plain:
            self._log.info("%s: done in %s", self.title, clock(time.monotonic() - self._started))

    def print_plan(self) -> None:
        """The stage list (with expected minutes where the estimates know them) before anything runs."""
        if not self.plan:
            return
        lines = []
        for i, name in enumerate(self.plan, 1):
            estimate = self.estimates.get(name)
            lines.append(f"  {i:>2}. {name}" + (f"  (~{clock(estimate)})" if estimate else ""))
        known = [self.estimates[n] for n in self.plan if n in self.estimates]
        total = f", ~{clock(sum(known))} expected" if len(known) == len(self.plan) else ""
        console.print(f"[bold]{self.title}[/]: {len(self.plan)} stages{total}", highlight=False)
        console.print("\n".join(lines), highlight=False, markup=False)

    # -- what the command and the library callbacks call -------------------------------------------------
    def stage(self, name: str) -> None:
        """Start stage `name` (the previous one ends)."""
        with self._lock:
            now = time.monotonic()
            self._stage, self._detail, self._info = name, "", ""
            self._done = self._total = None
            self._stage_started = self._count_started = now
            self._index = self.plan.index(name) + 1 if name in self.plan else self._index + 1
            if self._bars is not None:
                if self._task is not None:
                    self._bars.update(self._task, visible=False)
                self._task = self._bars.add_task(self._label(), total=None, info="")
            else:
                self._emit(started=True)

    def message(self, text: str) -> None:
        """A library stage message: "evaluate base: probes" is stage "evaluate base", detail "probes"."""
        top, _, detail = text.partition(": ")
        if top != self._stage:
            self.stage(top)
        with self._lock:
            self._detail = detail
            if self._bars is not None and self._task is not None:
                self._bars.update(self._task, description=self._label())
            elif detail:
                self._emit()

    def update(self, done: int, total: int | None = None, info: str = "") -> None:
        """Counts within the current stage; plain lines at most every `interval` seconds (and at the end)."""
        with self._lock:
            if self._done is None or (self._done > done):
                self._count_started = time.monotonic()
            self._done, self._info = done, info
            self._total = total if total is not None else self._total
            if self._bars is not None:
                if self._task is None:
                    self._task = self._bars.add_task(self._label(), total=None, info="")
                self._bars.update(self._task, completed=done, total=self._total, info=info)
            elif time.monotonic() - self._last_line >= self.interval or (self._total and done >= self._total):
                self._emit()

    # -- plain lines ---------------------------------------------------------------------------------------
    def _label(self) -> str:
        number = f"[{self._index}/{len(self.plan)}] " if self.plan and self._index <= len(self.plan) else ""
        return f"{number}{self._stage or self.title}" + (f": {self._detail}" if self._detail else "")

    def _emit(self, started: bool = False) -> None:
        now = time.monotonic()
        parts = [self._label()]
        if started:
            parts.append("started")
            estimate = self.estimates.get(self._stage)
            if estimate:
                parts.append(f"expected ~{clock(estimate)}")
        else:
            if self._done is not None:
                counts = f"{self._done}/{self._total}" if self._total else str(self._done)
                parts.append(counts + (f" ({self._info})" if self._info else ""))
            parts.append(f"elapsed {clock(now - self._stage_started)}")
            if self._done and self._total and self._done < self._total:
                rate = (now - self._count_started) / self._done
                parts.append(f"ETA {clock(rate * (self._total - self._done))}")
        parts.append(f"total {clock(now - self._started)}")
        self._log.info(" · ".join(parts))
        self._last_line = now

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval / 4)):
            with self._lock:
                if self._stage and time.monotonic() - self._last_line >= self.interval:
                    self._emit()


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield update(completed, total=None, info="") for one stage (a Reporter with a single stage)."""
    with Reporter(description) as reporter:
        reporter.stage(description)
        if total:
            reporter.update(0, total)

        def update(completed: int, total: int | None = None, info: str = "") -> None:
            reporter.update(completed, total, info)

        yield update
