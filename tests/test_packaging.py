"""The wheel carries every data file the package reads (a non-editable install must be able to evaluate)."""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sae_unlearn"


def _package_data_globs() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["package-data"]["sae_unlearn"]


def _non_python_files() -> set[str]:
    files = set()
    for path in PACKAGE.rglob("*"):
        if not path.is_file() or path.suffix in {".py", ".pyc"} or "__pycache__" in path.parts:
            continue
        files.add(path.relative_to(PACKAGE).as_posix())
    return files


def _covered(patterns: list[str]) -> set[str]:
    # setuptools expands package-data globs relative to the package directory, with ** recursive
    covered: set[str] = set()
    for pattern in patterns:
        covered.update(glob.glob(pattern, root_dir=PACKAGE, recursive=True))
    return covered


def test_every_data_file_under_the_package_is_package_data() -> None:
    data_files = _non_python_files()
    missing = sorted(data_files - _covered(_package_data_globs()))
    assert not missing, f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_the_data_the_code_reads_exists() -> None:
    data_files = _non_python_files()
    # the evaluation's generic text, a built-in pack and the shipped SAEs: each read by the installed package
    assert "evaluation/data/generic_heldout.txt" in data_files
    assert "concepts/packs/harry_potter/probes.jsonl" in data_files
    assert any(f.startswith("saes/shipped/gemma-3-270m/") and f.endswith(".safetensors") for f in data_files)


def test_the_check_notices_a_missing_glob() -> None:
    # without the evaluation data glob, the generic text is reported missing
    patterns = [p for p in _package_data_globs() if not p.startswith("evaluation/")]
    assert "evaluation/data/generic_heldout.txt" in _non_python_files() - _covered(patterns)


def test_constraints_pin_every_runtime_dependency() -> None:
    import re

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = {
        re.split(r"==", line)[0].strip().lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    for requirement in pyproject["project"]["dependencies"]:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pinned, f"{name} is a dependency but constraints.txt does not pin it"
        assert "==" not in requirement, f"{requirement}: dependencies are ranges; the exact pin is constraints.txt's"


def test_the_package_reports_the_version_pyproject_declares() -> None:
    import sae_unlearn

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert sae_unlearn.__version__ == declared
