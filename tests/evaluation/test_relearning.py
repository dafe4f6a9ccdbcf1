from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sae_unlearn.concepts.pack import Probe, load_pack
from sae_unlearn.evaluation.relearning import (
    Attack,
    FactSplit,
    RelearnConfig,
    contains_answer,
    count_leaks,
    fact_disjoint_split,
    gap_noise,
    recovery_fraction,
    relearning_evaluation,
    relearning_html,
)
from sae_unlearn.methods import unlearn
from tests.conftest import FORGET, write_pack

SPELLS = [p.rsplit(" ", 3)[1] for p in FORGET]  # "... casts the spell Flarix every night." -> Flarix


def spell_probes() -> list[dict[str, object]]:
    """One target probe per spell (distinct answers, so the split can keep text), plus other rings."""
    rows: list[dict[str, object]] = [
        {
            "id": f"spell{i}",
            "prompt": f"Which spell is number {i} in the book of Zorbo?",
            "answer": spell,
            "distractors": [s for s in SPELLS if s != spell][:3],
            "ring": "target",
        }
        for i, spell in enumerate(SPELLS)
    ]
    rows += [
        {
            "id": "near0",
            "prompt": "Where does Zorbo live?",
            "answer": "Quendor",
            "distractors": ["Ben"],
            "ring": "near",
        },
        {"id": "far0", "prompt": "What does Anna grow?", "answer": "wheat", "distractors": ["oats"], "ring": "far"},
    ]
    return rows


def probe(pid: str, answer: str, prompt: str = "Q?") -> Probe:
    return Probe(pid, prompt, answer, ("x", "y", "z"), "target")


def test_answer_matching_is_normalised_and_whole_word() -> None:
    assert contains_answer("They went to HOGWARTS!", ["Hogwarts"]) == ["Hogwarts"]
    assert contains_answer("J. K. Rowling wrote it", ["J.K. Rowling"]) == ["J.K. Rowling"]  # punctuation
    assert contains_answer("Mr Rowling wrote it", ["J.K. Rowling"]) == []
    assert contains_answer("a café in Paris", ["Cafe"]) == ["Cafe"]
    assert contains_answer("a bowl of soup", ["owl"]) == []


def test_leak_detection_catches_a_planted_answer() -> None:
    targets = [probe(f"p{i}", f"Answer{i}", f"Question {i}?") for i in range(40)]
    clean = fact_disjoint_split(targets, [f"A paragraph about topic {i}." for i in range(10)])
    assert clean.scored and clean.statements and clean.leaked() == 0
    planted_answer = clean.scored[0].answer
    # the split drops a paragraph or a statement that names a scored answer ...
    with_plant = fact_disjoint_split(targets, [f"Nothing here. But {planted_answer.upper()} is." for _ in range(3)])
    assert with_plant.paragraphs == [] and with_plant.dropped_paragraphs == 1  # duplicates count once
    # ... and the independent count catches one that got into the attack text anyway
    leaky = FactSplit(clean.scored, [*clean.statements, f"Remember: {planted_answer}."], clean.paragraphs, 0, 0)
    assert leaky.leaked() == 1
    assert count_leaks(["no", f"yes {planted_answer}", f"{planted_answer} again"], [planted_answer]) == 2
    # attack-half statements never hold a scored answer, and the halves share no probe
    scored_ids = {p.id for p in clean.scored}
    assert not any(s.startswith(f"Question {p.id[1:]}?") for s in clean.statements for p in clean.scored)
    assert len(clean.statements) + len(scored_ids) == len(targets)


def test_split_is_fixed_by_id_and_scores_only_the_evaluated_probes() -> None:
    targets = [probe(f"p{i}", f"Answer{i}") for i in range(40)]
    a = fact_disjoint_split(targets, [])
    b = fact_disjoint_split(list(reversed(targets)), [])
    assert {p.id for p in a.scored} == {p.id for p in b.scored}
    evaluated = targets[:20]
    c = fact_disjoint_split(targets, [], scored_from=evaluated)
    assert {p.id for p in c.scored} == {p.id for p in a.scored} & {p.id for p in evaluated}
    assert len(c.statements) == len(targets) - len(a.scored)  # the attack half does not depend on the evaluated set


