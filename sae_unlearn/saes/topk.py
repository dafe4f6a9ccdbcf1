"""Top-k over the last dimension, for the k-of-thousands selections TopK SAEs make on every token.

On CPU, `torch.topk` keeps a k-entry heap per row and pays it for every one of the row's d_sae entries,
which can cost as much as the encoder product feeding it. Split each row into
groups (group g holds columns g, g + G, g + 2G, ...): the row's top k entries all lie in the k groups
with the largest maxima, since every other group's maximum is beaten by k group maxima. So one cheap
max per group, a top-k over the G group maxima and a top-k over the k chosen groups' entries give the
same values (ties may pick other, equal, entries) while touching most entries only with a cheap max
(`benchmarks/bench_pipeline.py` times the two on the machine at hand).
"""

from __future__ import annotations

import torch

PER_GROUP = 8  # entries per group: for 5,120 latents and k = 64, a top-k over 640 maxima, then over 512


def topk_last_dim(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries along the last dimension, in no particular order."""
    *lead, width = x.shape
    groups = width // PER_GROUP
    if x.device.type != "cpu" or width % PER_GROUP or groups < 2 * k:
        return x.topk(k, dim=-1, sorted=False)
    rows = x.reshape(-1, PER_GROUP, groups)
    chosen = rows.amax(1).topk(k, dim=-1, sorted=False).indices
    candidates = rows.gather(2, chosen[:, None, :].expand(-1, PER_GROUP, k)).flatten(1)
    values, position = candidates.topk(k, dim=-1, sorted=False)
    indices = (position // k) * groups + chosen.gather(1, position % k)
    return values.view(*lead, k), indices.view(*lead, k)
