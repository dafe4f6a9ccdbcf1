"""Fixtures shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer) -> Path:
    """A tiny Llama saved as a local model directory (what --model takes)."""
    from tests.conftest import tiny_model

    root = tmp_path / "tiny-model"
    tiny_model("llama", len(tokenizer)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
