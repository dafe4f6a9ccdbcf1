"""NPO (Zhang et al. 2024, "Negative Preference Optimization", arXiv 2404.05868) with a LoRA adapter: the
most-used gradient baseline of unlearning benchmarks, no SAE.

On forget text x (each paragraph is its own y, predicted token by token),
    L_NPO = -(2/beta) * E[log sigmoid(-beta * (log p_theta(x) - log p_ref(x)))]
with log p(x) the summed log-probability of the paragraph's valid tokens (no BOS, no padding) and the
reference the same model with the adapter disabled (no second copy in memory). It is gradient ascent
whose per-paragraph weight 2 * sigmoid(beta * log-ratio) fades as the paragraph becomes unlikely, so
it does not run away as plain gradient ascent does. NPO+RT adds `retain_weight` x the mean per-token
NLL of retain text. Training, checkpoints, resume and fluency-based early stopping are the LoRA loop of
`adapter_training.AdapterTrainer` (the one CRISP uses); the artifact is the PEFT adapter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sae_unlearn.concepts.pack import ConceptPack
from sae_unlearn.distributed import world
from sae_unlearn.errors import UserError
from sae_unlearn.methods.adapter import AdapterMethod
from sae_unlearn.methods.adapter_training import AdapterTrainer, epoch_batch
from sae_unlearn.methods.base import MethodContext, TrainingWork, register
from sae_unlearn.models.batch import Batch, hidden_at_layers, tokenize
from sae_unlearn.models.hooks import lm_head_logits
from sae_unlearn.models.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class NpoConfig:
    beta: float = 0.1
    """Inverse temperature of the NPO loss (published default 0.1); beta -> 0 is gradient ascent."""
    retain_weight: float = 3.0
    """Weight of the retain NLL term (NPO+RT; open-unlearning's default is 1); 0 gives plain NPO. 3 kept
    retain perplexity lower than 1 at the same forgetting on the tune split (docs/baselines.md)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int | None = None
    """LoRA scaling numerator; default 2 x lora_r."""
    lora_dropout: float = 0.0
    """LoRA dropout; 0 keeps the adapted model equal to the reference at step 0 (loss = (2/beta) ln 2)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers that get LoRA (names absent from the model are skipped)."""
    lora_layers: list[int] | None = None
    """Blocks that get LoRA; default every block."""
    steps: int = 20
    """Optimizer steps, one forget and one retain batch each (20: the evaluated setting; the NPO term
    saturates within a few steps at lr 2e-4)."""
    batch_size: int = 4
    """Paragraphs per forget batch and per retain batch."""
    max_length: int = 64
    """Tokens per paragraph (64: the evaluated setting; each step runs Gemma's 262k-row lm_head twice)."""
    lr: float = 2e-4
    """AdamW learning rate of the adapter (the evaluated setting, docs/baselines.md)."""
    fluency_every: int = 20
    """Check the fluency of concept-prompt (tune half) generations every this many steps; 0: off."""
    max_fluency_ratio: float = 2.0
    """Early stop when the base model's perplexity of the generations exceeds this x its own's."""
    max_repetition_increase: float | None = 0.15
    """Early stop when the repeated-3-gram share exceeds the base model's by more than this; None: off."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints; 0: none."""
    logit_chunk: int = 256
    """Tokens per lm_head chunk (recomputed in the backward pass: bounds the memory of a large vocabulary)."""
    seed: int = 0
    """Seeds the adapter's initialisation and the batch order."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise UserError(f"NPO beta must be positive, got {self.beta}", "the published default is 0.1")
        if self.retain_weight < 0 or self.lr <= 0 or self.steps < 0 or self.batch_size < 1 or self.logit_chunk < 1:
            raise UserError(
                "NPO needs retain_weight >= 0, lr > 0, steps >= 0, batch_size >= 1 and logit_chunk >= 1",
                "check the --set npo.* options",
            )
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2/beta) * mean(log sigmoid(-beta * (logp - ref_logp))) over sequences (data-parallel: this rank's
    share, over the global number of sequences)."""
    n = world().global_count(logp.shape[0], logp.device)
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).sum() / n


