"""Sequence-level unlikelihood (Welleck et al. 2020, "Neural Text Generation with Unlikelihood Training"):
an objective term that holds repetition during training instead of an early stop. The model continues
prompts greedily; every token of a token n-gram that repeats an earlier n-gram of the same text gets the
loss -log(1 - p(token | prefix)), which lowers exactly the probabilities that produced the loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sae_unlearn.distributed import world
from sae_unlearn.models.batch import logits_at, tokenize
from sae_unlearn.models.generation import generate


def repeated_ngram_positions(ids: Sequence[int], start: int, n: int) -> list[int]:
    """Positions >= `start` of every token of an n-gram that already occurred earlier in `ids` (Welleck's
    candidates: all tokens of the repeat, not only its last)."""
    seen: set[tuple[int, ...]] = set()
    marked: set[int] = set()
    for end in range(n, len(ids) + 1):
        gram = tuple(ids[end - n : end])
        if gram in seen:
            marked.update(i for i in range(end - n, end) if i >= start)
        seen.add(gram)
    return sorted(marked)


def opening_words(text: str, words: int) -> str:
    """The first `words` words of `text` (the prompt a paragraph's continuation is generated from)."""
    return " ".join(text.split()[:words])


def unlikelihood_term(
    model: Any, tokenizer: Any, prompts: Sequence[str], new_tokens: int, n: int, max_length: int
) -> tuple[torch.Tensor, int]:
    """(mean -log(1 - p) over the repeated tokens of greedy continuations of `prompts`, their count).

    The continuations are generated without gradient in eval mode; the loss is read with gradient at the
    same weights. Data-parallel: this rank's share of the mean over every rank's repeated tokens."""
    was_training = model.training
    model.eval()
    continuations = generate(model, tokenizer, prompts, new_tokens, stop_at_eos=True)
    model.train(was_training)
    device = next(p.device for p in model.parameters())
    batch = tokenize(tokenizer, [p + c for p, c in zip(prompts, continuations, strict=True)], max_length, device)
    rows: list[int] = []
    cols: list[int] = []
    for row, (prompt, ids, mask) in enumerate(zip(prompts, batch.input_ids, batch.attention_mask, strict=True)):
        tokens = ids[mask.bool()].tolist()
        start = max(1, len(tokenizer(prompt).input_ids))  # the continuation's first token
        for position in repeated_ngram_positions(tokens, start, n):
            rows.append(row)
            cols.append(position)
    count = world().global_count(len(rows), device)
    if not rows:
        return torch.zeros((), device=device, requires_grad=False), 0
    at = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    logits = logits_at(model, batch.input_ids, batch.attention_mask, at[0], at[1] - 1)  # what predicted each token
    p = torch.softmax(logits, -1).gather(-1, batch.input_ids[at].unsqueeze(-1)).squeeze(-1)
    loss = -torch.log1p(-p.clamp(max=1 - 1e-6))
    return loss.sum() / count, len(rows)
