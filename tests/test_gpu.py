"""The GPU path (marked `gpu`: skipped without CUDA; scripts/gpu_check.sh runs them on a lent GPU).

Tiny models built here, so nothing is downloaded: device resolution and bf16, statistics on the GPU
against the CPU, the SAE trainer's dense-ops step against the CPU's CSR backward, exact CRISP resume
with LoRA dropout drawing from the CUDA generator, and --device-map across GPU memory and CPU offload.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_unlearn.features.statistics import compute_stats
from sae_unlearn.models.loading import LoadedModel, Placement, load_model
from sae_unlearn.saes.loading import load_saes_from_spec
from tests.conftest import FORGET, RETAIN, tiny_sae

pytestmark = pytest.mark.gpu


@pytest.fixture
def sae_dir(tmp_path: Path) -> Path:
    for layer in (1, 2):
        tiny_sae(layer, seed=layer).save_model(str(tmp_path / "saes" / f"blocks.{layer}.hook_resid_post"))
    return tmp_path / "saes"


def test_auto_device_is_cuda_with_bf16_where_supported(tiny_llama_dir: Path) -> None:
    loaded = load_model(str(tiny_llama_dir), dtype="auto", device="auto")
    assert loaded.device.type == "cuda"
    assert loaded.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    ids = loaded.tokenizer(FORGET[:2], return_tensors="pt", padding=True).to(loaded.device)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**ids).logits.float()).all()


def test_statistics_on_cuda_match_the_cpu(tiny_llama_dir: Path, sae_dir: Path) -> None:
    stats = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(str(tiny_llama_dir), dtype="float32", device=device)
        saes = load_saes_from_spec(str(sae_dir), device=device)
        stats[device] = compute_stats(loaded, saes, FORGET[:6], RETAIN[:6], batch_size=3, use_cache=False)
    for layer, cpu in stats["cpu"].items():
        gpu = stats["cuda"][layer].tensors()
        for name, value in cpu.tensors().items():
            if name.endswith("_count"):  # a latent at the firing threshold may flip under TF32
                assert (gpu[name] - value).abs().sum() <= 2, name
            else:
                torch.testing.assert_close(gpu[name], value, rtol=2e-3, atol=2e-3, msg=name)


def test_sae_step_on_cuda_uses_dense_ops_and_matches_the_cpu() -> None:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    from sae_unlearn.saes.training import topk_training_losses

    torch.manual_seed(0)
    grads = {}
    x, dead = torch.randn(256, 64) * 3, torch.rand(512) < 0.1
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        cfg = TopKTrainingSAEConfig(d_in=64, d_sae=512, k=8, apply_b_dec_to_input=True, device=device)
        sae = TopKTrainingSAE(cfg)
        mse, aux, _, _ = topk_training_losses(sae, x.to(device), dead.to(device))  # cuda: the dense codec
        (mse + aux).backward()
        grads[device] = {n: p.grad.cpu() for n, p in sae.named_parameters()}
    for name, grad in grads["cpu"].items():
        torch.testing.assert_close(grads["cuda"][name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_crisp_resume_is_exact_on_cuda(tiny_llama_dir: Path, sae_dir: Path, tmp_path: Path, pack_dir: Path) -> None:
    """LoRA dropout draws from the CUDA generator: the checkpoint must carry its state."""
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.features import find_features, make_strategy
    from sae_unlearn.methods import unlearn

    loaded = load_model(str(tiny_llama_dir), dtype="float32", device="cuda")
    saes = load_saes_from_spec(str(sae_dir), device="cuda")
    pack = load_pack(pack_dir)
    selection = find_features(
        loaded, saes, pack, make_strategy("crisp", k=4, min_ratio=0.0), batch_size=4, with_examples=False
    )
    options = {"steps": 4, "batch_size": 2, "max_length": 32, "fluency_every": 0, "checkpoint_every": 2}
    options |= {"lr": 1e-2, "lora_dropout": 0.3}
    kw = {"options": options, "saes": saes, "features": selection}
    full = unlearn("crisp", loaded, pack, tmp_path / "full", **kw)

    def interrupt(step: int, total: int, terms: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unlearn("crisp", loaded, pack, tmp_path / "part", progress=interrupt, **kw)
    torch.cuda.manual_seed_all(12345)  # whatever the generator holds now, resume restores the checkpoint's
    resumed = unlearn("crisp", loaded, pack, tmp_path / "part", resume=True, **kw)
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_device_map_across_gpu_and_cpu_offload(tiny_llama_dir: Path, sae_dir: Path, tmp_path: Path) -> None:
    whole = load_model(str(tiny_llama_dir), dtype="float32", device="cuda")
    size = sum(p.numel() * 4 for p in whole.model.parameters())
    placement = Placement("auto", {0: size // 2, "cpu": 4 * size}, str(tmp_path / "offload"))
    split = load_model(str(tiny_llama_dir), dtype="float32", device="cuda", placement=placement)
    places = set(split.model.hf_device_map.values())
    assert 0 in places and "cpu" in places and split.device == torch.device("cuda", 0)
    ids = whole.tokenizer(FORGET[:2], return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        torch.testing.assert_close(split.model(**ids).logits, whole.model(**ids).logits, rtol=1e-3, atol=1e-3)
    saes = load_saes_from_spec(str(sae_dir), device="cuda")
    a = compute_stats(whole, saes, FORGET[:4], RETAIN[:4], batch_size=2, use_cache=False)
    b = compute_stats(split, saes, FORGET[:4], RETAIN[:4], batch_size=2, use_cache=False)
    for layer in a:
        torch.testing.assert_close(b[layer].forget_sum, a[layer].forget_sum, rtol=2e-3, atol=2e-3)


def test_device_map_over_every_gpu(tiny_llama_dir: Path, sae_dir: Path, tmp_path: Path, pack_dir: Path) -> None:
    """Blocks spread over the GPUs (one GPU: all on it): CRISP trains LoRA on them."""
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.features import find_features, make_strategy
    from sae_unlearn.methods import unlearn

    n = torch.cuda.device_count()
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": n - 1, "lm_head": n - 1}
    device_map |= {f"model.layers.{i}": i * n // 4 for i in range(4)}
    loaded = load_model(str(tiny_llama_dir), dtype="float32", device="cuda", placement=Placement(device_map))
    assert isinstance(loaded, LoadedModel) and loaded.sharded
    saes = load_saes_from_spec(str(sae_dir), device=str(loaded.device))
    pack = load_pack(pack_dir)
    selection = find_features(
        loaded, saes, pack, make_strategy("crisp", k=4, min_ratio=0.0), batch_size=4, with_examples=False
    )
    options = {"steps": 2, "batch_size": 2, "max_length": 32, "fluency_every": 0, "checkpoint_every": 0}
    run = unlearn("crisp", loaded, pack, tmp_path / "run", options=options, saes=saes, features=selection)
    assert (run / "adapter" / "adapter_model.safetensors").exists()
