"""Peak memory at Llama-3.1-8B's shapes: feature statistics over 4 SAE layers of 131k latents, and one
CRISP step, on a randomly initialised model (nothing is downloaded).

    python benchmarks/bench_memory_8b.py --device cuda [--json OUT/memory_8b.json]   # full shape, on a GPU
    python benchmarks/bench_memory_8b.py --scaling 16,8                              # CPU: scaled down

Full shape: hidden 4096, 32 blocks, 32 heads (8 KV), MLP 14336, vocabulary 128256; TopK SAEs (k 64) of
32 x hidden = 131072 latents at blocks 8, 16, 24, 31; statistics on batches of 8 x 256 tokens, CRISP at
its defaults (4 + 4 paragraphs of 128 tokens, one coherence text, KL on 64 positions, LoRA r 4 on blocks
7..31). `--width-divisor W` divides hidden, MLP and heads by W (head size 128 kept, SAE width 32 x hidden,
blocks and vocabulary unchanged). On a GPU the figures are torch's peak allocated bytes per phase; on a
CPU the process's peak anonymous resident memory per phase (sampled), both above the memory held before
the model was built. `--scaling` runs one
process per divisor, splits each peak into the weights (model + SAEs, known exactly) and the rest, fits
the rest as a + b x hidden over the divisors and prints the full shape's prediction in bfloat16 (weights
in 2 bytes, the rest halved): a prediction, to be replaced by the GPU figures when one is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

FULL = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "mlp": 14336, "vocab": 128256}
SAE_LAYERS = [8, 16, 24, 31]
MB = 1 << 20


class Peak:
    """Peak memory of a phase: CUDA's max allocated bytes, or on a CPU the process's anonymous resident
    memory (RssAnon, sampled every millisecond by a thread; torch's kernels release the GIL). Not VmHWM:
    it counts the pages of libtorch's code a phase touches for the first time (hundreds of MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.highest = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type != "cuda":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.highest = max(self.highest, _rss_anon())

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.highest = _rss_anon()

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return max(self.highest, _rss_anon())

    def now(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated())
        return _rss_anon()


def _rss_anon() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssAnon:")[1].split()[0]) * 1024


def shapes(divisor: int) -> dict[str, int]:
    hidden = FULL["hidden"] // divisor
    heads = max(1, FULL["heads"] // divisor)
    return {
        "hidden": hidden,
        "layers": FULL["layers"],
        "heads": heads,
        "kv_heads": max(1, min(heads, FULL["kv_heads"] * heads // FULL["heads"])),
        "mlp": FULL["mlp"] // divisor,
        "vocab": FULL["vocab"],
        "d_sae": 32 * hidden,
    }


def build_model(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Any:
    """Llama at `shape`, randomly initialised directly on `device` (no float32 copy on the host first)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def build_tokenizer(texts: list[str]) -> Any:
    """A byte-level BPE trained on the texts (4k entries): real text, token ids inside any vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


def build_saes(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> list[Any]:
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_unlearn.saes.loading import LoadedSAE

    saes = []
    for layer in SAE_LAYERS:
        cfg = TopKSAEConfig(d_in=shape["hidden"], d_sae=shape["d_sae"], k=64, dtype="float32", device=str(device))
        cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        sae = TopKSAE(cfg).to(dtype).requires_grad_(False)
        saes.append(LoadedSAE(sae, layer, f"random-{layer}"))
    return saes


def measure(divisor: int, device_name: str, dtype_name: str) -> dict[str, Any]:
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.features.statistics import compute_stats
    from sae_unlearn.methods.adapter_training import AdapterTrainer
    from sae_unlearn.methods.base import MethodContext
    from sae_unlearn.methods.crisp import CrispConfig, CrispLoss, default_lora_layers
    from sae_unlearn.models.loading import ComputeDtype, LoadedModel, resolve_device, resolve_dtype

    os.environ["SAE_UNLEARN_CACHE"] = tempfile.mkdtemp(prefix="bench-memory-")  # the statistics' cache file
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    shape = shapes(divisor)
    peak = Peak(device)
    pack = load_pack("harry-potter")
    tokenizer = build_tokenizer(pack.forget_split("train") + pack.retain_split("train"))
    start = peak.now()
    model = build_model(shape, dtype, device)
    saes = build_saes(shape, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    sae_params = sum(p.numel() for s in saes for p in s.sae.parameters())
    loaded = LoadedModel(model, tokenizer, "random-llama-3.1-8b", f"random-llama-8b/{divisor}", 0.0)
    loaded.compute = ComputeDtype(dtype, "benchmark")
    resident = peak.now() - start
    out: dict[str, Any] = {
        "divisor": divisor,
        "shape": shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "model_params": n_params,
        "sae_params": sae_params,
        "weights_bytes": (n_params + sae_params) * dtype.itemsize,
        "resident_bytes": resident,
    }

    # feature statistics: 2 batches of 8 x 256 tokens per corpus, the 4 SAE layers from one pass
    forget, retain = pack.forget_split("train")[:16], pack.retain_split("train")[:16]
    peak.reset()
    began = time.perf_counter()
    compute_stats(loaded, saes, forget, retain, batch_size=8, max_length=256, use_cache=False)
    out["statistics_peak_bytes"] = peak.read() - start
    out["statistics_seconds"] = time.perf_counter() - began

    # one CRISP step at its defaults (frozen reference computed: the first epoch's step)
    cfg = CrispConfig()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = MethodContext(loaded, pack, Path(tmp), saes=saes)
        trainer = AdapterTrainer(
            ctx, default_lora_layers(SAE_LAYERS), cfg.target_modules, cfg.lora_r, 8, cfg.lora_dropout, cfg.lr, 0
        )
        features = {s.layer: torch.arange(10) * 97 for s in saes}
        loss_fn = CrispLoss(ctx, cfg, {s.layer: s for s in saes}, features)
        peak.reset()
        began = time.perf_counter()
        trainer.model.train()
        total, _ = loss_fn(trainer.model, 0)
        trainer.opt.zero_grad(set_to_none=True)
        total.backward()
        trainer.opt.step()
        out["crisp_step_peak_bytes"] = peak.read() - start
        out["crisp_step_seconds"] = time.perf_counter() - began
        trainer.model.unload()
    return out


def scaling(divisors: list[int], device: str, dtype: str) -> dict[str, Any]:
    """One process per divisor (clean peaks), then the fit and the full-shape prediction."""
    runs = []
    for divisor in divisors:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--width-divisor", str(divisor), "--device", device, "--dtype", dtype]
            subprocess.run([*cmd, "--json", f.name], check=True)
            runs.append(json.loads(Path(f.name).read_text()))
    prediction: dict[str, Any] = {}
    full = shapes(1)
    full_params = sum(p for p in _param_counts(full))
    full_weights_bf16 = (full_params + len(SAE_LAYERS) * _sae_params(full)) * 2
    for phase in ("statistics", "crisp_step"):
        rest = [(r["shape"]["hidden"], r[f"{phase}_peak_bytes"] - r["weights_bytes"]) for r in runs]
        (h0, r0), (h1, r1) = rest[0], rest[-1]
        b = (r1 - r0) / (h1 - h0) if h1 != h0 else 0.0
        a = r0 - b * h0
        rest_full = a + b * full["hidden"]
        bytes_per = 4 if runs[0]["dtype"] == "float32" else 2
        prediction[phase] = {
            "rest_fit_bytes": {"a": a, "b_per_hidden": b},
            "predicted_bf16_bytes": full_weights_bf16 + rest_full * 2 / bytes_per,
        }
    return {"runs": runs, "full_weights_bf16_bytes": full_weights_bf16, "prediction": prediction}


def _param_counts(shape: dict[str, int]) -> list[int]:
    h, m, v = shape["hidden"], shape["mlp"], shape["vocab"]
    kv = shape["kv_heads"] * (h // shape["heads"])
    block = h * h * 2 + h * kv * 2 + 3 * h * m + 2 * h
    return [v * h * 2, shape["layers"] * block, h]


def _sae_params(shape: dict[str, int]) -> int:
    return 2 * shape["hidden"] * shape["d_sae"] + shape["d_sae"] + shape["hidden"]


def _print_run(r: dict[str, Any]) -> None:
    s = r["shape"]
    print(
        f"1/{r['divisor']:<3d} hidden {s['hidden']:5d} SAE {s['d_sae']:6d} latents, {r['dtype']}, {r['device']}: "
        f"model {r['model_params'] / 1e6:7.0f}M + SAEs {r['sae_params'] / 1e6:5.0f}M params "
        f"= {r['weights_bytes'] / MB:7.0f} MiB; peak statistics {r['statistics_peak_bytes'] / MB:7.0f} MiB "
        f"({r['statistics_seconds']:.1f} s), CRISP step {r['crisp_step_peak_bytes'] / MB:7.0f} MiB "
        f"({r['crisp_step_seconds']:.1f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU that has it, float32 on most CPUs")
    parser.add_argument("--width-divisor", type=int, default=None, help="one run at hidden 4096 / W (default 1)")
    parser.add_argument("--scaling", default=None, help="comma-separated divisors: runs, fit, full-shape prediction")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.scaling:
        result = scaling([int(d) for d in args.scaling.split(",")], args.device, args.dtype)
        for r in result["runs"]:
            _print_run(r)
        print(f"full shape, bfloat16: weights {result['full_weights_bf16_bytes'] / MB / 1024:.1f} GiB (model + 4 SAEs)")
        for phase, p in result["prediction"].items():
            print(f"  predicted peak, {phase}: {p['predicted_bf16_bytes'] / MB / 1024:.1f} GiB")
    else:
        result = measure(args.width_divisor or 1, args.device, args.dtype)
        _print_run(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
