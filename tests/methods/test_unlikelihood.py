"""CRISP's unlikelihood term (methods/unlikelihood.py): the repeat positions on hand-made ids, the loss
against an independent full-logits computation on a tiny model, and a training step lowering it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sae_unlearn.methods import unlearn
from sae_unlearn.methods.unlikelihood import repeated_ngram_positions, unlikelihood_term
from sae_unlearn.models.generation import generate
from tests.conftest import tiny_model


def test_repeated_ngram_positions_mark_every_token_of_each_repeat_after_the_prompt() -> None:
    ids = [5, 1, 2, 3, 9, 1, 2, 3, 1, 2, 3]
    assert repeated_ngram_positions(ids, start=4, n=3) == [5, 6, 7, 8, 9, 10]
    assert repeated_ngram_positions(ids, start=4, n=4) == []  # no 4-gram occurs twice
    assert repeated_ngram_positions([1, 2, 3, 4, 1, 2, 3, 4], start=4, n=4) == [4, 5, 6, 7]
    assert repeated_ngram_positions([1, 2, 3, 1, 2, 3, 7, 8], start=6, n=3) == []  # repeats inside the prompt only
    assert repeated_ngram_positions([4, 4, 4, 4], start=1, n=2) == [1, 2, 3]
    assert repeated_ngram_positions([1, 2, 3, 4], start=0, n=2) == []


def _reference_loss(model, tokenizer, prompts, new_tokens: int, n: int) -> tuple[torch.Tensor, int]:
    """-log(1 - p) over the repeated tokens, from the model's full logits (no positions shortcut)."""
    model.eval()
    texts = [p + c for p, c in zip(prompts, generate(model, tokenizer, prompts, new_tokens), strict=True)]
    losses = []
    for prompt, text in zip(prompts, texts, strict=True):
        ids = tokenizer(text, return_tensors="pt").input_ids
        probs = torch.softmax(model(input_ids=ids).logits[0].float(), -1)
        start = len(tokenizer(prompt).input_ids)
        for t in repeated_ngram_positions(ids[0].tolist(), start, n):
            losses.append(-torch.log(1 - probs[t - 1, ids[0, t]]))
    return (torch.stack(losses).mean() if losses else torch.zeros(())), len(losses)


def test_unlikelihood_term_matches_full_logits_and_a_step_on_it_lowers_it(tokenizer) -> None:
    model = tiny_model("llama", len(tokenizer), n_layers=2)
    prompts = ["Harry Potter went to", "The wizard said"]
    loss, count = unlikelihood_term(model, tokenizer, prompts, new_tokens=24, n=2, max_length=256)
    expected, expected_count = _reference_loss(model, tokenizer, prompts, 24, 2)
    assert count == expected_count > 0  # a random tiny model loops
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
    after, after_count = _reference_loss(model, tokenizer, prompts, 24, 2)  # regenerated after the step
    assert after_count < count or after < expected


def test_crisp_trains_the_unlikelihood_term_only_when_weighted(setup, tmp_path: Path) -> None:
    loaded, saes, pack, selection, spec = setup
    options = {"steps": 2, "batch_size": 2, "max_length": 32, "fluency_every": 0, "checkpoint_every": 0}

    def run(name: str, **kw) -> list[dict]:
        out = unlearn(
            "crisp",
            loaded,
            pack,
            tmp_path / name,
            options={**options, **kw},
            saes=saes,
            sae_spec=spec,
            features=selection,
        )
        return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]

    plain = run("plain")
    weighted = run("weighted", unlikelihood_weight=1.0, unlikelihood_tokens=16, unlikelihood_ngram=2)
    assert all("unlikelihood" not in r for r in plain)
    assert all(r["unlikelihood"] >= 0 for r in weighted) and any(r["unlikelihood"] > 0 for r in weighted)
    # the term is added to the total: total - the other terms' weighted sum grows by it
    assert weighted[0]["unlearn"] == plain[0]["unlearn"]  # the first forward pass is the same
