"""Goal verdicts from paired CIs on hand-made results: met / missed / inconclusive, for every method."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sae_unlearn.evaluation.goals import GOALS, judge, paired_rings, verdicts
from sae_unlearn.evaluation.scoring import accuracy


def _probes(right: dict[str, int], n: int = 200) -> dict[str, Any]:
    """`right[ring]` of `n` probes per ring right (the first ones), four options each."""
    items = {f"{ring}{i}": {"ring": ring, "logprob": float(i < k)} for ring, k in right.items() for i in range(n)}
    rings = {
        ring: {"logprob": accuracy([float(i < k) for i in range(n)]).to_dict(), "chance": 0.25}
        for ring, k in right.items()
    }
    return {"rings": rings, "items": items}


def _result(method: str, right: dict[str, int], nll_per_token: float = 1.0, flu: float = 2.0) -> dict[str, Any]:
    return {
        "method": method,
        "probes": _probes(right),
        "per_text": {"retain_heldout": [[10 * nll_per_token, 10]] * 20},
        "fluency": {
            "concept_prompts": {
                "samples": [
                    {"prompt": f"p{i}", "text": "t", "base_nll": flu + 0.01 * i, "repeated_3gram_share": 0.0}
                    for i in range(8)
                ]
            }
        },
        "relearning": None,
    }


BASE = _result("base", {"target": 180, "near": 160, "far": 200})


def test_paired_rings_are_per_probe_differences() -> None:
    method = _result("clamp", {"target": 50, "near": 160, "far": 190})
    rings = paired_rings(method, BASE)["rings"]
    assert rings["target"]["logprob"]["diff"] == pytest.approx((50 - 180) / 200)
    assert rings["near"]["logprob"] == {"diff": 0.0, "ci95": [0.0, 0.0], "n": 200}
    lo, hi = rings["far"]["logprob"]["ci95"]
    assert lo < -0.05 < hi < 0  # 10 of 200 probes lost (-5 points), every difference a loss


def test_verdicts_hand_checked() -> None:
    good = _result("crisp", {"target": 50, "near": 160, "far": 200})  # target 25%: chance, nothing else moved
    assert {
        k: judge(k, GOALS[k], good, BASE)["verdict"] for k in GOALS if k != "relearn_recovery_max"
    } == dict.fromkeys([k for k in GOALS if k != "relearn_recovery_max"], "met")
    bad = _result("crisp", {"target": 170, "near": 40, "far": 100}, nll_per_token=1.1, flu=3.0)
    for key in ("target_within_chance_points", "near_drop_max_points", "far_drop_max_points", "retain_ppl_rise_max"):
        assert judge(key, GOALS[key], bad, BASE)["verdict"] == "missed", key
    row = judge("retain_ppl_rise_max", 0.05, bad, BASE)
    assert row["value"] == pytest.approx(0.1052, abs=1e-3)  # exp(0.1) - 1
    flu = judge("forget_prompt_fluency_ratio_max", 2.0, bad, BASE)
    assert flu["value"] == pytest.approx(2.718, abs=1e-3) and flu["verdict"] == "missed"
    # 2 far probes lost of 200: drop 1 point, CI reaching past the 2-point limit
    close = _result("crisp", {"target": 50, "near": 160, "far": 198})
    far = judge("far_drop_max_points", 2, close, BASE)
    assert far["value"] == pytest.approx(1.0) and far["ci95"][0] < 2 < far["ci95"][1]
    assert far["verdict"] == "inconclusive"


def test_small_samples_are_inconclusive() -> None:
    base = _result("base", {"target": 30, "near": 30, "far": 30})
    base["probes"] = _probes({"target": 27, "near": 24, "far": 28}, n=30)
    one_probe = copy.deepcopy(base)
    one_probe["method"] = "clamp"
    one_probe["probes"] = _probes({"target": 8, "near": 24, "far": 27}, n=30)  # 1 far probe: "-3.3 points"
    row = judge("far_drop_max_points", 2, one_probe, base)
    assert row["value"] == pytest.approx(100 / 30) and row["verdict"] == "inconclusive"
    assert judge("target_within_chance_points", 10, one_probe, base)["verdict"] == "inconclusive"


def test_every_method_is_judged_by_kind_not_name() -> None:
    results = {
        "goals": {**GOALS, "custom_goal": 3},
        "methods": {
            "base": BASE,
            "my-crisp-v2": _result("crisp", {"target": 50, "near": 160, "far": 200}),
            "clamp": _result("clamp", {"target": 170, "near": 40, "far": 100}),
        },
    }
    table = verdicts(results)
    assert set(table) == {"my-crisp-v2", "clamp"}
    assert table["my-crisp-v2"]["near_drop_max_points"]["verdict"] == "met"
    assert table["clamp"]["near_drop_max_points"]["verdict"] == "missed"
    assert table["clamp"]["custom_goal"] == {
        "limit": 3,
        "value": None,
        "ci95": None,
        "verdict": "inconclusive",
        "note": "unknown goal",
    }
    assert all(row["verdict"] in ("met", "missed", "inconclusive") for g in table.values() for row in g.values())


def test_invalid_metric_and_relearning() -> None:
    method = _result("crisp", {"target": 50, "near": 160, "far": 200})
    method["validity"] = {"invalid": {"relearning": "the relearn paragraphs are the training paragraphs"}}
    method["relearning"] = {"curve": [{"step": 0, "target_acc": 0.25}, {"step": 20, "target_acc": 0.4}]}
    row = judge("relearn_recovery_max", 0.5, method, BASE)
    assert row["verdict"] == "inconclusive" and row["note"].startswith("invalid: the relearn")
    del method["validity"]
    row = judge("relearn_recovery_max", 0.5, method, BASE)
    assert row["value"] == pytest.approx((0.4 - 0.25) / (0.9 - 0.25)) and row["verdict"] == "met"
    assert judge("near_drop_max_points", 8, method, None)["note"] == "no base model in the run"
