"""The measured time estimate: the work model follows the settings, the arithmetic divides by the rates."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.evaluation.compare import CompareConfig
from sae_unlearn.evaluation.estimate import (
    AttackProbe,
    Throughput,
    TrainingPlan,
    Work,
    estimate,
    estimate_against_measured,
    measured_stage_seconds,
    method_step_seconds,
    padded_batch_tokens,
    probe_throughput,
    stage_plan,
    training_plans,
)
from sae_unlearn.evaluation.evaluate import EvalConfig
from sae_unlearn.evaluation.relearning import Attack
from sae_unlearn.saes.loading import LoadedSAE
from tests.conftest import FORGET, tiny_sae

RATES = Throughput(
    forward_tokens=1000.0,
    lm_head_rows=200.0,
    sae_tokens=4000.0,
    train_tokens=250.0,
    lm_train_tokens=100.0,
    generated_tokens=20.0,
)


def _saes() -> list[LoadedSAE]:
    return [LoadedSAE(tiny_sae(layer), layer, "tiny") for layer in (1, 2)]


def _cfg(**kw) -> CompareConfig:
    options = {"crisp": {"steps": 10, "fluency_every": 0}, "rmu": {"steps": 10}}
    return CompareConfig(
        methods=["crisp", "clamp", "rmu"],
        max_length=kw.pop("max_length", 64),
        method_options=kw.pop("method_options", options),
        eval=kw.pop("eval", EvalConfig(probe_split="all", letter=False, relearn_steps=4, relearn_eval_at=[0, 4])),
        **kw,
    )


def test_work_seconds_is_work_over_rates() -> None:
    work = Work(forward_tokens=5000, lm_head_rows=100, sae_tokens=8000, generated_tokens=40)
    assert work.seconds(RATES) == pytest.approx(5 + 0.5 + 2 + 2)
    assert (work * 2).seconds(RATES) == pytest.approx(2 * work.seconds(RATES))
    assert (work + Work(train_tokens=500)).seconds(RATES) == pytest.approx(work.seconds(RATES) + 2)
    plan = [("a", work), ("b", Work(lm_train_tokens=300))]
    stages = estimate(plan, RATES)
    assert [(s.stage, s.seconds) for s in stages] == [("a", pytest.approx(9.5)), ("b", pytest.approx(3.0))]


def test_plan_follows_the_compare_stages_and_settings(loaded, pack_dir: Path) -> None:
    pack, saes = load_pack(pack_dir), _saes()
    plan = dict(stage_plan(loaded, saes, pack, _cfg()))
    assert list(plan) == [
        "feature_selection",
        "evaluate_base",
        "unlearn_crisp",
        "evaluate_crisp",
        "unlearn_clamp",
        "evaluate_clamp",
        "unlearn_rmu",
        "evaluate_rmu",
    ]
    assert plan["feature_selection"].sae_tokens > 0 and plan["feature_selection"].train_tokens == 0
    assert plan["unlearn_clamp"] == Work()  # clamp only writes intervention.json
    assert plan["evaluate_base"].sae_tokens == 0 and plan["evaluate_clamp"].sae_tokens > 0  # hooks + re-activation
    # every forget paragraph of the tiny pack names the one answer: evaluate skips the attack, and so does the plan
    assert plan["evaluate_base"].attack_train_tokens == 0
    built_in = dict(stage_plan(loaded, saes, load_pack("harry-potter"), _cfg()))
    assert built_in["evaluate_base"].attack_train_tokens > 0 and built_in["evaluate_crisp"].attack_forward_tokens > 0
    # twice the CRISP steps: twice the training work (the frozen states are computed in the first epoch only)
    doubled = dict(
        stage_plan(
            loaded, saes, pack, _cfg(method_options={"crisp": {"steps": 20, "fluency_every": 0}, "rmu": {"steps": 10}})
        )
    )
    assert doubled["unlearn_crisp"].train_tokens == pytest.approx(2 * plan["unlearn_crisp"].train_tokens)
    assert doubled["unlearn_rmu"] == plan["unlearn_rmu"]
    # longer statistics paragraphs never lower the statistics work
    longer = dict(stage_plan(loaded, saes, pack, _cfg(max_length=8)))
    assert longer["feature_selection"].sae_tokens < plan["feature_selection"].sae_tokens


def test_cached_feature_statistics_are_not_costed_again(loaded, pack_dir: Path) -> None:
    from sae_unlearn.features.statistics import compute_stats

    pack, saes, cfg = load_pack(pack_dir), _saes(), _cfg()
    fresh = dict(stage_plan(loaded, saes, pack, cfg))["feature_selection"]
    compute_stats(loaded, saes, pack.forget_split("train"), pack.retain_split("train"), max_length=cfg.max_length)
    cached = dict(stage_plan(loaded, saes, pack, cfg))["feature_selection"]
    assert 0 < cached.sae_tokens < fresh.sae_tokens  # the report's contexts are still read
    other_length = dict(stage_plan(loaded, saes, pack, _cfg(max_length=32)))["feature_selection"]
    assert other_length.sae_tokens > cached.sae_tokens  # other statistics: not in the cache


def test_plan_attacks_only_the_models_asked_for(loaded, pack_dir: Path) -> None:
    pack = load_pack(pack_dir)
    ev = EvalConfig(probe_split="all", letter=False, relearn_steps=4, relearn_eval_at=[0, 4], robustness_for=["crisp"])
    plan = dict(stage_plan(loaded, _saes(), pack, _cfg(eval=ev)))
    assert plan["evaluate_base"].attack_train_tokens == 0 and plan["evaluate_rmu"].attack_train_tokens == 0
    built_in = load_pack("harry-potter")
    alone = dict(stage_plan(loaded, _saes(), built_in, _cfg(eval=ev)))
    assert alone["evaluate_base"].attack_train_tokens == 0 and alone["evaluate_rmu"].attack_train_tokens == 0
    with_base = dict(stage_plan(loaded, _saes(), built_in, _cfg(eval=replace(ev, robustness_for=["base", "crisp"]))))
    # crisp attacked alone also pays for the base-model control the base evaluation would otherwise have cached
    crisp_alone, crisp_after_base = alone["evaluate_crisp"], with_base["evaluate_crisp"]
    assert crisp_alone.attack_train_tokens == 2 * crisp_after_base.attack_train_tokens > 0
    assert with_base["evaluate_base"].attack_train_tokens == crisp_after_base.attack_train_tokens
    assert with_base["evaluate_base"].full_attack_train_tokens == 0
    # the base model's unattacked measurement, cached like its curves, is paid once, where they are computed
    reference = with_base["evaluate_base"].attack_forward_tokens - crisp_after_base.attack_forward_tokens
    assert reference > 0
    assert crisp_alone.attack_forward_tokens - 2 * crisp_after_base.attack_forward_tokens == pytest.approx(reference)
    full_grid = replace(ev, robustness_for=["base"], relearn_grid="full")  # LoRA and full fine-tunes, same texts
    full = dict(stage_plan(loaded, _saes(), built_in, _cfg(eval=full_grid)))["evaluate_base"]
    assert full.full_attack_train_tokens == pytest.approx(full.attack_train_tokens) and full.attack_train_tokens > 0
    with_letter = dict(
        stage_plan(
            loaded,
            _saes(),
            pack,
            _cfg(eval=EvalConfig(probe_split="all", letter=True, relearn_steps=4, relearn_eval_at=[0, 4])),
        )
    )
    assert (
        with_letter["evaluate_base"].forward_tokens
        > dict(stage_plan(loaded, _saes(), pack, _cfg()))["evaluate_base"].forward_tokens
    )


def _state(loaded) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def _assert_unchanged(loaded, before: dict[str, torch.Tensor]) -> None:
    after = loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not any("lora" in name for name, _ in loaded.model.named_modules())


def test_probe_measures_positive_rates_and_leaves_the_model_alone(loaded) -> None:
    before = _state(loaded)
    attacks = [Attack("lora_r16", batch_size=2, max_length=32), Attack("full_ft", "full", 2e-5, batch_size=2)]
    rates = probe_throughput(
        loaded, _saes(), 0.01, AttackProbe([(a, FORGET[:4]) for a in attacks], "float32", "float32")
    )
    names = ("forward_tokens", "lm_head_rows", "sae_tokens", "train_tokens", "lm_train_tokens", "generated_tokens")
    for name in (*names, "attack_train_tokens", "full_attack_train_tokens", "attack_forward_tokens"):
        value = getattr(rates, name)
        assert value > 0 and math.isfinite(value), name
    assert rates.dtype == "float32" and rates.device == "cpu"
    _assert_unchanged(loaded, before)
    no_attack = probe_throughput(loaded, _saes(), budget_s=0.01)
    assert math.isinf(no_attack.attack_train_tokens)  # not timed: the run attacks nothing
    _assert_unchanged(loaded, before)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("crisp", {"batch_size": 2, "max_length": 32, "fluency_every": 2, "checkpoint_every": 1}),
        ("rmu", {"batch_size": 2, "max_length": 32}),
        ("npo", {"batch_size": 2, "max_length": 32, "fluency_every": 2}),
    ],
)
def test_a_methods_own_steps_are_timed_without_changing_the_model_or_the_rng(
    loaded, pack_dir: Path, method: str, options: dict
) -> None:
    pack, saes = load_pack(pack_dir), _saes()  # tiny_sae seeds the global RNG
    before, rng = _state(loaded), torch.get_rng_state()
    seconds = method_step_seconds(method, options, loaded, pack, saes, features_per_layer=3)
    assert seconds > 0 and math.isfinite(seconds)
    _assert_unchanged(loaded, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_timed_step_replaces_the_token_rates_for_its_training_stage() -> None:
    """Steps 1 and 2 are timed: the frozen model's work in them (when they fall in the frozen steps) is
    taken out of the time per step and added back for the steps that have it."""
    # at RATES: a step 1 s, the frozen work 1 s, the fluency checks 1 s
    plan = TrainingPlan(
        steps=10,
        step=Work(train_tokens=250),
        frozen=Work(forward_tokens=1000),
        frozen_steps=4,
        rest=Work(generated_tokens=20),
    )
    assert plan.work == Work(train_tokens=2500, forward_tokens=4000, generated_tokens=20)
    assert plan.seconds(RATES) == pytest.approx(10 + 4 + 1)
    assert plan.seconds(RATES, step_seconds=3.0) == pytest.approx(10 * 2 + 4 + 1)
    cached_early = replace(plan, frozen_steps=1)  # the timed steps have no frozen work in them
    assert cached_early.seconds(RATES, step_seconds=3.0) == pytest.approx(10 * 3 + 1 + 1)
    assert plan.seconds(RATES, step_seconds=0.5) == pytest.approx(0 + 4 + 1)  # never below the frozen work

    rates = replace(RATES, step_seconds={"unlearn_x": 3.0})
    stages = estimate([("unlearn_x", plan.work), ("evaluate_x", Work(generated_tokens=20))], rates, {"unlearn_x": plan})
    assert [s.seconds for s in stages] == [pytest.approx(25.0), pytest.approx(1.0)]
    assert estimate([("unlearn_x", plan.work)], RATES, {"unlearn_x": plan})[0].seconds == pytest.approx(15.0)


def test_training_plans_are_the_training_stages_work(loaded, pack_dir: Path) -> None:
    pack, cfg = load_pack(pack_dir), _cfg()
    plans = training_plans(loaded, _saes(), pack, cfg)
    assert list(plans) == ["unlearn_crisp", "unlearn_rmu"]  # clamp trains nothing
    staged = dict(stage_plan(loaded, _saes(), pack, cfg))
    assert all(plans[stage].work == staged[stage] for stage in plans)
    assert plans["unlearn_rmu"].frozen_steps == 10  # RMU reads the frozen retain states every step


def test_attack_batches_are_costed_padded_to_their_longest_text() -> None:
    lengths = [1, 2, 3, 10]
    for batch in (1, 2, 3, 4, 6):
        draws = list(itertools.combinations(lengths, min(batch, len(lengths))))
        brute = sum(len(d) * max(d) for d in draws) / len(draws)
        assert padded_batch_tokens(lengths, batch) == pytest.approx(brute)
    assert padded_batch_tokens(lengths, 2) == pytest.approx(2 * 38 / 6)


def test_demo_prints_and_saves_the_estimate(loaded, sae_dir: Path, pack_dir: Path, tmp_path: Path) -> None:
    import json

    from sae_unlearn.cli.experiment import stage_estimates
    from sae_unlearn.evaluation.experiment import Experiment

    out = tmp_path / "out"
    experiment = Experiment(concept=str(pack_dir), compare=_cfg(sae=str(sae_dir)))
    seconds = stage_estimates(loaded, experiment, out)
    assert set(experiment.stage_plan()) - {"load model"} == set(seconds)  # every stage the progress lines name
    saved = json.loads((out / "estimate.json").read_text())
    assert list(saved["stages"])[:3] == ["feature_selection", "evaluate_base", "unlearn_crisp"]
    assert saved["total_seconds"] == pytest.approx(sum(saved["stages"].values()), abs=0.5)
    assert all(v >= 0 for v in saved["stages"].values()) and saved["total_seconds"] > 0
    assert saved["compute_dtype"]["dtype"] == "float32"
    assert saved["throughput_per_second"]["forward_tokens"] > 0
    assert set(saved["throughput_per_second"]["step_seconds"]) == {"unlearn_crisp", "unlearn_rmu"}
    # the tiny pack leaves no attack text: the attack is not timed, and the file stays standard JSON
    assert saved["throughput_per_second"]["attack_train_tokens"] is None
    assert "Infinity" not in (out / "estimate.json").read_text()


def test_estimate_is_checked_against_the_measured_stage_times(tmp_path: Path) -> None:
    import json

    from sae_unlearn.cli.experiment import print_estimate_check

    results = {
        "seconds": {"feature_selection": 30.0, "unlearn_crisp": 300.0, "unlearn_clamp": 0.0, "total": 999.0},
        "methods": {"base": {"seconds": 100.0}, "crisp": {"seconds": 50.0}, "clamp": {"seconds": 20.0}},
    }
    measured = measured_stage_seconds(results)
    assert measured == {
        "feature_selection": 30.0,
        "unlearn_crisp": 300.0,
        "unlearn_clamp": 0.0,
        "evaluate_base": 100.0,
        "evaluate_crisp": 50.0,
        "evaluate_clamp": 20.0,
    }
    estimated = {"feature_selection": 20.0, "evaluate_base": 100.0, "unlearn_crisp": 400.0, "unlearn_clamp": 0.0}
    check = estimate_against_measured(estimated, measured)
    assert list(check["stages"]) == ["feature_selection", "evaluate_base", "unlearn_crisp"]  # clamp: no work
    assert check["stages"]["feature_selection"] == {"estimated": 20.0, "measured": 30.0, "ratio": 1.5}
    assert check["total"] == {"estimated": 520.0, "measured": 430.0, "ratio": pytest.approx(430 / 520, abs=1e-3)}
    assert estimate_against_measured({}, measured)["total"] is None

    out = tmp_path / "out"
    out.mkdir()
    (out / "estimate.json").write_text(json.dumps({"stages": estimated, "total_seconds": 520.0}))
    print_estimate_check(out, results, load_seconds=5.0)
    saved = json.loads((out / "estimate.json").read_text())
    assert saved["stages"] == estimated and saved["total_seconds"] == 520.0  # the estimate itself is kept
    assert saved["measured"]["stages"]["load_model"]["ratio"] == 1.0
    assert saved["measured"]["total"]["measured"] == 435.0


# The work of each method's stages on the tiny set-up, as computed before the methods' cost models moved
# into their own modules (Method.training_work / hooks_saes): the move must not change a figure. NPO's
# training is left out: it was costed as a CRISP step (hidden-state loss, SAE and coherence tokens) and
# now has its own model (test_npo_training_is_costed_as_next_token_training).
BEFORE_THE_MOVE = {
    "unlearn_crisp": Work(
        forward_tokens=870.375,
        lm_head_rows=1409,
        sae_tokens=1683.3333333333335,
        train_tokens=3228.333333333334,
        generated_tokens=96,
    ),
    "evaluate_crisp": Work(forward_tokens=14093.5, lm_head_rows=11133, sae_tokens=1010, generated_tokens=96),
    "unlearn_clamp": Work(),
    "evaluate_clamp": Work(forward_tokens=13714.75, lm_head_rows=11133, sae_tokens=12710, generated_tokens=96),
    "unlearn_ablate": Work(),
    "evaluate_ablate": Work(forward_tokens=13714.75, lm_head_rows=11133, sae_tokens=12710, generated_tokens=96),
    "unlearn_rmu": Work(forward_tokens=672.5, train_tokens=1514.166666666667),
    "evaluate_rmu": Work(forward_tokens=13336, lm_head_rows=11133, generated_tokens=96),
    "evaluate_npo": Work(forward_tokens=13336, lm_head_rows=11133, generated_tokens=96),
}


def test_each_methods_work_is_what_it_was_before_the_cost_models_moved(loaded, pack_dir: Path) -> None:
    cfg = CompareConfig(
        methods=["crisp", "clamp", "ablate", "rmu", "npo"],
        max_length=64,
        method_options={
            "crisp": {"steps": 10, "fluency_every": 4, "unlikelihood_weight": 0.0},  # the term came later
            "rmu": {"steps": 10},
            "npo": {"steps": 6, "fluency_every": 3},
        },
        eval=EvalConfig(probe_split="all", letter=True, relearn_steps=4, relearn_eval_at=[0, 4]),
    )
    plan = dict(stage_plan(loaded, _saes(), load_pack(pack_dir), cfg))
    for stage, before in BEFORE_THE_MOVE.items():
        assert asdict(plan[stage]) == pytest.approx(asdict(before), rel=1e-12), stage
    published = CompareConfig(
        methods=["crisp"],
        max_length=64,
        method_options={"crisp": {"steps": 7, "objective": "published"}},
        eval=EvalConfig(probe_split="all", letter=False, relearn_steps=4, relearn_eval_at=[0, 4]),
    )
    crisp = dict(stage_plan(loaded, _saes(), load_pack(pack_dir), published))["unlearn_crisp"]
    before = Work(
        forward_tokens=741.375, lm_head_rows=896, sae_tokens=1178.3333333333335, train_tokens=2259.8333333333335
    )
    assert asdict(crisp) == pytest.approx(asdict(before), rel=1e-12)


def test_npo_training_is_costed_as_next_token_training(loaded, pack_dir: Path) -> None:
    """NPO reads log-probabilities through the whole model (LM train tokens, no SAEs, no coherence text),
    the reference's forget log-probabilities once per paragraph, and checks fluency every fluency_every."""

    def npo_work(**options) -> Work:
        cfg = CompareConfig(methods=["npo"], max_length=64, method_options={"npo": options}, eval=_cfg().eval)
        return dict(stage_plan(loaded, _saes(), load_pack(pack_dir), cfg))["unlearn_npo"]

    work = npo_work(steps=6, fluency_every=3)
    assert asdict(work) == pytest.approx(
        asdict(Work(forward_tokens=634, lm_head_rows=634, lm_train_tokens=1817, generated_tokens=96)), rel=1e-12
    )
    assert work.train_tokens == 0 and work.sae_tokens == 0
    no_check = npo_work(steps=6, fluency_every=0)
    assert no_check.generated_tokens == 0 and no_check.lm_train_tokens == work.lm_train_tokens
    # the reference log-probabilities are cached: forward work stops growing after the first epoch
    assert npo_work(steps=60, fluency_every=0).forward_tokens == no_check.forward_tokens
    assert npo_work(steps=60, fluency_every=0).lm_train_tokens == pytest.approx(10 * no_check.lm_train_tokens)
    assert 0 < npo_work(steps=6, fluency_every=0, retain_weight=0.0).lm_train_tokens < no_check.lm_train_tokens