def _target_logprobs(model: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(lm_head_logits(model, hidden), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logprobs(model: Any, batch: Batch, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token | prefix) of every counted next token, and the row each belongs to.

    A target counts when it is a valid token (not BOS, not padding); the first token is never a target.
    The lm_head runs on `chunk` tokens at a time under activation checkpointing, so the full-vocabulary
    logits of the whole batch are never held at once."""
    final = hidden_at_layers(model, batch, None).final
    assert final is not None  # layers=None returns the final normed hidden state
    rows, cols = batch.valid[:, 1:].nonzero(as_tuple=True)
    hidden, targets = final[:, :-1][rows, cols], batch.input_ids[:, 1:][rows, cols]
    parts = []
    for i in range(0, len(rows), chunk):
        h, t = hidden[i : i + chunk], targets[i : i + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_target_logprobs, model, h, t, use_reentrant=False))
        else:
            parts.append(_target_logprobs(model, h, t))
    return (torch.cat(parts) if parts else final.new_zeros(0, dtype=torch.float32)), rows


def sequence_logprobs(model: Any, batch: Batch, chunk: int = 256) -> torch.Tensor:
    """[batch] summed log-probability of each row's counted tokens."""
    logp, rows = token_logprobs(model, batch, chunk)
    return torch.zeros(batch.input_ids.shape[0], device=logp.device).index_add(0, rows, logp)


@register
class NpoMethod(AdapterMethod):
    name = "npo"
    needs_saes = False
    Config = NpoConfig

    @classmethod
    def training_work(cls, config: NpoConfig, loaded: LoadedModel, pack: ConceptPack) -> TrainingWork:
        """Log-probabilities of the forget batch (and the retain batch's, for the retain NLL) through the
        whole model, lm_head included; the reference's forget log-probabilities cached after one epoch."""
        return TrainingWork(
            config.steps,
            config.batch_size,
            config.max_length,
            retain=config.retain_weight > 0,
            next_token_loss=True,
            frozen_states="forget_logprobs_first_epoch",
            fluency_every=config.fluency_every,
        )

    def run(self, ctx: MethodContext) -> dict[str, Any]:
        cfg: NpoConfig = self.config
        n_layers = ctx.loaded.n_layers
        lora_layers = cfg.lora_layers if cfg.lora_layers is not None else list(range(n_layers))
        loss_fn = _NpoLoss(ctx, cfg)  # refuses too-small splits before the adapter exists
        trainer = AdapterTrainer(
            ctx,
            lora_layers,
            cfg.target_modules,
            cfg.lora_r,
            int(cfg.lora_alpha or 2 * cfg.lora_r),
            cfg.lora_dropout,
            cfg.lr,
            cfg.seed,
        )
        summary = trainer.train(
            loss_fn,
            cfg.steps,
            cfg.checkpoint_every,
            fluency_every=cfg.fluency_every,
            max_fluency_ratio=cfg.max_fluency_ratio,
            max_repetition_increase=cfg.max_repetition_increase,
        )
        return {"artifact": "adapter", "lora_layers": lora_layers, **summary}


class _NpoLoss:
    """Callable(model, step) -> (total, {term: value}); deterministic batches from (seed, step). The
    reference log-probabilities of each forget paragraph are computed once and kept."""

    def __init__(self, ctx: MethodContext, cfg: NpoConfig) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.forget = ctx.pack.forget_split("train")
        self.retain = ctx.pack.retain_split("train")
        if len(self.forget) < cfg.batch_size or (cfg.retain_weight > 0 and len(self.retain) < cfg.batch_size):
            raise UserError("the forget or retain split is smaller than one batch", "lower --set npo.batch_size")
        world().check_batch(cfg.batch_size, "npo.batch_size")
        self.reference: dict[str, float] = {}

    def _batch(self, texts: list[str], step: int, salt: int) -> list[str]:
        return epoch_batch(texts, self.cfg.batch_size, self.cfg.seed, step, salt)

    def _reference(self, model: Any, texts: list[str], batch: Batch) -> torch.Tensor:
        if not all(t in self.reference for t in texts):
            with model.disable_adapter(), torch.no_grad():
                values = sequence_logprobs(model, batch, self.cfg.logit_chunk)
            self.reference.update(zip(texts, values.tolist(), strict=True))
        return torch.tensor([self.reference[t] for t in texts], device=batch.input_ids.device)

    def __call__(self, model: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, loaded, ranks = self.cfg, self.ctx.loaded, world()
        forget_texts = ranks.shard(self._batch(self.forget, step, 1))  # data-parallel: this rank's share
        forget = tokenize(loaded.tokenizer, forget_texts, cfg.max_length, loaded.device)
        ref_logp = self._reference(model, forget_texts, forget)
        logp = sequence_logprobs(model, forget, cfg.logit_chunk)
        forget_loss = npo_loss(logp, ref_logp, cfg.beta)
        total = forget_loss
        n_tokens = forget.valid[:, 1:].sum(-1).clamp_min(1)
        # per-token log-ratio: how much less likely the adapted model finds the forget text
        log_ratio = ((logp.detach() - ref_logp) / n_tokens).sum() / ranks.global_count(len(n_tokens), logp.device)
        shares = {"npo": forget_loss, "forget_log_ratio": log_ratio}
        if cfg.retain_weight > 0:
            retain_texts = ranks.shard(self._batch(self.retain, step, 2))
            retain = tokenize(loaded.tokenizer, retain_texts, cfg.max_length, loaded.device)
            token_lp, _ = token_logprobs(model, retain, cfg.logit_chunk)
            retain_nll = -token_lp.sum() / ranks.global_count(token_lp.numel(), token_lp.device)
            total = total + cfg.retain_weight * retain_nll
            shares["retain_nll"] = retain_nll
        values = ranks.sum(torch.stack([v.detach().float().reshape(()) for v in shares.values()])).tolist()
        terms = dict(zip(shares, values, strict=True))  # the global terms (each rank holds a share)
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError("the NPO loss diverged (non-finite)")
        return total, terms
