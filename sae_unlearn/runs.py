"""The run directory: what `unlearn` writes and what `apply` / `eval` read.

    RUN_DIR/config.json      every setting, package versions, seed
    RUN_DIR/features.json    the features the method used (absent for RMU)
    RUN_DIR/adapter/         PEFT adapter (crisp, npo)       -- or --
    RUN_DIR/rmu_weights.safetensors  the updated parameters (rmu)  -- or --
    RUN_DIR/intervention.json  SAE edits (clamp, ablate)
    RUN_DIR/train_log.jsonl  one JSON object per step (persistent methods): its loss terms and "seconds"
No pickles: everything is JSON or safetensors.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from sae_unlearn.errors import UserError

RUN_VERSION = 1


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("sae-unlearn", "torch", "transformers", "peft", "sae-lens", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def read_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}", "pass the --out of a sae-unlearn unlearn run")
    if not path.exists():
        raise UserError(
            f"{run_dir} has no config.json", "it is not a sae-unlearn run directory (or the run did not finish)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg})") from e
    if config.get("run_version") != RUN_VERSION:
        raise UserError(f"{path}: run format {config.get('run_version')} is not supported (expected {RUN_VERSION})")
    return config


def check_same_model(made_for: Mapping[str, Any], model_spec: str, model_source: str, what: str | Path) -> None:
    """Refuse a run directory or feature selection (`what`) made for another model: `made_for` is its
    config.json or features.json, which name the model spec ("model") and source ("model_source")."""
    if made_for.get("model") != model_spec and made_for.get("model_source") != model_source:
        raise UserError(
            f"{what} was made for model {made_for.get('model')!r}, not {model_spec!r}",
            f"pass --model {made_for.get('model')}",
        )


class TrainLog:
    """Append-only JSONL training log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> Iterator[dict[str, Any]]:
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    yield json.loads(line)
