"""One interface for every unlearning method, which owns its whole life: a dataclass config with the
published defaults, `run(ctx)` (writes the method's artifact into the run directory), `install`
(puts a run's artifact on a model until exit), `install_merged` (the same as a plain model, for a
caller that owns the model) and `export` (writes a full model with the run's weights in it)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from sae_unlearn.concepts.pack import ConceptPack
from sae_unlearn.errors import UserError
from sae_unlearn.features import FeatureSelection
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.options import coerce_options
from sae_unlearn.saes.loading import LoadedSAE

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TrainingWork:
    """What a method's `run` trains, for the time estimate (evaluation/estimate.py turns paragraphs into
    tokens with the run's tokenizer and pack): each optimizer step reads one forget batch (and one retain
    batch, with `retain`) of `batch_size` training paragraphs, each cut to `max_length` tokens."""

    steps: int
    batch_size: int
    max_length: int
    depth: float = 1.0
    """Share of the decoder body that each step's forward and backward pass runs through."""
    retain: bool = True
    """Each step also trains on a retain batch."""
    next_token_loss: bool = False
    """The loss reads next-token log-probabilities: forward and backward include the lm_head (the
    estimate's LM train tokens); otherwise it reads hidden states (train tokens)."""
    coherence: bool = False
    """Each step also trains on one paragraph of the pack's coherence text."""
    sae_forget: bool = False
    """Each step passes the forget batch through the SAEs."""
    kl_positions: int = 0
    """Retain positions per step whose next-token logits both the adapted and the frozen model compute."""
    frozen_states: Literal["first_epoch", "retain_each_step", "forget_logprobs_first_epoch"] = "first_epoch"
    """When the frozen model's states are computed: "first_epoch", the forget and retain batches up to the
    deepest SAE layer and the coherence paragraph, during the first epoch and reused after it
    (frozen_reference.FrozenReference); "retain_each_step", the retain batch up to `depth`, every step;
    "forget_logprobs_first_epoch", the forget batch's log-probabilities (the whole model, lm_head
    included), during the first epoch and reused after it."""
    generated_tokens: int = 0
    """Tokens each step greedily generates per forget paragraph, continuing its first `generation_prompt_words`
    words, and then trains on with them (CRISP's unlikelihood term)."""
    generation_prompt_words: int = 0
    fluency_every: int = 0
    """A fluency check of the concept prompts (tune half) every this many steps, plus one of the base model."""


class Method:
    name: ClassVar[str] = ""
    needs_saes: ClassVar[bool] = True
    persistent: ClassVar[bool] = False  # changes weights (adapter, swapped parameters): `export` can merge them
    hooks_saes: ClassVar[bool] = False  # installed as SAE hooks: every token the installed model reads passes them
    renamed_options: ClassVar[dict[str, str]] = {}  # {old option name: current name}, still accepted
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None:
        self.config = config

    def run(self, ctx: MethodContext) -> dict[str, Any]:
        """Write the artifact into ctx.out and return a summary for config.json."""
        raise NotImplementedError

    @classmethod
    def training_work(cls, config: Any, loaded: LoadedModel, pack: ConceptPack) -> TrainingWork | None:
        """What `run` trains under `config` on `loaded` and `pack`, for the time estimate; None: it trains
        nothing."""
        return None

    @classmethod
    def install(cls, loaded: LoadedModel, run_dir: Path) -> AbstractContextManager[Any]:
        """Put the run's artifact on `loaded.model` (hooks, adapter or swapped weights); yields the model to
        call. On exit `loaded.model` is as it was."""
        raise NotImplementedError

    @classmethod
    def install_merged(cls, loaded: LoadedModel, run_dir: Path) -> AbstractContextManager[Any]:
        """`install`, yielding a plain transformers model (no PEFT wrapper) to fine-tune or save. Methods
        whose artifact is an adapter merge it into `loaded.model`'s weights, which is not undone: call it
        on a model you own (a throwaway copy)."""
        return cls.install(loaded, run_dir)

    @classmethod
    def export(cls, loaded: LoadedModel, run_dir: Path, out: Path) -> None:
        """Write the model with the run's weights merged in (`save_pretrained`) into the directory `out`,
        leaving `loaded.model` as it was."""
        cls.check_exportable()
        with cls.install(loaded, run_dir) as model:
            model.save_pretrained(str(out))

    @classmethod
    def check_exportable(cls) -> None:
        if not cls.persistent:
            raise UserError(
                f"{cls.name} is an inference-time intervention and has no weights to merge",
                "use sae_unlearn.apply(model, RUN_DIR) at inference, or export a crisp/npo/rmu run",
            )


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def current_option_names(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with a method's renamed options under their current names (a deprecation warning each)."""
    renamed = METHODS[name].renamed_options if name in METHODS else {}
    out = dict(options)
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out:
            raise UserError(
                f"method {name} got both {old} and {new}", f"{old} is the old name of {new}: give only {new}"
            )
        log.warning("method %s: option %s is deprecated, use %s (same meaning)", name, old, new)
        out[new] = out.pop(old)
    return out


def method_config(name: str, options: dict[str, Any]) -> Any:
    """Build a method's config from options, refusing options that do not apply to the method and values
    of the wrong type (checked against the config's field types, before anything loads)."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}", f"use one of {', '.join(sorted(METHODS))}")
    config_cls = METHODS[name].Config
    options = current_option_names(name, options)
    valid = {f.name for f in fields(config_cls)}
    for key in options:
        if key not in valid:
            others = [m for m, c in METHODS.items() if key in {f.name for f in fields(c.Config)}]
            hint = f"it belongs to {', '.join(others)}" if others else f"options of {name}: {', '.join(sorted(valid))}"
            raise UserError(f"option --{key.replace('_', '-')} does not apply to method {name}", hint)
    return config_cls(**coerce_options(config_cls, options, owner=f"method {name}"))
