"""The compute-dtype decision (issue 12): on a CPU without bfloat16 instructions every SAE product is float32.

The capability check is monkeypatched both ways; SAE products are recognised by the SAE width (80), which
no dimension of the tiny model has, and recorded at the aten level, so every matrix product counts.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.errors import UserError
from sae_unlearn.evaluation.evaluate import feature_levels
from sae_unlearn.features import find_features, make_strategy
from sae_unlearn.methods import apply, unlearn
from sae_unlearn.models import loading
from sae_unlearn.models.loading import decide_compute_dtype, load_model
from sae_unlearn.saes import SAETrainingConfig, load_saes_for
from sae_unlearn.saes.training import encoder_matmul_dtype
from tests.conftest import tiny_sae

D_SAE = 80
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation", "dot"}


class ProductDtypes(TorchDispatchMode):
    """Records (dtype, is an SAE product) of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, bool]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ in MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if tensors:
                self.seen.append((tensors[-1].dtype, any(D_SAE in t.shape for t in tensors)))
        return func(*args, **(kwargs or {}))

    def sae_dtypes(self) -> set[torch.dtype]:
        return {d for d, is_sae in self.seen if is_sae}

    def all_dtypes(self) -> set[torch.dtype]:
        return {d for d, _ in self.seen}


def _bf16(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: available)