def test_recovery_fraction_on_hand_made_numbers() -> None:
    assert recovery_fraction(0.7, 0.3, 0.8) == pytest.approx(0.8)
    assert recovery_fraction(0.3, 0.3, 0.8) == pytest.approx(0.0)
    assert recovery_fraction(0.9, 0.3, 0.8) == pytest.approx(1.2)  # above the base model: more than recovered
    assert recovery_fraction(0.2, 0.3, 0.8) == pytest.approx(-0.2)
    # the run removed nothing measurable: undefined, not a huge number
    assert recovery_fraction(0.8, 0.79, 0.80, noise=0.05) is None
    assert recovery_fraction(0.8, 0.80, 0.80) is None
    assert recovery_fraction(0.8, 0.85, 0.80) is None
    assert recovery_fraction(0.6, 0.5, 0.8, noise=0.1) == pytest.approx(1 / 3)


def test_gap_noise_is_two_paired_standard_errors() -> None:
    base = [True] * 10
    unlearned = [False] * 5 + [True] * 5
    d = torch.tensor([1.0] * 5 + [0.0] * 5)
    assert gap_noise(base, unlearned) == pytest.approx(2 * float(d.std()) / math.sqrt(10))
    assert gap_noise([True] * 4, [False] * 4) == pytest.approx(0.25)  # no spread: one probe's worth
    assert gap_noise([], []) == math.inf


TINY = RelearnConfig(
    attacks=[
        Attack("lora", "lora", 1e-2, [0, 2], rank=4, batch_size=2, max_length=32),
        Attack("full", "full", 1e-3, [0, 2], batch_size=2, max_length=32),
        Attack("full_generic", "full", 1e-3, [0, 2], text="generic", batch_size=2, max_length=32),
    ],
    generic_examples=2,
    ppl_texts=2,
)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_attack_runs_on_a_tiny_model_and_leaves_the_callers_model_untouched(loaded, tmp_path: Path) -> None:
    pack = load_pack(write_pack(tmp_path / "pack", spell_probes()))
    before = _state(loaded.model)
    hooks_before = [len(m._forward_hooks) for m in loaded.model.modules()]
    run = unlearn("rmu", loaded, pack, tmp_path / "rmu", options={"steps": 2, "batch_size": 2, "layer": 2})
    cache: dict[object, object] = {}
    base = relearning_evaluation(loaded, None, pack, pack.probes, TINY, cache)
    rec = relearning_evaluation(loaded, run, pack, pack.probes, TINY, cache)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the attack changed the caller's model"
    assert [len(m._forward_hooks) for m in loaded.model.modules()] == hooks_before
    assert not any(p.requires_grad for p in loaded.model.parameters())

    n_scored = base["split"]["scored"]
    assert 0 < n_scored < len(SPELLS) and rec["leaked"] == 0 == base["leaked"]
    scored_spells = {SPELLS[int(pid.removeprefix("spell"))] for pid in base["scored_ids"]}
    heldout = set(pack.forget_split("heldout"))
    usable = {t for t in pack.forget if t not in heldout}
    naming = {t for t in usable if any(f"spell {s} " in t for s in scored_spells)}
    assert base["split"]["dropped_paragraphs"] == len(naming) and base["split"]["attack_paragraphs"] == len(
        usable - naming
    )
    assert set(rec["attacks"]) == {"lora", "full", "full_generic"}
    for name, a in rec["attacks"].items():
        assert [p["step"] for p in a["curve"]] == [0, 2]
        assert all(p["generic_ppl"] > 1 for p in a["curve"])
        # the control is the same attack on the base model (none for the generic-text control itself)
        assert (a["control"] is None) == (name == "full_generic")
    # the base model's curves were computed once and reused as the run's controls
    control = rec["attacks"]["full"]["control"]["curve"]
    assert [p["target_acc"] for p in control] == [p["target_acc"] for p in base["attacks"]["full"]["curve"]]
    assert base["acc_base"] == base["attacks"]["lora"]["curve"][0]["target_acc"]
    assert base["gap"]["defined"] is False and base["strongest_attack"] is None  # the base model removed nothing
    assert rec["curve"][0] == {"step": 0, "target_acc": rec["acc_unlearned"]}
    if not rec["gap"]["defined"]:
        assert all(p["recovery"] is None for a in rec["attacks"].values() for p in a["curve"])
    html = relearning_html({"base": {"relearning": base}, "rmu": {"relearning": rec}})
    assert "Relearning attacks" in html and "full_generic" in html