def test_crisp_epochs_set_the_estimated_steps(loaded, pack_dir: Path) -> None:
    """`epochs` sets CRISP's steps from the pack (crisp.training_steps, as run() counts them)."""
    pack = load_pack(pack_dir)
    steps = math.ceil(2 * len(pack.forget_split("train")) / 4)

    def crisp_work(**options) -> Work:
        cfg = CompareConfig(methods=["crisp"], max_length=64, method_options={"crisp": options}, eval=_cfg().eval)
        return dict(stage_plan(loaded, _saes(), pack, cfg))["unlearn_crisp"]

    by_epochs = crisp_work(epochs=2.0, batch_size=4, fluency_every=0)
    assert by_epochs == crisp_work(steps=steps, batch_size=4, fluency_every=0)
    assert by_epochs != crisp_work(batch_size=4, fluency_every=0)  # the default 100 steps


def test_crisp_unlikelihood_term_is_costed_as_generation_and_a_pass_over_openings_and_continuations(
    loaded, pack_dir: Path
) -> None:
    pack = load_pack(pack_dir)

    def crisp_work(**options) -> Work:
        cfg = CompareConfig(
            methods=["crisp"], max_length=64, method_options={"crisp": {"steps": 10, "batch_size": 2, **options}}
        )
        return dict(stage_plan(loaded, _saes(), pack, cfg))["unlearn_crisp"]

    off, on = crisp_work(unlikelihood_weight=0.0), crisp_work(unlikelihood_tokens=8)
    openings = [" ".join(text.split()[:6]) for text in pack.forget_split("train")]
    opening_tokens = sum(len(loaded.tokenizer(o).input_ids) for o in openings) / len(openings)
    assert on.generated_tokens - off.generated_tokens == 10 * 2 * 8
    assert on.train_tokens - off.train_tokens == pytest.approx(10 * 2 * (8 + opening_tokens))
    assert on.forward_tokens == off.forward_tokens and on.sae_tokens == off.sae_tokens
