"""The fact-disjoint relearning attack on a real model (embedded-small) and the built-in pack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.evaluation.relearning import Attack, RelearnConfig, relearning_evaluation
from sae_unlearn.methods import unlearn
from sae_unlearn.models import load_model

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_relearning_attack_on_embedded_small(tmp_path: Path) -> None:
    os.environ.setdefault("SAE_UNLEARN_CACHE", str(ROOT / ".cache" / "sae-unlearn"))
    small = load_model("embedded-small")
    pack = load_pack("harry-potter")
    run = unlearn("rmu", small, pack, tmp_path / "rmu", options={"steps": 2, "batch_size": 2, "max_length": 64})
    before = {k: v.detach().clone() for k, v in small.model.state_dict().items()}
    cfg = RelearnConfig(
        attacks=[
            Attack("lora_r16", "lora", 2e-4, [0, 2], batch_size=2, max_length=64),
            Attack("full_ft", "full", 2e-5, [0, 1], batch_size=2, max_length=64),
        ],
        ppl_texts=2,
    )
    # a third of the report split keeps the test within minutes on a shared CPU
    scored_from = [p for p in pack.probe_split("report") if p.ring == "target"][:28]
    cache: dict[object, object] = {}
    rec = relearning_evaluation(small, run, pack, scored_from, cfg, cache)

    after = small.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the attack changed the caller's model"
    assert rec["leaked"] == 0 and rec["valid"]
    assert rec["split"]["scored"] >= 5 and rec["split"]["attack_statements"] >= 50
    assert rec["split"]["attack_paragraphs"] >= 50
    for name, attack in rec["attacks"].items():
        steps = [p["step"] for p in attack["curve"]]
        assert steps == ([0, 2] if name == "lora_r16" else [0, 1])
        assert attack["control"]["curve"][0]["target_acc"] == pytest.approx(rec["acc_base"])
        assert all(1 < p["generic_ppl"] < 1000 for p in attack["curve"])
    # step 0 is measured on the attacked copy: every attack starts from the same unlearned model
    assert rec["attacks"]["lora_r16"]["curve"][0]["target_acc"] == rec["attacks"]["full_ft"]["curve"][0]["target_acc"]
    assert 0.25 < rec["acc_base"] <= 1.0
