"""A small batched decoding loop with a dynamic KV cache.

`model.generate` on Gemma 3 allocates a static hybrid cache sized to the context window on every
call, which dominates short CPU generations; this loop only grows what it needs. It works
with forward hooks (clamp/ablate) and PEFT-wrapped models alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sae_unlearn.models.hooks import decoder_body, lm_head_logits
from sae_unlearn.models.loading import main_device


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 40,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[str]:
    """Continue each prompt; greedy when temperature == 0. Returns only the continuations."""
    rows = generate_ids(model, tokenizer, prompts, max_new_tokens, temperature, top_k, seed, stop_at_eos)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 40,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """`generate`'s continuations as the token ids the model chose (with `stop_at_eos`, up to and
    including the first EOS)."""
    if not prompts:
        return []
    device = main_device(model)  # a sharded model: its first device
    body = decoder_body(model)
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    ids, mask = enc.input_ids, enc.attention_mask
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cache = None
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    eos = tokenizer.eos_token_id
    out: list[torch.Tensor] = []
    step_ids = ids
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1] :]
        res = body(
            input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        cache = res.past_key_values
        logits = lm_head_logits(model, res.last_hidden_state[:, -1])  # the lm_head only where a token is read
        if temperature > 0:
            top, order = (logits / temperature).topk(top_k, dim=-1)
            pick = torch.multinomial(torch.softmax(top, -1).cpu(), 1, generator=gen).to(device)
            nxt = order.gather(-1, pick)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        if eos is not None and stop_at_eos:
            nxt = torch.where(done.unsqueeze(-1), torch.full_like(nxt, eos), nxt)
            done |= nxt.squeeze(-1) == eos
        out.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        step_ids = nxt
        if bool(done.all()):
            break
    rows = torch.cat(out, dim=1).tolist()
    if eos is not None and stop_at_eos:
        rows = [row[: row.index(eos) + 1] if eos in row else row for row in rows]
    return rows
