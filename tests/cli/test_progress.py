"""Progress without a terminal: one plain line per stage and at least one per interval within it."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sae_unlearn.cli import app
from sae_unlearn.cli.common import Reporter


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sae_unlearn.progress"]


def test_plain_lines_per_stage_and_heartbeat(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sae_unlearn.progress")
    with Reporter("job", ["load model", "train"], plain=True, interval=0.05) as reporter:
        reporter.stage("load model")
        time.sleep(0.3)  # a stage that reports no counts still shows it is alive
        reporter.stage("train")
    lines = _lines(caplog)
    assert lines[0].startswith("[1/2] load model · started")
    beats = [line for line in lines if line.startswith("[1/2] load model · elapsed")]
    assert len(beats) >= 2, lines
    assert lines[-2].startswith("[2/2] train · started") and lines[-1].startswith("job: done in")


def test_counts_are_rate_limited_with_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sae_unlearn.progress")
    with Reporter("job", ["train"], plain=True, interval=0.2) as reporter:
        reporter.stage("train")
        reporter.update(1, 4, info="loss=2")  # within the interval of the stage line: no line of its own
        count_lines = [line for line in _lines(caplog) if "1/4" in line]
        time.sleep(0.35)  # the heartbeat repeats the counts
        reporter.update(4, 4, info="loss=1")  # the end of a count is always shown
    assert count_lines == []
    lines = _lines(caplog)
    beat = next(line for line in lines if "1/4 (loss=2)" in line)
    assert "elapsed" in beat and "ETA" in beat and "total" in beat
    assert any(line.startswith("[1/1] train · 4/4 (loss=1)") for line in lines)


def test_library_messages_become_stages_and_details(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sae_unlearn.progress")
    plan = ["load model", "evaluate base", "unlearn crisp"]
    with Reporter("compare", plan, plain=True, interval=60) as reporter:
        reporter.message("evaluate base")
        reporter.message("evaluate base: probes")
        reporter.message("unlearn crisp")
        reporter.update(10, 10)
    lines = _lines(caplog)
    assert lines[0].startswith("[2/3] evaluate base · started")
    assert lines[1].startswith("[2/3] evaluate base: probes · elapsed")
    assert lines[2].startswith("[3/3] unlearn crisp · started")
    assert lines[3].startswith("[3/3] unlearn crisp · 10/10")  # the end of a count is always shown


def test_plan_lists_stages_with_estimates(capsys: pytest.CaptureFixture[str]) -> None:
    Reporter("demo", ["load model", "train"], estimates={"load model": 5, "train": 125}, plain=True).print_plan()
    err = capsys.readouterr().err
    assert "demo: 2 stages, ~2:10 expected" in err and "1. load model  (~0:05)" in err and "2. train" in err


def test_features_command_logs_plain_stage_lines(
    model_dir: Path, sae_dir: Path, pack_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAE_UNLEARN_PROGRESS_SECONDS", "0.05")
    args = ["features", "--model", str(model_dir), "--sae", str(sae_dir), "--concept", str(pack_dir)]
    args += ["--out", str(tmp_path / "f"), "--k", "2", "--set", "min_ratio=0", "--batch", "4", "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "[1/2] load model · started" in result.output
    assert "[2/2] feature statistics · started" in result.output
    assert re.search(r"\[2/2\] feature statistics · (\d+)/\1 \(paragraphs\) · elapsed", result.output)
    assert "features: done in" in result.output
    assert (tmp_path / "f" / "features.json").exists()
