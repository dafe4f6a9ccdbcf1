"""results.json as a record: config, versions and content hashes of what was measured."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.evaluation.evaluate import EvalConfig
from sae_unlearn.evaluation.record import build_record, directory_hashes, sae_record


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_record_hashes_what_was_measured(loaded, pack_dir: Path, sae_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    loaded.model.save_pretrained(model_dir)
    local = dataclasses.replace(loaded, spec=str(model_dir), source=str(model_dir))
    pack = load_pack(pack_dir)
    cfg = EvalConfig(relearn_steps=7, lm_eval_tasks=["mmlu"])
    record = build_record(local, pack, None, cfg, pack.probes)
    assert record["config"]["relearn_steps"] == 7 and record["config"]["lm_eval_tasks"] == ["mmlu"]
    assert EvalConfig(**record["config"]) == cfg  # the whole config, round-tripped
    assert "sae-unlearn" in record["versions"] and "torch" in record["versions"]
    weights = next(model_dir.glob("*.safetensors"))
    assert record["model"]["files"][weights.name] == _sha(weights)
    assert record["pack"]["files"]["probes.jsonl"] == _sha(pack_dir / "probes.jsonl")
    assert record["pack"]["fingerprint"] == pack.fingerprint() and record["run"] is None
    json.dumps(record)
    # a changed probe set or pack file shows in the record
    assert build_record(local, pack, None, cfg, pack.probes[:1])["probes_hash"] != record["probes_hash"]
    (pack_dir / "forget.txt").write_text((pack_dir / "forget.txt").read_text() + "\n\nOne more paragraph.\n")
    again = build_record(local, load_pack(pack_dir), None, cfg, pack.probes)
    assert again["pack"]["files"]["forget.txt"] != record["pack"]["files"]["forget.txt"]
    assert again["model"]["files"] == record["model"]["files"]
    saes = sae_record(f"{sae_dir},org/release:layer_3", "tiny")
    assert saes["parts"][0]["files"] == directory_hashes(sae_dir) and saes["parts"][0]["files"]
    assert saes["parts"][1] == {"spec": "org/release:layer_3", "release": "org/release", "sae_id": "layer_3"}
