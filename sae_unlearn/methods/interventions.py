"""The SAE edits of clamping and ablation as forward hooks, with the error term kept.

x' = decode(z') + (x - decode(z)) = x + decode(z') - decode(z): the residual stream changes only by
the decoded difference of the edited latents, computed by `saes.edit.apply_feature_edit` (the one
feature edit; SAELens' own encode, thresholds, normalisation and decode). Tokens where nothing
changes, and BOS/padding/position 0 (models.hooks.TokenPolicy), get exactly x back.

intervention.json (version 1):
    {"version": 1, "method": "clamp"|"ablate", "model": spec, "sae": spec,
     "edits": [{"layer": L, "features": [i, ...], "mode": "clamp"|"scale"|"refusal",
                "threshold": t, "value": v, "scale": s, "refusal_feature": r|null,
                "basis": {how t and v were chosen}|null}]}
A refusal edit reads the columns [*features, refusal_feature]: where any feature is above t, the
refusal feature is set to v; the features themselves stay (docs/saes.md).
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
from sae_unlearn.models.hooks import CallTokens, EditFn, TokenPolicy, call_token_mask, edit_resid_post
from sae_unlearn.saes.edit import NewValues, apply_feature_edit, clamp_values, refusal_values, scale_values
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
    basis: dict[str, Any] | None = None  # how threshold and value were chosen (clamp: derived or explicit)

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


def edit_values(edit: LayerEdit) -> NewValues:
    """The new values of the columns `edit_columns(edit)` as a function of their old values."""
    if edit.mode == "clamp":
        return clamp_values(edit.threshold, edit.value)
    if edit.mode == "scale":
        return scale_values(edit.threshold, edit.scale)
    return refusal_values(edit.threshold, edit.value)


def edit_columns(edit: LayerEdit) -> list[int]:
    """The latents an edit reads: its features, then the refusal feature for the refusal clamp."""
    if edit.mode == "refusal":
        assert edit.refusal_feature is not None
        return [*edit.features, edit.refusal_feature]
    return list(edit.features)


def make_edit_fn(loaded_sae: LoadedSAE, edit: LayerEdit, policy: TokenPolicy | Sequence[int] = ()) -> EditFn:
    """The edit hook of one layer: `saes.edit.apply_feature_edit` on the tokens the policy keeps."""
    sae = loaded_sae.sae
    policy = policy if isinstance(policy, TokenPolicy) else TokenPolicy(tuple(policy))
    cols = edit_columns(edit)
    new_values = edit_values(edit)

    def edit_fn(hidden: torch.Tensor, tokens: CallTokens | None) -> torch.Tensor:
        if len(edit.features) == 0:
            return hidden
        keep = call_token_mask(tokens, policy) if tokens is not None else None
        if keep is not None and keep.shape != hidden.shape[:-1]:
            keep = None
        # a sharded model (--device-map) runs the block on its own device: edit on the SAE's, hand it back
        device = sae.W_enc.device
        keep = keep.to(device) if keep is not None else None
        return apply_feature_edit(sae, hidden.to(device), cols, new_values, keep).to(hidden.device)

    return edit_fn


@contextlib.contextmanager
def install(
    model: Any,
    saes: Sequence[LoadedSAE],
    intervention: Intervention,
    policy: TokenPolicy | Sequence[int] = (),
) -> Iterator[None]:
    """Install the intervention as forward hooks; they are removed on exit (the model is bit-identical again).

    `policy` (models.hooks.token_policy(tokenizer)) names the positions never edited: BOS, padding and,
    for tokenizers without BOS, position 0. A plain list of ids skips those ids only."""
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
        fns[edit.layer] = make_edit_fn(by_layer[edit.layer], edit, policy)
    with edit_resid_post(model, fns):
        yield
