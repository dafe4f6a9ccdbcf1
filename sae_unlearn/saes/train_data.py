"""The SAE trainer's data: paragraphs packed into BOS-led sequences, batched, run through the model for
the valid tokens' activations, and the per-layer normalisation statistics (outlier cut, mean, scale)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sae_unlearn.models.hooks import capture_resid_post, special_token_ids, valid_token_mask
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.train_config import NORMALIZATION_EXPONENTS, SAETrainingConfig

log = logging.getLogger(__name__)


@dataclass
class NormStats:
    """Per-layer input statistics: x_norm = (x - mean) / scale; tokens with ||x|| > max_norm are skipped."""

    mean: torch.Tensor
    scale: torch.Tensor
    max_norm: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def pack_sequences(texts: Sequence[str], tokenizer: Any, context_size: int, epoch_seed: int) -> Iterator[list[int]]:
    """Shuffle paragraphs (per epoch) and pack them into BOS + (context_size - 1) token sequences."""
    order = list(range(len(texts)))
    random.Random(epoch_seed).shuffle(order)
    bos = tokenizer.bos_token_id
    sep = tokenizer.eos_token_id
    body = context_size - (1 if bos is not None else 0)
    buf: list[int] = []
    for i in order:
        buf.extend(tokenizer(texts[i], add_special_tokens=False).input_ids)
        if sep is not None:
            buf.append(sep)
        while len(buf) >= body:
            chunk, buf = buf[:body], buf[body:]
            yield ([bos] if bos is not None else []) + chunk


def count_sequences(texts: Sequence[str], tokenizer: Any, context_size: int) -> int:
    return sum(1 for _ in pack_sequences(texts, tokenizer, context_size, 0))


def batch_sequences(seqs: Iterator[list[int]], n: int) -> Iterator[torch.Tensor]:
    batch: list[list[int]] = []
    for seq in seqs:
        batch.append(seq)
        if len(batch) == n:
            yield torch.tensor(batch)
            batch = []
    if batch:
        yield torch.tensor(batch)


def layer_activations(loaded: LoadedModel, ids: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """resid_post of each layer for valid (non-BOS, non-pad) tokens, as float32 [n_tokens, d_model]."""
    ids = ids.to(loaded.device)
    with torch.no_grad():
        acts = capture_resid_post(loaded.model, ids, None, layers)
    mask = valid_token_mask(ids, None, special_token_ids(loaded.tokenizer))
    return {layer: acts[layer][mask].float() for layer in layers}


def normalization_scale(x: torch.Tensor, mean: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-dimension scale: std ** exponent, times one factor that brings the mean norm to sqrt(d_model)."""
    scale = x.std(0).clamp_min(1e-6) ** NORMALIZATION_EXPONENTS[kind]
    return scale * float(((x - mean) / scale).norm(dim=-1).mean() / math.sqrt(x.shape[1]))


def estimate_norm_stats(batches: Iterator[dict[int, torch.Tensor]], cfg: SAETrainingConfig) -> dict[int, NormStats]:
    pooled: dict[int, list[torch.Tensor]] = {layer: [] for layer in cfg.layers}
    n = 0
    for acts in batches:
        for layer, x in acts.items():
            pooled[layer].append(x)
        n += next(iter(acts.values())).shape[0]
        if n >= cfg.norm_estimate_tokens:
            break
    stats = {}
    for layer, chunks in pooled.items():
        x = torch.cat(chunks)
        norms = x.norm(dim=-1)
        max_norm = float(cfg.outlier_factor * norms.median())
        keep = x[norms <= max_norm]
        mean = keep.mean(0)
        scale = normalization_scale(keep, mean, cfg.normalize)
        stats[layer] = NormStats(mean, scale, max_norm)
        top = (keep.var(0) / keep.var(0).sum()).topk(3).values.tolist()
        log.info(
            "layer %d: median norm %.0f, outliers %.2f%%, variance share of top-3 dims %s",
            layer,
            float(norms.median()),
            100 * float((norms > max_norm).float().mean()),
            [round(v, 3) for v in top],
        )
    return stats
