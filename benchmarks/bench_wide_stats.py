"""Feature statistics on wide non-TopK SAEs: time and memory from 16k to 131k latents, chunked
(`features.statistics.encode_valid_tokens`, LATENT_CHUNK latents at a time) vs one dense encode.

    python benchmarks/bench_wide_stats.py [--model embedded] [--layer 6] [--widths 16384,32768,65536,131072]
        [--batch 8] [--seq 128] [--batches 4] [--device cpu|cuda]

Random JumpReLU SAEs (GemmaScope's architecture) of each width read one layer of the model. Per width
it prints seconds per batch and the peak memory of the encode step: measured on CUDA
(torch.cuda.max_memory_allocated), else the size of the largest latent tensor each path materialises
(tokens x latents x 4 bytes). Timings on a shared machine are not comparable across runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_unlearn.features.statistics import LATENT_CHUNK, accumulate_latents, encode_valid_tokens, iter_batches
from sae_unlearn.models import load_model
from sae_unlearn.saes.loading import LoadedSAE

TEXTS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog near the river bank." * 4 for i in range(64)]


def random_jumprelu(d_in: int, d_sae: int, layer: int, device: str) -> LoadedSAE:
    from sae_lens.saes import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device=device))
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.normal_(0, d_sae**-0.5)
        sae.threshold.fill_(0.5)
    return LoadedSAE(sae.requires_grad_(False), layer, f"random-{d_sae}")


def run(loaded, sae: LoadedSAE, batches: list, chunk: int) -> tuple[float, float]:
    acc = {f"forget_{k}": torch.zeros(sae.d_sae) for k in ("count", "sum", "max")} | {"forget_tokens": 0}
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches:
        accumulate_latents(acc, "forget", encode_valid_tokens(loaded, [sae], batch, chunk_latents=chunk)[sae.layer])
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / len(batches)
    tokens = max(int(b["attention_mask"].sum()) for b in batches)
    peak = torch.cuda.max_memory_allocated() if cuda else tokens * min(chunk, sae.d_sae) * 4
    return seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--widths", default="16384,32768,65536,131072")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    loaded = load_model(args.model, dtype="float32", device=args.device)
    batches = list(iter_batches(TEXTS, loaded.tokenizer, args.batch, args.seq))[: args.batches]
    print(f"model {loaded.spec}, layer {args.layer}, {args.batches} batches of {args.batch} x <= {args.seq} tokens")
    print(f"{'latents':>8} {'chunked s/batch':>16} {'chunked MiB':>12} {'dense s/batch':>14} {'dense MiB':>10}")
    for width in (int(w) for w in args.widths.split(",")):
        sae = random_jumprelu(loaded.d_model, width, args.layer, str(loaded.device))
        chunked = run(loaded, sae, batches, LATENT_CHUNK)
        dense = run(loaded, sae, batches, width)
        print(f"{width:>8} {chunked[0]:>16.3f} {chunked[1]:>12.1f} {dense[0]:>14.3f} {dense[1]:>10.1f}")
        del sae
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
