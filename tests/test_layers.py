"""The package's shape: imports run one way, models <- saes <- concepts <- features <- methods <- evaluation
<- cli (docs/development.md), and scripts and benchmarks use public names only. Read from the source
(ast), lazy imports inside functions and TYPE_CHECKING blocks included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sae_unlearn"
STAGES = ["models", "saes", "concepts", "features", "methods", "evaluation", "cli"]
# top-level modules: shared leaves below every stage, except text_metrics, which reads models
LEAVES = {"errors": -1, "io": -1, "options": -1, "runs": -1, "distributed": -1, "text_metrics": 0}


def _rank(module: str) -> int | None:
    """The stage of a sae_unlearn module (higher may import lower); None for the package facade."""
    parts = module.split(".")
    if parts[0] != "sae_unlearn" or len(parts) == 1:
        return None
    if parts[1] in STAGES:
        return STAGES.index(parts[1])
    return LEAVES[parts[1]]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every `import` / `from ... import` in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return out


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_module_has_a_stage() -> None:
    names = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    dirs = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert names <= set(LEAVES), f"give {sorted(names - set(LEAVES))} a place in LEAVES"
    assert dirs <= set(STAGES), f"give {sorted(dirs - set(STAGES))} a place in STAGES"


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path: Path) -> None:
    here = _module_name(path)
    rank = _rank(here)
    if rank is None:  # sae_unlearn/__init__.py: the public facade over every stage
        return
    upward = [
        f"line {line}: {here} ({_label(rank)}) imports {module} ({_label(_rank(module))})"
        for line, module, _ in _imports(path)
        if module.startswith("sae_unlearn.") and (_rank(module) or 0) > rank
    ]
    assert not upward, "\n".join(upward)


def _label(rank: int | None) -> str:
    return "package" if rank is None else STAGES[rank] if rank >= 0 else "leaf"


def _private_imports(path: Path, same_stage_ok: bool) -> list[str]:
    """Imported `_names` from sae_unlearn modules (`same_stage_ok`: those of the file's own stage pass)."""
    stage = _module_name(path).split(".")[:2] if path.is_relative_to(PACKAGE) else None
    found = []
    for line, module, names in _imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if module.startswith("sae_unlearn") and private and not (same_stage_ok and module.split(".")[:2] == stage):
            found.append(f"line {line}: {module} {private}")
    return found


@pytest.mark.parametrize(
    "path",
    [*sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_scripts_and_benchmarks_use_public_names(path: Path) -> None:
    cli = [f"line {line}: {module}" for line, module, _ in _imports(path) if module.startswith("sae_unlearn.cli")]
    assert not cli, f"{path.name} imports CLI internals: {cli}"
    private = _private_imports(path, same_stage_ok=False)
    assert not private, f"{path.name} imports private names: {private}"


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_stages_share_public_names_only(path: Path) -> None:
    private = _private_imports(path, same_stage_ok=True)
    assert not private, f"{_module_name(path)} imports another stage's private names: {private}"
