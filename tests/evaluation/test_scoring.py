from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_unlearn.concepts.pack import Probe
from sae_unlearn.evaluation.scoring import (
    accuracy,
    bootstrap_ci,
    letter_choices,
    option_logprobs,
    question_prompt,
    score_probes,
)
from sae_unlearn.evaluation.text import distinct_n, foreign_script_share, repeated_ngram_share
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
    for pi, probe in enumerate(probes):
        prompt = tok(question_prompt(probe)).input_ids
        for oi, option in enumerate(probe.options):
            opt = tok(" " + option, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + opt])).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            expected = float(np.mean([logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(opt)]))
            assert scores[pi][oi] == pytest.approx(expected, abs=1e-4), (family, pi, oi)


def test_letter_permutation_rule(loaded) -> None:
    right = letter_choices(loaded.model, loaded.tokenizer, PROBES, n_permutations=4)
    assert right.shape == (2, 4)
    result = score_probes(loaded.model, loaded.tokenizer, PROBES)
    for ring, idx in (("target", 0), ("far", 1)):
        entry = result["rings"][ring]
        assert entry["letter_all_permutations"]["acc"] == float(right[idx].all())
        assert entry["letter"]["acc"] == float(right[idx].mean())
        assert entry["letter_all_permutations"]["acc"] <= entry["letter"]["acc"]


def test_a_constant_letter_scores_chance(loaded, monkeypatch) -> None:
    import sae_unlearn.evaluation.scoring as scoring

    # always answering "B": right in exactly one of the four rotations of every question
    monkeypatch.setattr(scoring, "letter_choices", lambda *a, **k: np.tile([False, True, False, False], (2, 1)))
    for entry in score_probes(loaded.model, loaded.tokenizer, PROBES)["rings"].values():
        assert entry["letter"]["acc"] == 0.25 and entry["letter_all_permutations"]["acc"] == 0.0


def test_bootstrap_ci_on_known_data() -> None:
    assert bootstrap_ci([True] * 20) == (1.0, 1.0)
    lo, hi = bootstrap_ci([True, False] * 200, seed=1)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(400), rel=0.2)
    acc = accuracy([True, True, False, False])
    assert acc.acc == 0.5 and acc.n == 4


def test_fluency_measures() -> None:
    assert repeated_ngram_share(["a", "b", "c", "a", "b", "c", "a", "b", "c"]) == pytest.approx(1 - 3 / 7)
    assert repeated_ngram_share(["one", "two", "three", "four"]) == 0.0
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert foreign_script_share("Harry Potter is a", "boy wizard") == 0.0
    assert foreign_script_share("Harry Potter is a", "наз займе") == 1.0