def test_decision_follows_cpu_capability_and_dtype_option(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    _bf16(monkeypatch, False)
    no_bf16 = decide_compute_dtype("auto", cpu)
    assert no_bf16.dtype == torch.float32 and "without bfloat16" in no_bf16.reason
    assert no_bf16.to_dict() == {"dtype": "float32", "reason": no_bf16.reason}
    assert decide_compute_dtype(None, cpu).dtype == torch.float32
    assert decide_compute_dtype("bfloat16", cpu).dtype == torch.bfloat16  # asked for: kept (with a warning)
    _bf16(monkeypatch, True)
    with_bf16 = decide_compute_dtype("auto", cpu)
    assert with_bf16.dtype == torch.bfloat16 and "with bfloat16" in with_bf16.reason
    forced = decide_compute_dtype("float32", cpu)
    assert forced.dtype == torch.float32 and forced.reason == "--dtype float32"
    with pytest.raises(UserError, match="unknown dtype"):
        decide_compute_dtype("int8", cpu)


def test_bf16_counts_only_when_the_instructions_exist_and_run_in_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    timed: list[float] = []

    def ratio(value: float) -> Any:
        def measure() -> float:
            timed.append(value)
            return value

        return measure

    monkeypatch.setattr(loading, "cpu_has_bf16_instructions", lambda: False)
    monkeypatch.setattr(loading, "bf16_over_f32_product_time", ratio(0.4))
    loading.cpu_supports_bf16.cache_clear()
    assert loading.cpu_supports_bf16() is False and timed == []  # no instructions: nothing timed
    monkeypatch.setattr(loading, "cpu_has_bf16_instructions", lambda: True)
    loading.cpu_supports_bf16.cache_clear()
    assert loading.cpu_supports_bf16() is True and timed == [0.4]
    assert loading.cpu_supports_bf16() is True and timed == [0.4]  # timed once per process
    monkeypatch.setattr(loading, "bf16_over_f32_product_time", ratio(90.0))  # instructions unused: emulated
    loading.cpu_supports_bf16.cache_clear()
    assert loading.cpu_supports_bf16() is False
    assert decide_compute_dtype("auto", torch.device("cpu")).dtype == torch.float32
    loading.cpu_supports_bf16.cache_clear()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ONEDNN_MAX_CPU_ISA=AVX2 is an x86 setting")
def test_product_timing_sees_emulated_bf16_when_onednn_is_limited_to_avx2() -> None:
    """With oneDNN limited to AVX2 no x86 CPU runs bfloat16 products in hardware: the timing must say so."""
    code = "from sae_unlearn.models.loading import bf16_over_f32_product_time as r; print(r())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) >= loading.BF16_EMULATED_RATIO


@pytest.fixture
def bf16_sae_dir(tmp_path: Path) -> Path:
    """SAEs stored in bfloat16, like the shipped ones."""
    root = tmp_path / "saes"
    for layer in (1, 2):
        tiny_sae(layer, d_sae=D_SAE, seed=layer).to(torch.bfloat16).save_model(
            str(root / f"blocks.{layer}.hook_resid_post")
        )
    return root


def _pipeline(model_dir: Path, sae_dir: Path, pack_dir: Path, out: Path, dtype: str) -> tuple[Any, ProductDtypes]:
    """Load, statistics + contexts, CRISP (targets, losses), clamp hooks and re-activation, recording products."""
    loaded = load_model(str(model_dir), dtype=dtype)
    saes = load_saes_for(loaded, str(sae_dir))
    pack = load_pack(pack_dir)
    recorder = ProductDtypes()
    with recorder:
        selection = find_features(
            loaded, saes, pack, make_strategy("crisp", k=3, min_ratio=0.0), batch_size=4, examples_from=4
        )
        options = {"steps": 2, "batch_size": 2, "max_length": 24, "fluency_every": 0, "checkpoint_every": 0}
        crisp_run = unlearn(
            "crisp", loaded, pack, out / "crisp", options=options, saes=saes, sae_spec=str(sae_dir), features=selection
        )
        clamp_run = unlearn("clamp", loaded, pack, out / "clamp", saes=saes, sae_spec=str(sae_dir), features=selection)
        with apply(loaded, clamp_run) as model:
            model(input_ids=torch.randint(3, 300, (1, 8)))
        feature_levels(loaded, loaded.model, crisp_run, pack.forget[:2])
    return (loaded, saes, crisp_run), recorder


def test_without_bf16_every_sae_and_product_is_float32(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, bf16_sae_dir: Path, pack_dir: Path, tmp_path: Path
) -> None:
    _bf16(monkeypatch, False)
    (loaded, saes, crisp_run), recorder = _pipeline(model_dir, bf16_sae_dir, pack_dir, tmp_path / "runs", "auto")
    assert loaded.dtype == torch.float32
    assert all(s.sae.W_enc.dtype == torch.float32 and s.sae.W_dec.dtype == torch.float32 for s in saes)
    assert recorder.sae_dtypes() == {torch.float32}  # SAE products did run, all in float32
    assert recorder.all_dtypes() == {torch.float32}
    recorded = json.loads((crisp_run / "config.json").read_text())["compute_dtype"]
    assert recorded["dtype"] == "float32" and "without bfloat16" in recorded["reason"]
    # the stored files are untouched: still bfloat16 on disk
    from safetensors.torch import load_file

    stored = load_file(str(bf16_sae_dir / "blocks.1.hook_resid_post" / "sae_weights.safetensors"))
    assert stored["W_enc"].dtype == torch.bfloat16


def test_dtype_float32_option_wins_on_a_bf16_cpu(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, bf16_sae_dir: Path
) -> None:
    _bf16(monkeypatch, True)
    loaded = load_model(str(model_dir), dtype="float32")
    assert loaded.compute_dtype.reason == "--dtype float32"
    assert {s.sae.W_enc.dtype for s in load_saes_for(loaded, str(bf16_sae_dir))} == {torch.float32}
    assert encoder_matmul_dtype("auto", loaded) is None  # the trainer's products: float32 too


def test_with_bf16_the_fast_path_is_kept(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, bf16_sae_dir: Path, pack_dir: Path, tmp_path: Path
) -> None:
    _bf16(monkeypatch, True)
    (loaded, saes, crisp_run), recorder = _pipeline(model_dir, bf16_sae_dir, pack_dir, tmp_path / "runs", "auto")
    assert loaded.dtype == torch.bfloat16
    assert {s.sae.W_enc.dtype for s in saes} == {torch.bfloat16}
    assert recorder.sae_dtypes() == {torch.bfloat16}
    assert json.loads((crisp_run / "config.json").read_text())["compute_dtype"]["dtype"] == "bfloat16"
    assert encoder_matmul_dtype("auto", loaded) == torch.bfloat16


def test_trainer_encoder_matmul_auto_is_float32_without_bf16(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    assert SAETrainingConfig(layers=[1]).encoder_matmul_dtype == "auto"
    _bf16(monkeypatch, False)
    loaded = load_model(str(model_dir), dtype="auto")
    assert encoder_matmul_dtype("auto", loaded) is None
    assert encoder_matmul_dtype("bfloat16", loaded) == torch.bfloat16  # asked for explicitly
    with pytest.raises(UserError, match="unknown encoder matmul dtype"):
        SAETrainingConfig(layers=[1], encoder_matmul_dtype="int8")
