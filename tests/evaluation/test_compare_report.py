"""render_compare_report on a hand-built compare results dict: methods, plots, escaping, offline, goals."""

from __future__ import annotations

import copy
import math
from html.parser import HTMLParser

import pytest

from sae_unlearn.evaluation.compare import GOALS as COMPARE_GOALS
from sae_unlearn.evaluation.goals import paired_rings, verdicts
from sae_unlearn.evaluation.report import fmt, goal_rows, render_compare_report, summary_markdown
from sae_unlearn.evaluation.result_keys import current_results_keys

EVIL = "<b>& it"
GOALS = {**COMPARE_GOALS, "custom_goal": 3}


def _acc(acc: float | None) -> dict:
    return {"acc": acc, "ci95": [acc - 0.05, acc + 0.05] if acc is not None else [math.nan, math.nan], "n": 40}


def _result(
    name: str,
    rings: dict[str, float],
    retain: float,
    fp_ppl: float,
    curve: list[float] | None,
    text: str,
    reactivation: float | None,
) -> dict:
    samples = [{"prompt": "The wizard", "text": text}]
    return {
        "version": 1,
        "name": name,
        "method": name,
        "model": "m",
        "probes": {
            "rings": {
                r: {"logprob": _acc(a), "letter": _acc(a), "letter_all_rotations": None, "chance": 0.25}
                for r, a in rings.items()
            },
            "items": {
                f"{r}{i}": {"ring": r, "logprob": float(i < round(a * 40)), "letter": float(i < round(a * 40))}
                for r, a in rings.items()
                for i in range(40)
            },
        },
        "retention": {"retain_heldout_ppl": retain, "generic_ppl": None, "forget_heldout_ppl": 30.0},
        "fluency": {
            "concept_prompts": {
                "base_model_ppl": fp_ppl,
                "repeated_3gram_share": 0.0,
                "distinct_2": 0.9,
                "foreign_script_share": None,
                "samples": samples,
            },
            "coherence": {"base_model_ppl": 12.0, "samples": [{"prompt": "Once upon", "text": f"{name} story"}]},
        },
        "reactivation": {"fraction": reactivation, "per_layer": {}} if reactivation is not None else None,
        "adversarial": {"templates": {}, "any_template_accuracy": _acc(0.4), "chance": {"any_template": 0.822}}
        if name != "clamp"
        else None,
        "relearning": None
        if curve is None
        else {
            "steps": 20,
            "lr": 3e-4,
            "paragraphs": 5,
            "curve": [{"step": 10 * i, "target_acc": a} for i, a in enumerate(curve)],
        },
        "lm_eval": {"hellaswag": {"acc_norm": 0.5}} if name == "base" else None,
        "seconds": 12.3,
    }


@pytest.fixture()
def results() -> dict:
    methods = {
        "base": _result(
            "base",
            {"target": 0.9, "near": 0.7, "mid": 0.75, "far": 0.8},
            10.0,
            20.0,
            [0.9, 0.9, 0.9],
            "Harry raised his wand",
            None,
        ),
        "crisp": _result(
            "crisp", {"target": 0.30, "near": 0.65, "mid": 0.74, "far": 0.77}, 10.4, 50.0, [0.3, 0.4, 0.45], EVIL, 0.1
        ),
        "clamp": _result(
            "clamp", {"target": 0.5, "near": 0.6, "mid": 0.7, "far": 0.79}, 11.0, 25.0, None, "clamped text", 0.3
        ),
    }
    methods["clamp"]["fluency"]["coherence"] = None
    methods["crisp"]["fluency"]["concept_prompts"]["repeated_3gram_share"] = 0.25
    for name in ("crisp", "clamp"):
        methods[name]["paired"] = paired_rings(methods[name], methods["base"])
    return {
        "version": 1,
        "concept": "harry_potter",
        "model": "gemma <2b>",
        "created": "2025-01-01T00:00:00",
        "goals": GOALS,
        "methods": methods,
    }


def test_goal_rows_cover_every_method(results: dict) -> None:
    rows = {(m, k): row for m, k, _, row in goal_rows(results)}
    assert {m for m, _ in rows} == {"crisp", "clamp"}  # every method but the base one
    # crisp: target 0.30 [0.25, 0.35] against chance 0.25: +5 points, CI [0, 10] inside the +-10 limit
    target = rows[("crisp", "target_within_chance_points")]
    assert target["value"] == pytest.approx(5.0) and target["verdict"] == "met"
    # clamp: target 0.50 [0.45, 0.55]: +25 points, the whole CI beyond the limit
    assert rows[("clamp", "target_within_chance_points")]["verdict"] == "missed"
    near = rows[("clamp", "near_drop_max_points")]  # 4 of 40 near probes lost: 10 points, every pair a loss
    assert near["value"] == pytest.approx(10.0) and near["ci95"][0] > 0
    assert rows[("crisp", "custom_goal")]["verdict"] == "inconclusive"
    assert rows[("crisp", "relearn_recovery_max")]["value"] == pytest.approx((0.45 - 0.3) / (0.9 - 0.3))
    results["verdicts"] = {"crisp": {"far_drop_max_points": {"limit": 2, "value": 1.0, "verdict": "met"}}}
    assert [(m, k, row["verdict"]) for m, k, _, row in goal_rows(results)] == [("crisp", "far_drop_max_points", "met")]


def test_goals_without_a_base_are_inconclusive(results: dict) -> None:
    del results["methods"]["base"]
    assert all(row["verdict"] == "inconclusive" and row["value"] is None for *_, row in goal_rows(results))
    assert "<svg" in render_compare_report(results)


