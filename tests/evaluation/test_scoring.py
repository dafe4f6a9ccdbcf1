from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_unlearn.concepts.pack import Probe
from sae_unlearn.evaluation.scoring import (
    OptionScores,
    accuracy,
    bootstrap_ci,
    letter_choices,
    option_logprobs,
    option_scores,
    paired_bootstrap,
    paired_difference,
    question_prompt,
    score_probes,
)
from sae_unlearn.text_metrics import distinct_n, foreign_script_share, repeated_ngram_share
from tests.conftest import FAMILIES, tiny_model

PROBES = [
    Probe("a", "Where does Zorbo live?", "Quendor", ("village", "spring", "tower"), "target"),
    Probe("b", "What does Ben grow?", "barley", ("wheat", "oats", "corn"), "far"),
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_option_logprobs_match_a_full_forward(family: str, tokenizer) -> None:
    """The shared-question KV cache gives each option the numbers of its own full forward pass."""
    model, tok = tiny_model(family, len(tokenizer)), tokenizer
    probes = [
        *PROBES,
        Probe("c", "Name the tall tower near the old mill by the river?", "a", ("b c d e", "f", "g h"), "mid"),
    ]
    scores = option_logprobs(model, tok, probes, batch_size=2)
    sums = option_scores(model, tok, probes, batch_size=2)
    for pi, probe in enumerate(probes):
        prompt = tok(question_prompt(probe)).input_ids
        for oi, option in enumerate(probe.options):
            opt = tok(" " + option, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + opt])).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            expected = float(np.mean([logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(opt)]))
            assert scores[pi][oi] == pytest.approx(expected, abs=1e-4), (family, pi, oi)
            assert sums.tokens[pi][oi] == len(opt)
            assert sums.total[pi][oi] == pytest.approx(expected * len(opt), abs=1e-3), (family, pi, oi)


def test_the_three_normalisations_on_hand_made_numbers() -> None:
    # answer "abcd": 4 tokens, 4 bytes, summed -4; distractor "x": 1 token, 1 byte, summed -3
    scores = OptionScores(total=[[-4.0, -3.0]], tokens=[[4, 1]], options=[["abcd", "x"]])
    assert scores.mean == [[-1.0, -3.0]] and scores.per_byte == [[-1.0, -3.0]]
    assert scores.right("logprob").tolist() == [True]
    assert scores.right("logprob_sum").tolist() == [False]  # lm-eval's acc favours the short option
    assert scores.right("logprob_per_byte").tolist() == [True]  # acc_norm
    # byte length, not tokens: a 2-token 8-byte answer at -4 beats a 1-token 1-byte option at -1.5 only per byte
    scores = OptionScores(total=[[-4.0, -1.5]], tokens=[[2, 1]], options=[["abcdefgh", "x"]])
    assert scores.right("logprob").tolist() == [False] and scores.right("logprob_per_byte").tolist() == [True]


def test_letter_rotation_rule(loaded) -> None:
    five = Probe("e", "Which tree grows by the mill?", "oak", ("ash", "elm", "yew", "fir"), "near")
    right = letter_choices(loaded.model, loaded.tokenizer, [*PROBES, five])
    assert [r.shape for r in right] == [(4,), (4,), (5,)]  # one rotation per option
    result = score_probes(loaded.model, loaded.tokenizer, [*PROBES, five])
    for ring, idx in (("target", 0), ("far", 1), ("near", 2)):
        entry = result["rings"][ring]
        assert entry["letter_all_rotations"]["acc"] == float(right[idx].all())
        assert entry["letter"]["acc"] == pytest.approx(float(right[idx].mean()))
        assert entry["letter_all_rotations"]["acc"] <= entry["letter"]["acc"]
    assert result["rings"]["near"]["chance"] == pytest.approx(0.2) and result["rings"]["far"]["chance"] == 0.25
    assert result["items"]["e"]["ring"] == "near" and set(result["items"]["e"]) >= {"logprob_sum", "logprob_per_byte"}


def test_too_many_options_for_letters(loaded) -> None:
    from sae_unlearn.errors import UserError

    many = Probe("m", "Pick one?", "a0", tuple(f"d{i}" for i in range(26)), "far")
    with pytest.raises(UserError, match="at most 26 options"):
        letter_choices(loaded.model, loaded.tokenizer, [many])


