"""Presets: the papers' published settings as data (sae_unlearn/methods/presets/NAME.toml), one
table per model family (the Hugging Face `model_type`), read the same way by Python and the CLI.

A preset names the method, the SAEs (a SAELens release and id pattern over its layer list), the
number of features per layer, and the method options. Explicit options always win over a preset's.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_unlearn.errors import UserError
from sae_unlearn.methods.base import current_option_names

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class Preset:
    name: str
    family: str
    method: str
    model: str
    sae: str  # a load_saes_from_spec spec: comma-joined RELEASE:SAE_ID
    layers: list[int]
    k: int
    options: dict[str, Any] = field(default_factory=dict)

    def merged_options(self, explicit: dict[str, Any] | None) -> dict[str, Any]:
        return {**self.options, **current_option_names(self.method, explicit or {})}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name: str, family: str) -> Preset:
    """The preset `name` for model family `family` (e.g. gemma2, llama)."""
    path = PRESETS_DIR / f"{name}.toml"
    if not path.exists():
        raise UserError(f"unknown preset {name!r}", f"use one of {', '.join(preset_names())}")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    families = data.get("families", {})
    if family not in families:
        raise UserError(
            f"preset {name} has no settings for model family {family!r}",
            f"it covers {', '.join(sorted(families))}; set the options yourself with --set",
        )
    fam = families[family]
    sae = ",".join(f"{fam['sae_release']}:{fam['sae_id'].format(layer=layer)}" for layer in fam["layers"])
    return Preset(
        name=name,
        family=family,
        method=data["method"],
        model=fam["model"],
        sae=sae,
        layers=list(fam["layers"]),
        k=int(fam["k"]),
        options=dict(fam.get("options", {})),
    )


def model_family(model: Any) -> str:
    """The Hugging Face model_type of a model (of its text config for multimodal wrappers)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "model_type", getattr(config, "model_type", "")))
