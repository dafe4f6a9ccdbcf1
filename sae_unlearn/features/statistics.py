"""Streaming SAE feature statistics over a forget and a retain corpus (all SAE layers from one pass).

Per layer and latent: firing counts (activation > 0), summed and max activations, over valid tokens
only (BOS, padding and, for tokenizers without BOS, position 0 masked: models.hooks.TokenPolicy).
TopK SAEs are encoded sparsely (k entries per token); others in chunks of LATENT_CHUNK latents.
Cached on disk, keyed by a hash of model, SAEs, corpora and settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sae_unlearn.distributed import world
from sae_unlearn.errors import UserError
from sae_unlearn.io import atomic_save_safetensors, cache_dir, hash_json, sha256_file
from sae_unlearn.models.hooks import capture_resid_post, token_policy, valid_token_mask
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.edit import encode_columns
from sae_unlearn.saes.loading import LoadedSAE, encode_topk_sparse

log = logging.getLogger(__name__)
STATS_VERSION = 3  # 3: position 0 masked for tokenizers without BOS
LATENT_CHUNK = 8192  # latents encoded at once for non-TopK SAEs (memory ~ tokens x this)
SIDES = ("forget", "retain")


@dataclass
class LayerStats:
    """Statistics of one SAE layer; each tensor has one entry per latent."""

    layer: int
    forget_count: torch.Tensor
    retain_count: torch.Tensor
    forget_sum: torch.Tensor
    retain_sum: torch.Tensor
    forget_max: torch.Tensor
    retain_max: torch.Tensor
    forget_tokens: int
    retain_tokens: int

    @property
    def forget_rate(self) -> torch.Tensor:
        return self.forget_count / max(1, self.forget_tokens)

    @property
    def retain_rate(self) -> torch.Tensor:
        return self.retain_count / max(1, self.retain_tokens)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"L{self.layer}.{name}": getattr(self, name).contiguous()
            for name in ("forget_count", "retain_count", "forget_sum", "retain_sum", "forget_max", "retain_max")
        }


def iter_batches(
    texts: Sequence[str], tokenizer: Any, batch_size: int, max_length: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of whole paragraphs (truncated at max_length), BOS added by the tokenizer."""
    for start in range(0, len(texts), batch_size):
        yield tokenizer(
            list(texts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=max_length,
        )


def _resid_and_mask(
    loaded: LoadedModel, saes: Sequence[LoadedSAE], batch: dict[str, torch.Tensor], keep_first: bool = False
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """resid_post at the SAEs' layers (one forward pass, stopped at the deepest) and the valid-token
    mask (models.hooks.TokenPolicy: no BOS, padding, or position 0 without BOS unless `keep_first`)."""
    ids = batch["input_ids"].to(loaded.device)
    attn = batch["attention_mask"].to(loaded.device)
    with torch.no_grad():
        acts = capture_resid_post(loaded.model, ids, attn, [s.layer for s in saes])
    return acts, valid_token_mask(ids, attn, token_policy(loaded.tokenizer, keep_first))


def encode_layers(
    loaded: LoadedModel,
    saes: Sequence[LoadedSAE],
    batch: dict[str, torch.Tensor],
    columns: Mapping[int, Sequence[int]] | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """SAE latents [B, T, d_sae] per layer for one batch, and the valid-token mask [B, T].

    With `columns` ({layer: latent ids}), only those latents are encoded (`saes.edit.encode_columns`)
    and each layer's tensor is [B, T, len(columns[layer])] in that order."""
    wanted = [s for s in saes if columns is None or s.layer in columns]
    acts, mask = _resid_and_mask(loaded, wanted, batch)
    with torch.no_grad():
        if columns is None:
            latents = {s.layer: s.sae.encode(acts[s.layer].to(s.sae.W_enc.dtype)).float() for s in wanted}
        else:
            latents = {s.layer: encode_columns(s.sae, acts[s.layer], list(columns[s.layer])).float() for s in wanted}
    return latents, mask


Latents = tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor]


def encode_valid_tokens(
    loaded: LoadedModel,
    saes: Sequence[LoadedSAE],
    batch: dict[str, torch.Tensor],
    chunk_latents: int = LATENT_CHUNK,
) -> dict[int, Latents]:
    """Per layer, the latents of the valid tokens only (BOS/padding never encoded): (values, ids) [N, k]
    for TopK SAEs; for other SAEs a list of dense [N, <= chunk_latents] blocks of consecutive latents,
    each encoded on its own (`encode_columns`), so memory is bounded by a chunk, not by N x d_sae."""
    acts, mask = _resid_and_mask(loaded, saes, batch)
    out: dict[int, Latents] = {}
    with torch.no_grad():
        for s in saes:
            x = acts[s.layer][mask].to(s.sae.W_enc.dtype)
            sparse = encode_topk_sparse(s.sae, x)
            if sparse is not None:
                out[s.layer] = sparse
            elif s.d_sae <= chunk_latents:
                out[s.layer] = [s.sae.encode(x)]
            else:
                out[s.layer] = [
                    encode_columns(s.sae, x, list(range(start, min(start + chunk_latents, s.d_sae))))
                    for start in range(0, s.d_sae, chunk_latents)
                ]
    return out


def accumulate_latents(acc: dict[str, Any], side: str, latents: Latents) -> None:
    if isinstance(latents, tuple):  # sparse: touch only the k active entries per token
        values, ids = latents
        v, i = values.flatten().float(), ids.flatten()
        n_tokens = values.shape[0]
        acc[f"{side}_count"] += torch.bincount(i[v > 0], minlength=len(acc[f"{side}_count"]))
        acc[f"{side}_sum"].index_add_(0, i, v)
        acc[f"{side}_max"].scatter_reduce_(0, i, v, "amax")
    else:  # consecutive blocks of latents
        n_tokens = latents[0].shape[0] if latents else 0
        start = 0
        for block in latents:
            z = block.float()
            cols = slice(start, start + z.shape[1])
            acc[f"{side}_count"][cols] += (z > 0).sum(0)
            acc[f"{side}_sum"][cols] += z.sum(0)
            if n_tokens:
                acc[f"{side}_max"][cols] = torch.maximum(acc[f"{side}_max"][cols], z.max(0).values)
            start += z.shape[1]
    acc[f"{side}_tokens"] += n_tokens


def stats_key(
    loaded: LoadedModel, saes: Sequence[LoadedSAE], forget: Sequence[str], retain: Sequence[str], max_length: int
) -> str:
    sae_ids = []
    for s in saes:
        weights = Path(s.spec) / "sae_weights.safetensors"
        sae_ids.append(sha256_file(weights) if weights.exists() else s.spec)
    corpus = hash_json([list(forget), list(retain)])
    return hash_json(
        {
            "v": STATS_VERSION,
            "model": loaded.source,
            "dtype": str(loaded.dtype),
            "sae_dtypes": sorted({str(s.sae.W_enc.dtype) for s in saes}),  # products run in the SAEs' dtype
            "saes": sae_ids,
            "corpus": corpus,
            "max_length": max_length,
        }
    )


def stats_cache_path(
    loaded: LoadedModel, saes: Sequence[LoadedSAE], forget: Sequence[str], retain: Sequence[str], max_length: int
) -> Path:
    """Where `compute_stats` keeps (and looks for) these statistics."""
    return cache_dir() / "features" / f"{stats_key(loaded, saes, forget, retain, max_length)}.safetensors"


def compute_stats(
    loaded: LoadedModel,
    saes: Sequence[LoadedSAE],
    forget: Sequence[str],
    retain: Sequence[str],
    batch_size: int = 8,
    max_length: int = 256,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, LayerStats]:
    if not forget:
        raise UserError("the forget corpus is empty", "give the concept pack a forget file with text")
    if not retain:
        raise UserError("the retain corpus is empty", "give the concept pack a retain file with text")
    path = stats_cache_path(loaded, saes, forget, retain, max_length)
    ranks = world()
    if use_cache and ranks.broadcast(path.exists()):  # data-parallel: the main rank's cache decides
        log.info("reusing cached feature statistics %s", path.name)
        cached = ranks.broadcast(load_stats(path) if ranks.is_main else None)
        assert cached is not None
        return cached
    acc: dict[int, dict[str, Any]] = {}
    for s in saes:
        zeros = torch.zeros(s.d_sae, device=loaded.device)  # on the GPU: no per-batch copies to the host
        acc[s.layer] = {f"{side}_{kind}": zeros.clone() for side in SIDES for kind in ("count", "sum", "max")}
        acc[s.layer].update(forget_tokens=0, retain_tokens=0)
    # data-parallel: each rank reads a contiguous share of each corpus, then the sums are reduced
    shares = {"forget": ranks.shard(forget), "retain": ranks.shard(retain)}
    total = len(shares["forget"]) + len(shares["retain"])
    done = 0
    for side in SIDES:
        for batch in iter_batches(shares[side], loaded.tokenizer, batch_size, max_length):
            for layer, latents in encode_valid_tokens(loaded, saes, batch).items():
                accumulate_latents(acc[layer], side, latents)
            done += batch["input_ids"].shape[0]
            if progress is not None and ranks.is_main:
                progress(done, total)
    stats = {layer: LayerStats(layer=layer, **_to_cpu(reduce_across_ranks(a))) for layer, a in acc.items()}
    if ranks.is_main:
        save_stats(path, stats)
    return stats


def _to_cpu(acc: dict[str, Any]) -> dict[str, Any]:
    return {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in acc.items()}


def reduce_across_ranks(acc: dict[str, Any]) -> dict[str, Any]:
    """One layer's accumulators summed over the data-parallel ranks (maxima: maximum); identity on one."""
    ranks = world()
    if not ranks.active:
        return acc
    out: dict[str, Any] = {}
    device = next(v.device for v in acc.values() if isinstance(v, torch.Tensor))  # NCCL reduces GPU tensors only
    for name, value in acc.items():
        if name.endswith("_tokens"):
            out[name] = int(ranks.sum(torch.tensor(float(value), dtype=torch.float64, device=device)))
        elif name.endswith("_max"):
            out[name] = ranks.max(value)
        else:
            out[name] = ranks.sum(value)
    return out


def save_stats(path: Path, stats: dict[int, LayerStats]) -> None:
    """One file, written atomically: the token counts travel in the safetensors header, so no crash
    can leave tensors without their counts (or counts of another run)."""
    tensors: dict[str, torch.Tensor] = {}
    for s in stats.values():
        tensors.update(s.tensors())
    meta = {str(s.layer): {"forget_tokens": s.forget_tokens, "retain_tokens": s.retain_tokens} for s in stats.values()}
    atomic_save_safetensors(path, tensors, metadata={"layers": json.dumps(meta)})


def load_stats(path: Path) -> dict[int, LayerStats]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["layers"])
    tensors = load_file(str(path))
    out = {}
    for layer_str, tokens in meta.items():
        layer = int(layer_str)
        fields = {
            name: tensors[f"L{layer}.{name}"]
            for name in ("forget_count", "retain_count", "forget_sum", "retain_sum", "forget_max", "retain_max")
        }
        out[layer] = LayerStats(layer=layer, **fields, **tokens)
    return out
