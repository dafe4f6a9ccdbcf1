"""sae-unlearn: remove a concept from a language model by suppressing the SAE features that carry it.

from sae_unlearn import load_model, load_saes, load_pack, find_features, unlearn, apply, evaluate

loaded = load_model("embedded")                      # Gemma 3 270M, offline
saes = load_saes(loaded, "shipped")                  # the SAEs shipped for it
pack = load_pack("harry-potter")
selection = find_features(loaded, saes, pack, "crisp", k=10)
unlearn("crisp", loaded, pack, Path("run"), saes=saes, features=selection)
with apply(loaded, "run") as model:                  # adapters and SAE hooks alike
    model.generate(...)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"
__all__ = ["apply", "evaluate", "find_features", "load_model", "load_pack", "load_saes", "unlearn"]

if TYPE_CHECKING:
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.evaluation.evaluate import evaluate
    from sae_unlearn.features import find_features
    from sae_unlearn.methods import apply, unlearn
    from sae_unlearn.models.loading import load_model
    from sae_unlearn.saes import load_saes_for as load_saes

_LAZY = {
    "load_model": ("sae_unlearn.models.loading", "load_model"),
    "load_saes": ("sae_unlearn.saes", "load_saes_for"),
    "load_pack": ("sae_unlearn.concepts.pack", "load_pack"),
    "find_features": ("sae_unlearn.features", "find_features"),
    "unlearn": ("sae_unlearn.methods", "unlearn"),
    "apply": ("sae_unlearn.methods", "apply"),
    "evaluate": ("sae_unlearn.evaluation.evaluate", "evaluate"),
}


def __getattr__(name: str) -> Any:
    # heavy imports (torch, transformers, sae-lens) only when the API is used
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(name)
