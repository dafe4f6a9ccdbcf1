"""What a results.json was measured with, so that a reader can tell two results apart and reproduce one:
the whole evaluation config, package versions, and content hashes (sha256) of the concept pack's files,
the probes scored, the model files, the SAEs and the run directory (the hub revision where the model
came from the hub).

    "record": {"config": {...EvalConfig}, "versions": {"sae-unlearn", "torch", ...},
               "pack": {"name", "fingerprint", "files": {relpath: sha256}} | null,
               "probes_hash" (of the probes scored),
               "model": {"spec", "source", "revision", "files": {relpath: sha256}},
               "saes": {"spec", "parts": [{"spec", "files": {...}} | {"spec", "release", "sae_id"}]} | null,
               "run": {"dir", "files": {relpath: sha256}} | null}
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from sae_unlearn.io import hash_json, sha256_file

log = logging.getLogger(__name__)

# (path, size, mtime_ns) -> sha256: a model's weights are hashed once per process, not once per method
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def directory_hashes(root: Path) -> dict[str, str]:
    """{path relative to root: sha256} of every regular file under root (a file: itself)."""
    if root.is_file():
        return {root.name: file_sha256(root)}
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def model_record(loaded: Any) -> dict[str, Any]:
    config = getattr(loaded.model, "config", None)
    revision = getattr(config, "_commit_hash", None)
    source = Path(str(loaded.source)).expanduser()
    return {
        "spec": loaded.spec,
        "source": str(loaded.source),
        "revision": revision,
        "files": directory_hashes(source) if source.exists() else {},
    }


def sae_record(spec: str, model_spec: str) -> dict[str, Any]:
    from sae_unlearn.saes.loading import shipped_dir_for

    parts: list[dict[str, Any]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = shipped_dir_for(model_spec) if part == "shipped" else Path(part).expanduser()
        if path.exists():
            parts.append({"spec": part, "files": directory_hashes(path)})
        elif ":" in part:  # a SAELens release: pinned by the sae-lens version in `versions`
            release, sae_id = part.split(":", 1)
            parts.append({"spec": part, "release": release, "sae_id": sae_id})
        else:
            parts.append({"spec": part})
    return {"spec": spec, "parts": parts}


def build_record(loaded: Any, pack: Any | None, run_dir: Path | None, cfg: Any, probes: list[Any]) -> dict[str, Any]:
    from sae_unlearn.runs import read_config, versions

    run_config = read_config(run_dir) if run_dir is not None else None
    sae_spec = (run_config or {}).get("sae")
    return {
        "config": dataclasses.asdict(cfg),
        "versions": versions(),
        "pack": {"name": pack.name, "fingerprint": pack.fingerprint(), "files": directory_hashes(pack.root)}
        if pack is not None
        else None,
        "probes_hash": hash_json([dataclasses.asdict(p) for p in probes]),
        "model": model_record(loaded),
        "saes": sae_record(str(sae_spec), str(run_config.get("model", loaded.spec)))
        if run_config is not None and sae_spec
        else None,
        "run": {"dir": str(run_dir), "files": directory_hashes(run_dir)} if run_dir is not None else None,
    }
