"""Grow a forget corpus from the model's own continuations of concept prompts: what the model itself
says about the concept, which is exactly what unlearning has to remove."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from sae_unlearn.models.generation import generate
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.text_metrics import foreign_script_share, repeated_ngram_share


def keep_paragraph(prompt: str, text: str, min_words: int = 30, max_repeat: float = 0.2) -> bool:
    words = text.split()
    return (
        len(words) >= min_words
        and repeated_ngram_share(words) <= max_repeat
        and foreign_script_share(prompt, text) < 0.05
    )


def _key(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", "", text.lower()).split()[:12])


def generate_corpus(
    loaded: LoadedModel,
    prompts: Sequence[str],
    n: int,
    max_new_tokens: int = 96,
    temperature: float = 0.8,
    batch_size: int = 16,
    seed: int = 0,
    max_rounds: int = 50,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Sample continuations until `n` distinct, fluent paragraphs are kept (or `max_rounds` batches)."""
    kept: list[str] = []
    seen: set[str] = set()
    for round_ in range(max_rounds):
        batch = [prompts[(round_ * batch_size + i) % len(prompts)] for i in range(batch_size)]
        texts = generate(
            loaded.model, loaded.tokenizer, batch, max_new_tokens, temperature=temperature, seed=seed + round_
        )
        for prompt, cont in zip(batch, texts, strict=True):
            cut = cont.rsplit(".", 1)[0] + "." if "." in cont else cont  # end on a full sentence
            paragraph = re.sub(r"\s+", " ", f"{prompt} {cut}").strip()
            key = _key(cut)
            if key not in seen and keep_paragraph(prompt, paragraph):
                seen.add(key)
                kept.append(paragraph)
        if progress is not None:
            progress(min(len(kept), n))
        if len(kept) >= n:
            break
    return kept[:n]
