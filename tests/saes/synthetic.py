"""Synthetic SAEs in SAELens format (random weights, tiny dims) of the architectures the papers used:
JumpReLU (GemmaScope), TopK with layer-norm input normalisation (LlamaScope-style), standard, gated."""

from __future__ import annotations

from typing import Any

import torch

ARCHS = ("jumprelu", "topk_ln", "standard", "gated")


def synthetic_sae(arch: str, layer: int, d_in: int = 64, d_sae: int = 96, seed: int = 0, k: int = 6) -> Any:
    from sae_lens.saes import (
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    torch.manual_seed(seed)
    common: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu"}
    if arch == "jumprelu":
        sae: Any = JumpReLUSAE(JumpReLUSAEConfig(**common))
    elif arch == "topk_ln":
        sae = TopKSAE(TopKSAEConfig(k=k, normalize_activations="layer_norm", **common))
    elif arch == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif arch == "gated":
        sae = GatedSAE(GatedSAEConfig(**common))
    else:
        raise ValueError(arch)
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.normal_(0, 0.3 if name.startswith("W") else 0.1)
        if arch == "jumprelu":  # a threshold that some positive pre-activations fall under
            sae.threshold.uniform_(0.05, 0.6)
        if arch == "gated":
            sae.r_mag.zero_()
    return sae.requires_grad_(False)


def silence_feature(sae: Any, feature: int) -> None:
    """Make `feature` fire on no input (a very negative encoder bias, on every path that gates it)."""
    with torch.no_grad():
        for name in ("b_enc", "b_gate", "b_mag"):
            if getattr(sae, name, None) is not None:
                getattr(sae, name)[feature] = -1e4
