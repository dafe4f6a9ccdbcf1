"""The SAE edit shared by clamping and ablation, with the error term kept.

x' = decode(z') + (x - decode(z)) = x + decode(z') - decode(z): the residual stream changes only by
the decoded difference of the edited latents. For SAEs with a linear decoder (no output
normalisation) that is (z'_S - z_S) @ W_dec[S] over the selected latents S, which we compute
directly: unselected latents and the error term are untouched by construction, and tokens where
nothing changes get exactly x back.

intervention.json (version 1):
    {"version": 1, "method": "clamp"|"ablate", "model": spec, "sae": spec,
     "edits": [{"layer": L, "features": [i, ...], "mode": "clamp"|"scale"|"refusal",
                "threshold": t, "value": v, "scale": s, "refusal_feature": r|null}]}
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_unlearn.errors import UserError
from sae_unlearn.models.hooks import edit_resid_post
from sae_unlearn.saes.loading import LoadedSAE

INTERVENTION_VERSION = 1
MODES = ("clamp", "scale", "refusal")


@dataclass
class LayerEdit:
    layer: int
    features: list[int]
    mode: str
    threshold: float = 0.0
    value: float = -100.0
    scale: float = -3.0
    refusal_feature: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown edit mode {self.mode!r}", f"use one of {', '.join(MODES)}")
        if self.mode == "refusal" and self.refusal_feature is None:
            raise UserError("the refusal clamp needs a refusal feature", "pass --refusal-feature LAYER:INDEX")


@dataclass
class Intervention:
    method: str
    model: str
    sae: str
    edits: list[LayerEdit] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": INTERVENTION_VERSION,
            "method": self.method,
            "model": self.model,
            "sae": self.sae,
            "edits": [asdict(e) for e in self.edits],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "intervention.json") -> Intervention:
        if data.get("version") != INTERVENTION_VERSION:
            raise UserError(
                f"{where}: version {data.get('version')} is not supported (expected {INTERVENTION_VERSION})"
            )
        try:
            return cls(data["method"], data["model"], data["sae"], [LayerEdit(**e) for e in data["edits"]])
        except (KeyError, TypeError) as e:
            raise UserError(f"{where} is malformed ({type(e).__name__}: {e})") from e

    @classmethod
    def load(cls, path: Path) -> Intervention:
        if not path.exists():
            raise UserError(f"{path} is missing", "the run directory is incomplete: run sae-unlearn unlearn again")
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))


def edited_latents(z: torch.Tensor, edit: LayerEdit) -> torch.Tensor:
    """New values of the selected latents z [..., n_selected] (the columns in `edit.features` order)."""
    if edit.mode == "clamp":
        return torch.where(z > edit.threshold, torch.full_like(z, edit.value), z)
    if edit.mode == "scale":
        return torch.where(z > edit.threshold, z * edit.scale, z)
    raise AssertionError("refusal edits are handled in make_edit_fn")


def _linear_decoder(sae: Any) -> bool:
    return getattr(sae.cfg, "normalize_activations", "none") == "none" and not getattr(
        sae.cfg, "rescale_acts_by_decoder_norm", False
    )


def make_edit_fn(loaded_sae: LoadedSAE, edit: LayerEdit, skip_ids: Sequence[int] = ()) -> Any:
    sae = loaded_sae.sae
    idx = torch.tensor(edit.features, dtype=torch.long, device=sae.W_dec.device)
    refusal = edit.refusal_feature
    skip = torch.tensor(list(skip_ids), dtype=torch.long) if skip_ids else None

    def edit_fn(hidden: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        if len(edit.features) == 0:
            return hidden
        x = hidden.to(sae.W_enc.dtype)
        z = sae.encode(x)
        z_sel = z[..., idx]
        if edit.mode == "refusal":
            assert refusal is not None
            fires = (z_sel > edit.threshold).any(-1, keepdim=True)
            cols = torch.tensor([refusal], device=z.device)
            old = z[..., cols]
            new = torch.where(fires, torch.full_like(old, edit.value), old)
        else:
            cols, old, new = idx, z_sel, edited_latents(z_sel, edit)
        if ids is not None and skip is not None and ids.shape == hidden.shape[:-1]:
            keep = ~torch.isin(ids, skip.to(ids.device)).unsqueeze(-1)
            new = torch.where(keep, new, old)
        if _linear_decoder(sae):
            delta = (new - old) @ sae.W_dec[cols]
        else:
            z_new = z.clone()
            z_new[..., cols] = new
            delta = sae.decode(z_new) - sae.decode(z)
        return hidden + delta.to(hidden.dtype)

    return edit_fn


@contextlib.contextmanager
def install(
    model: Any, saes: Sequence[LoadedSAE], intervention: Intervention, skip_ids: Sequence[int] = ()
) -> Iterator[None]:
    """Install the intervention as forward hooks; they are removed on exit (the model is bit-identical again)."""
    by_layer = {s.layer: s for s in saes}
    fns = {}
    for edit in intervention.edits:
        if edit.layer not in by_layer:
            raise UserError(
                f"the intervention edits layer {edit.layer} but no SAE for that layer was loaded",
                f"load the SAEs it was made with ({intervention.sae})",
            )
        width = by_layer[edit.layer].d_sae
        bad = [
            i
            for i in [*edit.features, *([edit.refusal_feature] if edit.refusal_feature is not None else [])]
            if not 0 <= i < width
        ]
        if bad:
            raise UserError(
                f"feature {bad[0]} is outside the layer-{edit.layer} SAE's width {width}",
                "the intervention was made with other SAEs",
            )
        fns[edit.layer] = make_edit_fn(by_layer[edit.layer], edit, skip_ids)
    with edit_resid_post(model, fns):
        yield
