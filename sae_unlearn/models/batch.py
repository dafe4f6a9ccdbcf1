"""Tokenised batches with their valid-token mask, the hidden states of a batch and logits at chosen
positions: the low-level pieces that training, attacks, scoring and text metrics share. Padding side is
an argument of each call; the tokenizer's own `padding_side` is never changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sae_unlearn.models.hooks import (
    capture_resid_post,
    capture_resid_post_and_final,
    decoder_body,
    lm_head_logits,
    token_policy,
    valid_token_mask,
)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    valid: torch.Tensor  # no BOS, no padding, no position 0 without BOS (models.hooks.TokenPolicy)


@dataclass
class Hidden:
    hidden: dict[int, torch.Tensor]
    final: torch.Tensor | None = None


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    device: torch.device,
    keep_first: bool = False,
    padding_side: str = "right",
) -> Batch:
    """`texts` padded to one batch (truncated at `max_length`) on `device`, with the valid-token mask."""
    enc = tokenizer(
        list(texts),
        return_tensors="pt",
        padding=True,
        padding_side=padding_side,
        truncation=True,
        max_length=max_length,
    ).to(device)
    valid = valid_token_mask(enc.input_ids, enc.attention_mask, token_policy(tokenizer, keep_first))
    return Batch(enc.input_ids, enc.attention_mask, valid)


def hidden_at_layers(model: Any, batch: Batch, layers: Sequence[int] | None, final: bool = False) -> Hidden:
    """resid_post (block outputs) at `layers` (forward stopped at the deepest unless `final`) and/or
    the final normed hidden state (`final`, or `layers` None), all from `models.hooks`."""
    if layers is None or final:
        hidden, last = capture_resid_post_and_final(model, batch.input_ids, batch.attention_mask, layers or [])
        return Hidden(hidden, last)
    return Hidden(capture_resid_post(model, batch.input_ids, batch.attention_mask, layers))


def logits_at(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits [n, vocab] at (rows, cols) only: the body runs once, the lm_head only where needed."""
    hidden = decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return lm_head_logits(model, hidden[rows, cols])
