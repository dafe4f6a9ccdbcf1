"""Inference-time methods: conditional clamping (arXiv 2503.11127), its refusal variant, and feature
ablation by negative scaling (the INLP project). Both write intervention.json; nothing is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sae_unlearn.errors import UserError
from sae_unlearn.io import atomic_write_json
from sae_unlearn.methods.base import Method, MethodContext, register
from sae_unlearn.methods.interventions import Intervention, LayerEdit


def _parse_refusal(spec: str) -> tuple[int, int]:
    try:
        layer, index = spec.split(":")
        return int(layer), int(index)
    except ValueError as e:
        raise UserError(f"--refusal-feature {spec!r} is not LAYER:INDEX", "e.g. --refusal-feature 6:1234") from e


def _selected(ctx: MethodContext) -> dict[int, list[int]]:
    if ctx.features is None:
        raise UserError("this method needs selected features", "run feature selection first (sae-unlearn features)")
    return ctx.features.by_layer()


@dataclass
class ClampConfig:
    threshold: float = 0.0  # clamp only on tokens where the feature fires above this
    value: float = -100.0  # the published range is -100 .. -500 (GemmaScope scale); see README for smaller SAEs
    refusal_feature: str | None = None  # LAYER:INDEX: set this feature instead (refusal clamp)
    refusal_value: float = -100.0


@register
class ClampMethod(Method):
    name = "clamp"
    Config = ClampConfig

    def run(self, ctx: MethodContext) -> dict[str, Any]:
        cfg: ClampConfig = self.config
        edits = []
        for layer, feats in _selected(ctx).items():
            edits.append(LayerEdit(layer, feats, "clamp", threshold=cfg.threshold, value=cfg.value))
        if cfg.refusal_feature is not None:
            r_layer, r_index = _parse_refusal(cfg.refusal_feature)
            if r_layer not in {e.layer for e in edits}:
                raise UserError(
                    f"the refusal feature is on layer {r_layer}, where no feature was selected",
                    f"pick a refusal feature on one of layers {sorted(e.layer for e in edits)}",
                )
            edits = [
                LayerEdit(
                    e.layer,
                    e.features,
                    "refusal",
                    threshold=cfg.threshold,
                    value=cfg.refusal_value,
                    refusal_feature=r_index,
                )
                for e in edits
                if e.layer == r_layer
            ]
        intervention = Intervention("clamp", ctx.loaded.spec, ctx.sae_spec, edits)
        atomic_write_json(ctx.out / "intervention.json", intervention.to_json())
        return {"artifact": "intervention.json", "layers": [e.layer for e in edits]}


@dataclass
class AblateConfig:
    scale: float = -3.0  # multiply the selected latents by this where they fire
    threshold: float = 0.0


@register
class AblateMethod(Method):
    name = "ablate"
    Config = AblateConfig

    def run(self, ctx: MethodContext) -> dict[str, Any]:
        cfg: AblateConfig = self.config
        edits = [
            LayerEdit(layer, feats, "scale", threshold=cfg.threshold, scale=cfg.scale)
            for layer, feats in _selected(ctx).items()
        ]
        intervention = Intervention("ablate", ctx.loaded.spec, ctx.sae_spec, edits)
        atomic_write_json(ctx.out / "intervention.json", intervention.to_json())
        return {"artifact": "intervention.json", "layers": [e.layer for e in edits]}