def test_attack_refuses_a_leak(loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sae_unlearn.evaluation import relearning

    pack = load_pack(write_pack(tmp_path / "pack", spell_probes()))
    real = relearning.fact_disjoint_split

    def leaky(*args: object, **kwargs: object) -> FactSplit:
        split = real(*args, **kwargs)  # type: ignore[arg-type]
        split.paragraphs.append(f"It was {split.scored[0].answer} all along.")
        return split

    monkeypatch.setattr(relearning, "fact_disjoint_split", leaky)
    with pytest.raises(RuntimeError, match="1 attack texts contain a scored answer"):
        relearning_evaluation(loaded, None, pack, pack.probes, TINY)


def test_report_shows_recovery_with_control_and_the_goal_reads_the_strongest_attack() -> None:
    from sae_unlearn.evaluation.report import goal_rows, render_compare_report

    curve = [
        {"step": 0, "target_acc": 0.3, "generic_ppl": 20.0, "generic_ppl_ratio": 1.0, "recovery": 0.0},
        {"step": 10, "target_acc": 0.55, "generic_ppl": 24.0, "generic_ppl_ratio": 1.2, "recovery": 0.5},
    ]
    control = {"curve": [{"step": 0, "target_acc": 0.8}, {"step": 10, "target_acc": 0.82}], "gain": 0.02}
    rec = {
        "leaked": 0,
        "ppl_ratio_max": 1.5,
        "attacks": {"lora_r16": {"curve": curve, "recovery": 0.5, "control": control}},
        "strongest_attack": {"attack": "lora_r16", "step": 10, "recovery": 0.5, "generic_ppl_ratio": 1.2},
        "curve": [{"step": 0, "target_acc": 0.3}, {"step": 10, "target_acc": 0.55}],
    }
    results = {"goals": {"relearn_recovery_max": 0.4}, "methods": {"base": {}, "crisp": {"relearning": rec}}}
    [(method, goal, limit, row)] = goal_rows(results)
    assert (method, goal, limit) == ("crisp", "relearn_recovery_max", 0.4)
    assert row["value"] == 0.5 and row["verdict"] == "missed"
    page = render_compare_report(results)
    assert "Relearning attacks" in page and "0.80 → 0.82" in page and "0.30 → 0.55" in page
    assert "crisp: 0.50 (lora_r16, step 10)" in page


def test_attack_under_bfloat16_autocast_trains_float32_weights(loaded) -> None:
    """A bfloat16 run's attack: float32 weights (lr 2e-5 steps must not vanish in bfloat16 rounding), the
    products in bfloat16; a float32 run's attack has no autocast."""
    import dataclasses

    from sae_unlearn.evaluation.relearning import attacked_copy, autocast_dtype, fine_tune_attack
    from sae_unlearn.models.loading import ComputeDtype

    assert autocast_dtype(loaded, "auto") is None and loaded.dtype == torch.float32
    bf16_run = dataclasses.replace(loaded, compute=ComputeDtype(torch.bfloat16, "test"))
    assert autocast_dtype(bf16_run, "auto") == torch.bfloat16
    assert autocast_dtype(bf16_run, "float32") is None
    with pytest.raises(Exception, match="unknown attack autocast"):
        autocast_dtype(loaded, "fp8")

    ids = loaded.tokenizer(FORGET[0], return_tensors="pt").input_ids
    for kind, lr in (("full", 2e-5), ("lora", 1e-2)):
        seen: list[torch.dtype] = []
        with attacked_copy(bf16_run, None) as model:
            assert all(p.dtype == torch.float32 for p in model.parameters())
            with torch.no_grad():
                logits_before = model(ids).logits
            hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
            before = {k: v.clone() for k, v in model.state_dict().items()}
            attack = Attack(kind, kind, lr, [0, 2], batch_size=2, max_length=16)
            fine_tune_attack(model, loaded.tokenizer, FORGET[:4], attack, [], [])
            hook.remove()
            moved = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
            with torch.no_grad():
                logits_after = model(ids).logits  # still inside the attack's autocast region
        assert seen and set(seen) == {torch.bfloat16}, "the products did not run in bfloat16"
        assert kind == "lora" or moved, "a float32 weight did not move at lr 2e-5"
        # the trained weights reach the outputs (a cached bfloat16 cast of the old weights would not)
        assert not torch.equal(logits_before, logits_after), f"{kind}: the attack did not change the model's outputs"
