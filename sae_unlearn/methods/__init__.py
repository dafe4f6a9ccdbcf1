"""Unlearning methods behind one interface (registry: crisp, clamp, ablate, rmu, npo), plus `apply` and
`export_merged` for their run directories."""

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
from safetensors.torch import load_file

from sae_unlearn.concepts.pack import ConceptPack
from sae_unlearn.errors import UserError
from sae_unlearn.features import FeatureSelection
from sae_unlearn.io import atomic_dir, atomic_write_json
from sae_unlearn.methods import clamp, crisp, npo, rmu  # noqa: F401  (registration)
from sae_unlearn.methods.base import METHODS, MethodContext, method_config
from sae_unlearn.methods.interventions import Intervention, install
from sae_unlearn.methods.preset import load_preset, model_family
from sae_unlearn.methods.robust import load_weight_edit, project_weights, projected_outputs
from sae_unlearn.models.hooks import decoder_blocks, token_policy
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.runs import RUN_VERSION, check_same_model, read_config, versions
from sae_unlearn.saes.loading import LoadedSAE, load_saes

log = logging.getLogger(__name__)
__all__ = ["METHODS", "apply", "export_merged", "method_config", "unlearn"]
ADAPTER_METHODS = ("crisp", "npo")  # run directories holding a PEFT adapter


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


@contextlib.contextmanager
def apply(loaded: LoadedModel, run_dir: str | Path) -> Iterator[Any]:
    """Install a run's unlearning on the model; yields the model to call. Fully undone on exit."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    check_same_model(config, loaded.spec, loaded.source, run_dir)
    method = config["method"]
    if method in ("clamp", "ablate"):
        intervention = Intervention.load(run_dir / "intervention.json")
        saes = load_saes(intervention.sae, model_spec=intervention.model, device=str(loaded.device), dtype=loaded.dtype)
        with install(loaded.model, saes, intervention, token_policy(loaded.tokenizer)):
            yield loaded.model
    elif method in ADAPTER_METHODS:
        from peft import PeftModel

        adapter = run_dir / "adapter"
        if not (adapter / "adapter_config.json").exists():
            raise UserError(f"{adapter} is missing", "the run did not finish: resume it with --resume")
        try:
            peft_model = PeftModel.from_pretrained(loaded.model, str(adapter))
        except Exception as e:
            raise UserError(
                f"cannot apply the adapter in {adapter}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                "it was made for another base model",
            ) from e
        peft_model.eval()
        edit = load_weight_edit(run_dir)
        try:
            with projected_outputs(peft_model, edit or {}):
                yield peft_model
        finally:
            loaded.model = peft_model.unload()
    elif method == "rmu":
        path = run_dir / "rmu_weights.safetensors"
        if not path.exists():
            raise UserError(f"{path} is missing", "the run did not finish")
        weights = load_file(str(path))
        blocks = decoder_blocks(loaded.model)
        params = {}
        for name in weights:
            layer, rest = name.split(".", 1)
            params[name] = blocks[int(layer)].get_parameter(rest)
            if params[name].shape != weights[name].shape:
                raise UserError(
                    f"{path}: {name} has shape {tuple(weights[name].shape)}, the model's is "
                    f"{tuple(params[name].shape)}",
                    "it was made for another base model",
                )
        originals = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k].to(p.device, p.dtype))
        try:
            yield loaded.model
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(originals[k])
    else:
        raise UserError(f"{run_dir}/config.json names unknown method {method!r}")


def export_merged(loaded: LoadedModel, run_dir: str | Path, out: Path, overwrite: bool = False) -> Path:
    """Write a full HF model (safetensors) with the run's weights merged in: loads with plain transformers."""
    config = read_config(run_dir)
    if config["method"] in ("clamp", "ablate"):
        raise UserError(
            f"{config['method']} is an inference-time intervention and has no weights to merge",
            "use sae_unlearn.apply(model, RUN_DIR) at inference, or export a crisp/npo/rmu run",
        )
    run_dir = Path(run_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if config["method"] in ADAPTER_METHODS:
            from peft import PeftModel

            from sae_unlearn.models.loading import load_model

            check_same_model(config, loaded.spec, loaded.source, run_dir)
            merged = PeftModel.from_pretrained(loaded.model, str(run_dir / "adapter")).merge_and_unload()
            project_weights(merged, load_weight_edit(run_dir) or {})
            merged.save_pretrained(str(tmp))
            # merging wrote the LoRA deltas into the base weights in place: reload clean ones
            loaded.model = load_model(
                loaded.spec, dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device)
            ).model
        else:
            with apply(loaded, run_dir) as model:
                model.save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
        (tmp / "sae_unlearn_run.json").write_text(json.dumps(config, indent=1))
    return out


def attach_permanently(loaded: LoadedModel, run_dir: str | Path, stack: contextlib.ExitStack) -> Any:
    """Make the run part of `loaded.model` for good (used on throwaway copies, e.g. for attacks):
    adapters are merged, RMU weights copied in, interventions installed until `stack` closes."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config["method"] in ("clamp", "rmu", "ablate"):
        stack.enter_context(apply(loaded, run_dir))
        return loaded.model
    from peft import PeftModel

    merged = PeftModel.from_pretrained(loaded.model, str(run_dir / "adapter")).merge_and_unload()
    project_weights(merged, load_weight_edit(run_dir) or {})
    return merged