def test_a_constant_letter_scores_chance(loaded, monkeypatch) -> None:
    import sae_unlearn.evaluation.scoring as scoring

    # always answering "B": right in exactly one of the four rotations of every question
    monkeypatch.setattr(scoring, "letter_choices", lambda *a, **k: list(np.tile([False, True, False, False], (2, 1))))
    for entry in score_probes(loaded.model, loaded.tokenizer, PROBES)["rings"].values():
        assert entry["letter"]["acc"] == 0.25 and entry["letter_all_rotations"]["acc"] == 0.0


def test_bootstrap_ci_on_known_data() -> None:
    assert bootstrap_ci([True] * 20) == (1.0, 1.0)
    lo, hi = bootstrap_ci([True, False] * 200, seed=1)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(400), rel=0.2)
    acc = accuracy([True, True, False, False])
    assert acc.acc == 0.5 and acc.n == 4


def test_paired_bootstrap_on_known_data() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=200)
    shifted = paired_difference(base + 0.1, base)  # a constant shift: every pair differs by exactly 0.1
    assert shifted.diff == pytest.approx(0.1) and shifted.ci == pytest.approx((0.1, 0.1)) and shifted.n == 200
    better = rng.random(300) < 0.6  # right wherever the base is, and on 30 more probes
    method = better.copy()
    method[np.flatnonzero(~better)[:30]] = True
    gain = paired_difference(method, better)
    assert gain.diff == pytest.approx(0.1) and gain.ci[0] > 0
    noise = np.tile([1.0, -1.0], 100)  # symmetric differences: no effect
    flat = paired_difference(base + noise, base)
    assert flat.ci[0] < 0 < flat.ci[1]
    # large sample: the percentile bootstrap CI matches the normal approximation mean +- 1.96 sd / sqrt(n)
    d = rng.normal(0.05, 1.0, size=4000)
    big = paired_difference(d, np.zeros_like(d), seed=1)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert big.ci[0] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert big.ci[1] == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert paired_difference(d, np.zeros_like(d), seed=1) == big  # seeded


def test_paired_bootstrap_keeps_pairs() -> None:
    """Correlated measurements: the paired CI is far narrower than the spread of either sample."""
    rng = np.random.default_rng(0)
    base = rng.normal(10, 3, size=100)
    method = base * 1.02 + rng.normal(0, 0.01, size=100)
    ratio, (lo, hi) = paired_bootstrap(lambda m, b: m.mean() / b.mean() - 1, [method, base])
    assert ratio == pytest.approx(0.02, abs=0.002) and 0.015 < lo < ratio < hi < 0.025
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap(lambda a, b: 0.0, [base, base[:3]])


def test_fluency_measures() -> None:
    assert repeated_ngram_share(["a", "b", "c", "a", "b", "c", "a", "b", "c"]) == pytest.approx(1 - 3 / 7)
    assert repeated_ngram_share(["one", "two", "three", "four"]) == 0.0
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert foreign_script_share("Harry Potter is a", "boy wizard") == 0.0
    assert foreign_script_share("Harry Potter is a", "наз займе") == 1.0


def test_length_sorted_batches_keep_each_items_own_result(loaded) -> None:
    """Batches are formed by length: every text's NLL and every letter prompt's choice is the one it gets
    alone, in the caller's order."""
    from sae_unlearn.text_metrics import text_nlls

    texts = ["a long text " * 9, "short", "a middling text of words", "x y " * 15, "tiny"]
    together = text_nlls(loaded.model, loaded.tokenizer, texts, batch_size=2)
    alone = [text_nlls(loaded.model, loaded.tokenizer, [t])[0] for t in texts]
    assert [n for _, n in together] == [n for _, n in alone]
    assert [t for t, _ in together] == pytest.approx([t for t, _ in alone], rel=1e-4)
    five = Probe("e", "Which tree grows by the mill in the old village?", "oak", ("ash", "elm", "yew", "fir"), "near")
    probes = [five, *PROBES]
    batched = letter_choices(loaded.model, loaded.tokenizer, probes, batch_size=3)
    single = [letter_choices(loaded.model, loaded.tokenizer, [p], batch_size=1)[0] for p in probes]
    assert all(np.array_equal(b, s) for b, s in zip(batched, single, strict=True))
