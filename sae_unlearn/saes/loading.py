"""Load SAEs through SAELens and check that they fit the model.

An SAE spec is one of:
- `shipped`: the SAEs this package ships for the embedded default model (all layers);
- a directory in SAELens format (`cfg.json` + `sae_weights.safetensors`), or a directory of such
  directories (one per layer, as `train-sae` writes);
- `RELEASE:SAE_ID` for a SAELens pretrained release, e.g.
  `gemma-scope-2b-pt-res-canonical:layer_7/width_16k/canonical` (needs the hub or its cache).
Several specs are joined with commas.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_unlearn.errors import UserError
from sae_unlearn.models.hooks import parse_hook_name
from sae_unlearn.saes.topk import topk_last_dim

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "shipped"
SHIPPED = {"embedded": SHIPPED_DIR / "gemma-3-270m"}


@dataclass
class LoadedSAE:
    sae: Any  # sae_lens.SAE
    layer: int
    spec: str

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def hook_name(self) -> str:
        return str(self.sae.cfg.metadata.hook_name)

    @property
    def neuronpedia_id(self) -> str | None:
        return self.sae.cfg.metadata.get("neuronpedia_id")


def pre_activations(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """The SAE's hidden pre-activations as its own `encode` computes them, before the activation function."""
    pre = sae.process_sae_in(x) @ sae.W_enc
    pre += sae.b_enc  # in place: out of place the add writes a second [tokens, d_sae] tensor
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        pre = pre * sae.W_dec.norm(dim=-1)
    return pre


def encode_topk_sparse(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, latent ids) [..., k] of a TopK SAE's encoding, exactly as `sae.encode` computes them but
    without scattering into a dense [..., d_sae] tensor; None for other architectures."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE

    if not isinstance(sae, TopKSAE | TopKTrainingSAE):
        return None
    values, ids = topk_last_dim(pre_activations(sae, x), int(sae.cfg.k))
    return values.relu(), ids


def shipped_dir_for(model_spec: str) -> Path:
    if model_spec not in SHIPPED:
        raise UserError(
            f"no SAEs are shipped for model {model_spec!r}",
            "pass --sae with a SAELens release (RELEASE:SAE_ID) or a local SAE directory, "
            "or train some with sae-unlearn train-sae",
        )
    path = SHIPPED[model_spec]
    if not path.exists():
        raise UserError(f"the shipped SAEs are missing from {path}", "reinstall sae-unlearn")
    return path


def _sae_dirs(path: Path) -> list[Path]:
    if (path / "cfg.json").exists():
        return [path]
    subdirs = sorted((p for p in path.iterdir() if (p / "cfg.json").exists()), key=lambda p: p.name)
    if not subdirs:
        raise UserError(
            f"{path} holds no SAE (no cfg.json in it or its subdirectories)",
            "point --sae at a SAELens-format directory (cfg.json + sae_weights.safetensors)",
        )
    return subdirs


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _load_disk(path: Path, device: str, dtype: torch.dtype | None) -> Any:
    from sae_lens import SAE

    if not (path / "sae_weights.safetensors").exists():
        raise UserError(f"{path} has cfg.json but no sae_weights.safetensors", "copy the weights file beside cfg.json")
    try:
        return SAE.load_from_disk(str(path), device=device, dtype=_dtype_name(dtype))
    except Exception as e:
        raise UserError(
            f"cannot load the SAE in {path}: {type(e).__name__}: {str(e).splitlines()[0]}",
            "the files are corrupt or not in SAELens format",
        ) from e


def _load_release(release: str, sae_id: str, device: str, dtype: torch.dtype | None) -> Any:
    from sae_lens import SAE

    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=_dtype_name(dtype) or "float32")
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise UserError(
            f"cannot load SAE {release}:{sae_id} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            + (" with HF_HUB_OFFLINE=1" if offline else ""),
            "check the release and id in SAELens' pretrained_saes.yaml; offline, download it once into the HF cache "
            "and set HF_HUB_OFFLINE=1, or use a local directory",
        ) from e


def load_saes_from_spec(
    spec: str, model_spec: str = "embedded", device: str = "cpu", dtype: torch.dtype | None = None
) -> list[LoadedSAE]:
    """Load every SAE named by `spec` (see module doc), sorted by layer.

    `dtype`: cast once at load to the run's compute dtype (the model's: `LoadedModel.dtype`), so every SAE
    product runs in it; the shipped files stay bfloat16 on disk. None keeps the stored dtype (SAELens
    releases: float32).
    """
    loaded: list[LoadedSAE] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "shipped":
            saes = [(_load_disk(d, device, dtype), str(d)) for d in _sae_dirs(shipped_dir_for(model_spec))]
        elif Path(part).expanduser().exists():
            saes = [(_load_disk(d, device, dtype), str(d)) for d in _sae_dirs(Path(part).expanduser())]
        elif ":" in part:
            release, sae_id = part.split(":", 1)
            saes = [(_load_release(release, sae_id, device, dtype), part)]
        else:
            raise UserError(
                f"unknown SAE spec {part!r}", "use shipped, a local SAE directory, or RELEASE:SAE_ID from SAELens"
            )
        for sae, name in saes:
            hook = sae.cfg.metadata.hook_name
            if hook is None:
                raise UserError(
                    f"SAE {name} does not say which hook it reads (cfg.json metadata.hook_name)",
                    "add metadata.hook_name, e.g. blocks.6.hook_resid_post",
                )
            sae.requires_grad_(False)
            loaded.append(LoadedSAE(sae, parse_hook_name(hook), name))
    if not loaded:
        raise UserError("no SAE was given", "pass --sae shipped, a directory, or RELEASE:SAE_ID")
    layers = [s.layer for s in loaded]
    if len(set(layers)) != len(layers):
        raise UserError(f"two SAEs read the same layer ({layers})", "give one SAE per layer")
    return sorted(loaded, key=lambda s: s.layer)


def check_compatible(saes: list[LoadedSAE], n_layers: int, d_model: int) -> None:
    """Say exactly what does not match between the SAEs and the model."""
    for s in saes:
        d_in = int(s.sae.cfg.d_in)
        if d_in != d_model:
            raise UserError(
                f"SAE {s.spec} reads vectors of size {d_in} but the model's hidden size is {d_model}",
                "use SAEs trained on this model",
            )
        if not 0 <= s.layer < n_layers:
            raise UserError(
                f"SAE {s.spec} reads {s.hook_name} but the model has blocks 0..{n_layers - 1}",
                "use SAEs trained on this model",
            )


def sae_dtype(saes: list[LoadedSAE]) -> torch.dtype:
    return saes[0].sae.W_enc.dtype
