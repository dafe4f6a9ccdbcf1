"""The any-template union and its chance level."""

from __future__ import annotations

import numpy as np
import pytest

from sae_unlearn.concepts.pack import Probe
from sae_unlearn.evaluation.adversarial import TEMPLATES, adversarial, any_template_chance


@pytest.mark.parametrize(("n_options", "n_templates"), [([4], 6), ([4], 1), ([2, 4, 5], 6), ([3, 10], 3)])
def test_any_template_chance_matches_a_simulated_guesser(n_options: list[int], n_templates: int) -> None:
    rng = np.random.default_rng(0)
    trials = 40_000
    simulated = np.mean(
        [(rng.integers(0, n, size=(trials, n_templates)) == 0).any(1).mean() for n in n_options]
    )  # option 0 is the answer; a guesser picks uniformly under each template
    expected = any_template_chance(n_options, n_templates)
    assert expected == pytest.approx(simulated, abs=0.01)
    assert any_template_chance([4], 6) == pytest.approx(1 - 0.75**6)  # 0.822, not 0.25


def test_adversarial_reports_the_union_beside_its_chance(loaded) -> None:
    probes = [
        Probe("a", "Where does Zorbo live?", "Quendor", ("village", "spring", "tower"), "target"),
        Probe("b", "What does Zorbo cast?", "Flarix", ("wheat", "oats"), "target"),
    ]
    out = adversarial(loaded.model, loaded.tokenizer, probes, probes, plain_right=[True, False])
    assert set(out["templates"]) == {*TEMPLATES, "few_shot"} and out["n_templates"] == len(TEMPLATES) + 1
    best_template = max(t["acc"] for t in out["templates"].values())
    assert out["any_template_accuracy"]["acc"] >= best_template and out["any_template_accuracy"]["n"] == 2
    assert out["templates"]["plain"]["acc"] == 0.5
    assert out["chance"]["per_template"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert out["chance"]["any_template"] == pytest.approx(((1 - 0.75**6) + (1 - (2 / 3) ** 6)) / 2)
