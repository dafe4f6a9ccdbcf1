"""CRISP's unlikelihood term (methods/unlikelihood.py): the repeat positions on hand-made ids, the loss
against an independent greedy loop and full-logits computation on a tiny model, a gradient step lowering
it, and its place in CRISP's total."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sae_unlearn.methods import unlearn
from sae_unlearn.methods.unlikelihood import repeated_ngram_positions, unlikelihood_term
from tests.conftest import tiny_model


def test_repeated_ngram_positions_mark_every_token_of_each_repeat_after_the_prompt() -> None:
    ids = [5, 1, 2, 3, 9, 1, 2, 3, 1, 2, 3]
    assert repeated_ngram_positions(ids, start=4, n=3) == [5, 6, 7, 8, 9, 10]
    assert repeated_ngram_positions(ids, start=4, n=4) == []  # no 4-gram occurs twice
    assert repeated_ngram_positions([1, 2, 3, 4, 1, 2, 3, 4], start=4, n=4) == [4, 5, 6, 7]
    assert repeated_ngram_positions([1, 2, 3, 1, 2, 3, 7, 8], start=6, n=3) == []  # repeats inside the prompt only
    assert repeated_ngram_positions([7, 8, 9, 7, 8, 9], start=3, n=3) == [3, 4, 5]  # looping back to the prompt
    assert repeated_ngram_positions([4, 4, 4, 4], start=1, n=2) == [1, 2, 3]
    assert repeated_ngram_positions([1, 2, 3, 4], start=0, n=2) == []


@torch.no_grad()
def _greedy(model, prompt_ids: list[int], new_tokens: int, eos: int) -> list[int]:
    """A plain greedy loop over full forward passes (no cache, no batching)."""
    ids = list(prompt_ids)
    for _ in range(new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids


def _loss_at(model, sequences: list[tuple[list[int], int]], n: int) -> tuple[torch.Tensor, int]:
    """Sum of -log(1 - p) over repeated tokens / generated tokens, one sequence at a time from full logits."""
    total, repeated, generated = torch.zeros(()), 0, 0
    for ids, start in sequences:
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        for t in repeated_ngram_positions(ids, start, n):
            total = total - torch.log(1 - probs[t - 1, ids[t]])
            repeated += 1
        generated += len(ids) - start
    return total / generated, repeated


def test_unlikelihood_term_matches_an_independent_computation_and_descends(tokenizer) -> None:
    model = tiny_model("llama", len(tokenizer), n_layers=2)
    prompts = ["Harry Potter went to", "The wizard said"]
    loss, count = unlikelihood_term(model, tokenizer, prompts, new_tokens=24, n=2)
    starts = [len(tokenizer(p).input_ids) for p in prompts]
    model.eval()
    sequences = [
        (_greedy(model, tokenizer(p).input_ids, 24, tokenizer.eos_token_id), s)
        for p, s in zip(prompts, starts, strict=True)
    ]
    expected, expected_count = _loss_at(model, sequences, 2)
    assert count == expected_count > 0  # a random tiny model loops
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
        after, _ = _loss_at(model, sequences, 2)  # the same tokens after one descent step
    assert after < expected


def test_crisp_adds_the_weighted_unlikelihood_term_to_its_total(setup, tmp_path: Path) -> None:
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

    plain = run("plain", unlikelihood_weight=0.0)
    weighted = run("weighted", unlikelihood_weight=2.0, unlikelihood_tokens=16, unlikelihood_ngram=2)
    assert all("unlikelihood" not in r for r in plain)
    assert all("unlikelihood" in r for r in run("default"))  # on by default
    assert all("unlikelihood" not in r for r in run("published", objective="published"))  # the paper's loss
    assert weighted[0]["unlearn"] == plain[0]["unlearn"]  # the first forward pass is the same
    first = weighted[0]
    assert first["unlikelihood"] > 0
    rest = first["unlearn"] + 3.0 * first["retain"] + 0.1 * first["coherence"] + 1.0 * first["retain_kl"]
    assert abs(first["total"] - rest - 2.0 * first["unlikelihood"]) < 1e-4 * first["total"]
