"""The method registry owns the life cycle: apply / export go to the registered method's install / export,
and none of them rebinds or changes the caller's model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_unlearn.errors import UserError
from sae_unlearn.methods import METHODS, apply, apply_merged, export_merged
from sae_unlearn.methods.base import Method
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.runs import RUN_VERSION


def _run_dir(root: Path, method: str, loaded: LoadedModel) -> Path:
    root.mkdir(parents=True)
    config = {"run_version": RUN_VERSION, "method": method, "model": loaded.spec, "model_source": loaded.source}
    (root / "config.json").write_text(json.dumps(config))
    return root


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_new_method_needs_only_its_own_module(loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Marker(Method):
        name = "marker"
        needs_saes = False

        @classmethod
        @contextlib.contextmanager
        def install(cls, loaded: LoadedModel, run_dir: Path) -> Iterator[Any]:
            calls.append(run_dir)
            yield "installed"

    monkeypatch.setitem(METHODS, "marker", Marker)
    run = _run_dir(tmp_path / "run", "marker", loaded)
    with apply(loaded, run) as model:
        assert model == "installed"
    with apply_merged(loaded, run) as model:
        assert model == "installed"
    assert calls == [run, run]
    with pytest.raises(UserError, match="marker is an inference-time intervention"):
        export_merged(loaded, run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_adapter_install_and_export_leave_the_callers_model_alone(loaded, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    run = _run_dir(tmp_path / "run", "crisp", loaded)
    base, before = loaded.model, _weights(loaded.model)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(loaded.model, config)
    peft_model.save_pretrained(str(run / "adapter"))
    peft_model.unload()
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
        with apply(loaded, run) as model:
            adapted = model(input_ids=ids).logits
    assert loaded.model is base and not torch.equal(adapted, reference)
    assert all(torch.equal(before[k], v) for k, v in _weights(base).items())

    merged_dir = export_merged(loaded, run, tmp_path / "merged")
    assert loaded.model is base and all(torch.equal(before[k], v) for k, v in _weights(base).items())
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert json.loads((merged_dir / "sae_unlearn_run.json").read_text())["method"] == "crisp"
