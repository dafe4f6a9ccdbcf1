"""Column-sparse SAE encoding and the one feature edit every method and report uses.

`encode_columns(sae, x, cols)` returns the activations of the latents `cols` exactly as SAELens'
`encode` computes them (input normalisation via `process_sae_in`, JumpReLU thresholds, gates, TopK
selection, decoder-norm rescaling) without materialising the other latents where the architecture
allows it: standard, JumpReLU and gated SAEs are elementwise per latent, so only `W_enc[:, cols]` is
multiplied; TopK needs every pre-activation to know the top k, so it is encoded sparsely (values and
ids [..., k]) and the columns read from that. Other architectures fall back to the dense `encode`.

`apply_feature_edit(sae, x, cols, new_values)` returns x + decode(z') - decode(z), where z' differs
from z only in `cols`, with the error term kept. When the decoder is linear in z (no run-time
input normalisation; decoder-norm rescaling is a per-latent constant) that difference is exactly
(z'_S - z_S) @ W_dec[S] and is computed column-sparse. Otherwise (`normalize_activations` =
`layer_norm` or `constant_norm_rescale`, whose `decode` rescales by statistics that `encode` stored
on the SAE and `decode` consumes) we encode once and decode z' and z stacked in ONE `decode` call,
so SAELens' own de-normalisation is applied to both. Tokens where no selected latent changes get
x back bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sae_unlearn.saes.loading import encode_topk_sparse, pre_activations

LINEAR_NORMALISATIONS = ("none", "expected_average_only_in", None)
NewValues = Callable[[torch.Tensor], torch.Tensor]


def sae_kind(sae: Any) -> str:
    """'standard', 'jumprelu', 'gated', 'topk' for the SAELens inference classes; 'other' otherwise."""
    from sae_lens.saes import GatedSAE, JumpReLUSAE, StandardSAE, TopKSAE, TopKTrainingSAE

    kinds: dict[type, str] = {
        StandardSAE: "standard",
        JumpReLUSAE: "jumprelu",
        GatedSAE: "gated",
        TopKSAE: "topk",
        TopKTrainingSAE: "topk",  # BatchTopK subclasses select per batch, not per token: 'other'
    }
    return kinds.get(type(sae), "other")


def linear_decoder(sae: Any) -> bool:
    """True when decode(z') - decode(z) is exactly (z' - z) times the (rescaled) decoder rows."""
    return getattr(sae.cfg, "normalize_activations", "none") in LINEAR_NORMALISATIONS


def _as_index(cols: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(cols, dtype=torch.long, device=device)


def selected_pre_activations(sae: Any, sae_in: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Pre-activations of `cols` from an already processed input (`sae.process_sae_in(x)`); for gated
    SAEs the magnitude path (SAELens' `hook_sae_acts_pre`)."""
    if sae_kind(sae) == "gated":
        return sae_in @ (sae.W_enc[:, cols] * sae.r_mag[cols].exp()) + sae.b_mag[cols]
    pre = sae_in @ sae.W_enc[:, cols] + sae.b_enc[cols]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        pre = pre * sae.W_dec[cols].norm(dim=-1)
    return pre


def activate_columns(sae: Any, sae_in: torch.Tensor, pre: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The SAE's activation of the pre-activations `pre` of latents `cols` (elementwise architectures).

    JumpReLU: relu(pre) * (pre > threshold); gated: relu(magnitude) * (gate pre > 0); standard: its
    activation_fn. `sae_in` is only read by gated SAEs (their gate has its own pre-activation)."""
    kind = sae_kind(sae)
    if kind == "jumprelu":
        return torch.relu(pre) * (pre > sae.threshold[cols]).to(pre.dtype)
    if kind == "gated":
        gate = (sae_in @ sae.W_enc[:, cols] + sae.b_gate[cols]) > 0
        return torch.relu(pre) * gate.to(pre.dtype)
    if kind == "standard":
        return sae.activation_fn(pre)
    raise ValueError(f"{type(sae).__name__} is not an elementwise SAE")


def encode_columns(sae: Any, x: torch.Tensor, cols: torch.Tensor | list[int]) -> torch.Tensor:
    """Activations [..., len(cols)] of the latents `cols`, as `sae.encode(x)[..., cols]` (see module doc)."""
    idx = _as_index(cols, sae.W_enc.device)
    x = x.to(sae.W_enc.dtype)
    kind = sae_kind(sae)
    if kind == "topk":
        sparse = encode_topk_sparse(sae, x)
        assert sparse is not None
        values, ids = sparse
        hit = ids.unsqueeze(-1) == idx  # [..., k, n]: at most one hit per column
        return torch.where(hit, values.unsqueeze(-1), torch.zeros((), dtype=values.dtype, device=values.device)).sum(-2)
    if kind in ("standard", "jumprelu", "gated"):
        sae_in = sae.process_sae_in(x)
        return activate_columns(sae, sae_in, selected_pre_activations(sae, sae_in, idx), idx)
    return sae.encode(x)[..., idx]


def apply_feature_edit(
    sae: Any,
    x: torch.Tensor,
    cols: torch.Tensor | list[int],
    new_values: NewValues,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """x + decode(z') - decode(z), z' = z with `z[..., cols]` replaced by `new_values(z[..., cols])`.

    `keep` [...] (bool) marks the tokens that may be edited (others are returned unchanged). The
    result has x's dtype; tokens whose selected latents do not change are x exactly."""
    idx = _as_index(cols, sae.W_enc.device)
    if idx.numel() == 0:
        return x
    xs = x.to(sae.W_enc.dtype)
    if linear_decoder(sae):
        old = encode_columns(sae, xs, idx)
        new = new_values(old)
        if keep is not None:
            new = torch.where(keep.unsqueeze(-1), new, old)
        change = new - old
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            change = change * (1 / sae.W_dec[idx].norm(dim=-1))  # as SAELens' act_times_W_dec
        delta = change @ sae.W_dec[idx]
        changed = (change != 0).any(-1)
    else:
        z = sae.encode(xs)  # stores the normalisation statistics that one decode call consumes
        old = z[..., idx]
        new = new_values(old)
        if keep is not None:
            new = torch.where(keep.unsqueeze(-1), new, old)
        z_new = z.clone()
        z_new[..., idx] = new
        both = sae.decode(torch.stack([z_new, z]))
        delta = both[0] - both[1]
        changed = (new != old).any(-1)
    return torch.where(changed.unsqueeze(-1), x + delta.to(x.dtype), x)


def clamp_values(threshold: float, value: float) -> NewValues:
    """Set latents above `threshold` to `value` (conditional clamping)."""
    return lambda z: torch.where(z > threshold, torch.full_like(z, value), z)


def scale_values(threshold: float, scale: float) -> NewValues:
    """Multiply latents above `threshold` by `scale` (feature ablation by negative scaling)."""
    return lambda z: torch.where(z > threshold, z * scale, z)


def refusal_values(threshold: float, value: float) -> NewValues:
    """For cols = [*features, refusal]: set the refusal latent to `value` on tokens where any of the
    features is above `threshold`; the features themselves are left as they are."""

    def new_values(z: torch.Tensor) -> torch.Tensor:
        fires = (z[..., :-1] > threshold).any(-1)
        out = z.clone()
        out[..., -1] = torch.where(fires, torch.full_like(z[..., -1], value), z[..., -1])
        return out

    return new_values


__all__ = [
    "activate_columns",
    "apply_feature_edit",
    "clamp_values",
    "encode_columns",
    "linear_decoder",
    "pre_activations",
    "refusal_values",
    "sae_kind",
    "scale_values",
    "selected_pre_activations",
]
