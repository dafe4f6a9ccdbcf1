"""examples/unlearn_a_concept.ipynb executes end to end (embedded-small, small SAEs trained in it, a small budget)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "unlearn_a_concept.ipynb"

# the CI budget: what the notebook's parameters cell is replaced with
CI_PARAMETERS = {
    "MODEL": "embedded-small",
    "SAES": "train",
    "TRAIN_LAYERS": [4, 8],
    "CONCEPT": "harry-potter",
    "K": 5,
    "STEPS": 25,
    "CRISP_OPTIONS": {"fluency_every": 0},
    "N_PROBES": 3,
    "PPL_TEXTS": 4,
    "GEN_TOKENS": 8,
}

SUMMARY_CELL = """
import json
json.dump(
    {
        "target": {name: r["probes"]["rings"]["target"]["logprob"]["acc"] for name, r in results.items()},
        "base_levels": sum(base_levels.values()),
        "crisp_levels": sum(crisp_levels.values()),
        "generations": [before, after],
    },
    open("summary.json", "w"),
)
"""


def _parameters_cell(nb) -> int:
    for i, cell in enumerate(nb.cells):
        if "parameters" in cell.metadata.get("tags", []):
            return i
    raise AssertionError("the notebook has no cell tagged 'parameters'")


def test_the_parameters_cell_names_every_ci_parameter() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = nb.cells[_parameters_cell(nb)].source
    defined = {line.split("=")[0].split(":")[0].strip() for line in source.splitlines() if "=" in line}
    assert set(CI_PARAMETERS) | {"OUT"} <= defined
    assert nb.cells[_parameters_cell(nb)].cell_type == "code"
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "ship it without outputs"


@pytest.mark.integration
def test_notebook_executes_on_embedded_small(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    os.environ.setdefault("SAE_UNLEARN_CACHE", str(ROOT / ".cache" / "sae-unlearn"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = {**CI_PARAMETERS, "OUT": str(tmp_path / "out")}
    nb.cells[_parameters_cell(nb)].source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.append(nbformat.v4.new_code_cell(SUMMARY_CELL))

    nbclient.NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 3  # the features, the loss curve, the probe accuracies
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["target"]) == {"base", "crisp"}
    assert summary["crisp_levels"] < 0.9 * summary["base_levels"]  # CRISP lowered the selected features
    before, after = summary["generations"]
    assert len(before) == len(after) > 0
    assert (tmp_path / "out" / "crisp" / "config.json").exists()
