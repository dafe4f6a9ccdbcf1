"""Standard MCQ files: WMDP/MMLU JSONL rows and column-oriented JSON, with file:line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_unlearn.concepts.pack import Probe, load_pack, load_probes
from sae_unlearn.errors import UserError
from tests.conftest import write_pack

WMDP = [
    {"question": "Where does Zorbo live?", "choices": ["village", "Quendor", "spring", "tower"], "answer": 1},
    {"question": "What does Ben grow?", "choices": ["barley", "wheat", "oats", "corn", "rye"], "answer": 0},
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_wmdp_rows(tmp_path: Path) -> None:
    probes = load_probes(_jsonl(tmp_path / "wmdp.jsonl", WMDP), ring="target")
    assert probes[0] == Probe("wmdp:1", "Where does Zorbo live?", "Quendor", ("village", "spring", "tower"), "target")
    assert probes[1].options == ["barley", "wheat", "oats", "corn", "rye"] and probes[1].id == "wmdp:2"
    rows = [{**WMDP[0], "answer": "B", "id": "q7", "ring": "far"}]  # a letter answer, the row's own ring
    assert load_probes(_jsonl(tmp_path / "l.jsonl", rows), ring="target")[0] == Probe(
        "q7", "Where does Zorbo live?", "Quendor", ("village", "spring", "tower"), "far"
    )


def test_column_json(tmp_path: Path) -> None:
    columns = {
        "questions": [r["question"] for r in WMDP],
        "choices": [r["choices"] for r in WMDP],
        "answers": [r["answer"] for r in WMDP],
    }
    (tmp_path / "cols.json").write_text(json.dumps(columns, indent=1))
    from_columns = load_probes(tmp_path / "cols.json", ring="near")
    from_rows = load_probes(_jsonl(tmp_path / "cols.jsonl", WMDP), ring="near")
    assert [(p.prompt, p.options, p.ring) for p in from_columns] == [(p.prompt, p.options, p.ring) for p in from_rows]
    assert [p.id for p in from_columns] == ["cols:0", "cols:1"]
    (tmp_path / "bad.json").write_text(json.dumps({**columns, "answers": [1]}))
    with pytest.raises(UserError, match="columns differ in length"):
        load_probes(tmp_path / "bad.json", ring="near")
    (tmp_path / "bad2.json").write_text(json.dumps({**columns, "answers": [1, 9]}))
    with pytest.raises(UserError, match=r"bad2\.json: entry 1: field 'answer' is 9 but there are 5 choices"):
        load_probes(tmp_path / "bad2.json", ring="near")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**WMDP[0], "answer": 4}, "field 'answer' is 4 but there are 4 choices"),
        ({**WMDP[0], "answer": True}, "field 'answer' is True"),
        ({**WMDP[0], "choices": "abcd"}, "field 'choices' must be a list"),
        ({**WMDP[0], "choices": ["a", ""], "answer": 0}, "non-empty strings"),
        ({**WMDP[0], "choices": ["a", "A"], "answer": 0}, "contains the answer"),
        ({k: v for k, v in WMDP[0].items() if k != "answer"}, "field 'answer' is missing"),
        ({k: v for k, v in WMDP[0].items() if k != "question"}, "field 'question' is missing"),
        ({**WMDP[0], "ring": "close"}, "field 'ring' is 'close'"),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path: Path, row, message: str) -> None:
    path = _jsonl(tmp_path / "w.jsonl", [WMDP[1], row])
    with pytest.raises(UserError, match=message) as e:
        load_probes(path, ring="target")
    assert str(e.value).startswith(f"{path}:2: ")


def test_a_file_without_rings_needs_ring(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "w.jsonl", WMDP)
    with pytest.raises(UserError, match=r"w\.jsonl:1: no 'ring' field") as e:
        load_probes(path)
    assert e.value.fix is not None and "--ring" in e.value.fix
    with pytest.raises(UserError, match="unknown ring 'inner'"):
        load_probes(path, ring="inner")


def test_a_pack_accepts_wmdp_probes(tmp_path: Path) -> None:
    root = write_pack(tmp_path / "pack")
    _jsonl(root / "probes.jsonl", WMDP)
    toml = root / "concept.toml"
    with pytest.raises(UserError, match="no 'ring' field"):
        load_pack(root)
    toml.write_text(toml.read_text().replace('path = "probes.jsonl"', 'path = "probes.jsonl"\nring = "target"'))
    assert [p.ring for p in load_pack(root).probes] == ["target", "target"]


def test_eval_cli_on_a_wmdp_file(tmp_path: Path, loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import sae_unlearn.models
    from sae_unlearn.cli import app

    monkeypatch.setattr(sae_unlearn.models, "load_model", lambda *a, **k: loaded)
    path = _jsonl(tmp_path / "wmdp-style.jsonl", WMDP)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", "--probes", str(path), "--ring", "target", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["probes"]["rings"]["target"]["logprob"]["n"] == 2 and saved["probe_split"] == "given"
    assert saved["probes"]["rings"]["target"]["chance"] == pytest.approx((1 / 4 + 1 / 5) / 2)
