"""--device-map on the CPU: a tiny model split between CPU memory and disk offload (accelerate's big-model
loading) gives the unsharded model's logits, feature statistics, SAE edits and CRISP adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_unlearn.errors import UserError
from sae_unlearn.features.statistics import compute_stats
from sae_unlearn.models.loading import Placement, load_model, main_device, parse_max_memory
from sae_unlearn.saes.loading import load_saes_from_spec
from tests.conftest import FORGET, RETAIN, tiny_sae


def _bytes(path: Path) -> int:
    return sum(p.numel() * 4 for p in load_model(str(path), dtype="float32").model.parameters())


def _sharded(tiny_llama_dir: Path, tmp_path: Path, device_map: object = "auto") -> object:
    """Half the weights in 'CPU memory', the rest offloaded to disk (loaded block by block per forward)."""
    budget = {"cpu": _bytes(tiny_llama_dir) // 2}
    placement = Placement(device_map, budget, str(tmp_path / "offload"))  # type: ignore[arg-type]
    return load_model(str(tiny_llama_dir), dtype="float32", device="cpu", placement=placement)


def test_offloaded_model_gives_the_same_logits_statistics_and_edits(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from sae_unlearn.methods.interventions import Intervention, LayerEdit, install

    whole = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    split = _sharded(tiny_llama_dir, tmp_path)
    places = set(split.model.hf_device_map.values())
    assert split.sharded and not whole.sharded and {"cpu", "disk"} <= places
    assert split.model.hf_device_map["model.layers.3"] == "disk" and split.device == torch.device("cpu")
    ids = whole.tokenizer(FORGET[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(split.model(**ids).logits, whole.model(**ids).logits)

    for layer in (1, 3):
        tiny_sae(layer, seed=layer).save_model(str(tmp_path / "saes" / f"blocks.{layer}.hook_resid_post"))
    saes = load_saes_from_spec(str(tmp_path / "saes"))
    args = (saes, FORGET[:5], RETAIN[:5])
    a = compute_stats(whole, *args, batch_size=2, max_length=32, use_cache=False)
    b = compute_stats(split, *args, batch_size=2, max_length=32, use_cache=False)
    for layer in (1, 3):
        for name, value in a[layer].tensors().items():
            torch.testing.assert_close(b[layer].tensors()[name], value, msg=name)

    # greedy generation (the body called directly, the lm_head on the last token) as on the whole model
    from sae_unlearn.models.generation import generate

    prompts = ["The wizard Zorbo", "The farmer Anna"]
    assert generate(split.model, split.tokenizer, prompts, 6) == generate(whole.model, whole.tokenizer, prompts, 6)

    # an SAE edit on an offloaded block (layer 3 lives on disk)
    edit = Intervention("ablate", "m", "tiny", [LayerEdit(3, list(range(64)), "scale", scale=-2.0)])
    with torch.no_grad():
        with install(whole.model, saes, edit):
            edited = whole.model(**ids).logits
        with install(split.model, saes, edit):
            torch.testing.assert_close(split.model(**ids).logits, edited)
        assert not torch.allclose(edited, whole.model(**ids).logits)


def test_crisp_on_a_sharded_model_trains_the_same_adapter(tiny_llama_dir: Path, tmp_path: Path, pack_dir: Path) -> None:
    from safetensors.torch import load_file

    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.features import find_features, make_strategy
    from sae_unlearn.methods import unlearn

    tiny_sae(1, seed=1).save_model(str(tmp_path / "saes" / "blocks.1.hook_resid_post"))
    pack = load_pack(pack_dir)
    # blocks 0-1 (where LoRA trains) in memory; blocks 2-3, the norm and the lm_head offloaded to disk:
    # the coherence and KL terms back-propagate through them
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu"}
    device_map |= {"model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "disk"}
    device_map |= {"model.rotary_emb": "cpu", "lm_head": "disk"}
    options = {"steps": 2, "batch_size": 2, "max_length": 32, "fluency_every": 0, "checkpoint_every": 0}
    options |= {"lr": 1e-2, "lora_dropout": 0.0, "lora_layers": [0, 1], "retain_kl_positions": 8}
    adapters = []
    for name, loaded in (
        ("whole", load_model(str(tiny_llama_dir), dtype="float32", device="cpu")),
        ("split", _sharded(tiny_llama_dir, tmp_path, device_map)),
    ):
        if name == "split":
            layer3 = loaded.model.model.layers[3]
            assert all(p.device.type == "meta" for p in layer3.parameters())  # really offloaded
        saes = load_saes_from_spec(str(tmp_path / "saes"))
        selection = find_features(
            loaded, saes, pack, make_strategy("crisp", k=4, min_ratio=0.0), batch_size=2, with_examples=False
        )
        run = unlearn("crisp", loaded, pack, tmp_path / name, options=options, saes=saes, features=selection)
        adapters.append(load_file(str(run / "adapter" / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_lora_on_an_offloaded_block_is_refused(tiny_llama_dir: Path, tmp_path: Path, pack_dir: Path) -> None:
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.methods import unlearn

    split = _sharded(tiny_llama_dir, tmp_path)
    options = {"steps": 1, "batch_size": 2, "max_length": 32, "fluency_every": 0, "lora_layers": [3]}
    with pytest.raises(UserError, match="offloaded"):
        unlearn("npo", split, load_pack(pack_dir), tmp_path / "run", options=options)


def test_parse_max_memory_and_main_device() -> None:
    assert parse_max_memory("0=20GiB, cuda:1=10GiB,cpu=60GiB") == {0: "20GiB", 1: "10GiB", "cpu": "60GiB"}
    assert parse_max_memory(None) is None
    with pytest.raises(UserError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")
    with pytest.raises(UserError, match="unknown device"):
        parse_max_memory("gpu0=1GiB")

    class Mapped(torch.nn.Module):
        def __init__(self, device_map: dict[str, object]) -> None:
            super().__init__()
            self.hf_device_map = device_map

    assert main_device(Mapped({"embed": 0, "layers.0": 1})) == torch.device("cuda", 0)
    assert main_device(Mapped({"embed": "cpu", "layers.0": 1, "lm_head": "disk"})) == torch.device("cuda", 1)
    assert main_device(Mapped({"embed": "cpu", "layers.0": "disk"})) == torch.device("cpu")
    assert main_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
