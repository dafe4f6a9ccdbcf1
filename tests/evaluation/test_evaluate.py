from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.evaluation.compare import CompareConfig, compare
from sae_unlearn.evaluation.evaluate import EvalConfig, evaluate
from sae_unlearn.features import find_features, make_strategy
from sae_unlearn.methods import unlearn
from sae_unlearn.saes.loading import load_saes_from_spec

FAST = EvalConfig(probe_split="all", relearn_steps=2, relearn_eval_at=[0, 2], fluency_tokens=6, max_ppl_texts=4)


def test_evaluate_base_and_run(loaded, sae_dir, pack_dir, tmp_path: Path) -> None:
    pack = load_pack(pack_dir)
    base = evaluate(loaded, pack, None, cfg=FAST)
    assert set(base["probes"]["rings"]) == {"target", "near", "mid", "far"}
    assert base["retention"]["retain_heldout_ppl"] > 1 and base["relearning"]["leaked"] == 0
    # every forget paragraph of the tiny pack names the one answer: no fact-disjoint attack text is left
    assert base["relearning"]["skipped"] and base["relearning"]["curve"] == []
    assert base["adversarial"]["any_template_accuracy"]["n"] == 2 and base["reactivation"] is None
    assert base["adversarial"]["chance"]["any_template"] == pytest.approx(1 - 0.75**6)
    assert base["record"]["config"]["relearn_steps"] == 2 and base["record"]["pack"]["name"] == "zorbo"
    assert {"probes", "reactivation"} <= set(base["validity"]["invalid"])  # the "all" split; a 12-paragraph pack
    saes = load_saes_from_spec(str(sae_dir))
    selection = find_features(loaded, saes, pack, make_strategy("crisp", k=4, min_ratio=0.0), with_examples=False)
    run = unlearn(
        "ablate",
        loaded,
        pack,
        tmp_path / "ablate",
        saes=saes,
        sae_spec=str(sae_dir),
        features=selection,
        options={"scale": -5.0},
    )
    result = evaluate(loaded, pack, run, cfg=FAST)
    assert result["method"] == "ablate" and 0 <= result["reactivation"]["fraction"] < 1.0
    assert result["fluency"]["concept_prompts"]["samples"]
    json.dumps(result)  # serialisable


def test_compare_writes_results_and_report(loaded, sae_dir, pack_dir, tmp_path: Path) -> None:
    pack = load_pack(pack_dir)
    cfg = CompareConfig(
        methods=["clamp", "rmu"],
        sae=str(sae_dir),
        k=3,
        eval=FAST,
        method_options={"rmu": {"steps": 2, "batch_size": 2, "layer": 2}},
    )
    cfg.strategy = "saebench"
    results = compare(loaded, pack, tmp_path / "cmp", cfg)
    assert set(results["methods"]) == {"base", "clamp", "rmu"}
    assert set(results["seconds"]) == {"feature_selection", "unlearn_clamp", "unlearn_rmu", "total"}
    assert (tmp_path / "cmp" / "report.html").read_text().count("<svg") >= 3
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["concept"] == "zorbo" and set(saved["verdicts"]) == {"clamp", "rmu"}
    assert saved["methods"]["clamp"]["paired"]["rings"]["target"]["logprob"]["n"] >= 1
    assert saved["verdicts"]["rmu"]["relearn_recovery_max"]["note"] == "not measured"  # every attack skipped
    assert saved["record"]["config"]["methods"] == ["clamp", "rmu"]


def test_compare_refuses_attacks_on_a_method_it_does_not_run(loaded, pack_dir, tmp_path: Path) -> None:
    import dataclasses

    import pytest

    from sae_unlearn.errors import UserError

    with pytest.raises(UserError, match="'ablate', which is not run"):
        CompareConfig(methods=["clamp"], eval=dataclasses.replace(FAST, robustness_for=["base", "ablate"]))
    cfg = CompareConfig(methods=["clamp"], eval=dataclasses.replace(FAST))
    cfg.eval.robustness_for = ["rmu"]  # set after construction, as the CLI does
    with pytest.raises(UserError, match="'rmu', which is not run"):
        compare(loaded, load_pack(pack_dir), tmp_path / "cmp", cfg)
    assert not (tmp_path / "cmp").exists()
