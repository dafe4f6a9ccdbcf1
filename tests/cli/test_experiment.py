"""Experiment files: compare --config, the built-in demo settings, results.json that re-runs itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sae_unlearn.cli import app
from sae_unlearn.cli.experiment import experiment_overrides, load_cli_experiment
from sae_unlearn.errors import UserError
from sae_unlearn.evaluation.compare import CompareConfig
from sae_unlearn.evaluation.evaluate import EvalConfig
from sae_unlearn.evaluation.experiment import Experiment, load_experiment, run_experiment

SHIPPED_CLAMP = {"value": -5.0, "threshold": 2.0}
FAST_EVAL = {
    "max_probes_per_ring": 25,
    "relearn_steps": 5,
    "relearn_eval_at": [0, 5],
    "max_ppl_texts": 8,
    "fluency_tokens": 20,
    "robustness_for": ["crisp"],
    "relearn_for": ["crisp"],
}
FAST_METHODS = {"crisp": {"steps": 25, "max_length": 64}, "rmu": {"steps": 20}, "npo": {"steps": 5}}
DEMO_METHODS = ["crisp", "clamp", "ablate", "rmu", "npo"]


def _expected(**kw) -> CompareConfig:
    return CompareConfig(**kw)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        # the settings `_run_compare` injected before they moved into sae_unlearn/experiments/*.toml
        (("compare", None, False), _expected(method_options={"clamp": SHIPPED_CLAMP})),
        (
            ("compare", None, True),
            _expected(
                examples_from=64,
                method_options={"clamp": SHIPPED_CLAMP, **FAST_METHODS},
                eval=EvalConfig(**FAST_EVAL),
            ),
        ),
        (
            ("demo", "demo", False),
            _expected(
                methods=DEMO_METHODS,
                max_length=128,
                method_options={"clamp": SHIPPED_CLAMP},
                eval=EvalConfig(
                    letter=False, robustness_for=["base", *DEMO_METHODS], relearn_for=["base", "crisp", "rmu", "npo"]
                ),
            ),
        ),
        (
            ("demo", "demo-fast", False),
            _expected(
                methods=DEMO_METHODS,
                max_length=128,
                examples_from=64,
                method_options={"clamp": SHIPPED_CLAMP, **FAST_METHODS},
                eval=EvalConfig(letter=False, **FAST_EVAL),
            ),
        ),
    ],
)
def test_builtin_experiments_keep_the_former_cli_defaults(command, expected: CompareConfig) -> None:
    _, spec, fast = command
    experiment = load_cli_experiment(spec, fast, {})
    assert experiment.concept == "harry-potter" and experiment.model == "embedded"
    assert experiment.compare == expected


def test_flags_and_set_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(
        'extends = "demo"\nk = 4\n'
        "[method_options.crisp]\nsteps = 7\n[method_options.clamp]\nvalue = -3.0\n"
        "[strategy_options]\nmin_ratio = 2.0\n[eval]\nmax_probes_per_ring = 3\n"
    )
    overrides = experiment_overrides(
        sae="shipped",
        methods="crisp,clamp",
        k=6,
        set_=["crisp.lr=1e-4", "features.max_retain_rate=0.02", "eval.fluency_tokens=5", "max_length=64"],
    )
    cfg = load_cli_experiment(str(path), False, overrides).compare
    assert cfg.methods == ["crisp", "clamp"] and cfg.k == 6 and cfg.max_length == 64
    assert cfg.method_options["crisp"] == {"steps": 7, "lr": 1e-4}
    assert cfg.method_options["clamp"] == {"value": -3.0, "threshold": 2.0}  # the file wins over when_sae
    assert cfg.strategy_options == {"min_ratio": 2.0, "max_retain_rate": 0.02}
    assert cfg.eval.max_probes_per_ring == 3 and cfg.eval.fluency_tokens == 5
    # --methods without --attack keeps the file's attack list to the methods that run
    assert cfg.eval.robustness_for == ["base", "crisp", "clamp"]
    assert load_cli_experiment("demo", False, experiment_overrides(set_=["features.k=3"])).compare.k == 3


def test_shipped_clamp_defaults_only_for_the_shipped_saes() -> None:
    assert "clamp" not in load_experiment(overrides={"sae": "/some/saes"}).compare.method_options


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[method_options.crisp]\nsteps = 'many'\n", "steps must be an integer"),
        ("[method_options.crisp]\nlr = 'abc'\n", "lr must be a number"),
        ("[method_options.crsip]\nsteps = 3\n", "unknown method 'crsip'"),
        ("[eval]\nletter = 3\n", "eval.letter must be true or false"),
        ("[strategy_options]\nk = 3\n", "top-level setting k"),
        ("methods = ['crisp', 'forget']\n", "unknown method 'forget'"),
        ("colour = 'blue'\n", "experiments have no setting 'colour'"),
        ("k = \n", "not a valid experiment file"),
        ("extends = 'nope'\n", "experiment file not found: nope"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_experiment(path)


def test_extends_loop_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(UserError, match="extends itself"):
        load_experiment(tmp_path / "a.toml")


def test_resolved_experiment_round_trips_through_results_json(tmp_path: Path) -> None:
    experiment = load_experiment("demo-fast", overrides={"method_options": {"rmu": {"lr": 1e-4}}})
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"version": 1, "goals": {}, "methods": {}, "experiment": experiment.to_dict()}))
    assert load_experiment(path) == experiment
    assert Experiment.from_dict(experiment.to_dict()) == experiment


def test_compare_cli_checks_the_file_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.toml").write_text("[method_options.crisp]\nlr = 'abc'\n")
    result = CliRunner().invoke(app, ["compare", "--config", "exp.toml", "--out", "X"])
    assert result.exit_code == 2 and "error: crisp" not in result.output
    assert "lr must be a number" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["compare", "--set", "crisp.steps=abc", "--out", "X"])
    assert result.exit_code == 2 and "steps must be an integer" in result.output


def test_results_json_reruns_the_same_experiment(
    model_dir: Path, sae_dir: Path, pack_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.toml").write_text(
        f'concept = "{pack_dir}"\nmodel = "{model_dir}"\nsae = "{sae_dir}"\nmethods = ["ablate"]\nk = 3\n'
        "[strategy_options]\nmin_ratio = 0.0\n"
        '[eval]\nprobe_split = "all"\nletter = false\nadversarial = false\nrelearn = false\n'
        "fluency_tokens = 4\nmax_ppl_texts = 2\n"
    )
    runner = CliRunner()
    first = runner.invoke(app, ["compare", "--config", "exp.toml", "--out", "one", "--dtype", "float32"])
    assert first.exit_code == 0, first.output
    assert "[1/5] load model · started" in first.output and "[4/5] unlearn ablate · started" in first.output
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["experiment"] == load_experiment("exp.toml").to_dict()
    second = runner.invoke(app, ["compare", "--config", "one/results.json", "--out", "two", "--dtype", "float32"])
    assert second.exit_code == 0, second.output
    again = json.loads((tmp_path / "two" / "results.json").read_text())
    assert again["experiment"] == results["experiment"]
    for name in ("base", "ablate"):
        assert again["methods"][name]["probes"] == results["methods"][name]["probes"]


def _stable(value: Any) -> Any:
    """results.json without what differs between two runs of the same experiment: timings and the date."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in ("seconds", "stage_seconds", "created")}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def test_python_and_cli_compare_write_the_same_results(
    model_dir: Path, sae_dir: Path, pack_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same options through `sae-unlearn compare` and through load_experiment + run_experiment from
    Python: the same experiment (the experiment files' defaults included) and the same results.json."""
    monkeypatch.chdir(tmp_path)
    args = ["--concept", str(pack_dir), "--model", str(model_dir), "--sae", str(sae_dir), "--methods", "ablate"]
    settings = ["features.min_ratio=0.0", "eval.probe_split=all", "eval.letter=false", "eval.adversarial=false"]
    settings += ["eval.relearn=false", "eval.fluency_tokens=4", "eval.max_ppl_texts=2", "k=3"]
    args += ["--fast", *[a for s in settings for a in ("--set", s)], "--out", "cli", "--dtype", "float32"]
    cli = CliRunner().invoke(app, ["compare", *args])
    assert cli.exit_code == 0, cli.output

    overrides = {
        "concept": str(pack_dir),
        "model": str(model_dir),
        "sae": str(sae_dir),
        "methods": ["ablate"],
        "k": 3,
        "strategy_options": {"min_ratio": 0.0},
        "eval": {
            "probe_split": "all",
            "letter": False,
            "adversarial": False,
            "relearn": False,
            "fluency_tokens": 4,
            "max_ppl_texts": 2,
        },
    }
    experiment = load_experiment(fast=True, overrides=overrides)
    (tmp_path / "python").mkdir()
    monkeypatch.chdir(tmp_path / "python")  # the same relative --out, so the run paths recorded are equal
    run_experiment(experiment, Path("cli"), dtype="float32")
    from_cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    from_python = json.loads((tmp_path / "python" / "cli" / "results.json").read_text())
    assert from_cli["experiment"] == experiment.to_dict()
    assert _stable(from_cli) == _stable(from_python)


def test_estimate_only_prints_the_plan_and_runs_nothing(
    model_dir: Path, sae_dir: Path, pack_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["compare", "--model", str(model_dir), "--sae", str(sae_dir), "--concept", str(pack_dir)]
    args += ["--methods", "crisp,npo", "--fast", "--dtype", "float32", "--estimate-only", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "compare: 7 stages" in result.output and "estimate only: nothing run" in result.output
    saved = json.loads((out / "estimate.json").read_text())
    assert saved["stages"]["unlearn_npo"] > 0 and saved["compute_dtype"]["dtype"] == "float32"
    assert sorted(p.name for p in out.iterdir()) == ["estimate.json"]  # no results, runs or features
