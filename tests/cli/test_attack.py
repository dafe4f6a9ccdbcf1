"""`sae-unlearn attack`: a run directory and its merged export give the same attack; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sae_unlearn.cli import app
from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.methods import export_merged, unlearn
from sae_unlearn.models import load_model
from tests.evaluation.test_relearning import spell_probes

runner = CliRunner()


def _one_line_error(args: list[str], text: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.output


def test_attack_on_a_run_and_on_its_merged_export(loaded, tmp_path: Path) -> None:
    from tests.conftest import write_pack

    model_dir = tmp_path / "model"
    loaded.model.save_pretrained(str(model_dir))
    loaded.tokenizer.save_pretrained(str(model_dir))
    local = load_model(str(model_dir), dtype="float32")
    pack_dir = write_pack(tmp_path / "pack", spell_probes())
    pack = load_pack(pack_dir)
    run = unlearn("rmu", local, pack, tmp_path / "rmu", options={"steps": 2, "batch_size": 2, "layer": 2})
    merged = export_merged(local, run, tmp_path / "merged")
    common = ["--concept", str(pack_dir), "--probe-split", "all", "--dtype", "float32", "--eval-at", "0,3"]

    result = runner.invoke(app, ["attack", str(run), *common])
    assert result.exit_code == 0, result.output
    from_run = json.loads((run / "attack.json").read_text())
    assert from_run["method"] == "rmu" and not from_run["merged_export"]
    record = from_run["relearning"]
    assert record["leaked"] == 0 and list(record["attacks"]) == ["lora_r16"]
    assert [p["step"] for p in record["attacks"]["lora_r16"]["curve"]] == [0, 3]
    assert record["attacks"]["lora_r16"]["control"]["curve"][0]["target_acc"] == record["acc_base"]

    out = tmp_path / "merged.json"
    result = runner.invoke(app, ["attack", str(merged), *common, "--out", str(out)])
    assert result.exit_code == 0, result.output
    from_merged = json.loads(out.read_text())
    assert from_merged["merged_export"] and from_merged["method"] == "rmu"
    # the same weights, the same attack, the same seed: the same curve
    a, b = from_merged["relearning"]["attacks"]["lora_r16"]["curve"], record["attacks"]["lora_r16"]["curve"]
    assert [p["target_acc"] for p in a] == [p["target_acc"] for p in b]
    assert [p["generic_ppl"] for p in a] == pytest.approx([p["generic_ppl"] for p in b], rel=1e-3)

    _one_line_error(["attack", str(run), *common], "already exists")
    _one_line_error(
        ["attack", str(run), *common, "--out", str(tmp_path / "x.json"), "--grid", "huge"], "unknown attack grid"
    )
    _one_line_error(["attack", str(run), *common, "--out", str(tmp_path / "x.json"), "--seeds", "a"], "--seeds")


def test_attack_needs_a_run(tmp_path: Path) -> None:
    _one_line_error(["attack", str(tmp_path / "nothing")], "run directory not found")
