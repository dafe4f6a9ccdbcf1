"""Atomic writes and training checkpoints: nothing a user had is overwritten or lost."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae_unlearn.errors import UserError


def cache_dir() -> Path:
    """Where converted models and cached statistics live (override with SAE_UNLEARN_CACHE)."""
    root = os.environ.get("SAE_UNLEARN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sae-unlearn"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask_mode(mode: int) -> int:
    """`mode` less the process umask: what open()/mkdir() would give (mkstemp/mkdtemp give 0600/0700)."""
    return mode & ~_current_umask()


def _current_umask() -> int:
    # Linux reports it without changing it; setting and restoring it (the fallback) races other threads.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[str]:
    """A temporary sibling of `path` to write; renamed over `path` in one step when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with _atomic_target(Path(path)) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def atomic_save_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file into a temporary sibling, then one rename: readers see all or nothing."""
    from safetensors.torch import save_file

    with _atomic_target(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename.

    An existing `final` is kept unless `overwrite`; with `overwrite` the old one is moved aside
    first and removed only after the new one is in place.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise UserError(f"{final} already exists", "pass --overwrite to replace it, or choose another path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, _umask_mode(0o777))
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(ckpt: Path, tensors: dict[str, Any], state: dict[str, Any], indent: int | None = None) -> None:
    """A training checkpoint (SAE trainer, adapter trainer): CKPT/state.safetensors holds the tensors,
    CKPT/state.json the rest; the directory is replaced in one rename. No pickles."""
    from safetensors.torch import save_file

    with atomic_dir(ckpt, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=indent))


def read_checkpoint(ckpt: Path, run_dir: Path, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors and the state of a checkpoint written by `write_checkpoint`."""
    from safetensors.torch import load_file

    if not (ckpt / "state.json").exists():
        raise UserError(f"no checkpoint to resume in {run_dir}", "run without --resume to start fresh")
    return load_file(str(ckpt / "state.safetensors"), device=device), json.loads((ckpt / "state.json").read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
