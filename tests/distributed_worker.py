"""One rank of the data-parallel equivalence test (tests/test_distributed.py), or the single process it is
compared with: `python -m tests.distributed_worker OUT`, with WORLD_SIZE/RANK/MASTER_* set for a rank.

Builds the tiny model, SAEs and pack of tests/conftest.py, computes feature statistics and trains CRISP
(both objectives, the KL term on), NPO and RMU for a few steps on a global batch of 4, trains TopK SAEs on
two layers, and (on the main rank) writes what the ranks must agree on into OUT/result.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def run(out: Path) -> None:
    torch.set_num_threads(1)
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.distributed import world
    from sae_unlearn.features import find_features, make_strategy
    from sae_unlearn.features.statistics import compute_stats
    from sae_unlearn.methods import unlearn
    from sae_unlearn.models.loading import LoadedModel
    from sae_unlearn.saes.loading import load_saes_from_spec
    from tests.conftest import FORGET, RETAIN, make_tokenizer, tiny_model, tiny_sae, write_pack

    tokenizer = make_tokenizer()
    model = tiny_model("llama", len(tokenizer), n_layers=3)
    model.requires_grad_(False)
    loaded = LoadedModel(model, tokenizer, "tiny-llama", "tiny-llama", 0.0)
    ranks = world()
    work = out / f"rank{ranks.rank}"
    for layer in (1, 2):
        tiny_sae(layer, seed=layer).save_model(str(work / "saes" / f"blocks.{layer}.hook_resid_post"))
    saes = load_saes_from_spec(str(work / "saes"))
    pack = load_pack(write_pack(work / "pack"))

    result: dict[str, torch.Tensor] = {}
    stats = compute_stats(loaded, saes, FORGET[:7], RETAIN[:9], batch_size=2, max_length=32, use_cache=False)
    for layer_stats in stats.values():
        result.update({f"stats.{k}": v for k, v in layer_stats.tensors().items()})
        result[f"stats.L{layer_stats.layer}.tokens"] = torch.tensor(
            [layer_stats.forget_tokens, layer_stats.retain_tokens]
        )
    selection = find_features(
        loaded, saes, pack, make_strategy("crisp", k=4, min_ratio=0.0), batch_size=4, with_examples=False
    )
    common = {"batch_size": 4, "max_length": 32, "fluency_every": 0, "checkpoint_every": 0, "lr": 1e-2}
    runs = {
        "crisp": ("crisp", {**common, "steps": 3, "lora_dropout": 0.0, "retain_kl_positions": 8}),
        "published": ("crisp", {**common, "steps": 2, "lora_dropout": 0.0, "objective": "published"}),
        "npo": ("npo", {**common, "steps": 2, "lora_layers": [0, 1, 2]}),
    }
    for name, (method, options) in runs.items():
        run = unlearn(method, loaded, pack, work / name, options=options, saes=saes, features=selection)
        if ranks.is_main:
            adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
            result.update({f"{name}.{k}": v for k, v in adapter.items()})
    rmu = {"steps": 2, "batch_size": 4, "max_length": 32, "layer": 2, "lr": 1e-2}
    run = unlearn("rmu", loaded, pack, work / "rmu", options=rmu)
    if ranks.is_main:
        result.update({f"rmu.{k}": v for k, v in load_file(str(run / "rmu_weights.safetensors")).items()})

    from sae_unlearn.saes.training import SAETrainer, SAETrainingConfig

    # model batches of 3 sequences (uneven shares), dead latents early so the aux-k term trains too
    cfg = SAETrainingConfig(
        layers=[1, 2],
        expansion=2,
        k=4,
        model_batch=3,
        context_size=16,
        sae_batch_tokens=32,
        buffer_tokens=64,
        norm_estimate_tokens=64,
        dead_after_tokens=40,
        checkpoint_every=0,
    )
    trainer = SAETrainer(loaded, cfg, (RETAIN + FORGET) * 2, work / "sae", "tiny")
    trainer.train()
    result["sae.steps"] = torch.tensor([trainer.state.step, trainer.state.tokens_trained])
    for layer, sae in trainer.saes.items():
        result.update({f"sae.L{layer}.{k}": v.detach().clone() for k, v in sae.state_dict().items()})
        result[f"sae.L{layer}.since_fired"] = trainer.since_fired[layer]
    if ranks.is_main:
        save_file({k: v.contiguous() for k, v in result.items()}, str(out / "result.safetensors"))
    ranks.barrier()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
