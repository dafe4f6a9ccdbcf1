"""Sequence-level unlikelihood (Welleck et al. 2020, "Neural Text Generation with Unlikelihood Training"):
an objective term that holds repetition during training instead of an early stop. The model continues
prompts greedily; every token of a token n-gram that repeats an earlier n-gram of the same text gets the
loss -log(1 - p(token | prefix)), summed and divided by the number of generated tokens as in the
reference code, which lowers exactly the probabilities that produced the loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sae_unlearn.distributed import world
from sae_unlearn.models.batch import logits_at
from sae_unlearn.models.generation import generate_ids


def repeated_ngram_positions(ids: Sequence[int], start: int, n: int) -> list[int]:
    """Positions >= `start` of every token of an n-gram that already occurred earlier in `ids` (Welleck's
    candidates: all tokens of the repeat, not only its last). Earlier n-grams include the prompt's
    (`ids[:start]`): a continuation that loops back to its prompt repeats too."""
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
    model: Any, tokenizer: Any, prompts: Sequence[str], new_tokens: int, n: int
) -> tuple[torch.Tensor, int]:
    """(sum of -log(1 - p) over the repeated tokens of greedy continuations of `prompts` / the number of
    generated tokens, the number of repeated tokens).

    The continuations are generated without gradient in eval mode and scored with gradient at the same
    weights, as the token ids the model chose (not re-tokenised text). Data-parallel: this rank's share of
    the global value (every rank's generated tokens in the denominator)."""
    was_training = model.training
    model.eval()
    try:
        continuations = generate_ids(model, tokenizer, prompts, new_tokens)
    finally:
        model.train(was_training)
    device = next(p.device for p in model.parameters())
    texts = [tokenizer(prompt).input_ids + ids for prompt, ids in zip(prompts, continuations, strict=True)]
    width = max(len(ids) for ids in texts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in texts], device=device)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in texts], device=device)
    rows: list[int] = []
    cols: list[int] = []
    for row, (ids, generated) in enumerate(zip(texts, continuations, strict=True)):
        for position in repeated_ngram_positions(ids, len(ids) - len(generated), n):
            rows.append(row)
            cols.append(position)
    generated_count = world().global_count(sum(len(ids) for ids in continuations), device)
    if not rows:
        return torch.zeros((), device=device), 0
    at_rows, at_cols = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    logits = logits_at(model, input_ids, attention_mask, at_rows, at_cols - 1)  # what predicted each token
    p = torch.softmax(logits, -1).gather(-1, input_ids[at_rows, at_cols].unsqueeze(-1)).squeeze(-1)
    return -torch.log1p(-p.clamp(max=1 - 1e-6)).sum() / generated_count, len(rows)
