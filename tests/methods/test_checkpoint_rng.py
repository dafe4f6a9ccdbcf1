"""LoRA checkpoints carry the CUDA generators' states where CUDA exists (LoRA dropout on a GPU draws from
them), and resume restores them. On a CPU-only machine torch.cuda is faked; tests/test_gpu.py checks the
whole resume on a real GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.methods import unlearn


def test_cuda_rng_states_are_saved_and_restored(
    loaded, pack_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.append(list(new)))
    options = {"steps": 2, "batch_size": 2, "max_length": 32, "fluency_every": 0, "checkpoint_every": 1}
    pack = load_pack(pack_dir)
    run = unlearn("npo", loaded, pack, tmp_path / "run", options={**options, "lora_layers": [0, 1]})
    saved = load_file(str(run / "checkpoint" / "state.safetensors"))
    assert torch.equal(saved["cuda_rng.0"], states[0]) and torch.equal(saved["cuda_rng.1"], states[1])
    options["steps"] = 3
    unlearn("npo", loaded, pack, tmp_path / "run", options={**options, "lora_layers": [0, 1]}, resume=True)
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], states, strict=True))
