"""Integration tests on the real embedded models (select with -m integration; CI runs them too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.features import find_features, make_strategy
from sae_unlearn.methods import apply, export_merged, unlearn
from sae_unlearn.models import load_model
from sae_unlearn.saes import SAETrainingConfig, load_saes_for, train_saes

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_env() -> None:
    os.environ.setdefault("SAE_UNLEARN_CACHE", str(ROOT / ".cache" / "sae-unlearn"))


@pytest.fixture(scope="module")
def small(cache_env):
    return load_model("embedded-small")


def test_embedded_small_pipeline(small, tmp_path: Path) -> None:
    """Train SAEs, select features, CRISP lowers them on forget text, clamp works in generate, export loads."""
    pack = load_pack("harry-potter")
    cfg = SAETrainingConfig(
        layers=[4, 8], expansion=2, k=16, epochs=0.5, model_batch=8, checkpoint_every=0, eval_tokens=2048
    )
    quality = train_saes(small, cfg, pack.retain + pack.forget, tmp_path / "saes", heldout=pack.retain_split("heldout"))
    assert all(q.fve > 0.2 and q.l0 == pytest.approx(16, abs=0.5) for q in quality)
    saes = load_saes_for(small, str(tmp_path / "saes"))
    selection = find_features(small, saes, pack, make_strategy("crisp", k=5, min_ratio=2.0), with_examples=False)
    assert selection.features

    run = unlearn(
        "crisp",
        small,
        pack,
        tmp_path / "crisp",
        saes=saes,
        sae_spec=str(tmp_path / "saes"),
        features=selection,
        options={"steps": 25, "fluency_every": 0, "lr": 1e-3, "batch_size": 4},
    )
    from sae_unlearn.evaluation.evaluate import feature_levels

    texts = pack.forget_split("heldout")[:8]
    base = feature_levels(small, small.model, run, texts)
    with apply(small, run) as model:
        after = feature_levels(small, model, run, texts)
    assert sum(after.values()) < 0.9 * sum(base.values())

    clamp = unlearn(
        "clamp", small, pack, tmp_path / "clamp", saes=saes, sae_spec=str(tmp_path / "saes"), features=selection
    )
    ids = small.tokenizer("Harry Potter is a", return_tensors="pt").input_ids
    with torch.no_grad(), apply(small, clamp) as model:
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5

    merged = export_merged(small, run, tmp_path / "merged")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "assert 'sae_unlearn' not in sys.modules; print(m.config.model_type)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(merged)], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "llama"


def test_doctor_on_embedded(cache_env) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "sae_unlearn.cli", "doctor"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 0, res.stderr
    assert "Gemma3ForCausalLM" in res.stdout and "width 5120" in res.stdout


def test_demo_fast_end_to_end(cache_env, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "sae_unlearn.cli", "demo", "--fast", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "report.html").exists() and (out / "features" / "report.html").exists()
    results = json.loads((out / "results.json").read_text())
    acc = {name: r["probes"]["rings"]["target"]["logprob"]["acc"] for name, r in results["methods"].items()}
    assert set(acc) == {"base", "crisp", "clamp", "ablate", "rmu", "npo"}
    assert acc["crisp"] < acc["base"]
    # output to a pipe: the stage plan and plain stage lines, and results.json holds the experiment that re-runs it
    assert "demo: 13 stages" in res.stderr and "[4/13] unlearn crisp · started" in res.stderr
    assert (out / "summary.md").read_text().startswith("|  | base | crisp | clamp | ablate | rmu | npo |")
    from sae_unlearn.evaluation.experiment import load_experiment

    assert results["experiment"] == load_experiment("demo-fast").to_dict()
    # the estimate printed at the start, beside the measured times at the end
    check = json.loads((out / "estimate.json").read_text())["measured"]
    assert {"feature_selection", "unlearn_crisp", "evaluate_base"} <= set(check["stages"])
    assert check["total"]["measured"] > 0 and "measured / estimated" in res.stdout
