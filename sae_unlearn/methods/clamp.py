"""Inference-time methods: conditional clamping (arXiv 2503.11127), its refusal variant, and feature
ablation by negative scaling (the INLP project). Both write intervention.json; nothing is trained.
`install` loads the run's SAEs and hooks the edits in (methods.interventions.install); there are no
weights to export.

Refusal clamp: on the refusal feature's layer, wherever any selected feature fires above the
threshold, the refusal feature is set to `refusal_value` instead of clamping the selected features
(default +|value|: the feature is turned on); clamps on the other selected layers stay as they are."""

from __future__ import annotations

import contextlib
import logging
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_unlearn.errors import UserError
from sae_unlearn.features.selection import SelectedFeature
from sae_unlearn.io import atomic_write_json
from sae_unlearn.methods.base import Method, MethodContext, register
from sae_unlearn.methods.interventions import Intervention, LayerEdit, install
from sae_unlearn.models.hooks import token_policy
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.loading import load_saes_from_spec

log = logging.getLogger(__name__)


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


class InterventionMethod(Method):
    """A method whose artifact is intervention.json: SAE edits as forward hooks, removed on exit."""

    hooks_saes = True

    @classmethod
    @contextlib.contextmanager
    def install(cls, loaded: LoadedModel, run_dir: Path) -> Iterator[Any]:
        intervention = Intervention.load(run_dir / "intervention.json")
        saes = load_saes_from_spec(
            intervention.sae, model_spec=intervention.model, device=str(loaded.device), dtype=loaded.dtype
        )
        with install(loaded.model, saes, intervention, token_policy(loaded.tokenizer)):
            yield loaded.model


@dataclass
class ClampConfig:
    """Conditional clamping. `threshold` and `value` left unset are derived per layer from the selected
    features' activation statistics on the forget text (`derived_clamp`), so they fit the SAE's
    activation scale (GemmaScope latents reach hundreds, small TopK SAEs ~10); an explicit value wins.
    Both the derived values and how they were derived are recorded in intervention.json."""

    threshold: float | None = None  # clamp only on tokens where the feature fires above this
    value: float | None = None  # the published -100 .. -500 is for GemmaScope's activation scale
    threshold_fraction: float = 0.5  # derived threshold: this x the median mean firing activation
    value_multiple: float = 1.0  # derived value: minus this x the median per-feature maximum activation
    refusal_feature: str | None = None  # LAYER:INDEX: the refusal clamp (docs/saes.md)
    refusal_value: float | None = None  # default: +|value| (turn the refusal feature on)


def derived_clamp(features: list[SelectedFeature], threshold_fraction: float, value_multiple: float) -> dict[str, Any]:
    """Clamp threshold and value of one layer from its selected features' forget-text statistics:
    threshold = fraction x median over features of (summed activation / firing count), value = -multiple
    x median over features of the maximum activation (the top of each feature's distribution)."""
    means = [f.forget_sum / f.forget_count for f in features if f.forget_count > 0]
    maxima = [f.forget_max for f in features if f.forget_max > 0]
    if not means or not maxima:
        raise UserError(
            "the selected features never fire on the forget text, so no clamp value can be derived from them",
            "pass --set value=V --set threshold=T, or select features that fire on the concept",
        )
    mean_act, max_act = statistics.median(means), statistics.median(maxima)
    return {
        "threshold": threshold_fraction * mean_act,
        "value": -value_multiple * max_act,
        "basis": {
            "median_mean_forget_activation": mean_act,
            "median_max_forget_activation": max_act,
            "threshold_fraction": threshold_fraction,
            "value_multiple": value_multiple,
        },
    }


@register
class ClampMethod(InterventionMethod):
    name = "clamp"
    Config = ClampConfig

    def run(self, ctx: MethodContext) -> dict[str, Any]:
        cfg: ClampConfig = self.config
        if ctx.features is None:
            raise UserError("this method needs selected features", "run feature selection first (sae-unlearn features)")
        by_layer: dict[int, list[SelectedFeature]] = {}
        for f in ctx.features.features:
            by_layer.setdefault(f.layer, []).append(f)
        refusal = _parse_refusal(cfg.refusal_feature) if cfg.refusal_feature is not None else None
        if refusal is not None and refusal[0] not in by_layer:
            raise UserError(
                f"the refusal feature is on layer {refusal[0]}, where no feature was selected",
                f"pick a refusal feature on one of layers {sorted(by_layer)}",
            )
        edits = []
        for layer, feats in sorted(by_layer.items()):
            derived = derived_clamp(feats, cfg.threshold_fraction, cfg.value_multiple)
            threshold = cfg.threshold if cfg.threshold is not None else derived["threshold"]
            value = cfg.value if cfg.value is not None else derived["value"]
            basis = {**derived["basis"], "threshold": "explicit" if cfg.threshold is not None else "derived"}
            basis["value"] = "explicit" if cfg.value is not None else "derived"
            indices = [f.index for f in feats]
            if refusal is not None and layer == refusal[0]:
                refusal_value = cfg.refusal_value if cfg.refusal_value is not None else abs(value)
                edit = LayerEdit(
                    layer, indices, "refusal", threshold=threshold, value=refusal_value, refusal_feature=refusal[1]
                )
            else:
                edit = LayerEdit(layer, indices, "clamp", threshold=threshold, value=value)
            edit.basis = basis
            edits.append(edit)
        if refusal is not None and len(edits) > 1:
            log.info(
                "refusal clamp on layer %d; the clamps on layers %s stay",
                refusal[0],
                [e.layer for e in edits if e.layer != refusal[0]],
            )
        intervention = Intervention("clamp", ctx.loaded.spec, ctx.sae_spec, edits)
        atomic_write_json(ctx.out / "intervention.json", intervention.to_json())
        return {
            "artifact": "intervention.json",
            "layers": [e.layer for e in edits],
            "edits": [{"layer": e.layer, "mode": e.mode, "threshold": e.threshold, "value": e.value} for e in edits],
        }


@dataclass
class AblateConfig:
    scale: float = -3.0  # multiply the selected latents by this where they fire
    threshold: float = 0.0


@register
class AblateMethod(InterventionMethod):
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
