"""Bad input gets one line on stderr naming the fix, exit code 2, and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sae_unlearn.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def _one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # progress lines (logged at INFO when output is not a terminal) may come before the error
    lines = [line for line in result.output.strip().splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.output


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["unlearn", "--method", "forget", "--out", "X"], "unknown method 'forget'"),
        (["unlearn", "--method", "clamp", "--scale", "-3", "--out", "X"], "does not apply to method clamp"),
        (["unlearn", "--method", "crisp", "--set", "objective=magic", "--out", "X"], "unknown CRISP objective"),
        (["features", "--concept", "no-such-pack", "--out", "X"], "unknown concept pack"),
        (["features", "--strategy", "magic", "--out", "X"], "unknown selection strategy"),
        (["train-sae", "--corpus", "missing.txt", "--out", "X"], "corpus not found"),
        (["train-sae", "--corpus", "c.txt", "--layers", "a,b", "--out", "X"], "not a comma-separated list"),
        (["doctor", "--model", "nonsense"], "unknown model 'nonsense'"),
        (["eval", "--out", "r.json"], "nothing to evaluate on"),
        (["eval", "--concept", "harry-potter", "--run", "no-run-dir", "--out", "r.json"], "run directory not found"),
        (["concept", "validate", "no-such-pack"], "unknown concept pack"),
        (["compare", "--methods", "crisp,forget", "--out", "X"], "unknown method 'forget'"),
        (
            ["compare", "--methods", "crisp", "--attack", "base,ablate", "--out", "X"],
            "the attacks are asked for 'ablate', which is not run",
        ),
    ],
)
def test_bad_input_is_one_line(args: list[str], text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _one_line_error(run(*args), text)


def test_existing_output_is_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    _one_line_error(run("features", "--out", str(out)), "already holds files")
    (tmp_path / "r.json").write_text("{}")
    _one_line_error(run("eval", "--concept", "harry-potter", "--out", "r.json"), "already exists")
    assert (out / "mine.txt").read_text() == "keep me" and (tmp_path / "r.json").read_text() == "{}"


def test_concept_list_and_validate() -> None:
    result = run("concept", "list")
    assert result.exit_code == 0 and "harry-potter" in result.output
    result = run("concept", "validate", "harry-potter")
    assert result.exit_code == 0 and "OK" in result.output


def test_broken_pack_names_file_and_line(tmp_path: Path) -> None:
    from tests.conftest import write_pack

    root = write_pack(tmp_path / "p")
    with (root / "probes.jsonl").open("a") as f:
        f.write('{"id": "x", "prompt": "q?", "answer": "A", "distractors": ["A", "B", "C"], "ring": "far"}\n')
    result = run("concept", "validate", str(root))
    _one_line_error(result, "probes.jsonl:6: field 'distractors' contains the answer")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["unlearn", "--method", "crisp", "--set", "lr=abc", "--out", "X"], "lr must be a number"),
        (["unlearn", "--method", "crisp", "--set", "k=5", "--out", "X"], "pass --k 5 or --set features.k=5"),
        (["unlearn", "--method", "crisp", "--set", "features.min_ratio=x", "--out", "X"], "must be a number"),
        (["unlearn", "--method", "crisp", "--set", "rmu.steps=3", "--out", "X"], "takes no rmu. options"),
        (["features", "--set", "k=five", "--out", "X"], "k must be an integer"),
        (["demo", "--fast", "--set", "crisp.lr=abc", "--out", "X"], "lr must be a number"),
        (["compare", "--set", "k=5", "--device", "tpu", "--out", "X"], "unknown device 'tpu'"),
        (["export", "no-run", "--merged", "M", "--device", "tpu"], "run directory not found"),
        (["features", "--set", "features.k=0", "--model", "nonsense", "--out", "X"], "unknown model"),
    ],
)
def test_set_values_are_checked_before_loading(
    args: list[str], text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _one_line_error(run(*args), text)


def test_revision_flag_pins_a_hub_model(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: list[str | None] = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def fake(real):
        def from_pretrained(source, *args, revision=None, **kwargs):
            seen.append(revision)
            return real(str(model_dir), *args, **kwargs)  # the hub id answered from the local directory

        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake(real_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake(real_tok))
    result = run("doctor", "--model", "org/tiny", "--revision", "abc123", "--sae", str(model_dir / "no-saes"))
    assert seen and set(seen) == {"abc123"}, result.output
    _one_line_error(run("doctor", "--model", str(model_dir), "--revision", "abc123"), "applies to hub ids")
