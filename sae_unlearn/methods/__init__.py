"""Unlearning methods behind one interface (registry: crisp, clamp, ablate, rmu, npo; methods/base.py):
`unlearn` runs one and writes its run directory; `apply`, `apply_merged` and `export_merged` read a run
directory and hand it to the method that wrote it."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sae_unlearn.concepts.pack import ConceptPack
from sae_unlearn.errors import UserError
from sae_unlearn.features import FeatureSelection
from sae_unlearn.io import atomic_dir, atomic_write_json
from sae_unlearn.methods import clamp, crisp, npo, rmu  # noqa: F401  (registration)
from sae_unlearn.methods.base import METHODS, Method, MethodContext, current_option_names, method_config
from sae_unlearn.methods.preset import load_preset, model_family
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.runs import RUN_VERSION, check_same_model, read_config, versions
from sae_unlearn.saes.loading import LoadedSAE

log = logging.getLogger(__name__)
__all__ = [
    "METHODS",
    "apply",
    "apply_merged",
    "current_option_names",
    "export_merged",
    "method_config",
    "method_of",
    "unlearn",
]


def unlearn(
    method: str,
    loaded: LoadedModel,
    pack: ConceptPack,
    out: Path,
    *,
    options: dict[str, Any] | None = None,
    saes: list[LoadedSAE] | None = None,
    sae_spec: str = "shipped",
    features: FeatureSelection | None = None,
    resume: bool = False,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    preset: str | None = None,
) -> Path:
    """Run a method and write its run directory (config.json, features.json, artifact, train log).

    `preset` (e.g. crisp-paper): the published options for this model's family, under `options`."""
    if preset is not None:
        chosen = load_preset(preset, model_family(loaded.model))
        if chosen.method != method:
            raise UserError(
                f"preset {preset} is for method {chosen.method}, not {method}", f"pass --method {chosen.method}"
            )
        options = chosen.merged_options(options)
    config = method_config(method, options or {})
    cls = METHODS[method]
    if cls.needs_saes and (features is None or not saes):
        raise UserError(f"method {method} needs SAEs and selected features")
    if cls.needs_saes and features is not None:
        made_for = {"model": features.model, "model_source": features.model_source}
        check_same_model(made_for, loaded.spec, loaded.source, "the feature selection")
    seed = getattr(config, "seed", 0)
    random.seed(seed)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    if features is not None and cls.needs_saes:
        features.write(out)
    ctx = MethodContext(
        loaded=loaded,
        pack=pack,
        out=out,
        sae_spec=sae_spec,
        saes=saes or [],
        features=features,
        progress=progress,
        resume=resume,
    )
    start = time.perf_counter()
    summary = cls(config).run(ctx)
    atomic_write_json(
        out / "config.json",
        {
            "run_version": RUN_VERSION,
            "method": method,
            "options": asdict(config),
            "model": loaded.spec,
            "model_source": loaded.source,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "compute_dtype": loaded.compute_dtype.to_dict(),
            "sae": sae_spec if cls.needs_saes else None,
            "concept": pack.name,
            "concept_fingerprint": pack.fingerprint(),
            "features": {"strategy": features.strategy, "params": features.params, "count": len(features.features)}
            if features is not None and cls.needs_saes
            else None,
            "seed": seed,
            "seconds": round(time.perf_counter() - start, 1),
            "versions": versions(),
            "result": summary,
        },
    )
    return out


def method_of(run_dir: Path) -> tuple[dict[str, Any], type[Method]]:
    """A run directory's config.json and the registered method that wrote it."""
    config = read_config(run_dir)
    if config["method"] not in METHODS:
        raise UserError(f"{run_dir}/config.json names unknown method {config['method']!r}")
    return config, METHODS[config["method"]]


@contextlib.contextmanager
def apply(loaded: LoadedModel, run_dir: str | Path) -> Iterator[Any]:
    """Install a run's unlearning on the model; yields the model to call. Fully undone on exit."""
    run_dir = Path(run_dir)
    config, method = method_of(run_dir)
    check_same_model(config, loaded.spec, loaded.source, run_dir)
    with method.install(loaded, run_dir) as model:
        yield model


@contextlib.contextmanager
def apply_merged(loaded: LoadedModel, run_dir: str | Path) -> Iterator[Any]:
    """Like `apply`, yielding a plain transformers model (to fine-tune, e.g. in attacks): an adapter is
    merged into `loaded.model`'s weights for good, so pass a `loaded` whose model is yours to change
    (a throwaway copy); hooks and swapped weights are undone on exit."""
    run_dir = Path(run_dir)
    config, method = method_of(run_dir)
    check_same_model(config, loaded.spec, loaded.source, run_dir)
    with method.install_merged(loaded, run_dir) as model:
        yield model


def export_merged(loaded: LoadedModel, run_dir: str | Path, out: Path, overwrite: bool = False) -> Path:
    """Write a full HF model (safetensors) with the run's weights merged in: loads with plain transformers.
    `loaded.model` is left as it was."""
    run_dir = Path(run_dir)
    config, method = method_of(run_dir)
    method.check_exportable()
    check_same_model(config, loaded.spec, loaded.source, run_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        method.export(loaded, run_dir, tmp)
        loaded.tokenizer.save_pretrained(str(tmp))
        (tmp / "sae_unlearn_run.json").write_text(json.dumps(config, indent=1))
    return out
