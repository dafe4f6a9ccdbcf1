"""CRISP (arXiv 2508.13650): a LoRA adapter trained so the selected SAE features stop firing on
forget text while hidden states on retain text stay as they were.

Two objectives:
- `published`: unlearn = the reference's `loss_features_acts`: the margin |margin_alpha * mean(pre_acts)|
  is added to the selected features' pre-activations where the frozen model had them active, the
  SAE's own activation applied (JumpReLU threshold included), and the positive selected
  activations on valid tokens averaged, per layer, then over layers; retain = MSE of hidden
  states at the SAE layers; coherence = MSE of the final hidden state on one coherence prompt per
  step. total = (1-beta)*unlearn + beta*retain + beta*gamma*coherence.
- `ablation` (default): the persistent twin of feature ablation. On forget text the adapted hidden
  state at each SAE layer is trained toward the frozen one with the selected features' decoded
  contribution scaled by `ablation_scale` (error term kept), so the text stays on-distribution;
  retain and coherence terms are relative MSEs. Fluency of forget-prompt generations is checked
  every `fluency_every` steps and training stops (restoring the last fluent adapter) when the
  base model's perplexity of them exceeds `max_fluency_ratio` x that of its own generations, or
  their repeated-3-gram share exceeds the base model's by more than `max_repetition_increase`.
  An unlikelihood term on the adapted model's own continuations of forget-paragraph openings
  (`unlikelihood_weight`, methods/unlikelihood.py) keeps them from looping, so the early stop is a
  guard rather than what decides how far training gets.
The frozen reference is the same model with the adapter disabled: no second copy in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from sae_unlearn.concepts.pack import ConceptPack
from sae_unlearn.distributed import world
from sae_unlearn.errors import UserError
from sae_unlearn.methods import robust
from sae_unlearn.methods.adapter import AdapterMethod
from sae_unlearn.methods.adapter_training import AdapterTrainer, epoch_batch
from sae_unlearn.methods.base import MethodContext, TrainingWork, register
from sae_unlearn.methods.frozen_reference import FrozenReference
from sae_unlearn.methods.unlikelihood import opening_words, unlikelihood_term
from sae_unlearn.models.batch import hidden_at_layers, tokenize
from sae_unlearn.models.hooks import lm_head_logits
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.edit import (
    activate_columns,
    apply_feature_edit,
    encode_columns,
    sae_kind,
    scale_values,
    selected_pre_activations,
)
from sae_unlearn.saes.loading import LoadedSAE, pre_activations

log = logging.getLogger(__name__)

# the unlikelihood term continues this many opening words of each forget paragraph: about the length of
# a concept prompt, so the continuation is the model's own text rather than the paragraph's
UNLIKELIHOOD_PROMPT_WORDS = 6


@dataclass
class CrispConfig:
    objective: str = "ablation"  # or "published"
    lora_r: int = 4
    lora_alpha: int | None = None  # default 2r
    lora_dropout: float = 0.05
    # Llama/Gemma/Qwen/Mistral names, then GPT-2's (c_attn, c_proj, c_fc); the ones a model lacks are skipped
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "c_attn",
            "c_proj",
            "c_fc",
        ]
    )
    lora_layers: list[int] | None = None  # default: from one below the first SAE layer to the deepest
    steps: int = 100
    epochs: float | None = None  # set: steps = ceil(epochs x forget training paragraphs / batch_size)
    batch_size: int = 4
    max_length: int = 128
    lr: float = 1e-3  # published: 1e-5 (Gemma-2-2B, 625 steps); third parties 1e-4..5e-4
    margin_alpha: float = 5.0  # the published loss's margin factor, `alpha` in the paper (Gemma); 30 for Llama
    beta: float = 0.99
    gamma: float = 0.01
    # ablation objective; scale, retain and KL weights chosen on the tune probe split of harry-potter
    # (scripts/tune_method.py; README): the KL term keeps retain perplexity within ~2% of the base model
    ablation_scale: float = -20.0
    retain_weight: float = 3.0  # weight of the retain term (relative MSE at the SAE layers)
    coherence_weight: float = 0.1  # weight of the coherence term
    retain_kl_weight: float = 1.0  # KL(base || adapted) of next-token distributions on retain text
    retain_kl_positions: int = 64  # retain tokens per step that the KL term reads (the lm_head is the cost)
    fluency_every: int = 20
    max_fluency_ratio: float = 2.0
    max_repetition_increase: float | None = 0.15  # over the base model's repeated-3-gram share; None: off
    unlikelihood_weight: float = 1.0  # chosen on the tune split (docs/robustness.md); 0: off
    """Weight of the ablation objective's sequence-level unlikelihood term (Welleck et al. 2020;
    methods/unlikelihood.py), which holds repetition in the objective: each step the adapted model greedily
    continues the opening words of the forget batch's paragraphs by `unlikelihood_tokens` tokens, and every
    token of a repeated token `unlikelihood_ngram`-gram gets the loss -log(1 - p), summed over them and
    divided by the number of generated tokens."""
    unlikelihood_tokens: int = 32
    """Tokens generated per paragraph opening for the unlikelihood term."""
    unlikelihood_ngram: int = 3
    """The token n-gram length whose repeats the unlikelihood term penalises."""
    checkpoint_every: int = 50
    seed: int = 0
    # robustness to relearning (methods/robust.py, docs/robustness.md); all off by default
    sam_rho: float = 0.0
    """Sharpness-aware unlearning (Fan et al. 2025): take the unlearning term's gradient at the trainable
    weights moved by sam_rho * g/|g| along it (0: off; the paper's range 0.01-0.1). One extra forward and
    backward on the forget batch per step."""
    disruption_mask: bool = False
    """MUDMAN's disruption masking: apply an unlearning-gradient element only where its sign agrees with
    the running mean of the retain terms' gradient (momentum `retain_momentum`)."""
    retain_momentum: float = 0.9
    """Momentum of the retain-gradient running mean that `disruption_mask` reads."""
    unlearn_grad_norm: float | None = None
    """Rescale the unlearning term's gradient to this global L2 norm every step (MUDMAN's normalisation;
    None: off)."""
    adversary_every: int = 0
    """MUDMAN's meta-learning adversary (0: off): every this many steps a copy of the trainable weights is
    forked; each step it takes one SGD step (lr `adversary_lr`) toward restoring the frozen model's hidden
    states on the forget batch, and the unlearning gradient is taken at its weights. Never saved."""
    adversary_lr: float = 1e-2
    """Learning rate of the adversary's SGD steps."""
    concept_tokens: int = 0
    """Also train the input-embedding rows of this many tokens, the ones most over-represented in the
    forget training text relative to the retain text (0: off; saved in the adapter)."""
    weight_edit_blocks: list[int] | None = None
    """After training, project the selected features' decoder directions out of what these blocks'
    `weight_edit_modules` write into the residual stream (each block gets the directions of the nearest
    SAE layer at or above it). None: off; [] : the SAE layers' own blocks."""
    weight_edit_modules: list[str] = field(default_factory=lambda: ["o_proj", "down_proj", "c_proj"])
    """The residual-writing matrices the weight edit projects (attention output, MLP down projection)."""

    def __post_init__(self) -> None:
        if self.objective not in ("published", "ablation"):
            raise UserError(f"unknown CRISP objective {self.objective!r}", "use published or ablation")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r


def unlikelihood(cfg: CrispConfig) -> bool:
    """Whether the run trains the unlikelihood term: the ablation objective's, like the fluency check (the
    published objective stays the paper's loss)."""
    return cfg.objective == "ablation" and cfg.unlikelihood_weight > 0


def relative_mse(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Squared error over valid tokens relative to the reference's squared norm (scale-free across layers).

    `b` is the reference (a frozen state or target: no gradient reaches it). Data-parallel, this rank's
    share of the global value: its summed error over the global mean of the reference's squared norm and
    the global token count (`sae_unlearn.distributed`); the shares sum to it."""
    a, b = a.float()[valid], b.float()[valid]
    ranks = world()
    n = ranks.global_count(valid.sum(), a.device)
    reference = ranks.sum((b**2).sum()) / n
    return ((a - b) ** 2).sum() / n / reference.clamp_min(1e-6)


def default_lora_layers(sae_layers: Sequence[int]) -> list[int]:
    """From one block below the first SAE layer up to the deepest SAE layer (LoRA must reach it)."""
    return list(range(max(0, min(sae_layers) - 1), max(sae_layers) + 1))


def training_steps(cfg: CrispConfig, pack: ConceptPack) -> int:
    """`cfg.steps`, or with `cfg.epochs` that many passes over the forget training paragraphs."""
    if cfg.epochs is None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * len(pack.forget_split("train")) / cfg.batch_size))


def published_unlearn_loss(
    sae: Any,
    adapted: torch.Tensor,
    frozen_active: torch.Tensor,
    features: torch.Tensor,
    valid: torch.Tensor,
    margin_alpha: float,
) -> torch.Tensor:
    """The CRISP reference's `loss_features_acts` for one layer.

    The selected features' pre-activations get the margin |margin_alpha * mean over all latents of the
    pre-activations| on the tokens where the frozen model had them active (`frozen_active`
    [..., n_features]); the SAE's own activation (JumpReLU threshold, TopK selection, gate) turns
    them into activations; the loss is the mean of the positive ones on valid tokens (0 when none).
    Elementwise SAEs are computed column-sparse: the mean pre-activation is linear in the input,
    sae_in @ mean(W_enc, 1) + mean(b_enc)."""
    x = adapted.to(sae.W_enc.dtype)
    kind = sae_kind(sae)
    if kind in ("standard", "jumprelu", "gated"):
        sae_in = sae.process_sae_in(x)
        pre = selected_pre_activations(sae, sae_in, features)
        if kind == "gated":
            mean_pre = sae_in @ (sae.W_enc * sae.r_mag.exp()).mean(1) + sae.b_mag.mean()
        else:
            mean_pre = sae_in @ sae.W_enc.mean(1) + sae.b_enc.mean()
        pre = torch.where(frozen_active, pre + (margin_alpha * mean_pre).abs().unsqueeze(-1), pre)
        acts = activate_columns(sae, sae_in, pre, features)
    else:  # TopK and others: the activation reads every pre-activation
        pre = pre_activations(sae, x)
        margin = (margin_alpha * pre.mean(-1, keepdim=True)).abs()
        selected = pre[..., features]
        pre = pre.index_copy(-1, features, torch.where(frozen_active, selected + margin, selected))
        acts = sae.activation_fn(pre)[..., features]
    acts = acts.float() * valid.unsqueeze(-1)
    positive = acts[acts > 0]
    # the mean of the positive activations (0 when none); data-parallel, this rank's share (global count)
    count = world().global_count(positive.numel(), acts.device)
    return positive.sum() / count if positive.numel() else acts.sum() * 0.0


def ablation_target(sae: Any, frozen: torch.Tensor, features: torch.Tensor, scale: float) -> torch.Tensor:
    """Frozen hidden state with the selected latents scaled by `scale` where they fire (error term kept),
    through the one feature edit (`saes.edit.apply_feature_edit`)."""
    return apply_feature_edit(sae, frozen, features, scale_values(0.0, scale))


def retain_kl(
    model: Any, frozen: torch.Tensor, adapted: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Mean KL(base || adapted) of the next-token distributions at (rows, cols) of final hidden states
    (data-parallel: this rank's share, over the global number of positions)."""
    with torch.no_grad():
        base_logp = torch.log_softmax(lm_head_logits(model, frozen[rows, cols]), -1)
    logp = torch.log_softmax(lm_head_logits(model, adapted[rows, cols]), -1)
    return (base_logp.exp() * (base_logp - logp)).sum() / world().global_count(len(rows), logp.device)


@register
class CrispMethod(AdapterMethod):
    name = "crisp"
    Config = CrispConfig
    renamed_options: ClassVar[dict[str, str]] = {
        "alpha": "margin_alpha"
    }  # RmuConfig.alpha is a retain weight: the name was ambiguous

    @classmethod
    def training_work(cls, config: CrispConfig, loaded: LoadedModel, pack: ConceptPack) -> TrainingWork:
        """Forward and backward through the body on forget, retain and coherence text; the forget batch
        through the SAEs; the KL term's logits on both models; the frozen states cached after one epoch."""
        return TrainingWork(
            training_steps(config, pack),
            config.batch_size,
            config.max_length,
            coherence=True,
            sae_forget=True,
            kl_positions=config.retain_kl_positions if config.retain_kl_weight else 0,
            fluency_every=config.fluency_every if config.objective == "ablation" else 0,
            generated_tokens=config.unlikelihood_tokens if unlikelihood(config) else 0,
            generation_prompt_words=UNLIKELIHOOD_PROMPT_WORDS,
        )

    def run(self, ctx: MethodContext) -> dict[str, Any]:
        cfg: CrispConfig = self.config
        if ctx.features is None:
            raise UserError("CRISP needs selected features", "run feature selection first")
        by_layer = ctx.features.by_layer()
        saes = {s.layer: s for s in ctx.saes if s.layer in by_layer}
        missing = sorted(set(by_layer) - set(saes))
        if missing:
            raise UserError(f"features were selected on layers {missing} but no SAE for them is loaded")
        lora_layers = cfg.lora_layers if cfg.lora_layers is not None else default_lora_layers(list(by_layer))
        steps = training_steps(cfg, ctx.pack)
        if cfg.epochs is not None:
            log.info("%s epoch(s) of %d-paragraph batches: %d steps", cfg.epochs, cfg.batch_size, steps)
        if max(lora_layers) < max(by_layer):
            log.warning(
                "LoRA reaches block %d but the deepest SAE layer is %d: features there can only change "
                "through earlier blocks",
                max(lora_layers),
                max(by_layer),
            )
        tokens = robust.concept_tokens(
            ctx.loaded.tokenizer, ctx.pack.forget_split("train"), ctx.pack.retain_split("train"), cfg.concept_tokens
        )
        trainer = AdapterTrainer(
            ctx,
            lora_layers,
            cfg.target_modules,
            cfg.lora_r,
            int(cfg.lora_alpha or 8),
            cfg.lora_dropout,
            cfg.lr,
            cfg.seed,
            amsgrad=True,
            trainable_tokens=tokens or None,
        )
        loss_fn = CrispLoss(ctx, cfg, saes, {layer: torch.tensor(v) for layer, v in by_layer.items()})
        step_fn = None
        if cfg.sam_rho > 0 or cfg.disruption_mask or cfg.unlearn_grad_norm is not None or cfg.adversary_every:
            step_fn = robust.GradientStep(
                trainer.params,
                cfg.sam_rho,
                cfg.disruption_mask,
                cfg.retain_momentum,
                cfg.unlearn_grad_norm,
                cfg.adversary_every,
                cfg.adversary_lr,
            )
        summary = trainer.train(
            loss_fn,
            steps,
            cfg.checkpoint_every,
            fluency_every=cfg.fluency_every if cfg.objective == "ablation" else 0,
            max_fluency_ratio=cfg.max_fluency_ratio,
            max_repetition_increase=cfg.max_repetition_increase,
            step_fn=step_fn,
        )
        if tokens:
            summary["concept_tokens"] = [ctx.loaded.tokenizer.decode([t]) for t in tokens]
        if cfg.weight_edit_blocks is not None:
            directions = {layer: saes[layer].sae.W_dec[torch.tensor(v)].detach() for layer, v in by_layer.items()}
            blocks = cfg.weight_edit_blocks or sorted(by_layer)
            bases = robust.edit_bases(ctx.loaded.model, directions, blocks, cfg.weight_edit_modules)
            robust.save_weight_edit(ctx.out, bases)
            summary["weight_edit"] = {name: int(u.shape[1]) for name, u in bases.items()}
        return {"artifact": "adapter", "lora_layers": lora_layers, **summary}


def tokenize_valid(tokenizer: Any, texts: list[str], cfg: CrispConfig) -> torch.Tensor:
    """The valid-token mask of a whole global batch (on the CPU: only its positions are read)."""
    return tokenize(tokenizer, texts, cfg.max_length, torch.device("cpu")).valid


class CrispLoss:
    """Callable(step) -> (total, {term: value}); deterministic batches from (seed, step)."""

    def __init__(
        self, ctx: MethodContext, cfg: CrispConfig, saes: dict[int, LoadedSAE], features: dict[int, torch.Tensor]
    ) -> None:
        self.ctx, self.cfg, self.saes, self.features = ctx, cfg, saes, features
        self.layers = sorted(features)
        self.forget = ctx.pack.forget_split("train")
        self.retain = ctx.pack.retain_split("train")
        self.coherence = ctx.pack.coherence
        if len(self.forget) < cfg.batch_size or len(self.retain) < cfg.batch_size:
            raise UserError("the forget or retain split is smaller than one batch", "lower --batch-size or add text")
        world().check_batch(cfg.batch_size, "crisp.batch_size")
        self.kl = cfg.objective == "ablation" and cfg.retain_kl_weight > 0
        self.frozen_forget = FrozenReference(self.layers)
        self.frozen_retain = FrozenReference(self.layers, final=self.kl)
        self.frozen_coherence = FrozenReference(None)

    def _batch(self, texts: list[str], step: int, salt: int) -> list[str]:
        return epoch_batch(texts, self.cfg.batch_size, self.cfg.seed, step, salt)

    def __call__(self, model: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        unlearn, rest, terms = self._terms(model, step)
        total = unlearn
        for term in rest:  # summed in this order: the plain step is unchanged by the split
            total = total + term
        return total, terms

    def parts(self, model: Any, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(weighted unlearning term, weighted retain + coherence (+ KL) terms, {term: value})."""
        unlearn, rest, terms = self._terms(model, step)
        retain = rest[0]
        for term in rest[1:]:
            retain = retain + term
        return unlearn, retain, terms

    def _forget_batch(self, step: int) -> tuple[list[str], Any]:
        texts = world().shard(self._batch(self.forget, step, 1))  # data-parallel: this rank's share
        return texts, tokenize(self.ctx.loaded.tokenizer, texts, self.cfg.max_length, self.ctx.loaded.device)

    def forget_term(self, model: Any, step: int) -> torch.Tensor:
        """The weighted unlearning term alone at the current weights (what sharpness-aware steps re-read)."""
        texts, forget = self._forget_batch(step)
        unlearn = self._unlearn(model, texts, forget)
        return (1 - self.cfg.beta) * unlearn if self.cfg.objective == "published" else unlearn

    def adversary_terms(self, model: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted unlearning term, relearning term) on the forget batch from one forward pass. The
        relearning term, the adapted hidden states' relative MSE to the frozen ones at the SAE layers,
        is what an attacker restoring the concept's representation minimises."""
        texts, forget = self._forget_batch(step)
        relearn: list[torch.Tensor] = []
        unlearn = self._unlearn(model, texts, forget, relearn)
        weighted = (1 - self.cfg.beta) * unlearn if self.cfg.objective == "published" else unlearn
        return weighted, relearn[0]

    def _unlearn(
        self, model: Any, forget_texts: list[str], forget: Any, relearn: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        cfg, loaded = self.cfg, self.ctx.loaded
        frozen_f = self.frozen_forget(model, forget_texts, forget)
        adapted_f = hidden_at_layers(model, forget, self.layers)
        if relearn is not None:
            relearn.append(
                torch.stack(
                    [relative_mse(adapted_f.hidden[la], frozen_f.hidden[la], forget.valid) for la in self.layers]
                ).mean()
            )
        unlearn = torch.zeros((), device=loaded.device)
        for layer in self.layers:
            sae, feats = self.saes[layer].sae, self.features[layer].to(loaded.device)
            if cfg.objective == "published":
                with torch.no_grad():
                    active = encode_columns(sae, frozen_f.hidden[layer], feats) > 0
                unlearn = unlearn + published_unlearn_loss(
                    sae, adapted_f.hidden[layer], active, feats, forget.valid, cfg.margin_alpha
                )
            else:
                with torch.no_grad():
                    target = ablation_target(sae, frozen_f.hidden[layer], feats, cfg.ablation_scale)
                unlearn = unlearn + relative_mse(adapted_f.hidden[layer], target, forget.valid)
        return unlearn / len(self.layers)

    def _terms(self, model: Any, step: int) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, float]]:
        cfg, loaded, ranks = self.cfg, self.ctx.loaded, world()
        forget_texts, forget = self._forget_batch(step)
        unlearn = self._unlearn(model, forget_texts, forget)  # first: the adapted passes keep their RNG order
        # data-parallel: each rank a contiguous share of the global batch; the loss is its share of the global loss
        global_retain = self._batch(self.retain, step, 2)
        retain_texts = ranks.shard(global_retain)
        coherence_texts = [self.coherence[step % len(self.coherence)]]  # one text: every rank, weight 1/ranks
        retain = tokenize(loaded.tokenizer, retain_texts, cfg.max_length, loaded.device)
        coherence = tokenize(loaded.tokenizer, coherence_texts, cfg.max_length, loaded.device)

        kl = self.kl
        frozen_r = self.frozen_retain(model, retain_texts, retain)
        frozen_c = self.frozen_coherence(model, coherence_texts, coherence)
        adapted_r = hidden_at_layers(model, retain, self.layers, final=kl)
        adapted_c = hidden_at_layers(model, coherence, None)

        assert adapted_c.final is not None and frozen_c.final is not None  # layers=None: the final state
        if cfg.objective == "published":
            n_retain = ranks.global_count(retain.valid.sum(), loaded.device)
            retain_loss = torch.stack(
                [
                    ((adapted_r.hidden[layer] - frozen_r.hidden[layer]).float() ** 2).mean(-1)[retain.valid].sum()
                    / n_retain
                    for layer in self.layers
                ]
            ).mean()
            coherence_loss = ((adapted_c.final - frozen_c.final).float() ** 2).mean(-1)[
                coherence.valid
            ].mean() / ranks.size
            weighted_unlearn = (1 - cfg.beta) * unlearn
            rest = [cfg.beta * retain_loss, cfg.beta * cfg.gamma * coherence_loss]
        else:
            retain_loss = torch.stack(
                [relative_mse(adapted_r.hidden[layer], frozen_r.hidden[layer], retain.valid) for layer in self.layers]
            ).mean()
            # every rank computes the same coherence text: relative_mse's global sums make each share 1/ranks
            coherence_loss = relative_mse(adapted_c.final, frozen_c.final, coherence.valid)
            weighted_unlearn = unlearn
            rest = [cfg.retain_weight * retain_loss, cfg.coherence_weight * coherence_loss]
            if kl:
                assert adapted_r.final is not None and frozen_r.final is not None
                # the positions are drawn from the global batch's valid tokens; each rank reads those in its rows
                valid = retain.valid if not ranks.active else tokenize_valid(loaded.tokenizer, global_retain, cfg)
                rows, cols = valid.nonzero(as_tuple=True)
                pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + step))
                pick = pick[: cfg.retain_kl_positions].to(rows.device)
                rows, cols = rows[pick], cols[pick]
                start, stop = ranks.bounds(len(global_retain))
                mine = (rows >= start) & (rows < stop)
                rows, cols = (rows[mine] - start).to(loaded.device), cols[mine].to(loaded.device)
                kl_loss = retain_kl(model, frozen_r.final, adapted_r.final, rows, cols)
                rest.append(cfg.retain_kl_weight * kl_loss)
        shares = {"unlearn": unlearn, "retain": retain_loss, "coherence": coherence_loss}
        if kl:
            shares["retain_kl"] = kl_loss
        if unlikelihood(cfg):
            prompts = [opening_words(text, UNLIKELIHOOD_PROMPT_WORDS) for text in forget_texts]
            repeat_loss, _ = unlikelihood_term(
                model, loaded.tokenizer, prompts, cfg.unlikelihood_tokens, cfg.unlikelihood_ngram
            )
            rest.append(cfg.unlikelihood_weight * repeat_loss)
            shares["unlikelihood"] = repeat_loss
        values = ranks.sum(torch.stack([v.detach().float().reshape(()) for v in shares.values()])).tolist()
        terms = dict(zip(shares, values, strict=True))  # the global terms (each rank holds a share)
        if not all(math.isfinite(v) for v in values):
            bad = [name for name, v in terms.items() if not math.isfinite(v)] or ["total"]
            raise FloatingPointError(f"the {bad[0]} term diverged (non-finite loss)")
        return weighted_unlearn, rest, terms
