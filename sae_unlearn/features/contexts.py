"""For selected features: top activating contexts in each corpus and activation histograms."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_unlearn.features.selection import SelectedFeature
from sae_unlearn.features.statistics import encode_layers, iter_batches
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.loading import LoadedSAE

N_BINS = 20


@dataclass
class FeatureExamples:
    top: dict[str, list[tuple[float, str, str, str]]] = field(default_factory=lambda: {"forget": [], "retain": []})
    hist: dict[str, list[int]] = field(default_factory=lambda: {"forget": [0] * N_BINS, "retain": [0] * N_BINS})
    bin_max: float = 1.0


def _context(tokenizer: Any, ids: list[int], pos: int, width: int) -> tuple[str, str, str]:
    left = tokenizer.decode(ids[max(0, pos - width) : pos], skip_special_tokens=True)
    token = tokenizer.decode(ids[pos : pos + 1], skip_special_tokens=True)
    right = tokenizer.decode(ids[pos + 1 : pos + 1 + width // 2], skip_special_tokens=True)
    return left, token, right


@torch.no_grad()
def collect_examples(
    loaded: LoadedModel,
    saes: Sequence[LoadedSAE],
    features: Sequence[SelectedFeature],
    corpora: Mapping[str, Sequence[str]],
    n_top: int = 5,
    width: int = 16,
    batch_size: int = 8,
    max_length: int = 256,
) -> dict[tuple[int, int], FeatureExamples]:
    by_layer: dict[int, list[int]] = {}
    for f in features:
        by_layer.setdefault(f.layer, []).append(f.index)
    wanted = [s for s in saes if s.layer in by_layer]
    out = {(f.layer, f.index): FeatureExamples(bin_max=max(f.forget_max, f.retain_max, 1e-6)) for f in features}
    heaps: dict[tuple[int, int, str], list[tuple[float, int, int, int]]] = {}
    tokens: dict[str, list[list[int]]] = {side: [] for side in corpora}
    for side, texts in corpora.items():
        for batch in iter_batches(texts, loaded.tokenizer, batch_size, max_length):
            latents, mask = encode_layers(loaded, wanted, batch, columns=by_layer)  # only the selected latents
            base = len(tokens[side])
            tokens[side].extend(batch["input_ids"].tolist())
            for layer, idxs in by_layer.items():
                z = latents[layer].cpu() * mask.unsqueeze(-1).cpu()
                for j, index in enumerate(idxs):
                    ex = out[(layer, index)]
                    zj = z[..., j]
                    fired = zj[zj > 0]
                    if len(fired):
                        bins = (fired / ex.bin_max * N_BINS).long().clamp(0, N_BINS - 1)
                        counts = torch.bincount(bins, minlength=N_BINS)
                        ex.hist[side] = [a + int(b) for a, b in zip(ex.hist[side], counts.tolist(), strict=True)]
                    # best token per sequence, so one paragraph does not fill the whole list
                    best, pos = zj.max(dim=1)
                    heap = heaps.setdefault((layer, index, side), [])
                    for row in range(zj.shape[0]):
                        if best[row] > 0:
                            item = (float(best[row]), base + row, int(pos[row]), len(heap))
                            if len(heap) < n_top:
                                heapq.heappush(heap, item)
                            else:
                                heapq.heappushpop(heap, item)
    for (layer, index, side), heap in heaps.items():
        out[(layer, index)].top[side] = [
            (act, *_context(loaded.tokenizer, tokens[side][row], pos, width))
            for act, row, pos, _ in sorted(heap, reverse=True)
        ]
    return out