def test_page(results: dict) -> None:
    page = render_compare_report(results)
    for name in ("base", "crisp", "clamp"):
        assert name in page
    assert 'class="chance"' in page and "stroke-dasharray" in page
    for pid in ("plot-rings", "plot-tradeoff", "plot-relearning", "plot-reactivation"):
        assert f'<svg id="{pid}"' in page
    assert page.count("<svg") == 4
    assert "&lt;b&gt;&amp; it" in page and EVIL not in page
    assert "gemma &lt;2b&gt;" in page
    low = page.lower()
    assert "src=" not in low and "<link" not in low and "http" not in low and "<script" not in low
    assert "0.90 [0.85, 0.95]" in page
    assert "hellaswag" in page
    assert "far_drop_max_points: 2" in page and '<span class="na">inconclusive</span>' in page
    assert '<span class="pass">met</span>' in page and "custom_goal: 3" in page
    assert "Δ vs base · logprob · target" in page and "-0.60 [" in page  # crisp target 0.30 vs base 0.90
    assert "adversarial any-template chance" in page and "0.822" in page


def test_page_is_well_formed(results: dict) -> None:
    void = {"meta", "br", "hr", "img", "input", "link"}

    class Checker(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag not in void:
                self.stack.append(tag)

        def handle_startendtag(self, tag: str, attrs: list) -> None:
            pass

        def handle_endtag(self, tag: str) -> None:
            assert self.stack and self.stack.pop() == tag, tag

    checker = Checker()
    checker.feed(render_compare_report(results))
    assert checker.stack == []


def test_empty_and_fmt() -> None:
    page = render_compare_report({"methods": {"base": {"probes": None, "fluency": {}}}})
    assert "—" in page and page.count("<svg") == 4
    assert fmt(None) == "—" and fmt(math.nan) == "—" and fmt(0.123456) == "0.123" and fmt(1234.5) == "1234"
    assert fmt(20) == "20"


def test_summary_markdown(results: dict) -> None:
    crisp = results["methods"]["crisp"]
    crisp["relearning"] = {
        "gap": {"defined": True},
        "attacks": {
            "lora_r16": {
                "curve": [{"step": 0, "target_acc": 0.3}, {"step": 10, "target_acc": 0.6}],
                "recovery": 0.5,
                "control": {"gain": 0.02},
            }
        },
    }
    lines = summary_markdown(results).splitlines()
    assert lines[0] == "|  | base | crisp | clamp |"
    target = next(line for line in lines if line.startswith("| target accuracy"))
    cells = [c.strip() for c in target.strip("|").split("|")]
    diff = crisp["paired"]["rings"]["target"]["logprob"]
    lo, hi = diff["ci95"]
    assert cells[1] == "0.900"  # the base column: accuracy only
    assert cells[2] == f"0.300 ({diff['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}])"
    assert diff["diff"] == pytest.approx(-0.6)
    attack = next(line for line in lines if "`lora_r16`" in line)
    assert "0.3 -> 0.6, recovery 0.5 (base control +0.02)" in attack
    assert attack.rstrip(" |").endswith("—")  # clamp ran no attack
    assert "target 40" in lines[-1]


def _with_old_fluency_names(results: dict) -> dict:
    """`results` as a results.json written before fluency.forget_prompts and base_ppl were renamed."""
    old = copy.deepcopy(results)
    for r in old["methods"].values():
        fluency = r["fluency"]
        fluency["forget_prompts"] = fluency.pop("concept_prompts")
        for part in fluency.values():
            if isinstance(part, dict) and "base_model_ppl" in part:
                part["base_ppl"] = part.pop("base_model_ppl")
    return old


def test_results_with_the_old_fluency_names_read_the_same(results: dict) -> None:
    old = _with_old_fluency_names(results)
    before = copy.deepcopy(old)
    assert verdicts(old) == verdicts(results)
    assert render_compare_report(old) == render_compare_report(results)
    assert summary_markdown(old) == summary_markdown(results)
    assert old == before  # the readers leave the caller's dict alone
    assert current_results_keys(results) == results  # current names come back as they are
    # a field marked invalid under its old name still withholds the verdicts that read it
    old["methods"]["crisp"]["validity"] = {"invalid": {"fluency.forget_prompts": "prompts open training paragraphs"}}
    rows = verdicts(old)["crisp"]
    assert rows["forget_prompt_fluency_ratio_max"]["note"] == "invalid: prompts open training paragraphs"
    assert rows["far_drop_max_points"]["note"] == ""


def test_results_with_the_old_strongest_attack_name_read_the_same() -> None:
    curve = [
        {"step": 0, "target_acc": 0.3, "generic_ppl": 20.0, "generic_ppl_ratio": 1.0, "recovery": 0.0},
        {"step": 10, "target_acc": 0.55, "generic_ppl": 24.0, "generic_ppl_ratio": 1.2, "recovery": 0.5},
    ]
    strongest = {"attack": "lora_r16", "step": 10, "recovery": 0.5, "generic_ppl_ratio": 1.2}
    rec = {"leaked": 0, "ppl_ratio_max": 1.5, "attacks": {"lora_r16": {"curve": curve, "recovery": 0.5}}}

    def results(key: str) -> dict:
        methods = {"base": {}, "crisp": {"relearning": {**rec, key: strongest}}}
        return {"goals": {"relearn_recovery_max": 0.4}, "methods": methods}

    old, new = results("worst_case"), results("strongest_attack")
    assert verdicts(old) == verdicts(new)
    assert verdicts(old)["crisp"]["relearn_recovery_max"]["value"] == 0.5
    assert render_compare_report(old) == render_compare_report(new)
    assert "crisp: 0.50 (lora_r16, step 10)" in render_compare_report(old)
