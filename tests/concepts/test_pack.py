from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_unlearn.concepts.corpus import read_corpus
from sae_unlearn.concepts.pack import RINGS, load_pack, load_probes
from sae_unlearn.errors import UserError
from tests.conftest import write_pack

GOOD = {"id": "q1", "prompt": "Who?", "answer": "A", "distractors": ["B", "C", "D"], "ring": "far"}


def _probe_file(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_builtin_pack_meets_the_sizes() -> None:
    pack = load_pack("harry-potter")
    assert len(pack.forget) >= 250 and len(pack.retain) >= 250 and len(pack.coherence) >= 20
    counts = {ring: len(pack.probes_in(ring)) for ring in RINGS}
    assert counts["target"] >= 120 and min(counts["near"], counts["mid"], counts["far"]) >= 60
    for text in pack.forget:
        assert 60 <= len(text.split()) <= 200
    tune, report = pack.probe_split("tune"), pack.probe_split("report")
    assert tune and report and not {p.id for p in tune} & {p.id for p in report}
    _assert_disjoint_forget_splits(pack)
    assert not set(pack.retain_split("heldout")) & set(pack.retain_split("train"))
    assert pack.split_problems() == {}
    tune_prompts, report_prompts = pack.prompt_split("tune"), pack.prompt_split("report")
    assert len(tune_prompts) >= 8 and len(report_prompts) >= 8 and not set(tune_prompts) & set(report_prompts)
    assert sorted(tune_prompts + report_prompts) == sorted(pack.prompt_split("all"))


def _assert_disjoint_forget_splits(pack) -> None:
    """No normalised paragraph in two forget splits, and every distinct paragraph in one."""
    from sae_unlearn.concepts.pack import normalise

    parts = {part: [normalise(t) for t in pack.forget_split(part)] for part in ("train", "relearn", "heldout")}
    for part, texts in parts.items():
        assert len(set(texts)) == len(texts), part
    assert not set(parts["train"]) & set(parts["relearn"])
    assert not set(parts["train"]) & set(parts["heldout"])
    assert not set(parts["relearn"]) & set(parts["heldout"])
    assert sum(map(len, parts.values())) == len({normalise(t) for t in pack.forget})


def _pack_with(tmp_path: Path, forget: list[str]):
    root = write_pack(tmp_path / "pack")
    (root / "forget.txt").write_text("\n\n".join(forget) + "\n")
    return load_pack(root)


def test_duplicated_paragraphs_never_straddle_splits(tmp_path: Path) -> None:
    distinct = [f"Paragraph {i} tells of the wizard Zorbo and the spell number {i}." for i in range(90)]
    copies = [t.upper().replace(" ", "  ") for t in distinct[:30]] + [t + " !" for t in distinct[30:40]]
    pack = _pack_with(tmp_path, distinct + copies)
    assert pack.duplicates()["forget"] == 40 and len(pack.forget) == 130
    _assert_disjoint_forget_splits(pack)
    assert len(pack.forget_split("relearn")) == 32 and len(pack.forget_split("heldout")) == 24


def test_a_small_pack_gets_invalid_marks_not_silent_overlap(tmp_path: Path, caplog) -> None:
    from sae_unlearn.evaluation.evaluate import EvalConfig, split_validity

    pack = _pack_with(tmp_path, [f"Zorbo casts spell {i} at dawn over the tower." for i in range(20)])
    problems = pack.split_problems()
    assert {"retention.forget_heldout_ppl", "reactivation", "fluency.concept_prompts"} <= set(problems)
    assert "only 20 distinct forget paragraphs" in problems["reactivation"]
    with caplog.at_level("WARNING"):
        validity = split_validity(pack, EvalConfig())
    assert validity["invalid"] == problems and "reactivation is not a held-out measurement" in caplog.text
    assert "probes" in split_validity(pack, EvalConfig(probe_split="all"))["invalid"]
    with pytest.raises(UserError, match="unknown forget split"):
        pack.forget_split("test")


def test_tune_and_report_prompts_are_disjoint_or_marked(tmp_path: Path) -> None:
    distinct = [f"Story {i}: the wizard Zorbo walks to the tower of Quendor at night." for i in range(70)]
    pack = _pack_with(tmp_path, distinct)
    tune, report = pack.prompt_split("tune"), pack.prompt_split("report")
    assert tune and report and not set(tune) & set(report) and len(report) <= 8
    assert "fluency.concept_prompts" not in pack.split_problems()
    pack.prompts = ["Zorbo is a", "zorbo  IS a"]  # one distinct prompt: cannot be split
    assert pack.prompt_split("tune") == pack.prompt_split("report") == ["Zorbo is a"]
    assert "the same set" in pack.split_problems()["fluency.concept_prompts"]


def test_prompts_file_is_optional_and_checked(tmp_path: Path) -> None:
    root = write_pack(tmp_path / "pack")
    pack = load_pack(root)
    assert not pack.prompts and pack.prompt_split("tune") == pack.prompt_split("report")  # forget openings
    toml = root / "concept.toml"
    toml.write_text(toml.read_text() + '\n[files.prompts]\npath = "prompts.txt"\n')
    with pytest.raises(UserError, match=r"prompts\.txt \(files\.prompts"):
        load_pack(root)
    (root / "prompts.txt").write_text("Zorbo is a\nThe zorbo tree\n\n")
    assert load_pack(root).prompts == ["Zorbo is a", "The zorbo tree"]
    with pytest.raises(UserError, match="unknown prompt split"):
        pack.prompt_split("train")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**GOOD, "distractors": ["A", "C", "D"]}, "contains the answer"),
        ({k: v for k, v in GOOD.items() if k != "prompt"}, "field 'prompt' is missing"),
        ({**GOOD, "ring": "close"}, "field 'ring' is 'close'"),
        ({**GOOD, "distractors": "B"}, "field 'distractors' must be a list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_probe_validator_names_file_line_and_field(tmp_path: Path, row, message: str) -> None:
    path = _probe_file(tmp_path, [GOOD | {"id": "q0"}, row])
    with pytest.raises(UserError, match=message) as e:
        load_probes(path)
    assert f"{path}:2" in str(e.value)


def test_duplicate_ids(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="used twice"):
        load_probes(_probe_file(tmp_path, [GOOD, GOOD]))


def test_pack_missing_file(tmp_path: Path) -> None:
    root = write_pack(tmp_path / "p")
    (root / "retain.txt").unlink()
    with pytest.raises(UserError, match=r"retain.txt \(files.retain"):
        load_pack(root)
    with pytest.raises(UserError, match="unknown concept pack"):
        load_pack("no-such-pack")


def test_corpus_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\n")
    assert read_corpus(tmp_path / "a.txt") == ["one two", "three"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    assert read_corpus(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "c.csv").write_text("id,body\n1,hello\n2,world\n")
    assert read_corpus(tmp_path / "c.csv", column="body") == ["hello", "world"]
    with pytest.raises(UserError, match="no column 'text'"):
        read_corpus(tmp_path / "c.csv")
    import datasets

    datasets.Dataset.from_dict({"text": ["p", "q"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_corpus(tmp_path / "ds") == ["p", "q"]


def test_corpus_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="is empty"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_corpus(tmp_path / "latin1.txt")
    with pytest.raises(UserError, match="corpus not found"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        read_corpus(tmp_path / "bad.jsonl")
