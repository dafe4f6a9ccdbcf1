"""One interface for every unlearning method: a dataclass config with the published defaults and
`run(ctx)`, which writes the method's artifact into the run directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from sae_unlearn.concepts.pack import ConceptPack
from sae_unlearn.errors import UserError
from sae_unlearn.features import FeatureSelection
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.options import coerce_options
from sae_unlearn.saes.loading import LoadedSAE


@dataclass
class MethodContext:
    loaded: LoadedModel
    pack: ConceptPack
    out: Path
    sae_spec: str = "shipped"
    saes: list[LoadedSAE] = dataclasses.field(default_factory=list)
    features: FeatureSelection | None = None
    progress: Callable[[int, int, dict[str, float]], None] | None = None
    resume: bool = False


class Method:
    name: ClassVar[str] = ""
    needs_saes: ClassVar[bool] = True
    persistent: ClassVar[bool] = False
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None:
        self.config = config

    def run(self, ctx: MethodContext) -> dict[str, Any]:
        """Write the artifact into ctx.out and return a summary for config.json."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_config(name: str, options: dict[str, Any]) -> Any:
    """Build a method's config from options, refusing options that do not apply to the method and values
    of the wrong type (checked against the config's field types, before anything loads)."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}", f"use one of {', '.join(sorted(METHODS))}")
    config_cls = METHODS[name].Config
    valid = {f.name for f in fields(config_cls)}
    for key in options:
        if key not in valid:
            others = [m for m, c in METHODS.items() if key in {f.name for f in fields(c.Config)}]
            hint = f"it belongs to {', '.join(others)}" if others else f"options of {name}: {', '.join(sorted(valid))}"
            raise UserError(f"option --{key.replace('_', '-')} does not apply to method {name}", hint)
    return config_cls(**coerce_options(config_cls, options, owner=f"method {name}"))
