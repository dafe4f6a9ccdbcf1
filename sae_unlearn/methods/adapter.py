"""Methods whose artifact is a PEFT LoRA adapter (RUN_DIR/adapter; CRISP, NPO): installed by wrapping
the model in PEFT (unloaded on exit), merged into a copy for export and into a throwaway model for attacks.
A run's SAE-native weight edit (RUN_DIR/weight_edit.safetensors, methods/robust.py) comes after the
adapter: as output hooks when installed, in the weights when merged."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae_unlearn.errors import UserError
from sae_unlearn.methods.base import Method
from sae_unlearn.methods.robust import load_weight_edit, project_weights, projected_outputs
from sae_unlearn.models.loading import LoadedModel


def load_adapter(model: Any, run_dir: Path) -> Any:
    """`model` wrapped in PEFT with the run's adapter (LoRA layers injected into `model` in place)."""
    from peft import PeftModel

    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"{adapter} is missing", "the run did not finish: resume it with --resume")
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except Exception as e:
        raise UserError(
            f"cannot apply the adapter in {adapter}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            "it was made for another base model",
        ) from e


class AdapterMethod(Method):
    persistent = True

    @classmethod
    @contextlib.contextmanager
    def install(cls, loaded: LoadedModel, run_dir: Path) -> Iterator[Any]:
        peft_model = load_adapter(loaded.model, run_dir)
        peft_model.eval()
        try:
            with projected_outputs(peft_model, load_weight_edit(run_dir) or {}):
                yield peft_model
        finally:
            peft_model.unload()  # removes the LoRA layers: loaded.model is the base model again, unchanged

    @classmethod
    @contextlib.contextmanager
    def install_merged(cls, loaded: LoadedModel, run_dir: Path) -> Iterator[Any]:
        merged = load_adapter(loaded.model, run_dir).merge_and_unload()
        project_weights(merged, load_weight_edit(run_dir) or {})
        yield merged

    @classmethod
    def export(cls, loaded: LoadedModel, run_dir: Path, out: Path) -> None:
        own = copy.deepcopy(loaded.model)  # merging writes the LoRA deltas into the weights in place
        merged = load_adapter(own, run_dir).merge_and_unload()
        project_weights(merged, load_weight_edit(run_dir) or {})
        merged.save_pretrained(str(out))
