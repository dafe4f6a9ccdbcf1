"""Evaluation on the real embedded model: a WMDP-format file scores exactly as the pack's own probes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_unlearn.concepts.pack import load_pack, load_probes
from sae_unlearn.evaluation.scoring import score_probes
from sae_unlearn.models import load_model

pytestmark = pytest.mark.integration


def test_wmdp_and_column_files_score_as_the_pack_probes(tmp_path: Path) -> None:
    loaded = load_model("embedded")
    probes = [p for p in load_pack("harry-potter").probe_split("report") if p.ring == "target"][:24]
    rows = []
    for i, p in enumerate(probes):  # the answer at a different index in every row
        choices = list(p.distractors)
        choices.insert(i % len(p.options), p.answer)
        rows.append({"question": p.prompt, "choices": choices, "answer": i % len(p.options), "id": p.id})
    (tmp_path / "wmdp-style.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    columns = {k: [r[f] for r in rows] for k, f in (("questions", "question"), ("choices", "choices"))}
    columns["answers"] = [r["answer"] for r in rows]
    (tmp_path / "cols.json").write_text(json.dumps(columns))
    native = score_probes(loaded.model, loaded.tokenizer, probes, letter=False)
    for name in ("wmdp-style.jsonl", "cols.json"):
        read = load_probes(tmp_path / name, ring="target")
        assert [sorted(p.options) for p in read] == [sorted(p.options) for p in probes]
        scored = score_probes(loaded.model, loaded.tokenizer, read, letter=False)
        for kind in ("logprob", "logprob_sum", "logprob_per_byte"):
            assert scored["rings"]["target"][kind]["acc"] == native["rings"]["target"][kind]["acc"], (name, kind)
