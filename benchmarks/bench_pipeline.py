"""Speed ratios of sae-unlearn's hot paths, each measured against its baseline in this one run
(the two timed back to back, round after round; the median ratio is printed).

    python benchmarks/bench_pipeline.py [--model embedded] [--sae shipped] [--batch 8] [--seq 128]

Prints, with the targets from the issues:
- capture of N SAE layers vs a bare forward truncated at the deepest of them (>= 0.9x) and vs a
  naive full forward with output_hidden_states=True (>= 2.5x);
- feature statistics (all SAE layers encoded, one pass) vs the bare truncated forward (>= 0.85x), and
  vs the original method's approach (full forward with all hidden states, one SAE layer at a time);
- SAE training step for all layers at once vs the forward pass alone, per token (<= 1.5x cost), and the
  grouped top-k it uses vs torch.topk;
- CRISP training step vs a plain LoRA language-modelling step on the same tokens (<= 2.0x cost);
- greedy generation with a clamp intervention installed vs the bare model (>= 0.85x tokens/s);
- feature statistics vs the bare truncated forward in float32 and in bfloat16 (model and SAEs both in
  that dtype, as a run with --dtype gets them), and bfloat16 statistics' time over float32's: on a CPU
  without bfloat16 in hardware the bfloat16 row shows why `auto` computes in float32 there (issue 12;
  `ONEDNN_MAX_CPU_ISA=AVX2` makes a CPU that has the instructions emulate bfloat16 like one without).

    python benchmarks/bench_pipeline.py --rows dtype     # only the dtype rows
    python benchmarks/bench_pipeline.py --device cuda --json OUT/bench.json   # on a GPU (scripts/gpu_check.sh)

On a GPU (`--device cuda`, compute dtype `auto`: bfloat16 where supported) the trainer's step uses plain
dense ops; the row "SAE step, CSR backward vs dense ops" says whether the CPU's sparse backward would pay
there. Timings synchronise the GPU before reading the clock.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_unlearn.features.statistics import accumulate_latents, encode_valid_tokens
from sae_unlearn.models import load_model
from sae_unlearn.models.hooks import capture_resid_post, decoder_blocks
from sae_unlearn.saes import load_saes_for


def sync() -> None:
    """Wait for queued GPU work, so the clock reads finished work (nothing on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Fastest of `repeats` runs after a warm-up: the least disturbed by whatever else the machine does."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def paired(fn: Callable[[], Any], baseline: Callable[[], Any], repeats: int = 5) -> tuple[float, float, float]:
    """(fn seconds, baseline seconds, median ratio fn / baseline), the two timed back to back each round.

    This machine's speed drifts by 10-30% between minutes; a ratio of neighbouring runs cancels that
    where two separately taken minima do not. The seconds are the fastest of each side's rounds.
    """
    fn()
    baseline()
    pairs = []
    for _ in range(repeats):
        pairs.append((seconds(fn), seconds(baseline)))
    ratios = sorted(a / b for a, b in pairs)
    return min(a for a, _ in pairs), min(b for _, b in pairs), ratios[len(ratios) // 2]


def seconds(fn: Callable[[], Any]) -> float:
    """One run, no warm-up: for runs long enough that one more would only cost time."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bare_truncated(model: Any, ids: torch.Tensor, deepest: int) -> None:
    """A bare forward through blocks 0..deepest with no hooks of ours (the baseline)."""
    blocks = decoder_blocks(model)
    saved = list(blocks)
    del blocks[deepest + 1 :]
    try:
        model.get_decoder()(input_ids=ids, use_cache=False)
    finally:
        blocks.extend(saved[deepest + 1 :])


def in_vocab(ids: torch.Tensor, loaded: Any) -> torch.Tensor:
    """Random token ids folded into a small test model's vocabulary (real models: unchanged)."""
    return ids % int(loaded.model.config.get_text_config().vocab_size)


def statistics_pass(loaded: Any, saes: list[Any], ids: torch.Tensor) -> Callable[[], None]:
    """One batch of what compute_stats does: encode the valid tokens at every SAE layer and accumulate."""
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    acc: dict[int, dict[str, Any]] = {
        s.layer: {f"forget_{kind}": torch.zeros(s.d_sae, device=loaded.device) for kind in ("count", "sum", "max")}
        for s in saes
    }

    def stats_pass() -> None:
        for layer, latents in encode_valid_tokens(loaded, saes, batch).items():
            acc[layer]["forget_tokens"] = 0
            accumulate_latents(acc[layer], "forget", latents)

    return stats_pass


def statistics_vs_bare(loaded: Any, saes: list[Any], ids: torch.Tensor, repeats: int = 5) -> tuple[float, float, float]:
    """(statistics seconds, bare truncated forward seconds, median ratio) for one batch, in the model's dtype."""
    deepest = max(s.layer for s in saes)
    with torch.no_grad():
        return paired(statistics_pass(loaded, saes, ids), lambda: bare_truncated(loaded.model, ids, deepest), repeats)


def dtype_rows(
    model: str, sae: str, ids: torch.Tensor, repeats: int, device: str = "cpu"
) -> list[tuple[str, float, str]]:
    """Statistics vs bare forward with model and SAEs in float32, then in bfloat16 (each loaded as a run with
    --dtype would be), and the bfloat16 statistics' time over float32's."""
    from sae_unlearn.models.loading import cpu_supports_bf16

    rows, stats_seconds = [], {}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(model, dtype=dtype, device=device)
        saes = load_saes_for(loaded, sae)
        t_stats, t_bare, ratio = statistics_vs_bare(loaded, saes, in_vocab(ids, loaded).to(loaded.device), repeats)
        stats_seconds[dtype] = t_stats
        print(
            f"{dtype}: statistics {ids.numel() / t_stats:.0f} tok/s, bare truncated forward {ids.numel() / t_bare:.0f}"
        )
        rows.append((f"feature statistics vs bare truncated forward, {dtype}", 1 / ratio, ">= 0.85"))
    bf16 = "with" if cpu_supports_bf16() else "WITHOUT"  # in hardware: instructions present and used
    where = "GPU" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "CPU"
    rows.append(
        (
            f"bfloat16 statistics time / float32's ({where}" + (")" if where == "GPU" else f" {bf16} hw bf16)"),
            stats_seconds["bfloat16"] / stats_seconds["float32"],
            "info",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sae", default="shipped")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rows", choices=["all", "dtype"], default="all", help="dtype: only the dtype rows")
    parser.add_argument("--repeats", type=int, default=5, help="paired rounds per ratio")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (compute dtype: auto for the device)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and figures to this file")
    args = parser.parse_args()
    if args.rows == "dtype":
        torch.manual_seed(0)
        ids = torch.randint(1000, 20000, (args.batch, args.seq))
        rows = dtype_rows(args.model, args.sae, ids, args.repeats, args.device)
        print(f"model {args.model}, {ids.numel()} tokens per batch, {torch.get_num_threads()} threads")
        for name, ratio, target in rows:
            print(f"{name:62s} {ratio:8.2f}  {target}")
        write_json(args, rows, {})
        return
    loaded = load_model(args.model, device=args.device)
    saes = load_saes_for(loaded, args.sae)
    layers = [s.layer for s in saes]
    deepest = max(layers)
    torch.manual_seed(0)
    ids = in_vocab(torch.randint(1000, 20000, (args.batch, args.seq)), loaded).to(loaded.device)
    n_tok = ids.numel()
    rows: list[tuple[str, float, str]] = []

    with torch.no_grad():

        def bare() -> None:
            bare_truncated(loaded.model, ids, deepest)

        def capture() -> None:
            with torch.no_grad():
                capture_resid_post(loaded.model, ids, None, layers)

        t_capture, t_bare, r_capture = paired(capture, bare)
        _, _, r_naive = paired(capture, lambda: loaded.model(input_ids=ids, output_hidden_states=True), 3)

        stats_pass = statistics_pass(loaded, saes, ids)

        def original_stats() -> None:  # full forward with all hidden states, one SAE layer at a time
            for s in saes:
                hs = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
                (s.sae.encode(hs[s.layer + 1].to(s.sae.W_enc.dtype)) > 0).sum((0, 1))

        t_stats, _, r_stats = paired(stats_pass, bare)
        _, _, r_orig = paired(stats_pass, original_stats, 2)
    rows += [
        ("capture vs bare truncated forward", 1 / r_capture, ">= 0.9"),
        ("capture vs output_hidden_states full forward", 1 / r_naive, ">= 2.5"),
        ("feature statistics vs bare truncated forward", 1 / r_stats, ">= 0.85"),
        ("feature statistics speed-up over the original approach", 1 / r_orig, "> 1"),
    ]

    # SAE training step (all layers) vs forward alone; 10% dead latents so the aux-k loss is on
    from sae_lens.saes.sae import TrainStepInput

    from sae_unlearn.saes.training import (
        SAETrainer,
        SAETrainingConfig,
        new_optimizer,
        new_sae,
        topk_training_losses,
        trainable_parameters,
    )

    cfg = SAETrainingConfig(layers=layers, expansion=saes[0].d_sae // loaded.d_model, k=int(saes[0].sae.cfg.k))
    device = str(loaded.device)
    train_saes = {layer: new_sae(cfg, loaded.d_model, layer, "bench", device) for layer in layers}
    params = {layer: trainable_parameters(s) for layer, s in train_saes.items()}
    opts = {layer: new_optimizer(p, 1e-4) for layer, p in params.items()}
    lens_saes = {layer: new_sae(cfg, loaded.d_model, layer, "bench", device) for layer in layers}  # plain W_enc
    lens_opts = {layer: new_optimizer(dict(s.named_parameters()), 1e-4) for layer, s in lens_saes.items()}
    dead = (torch.rand(saes[0].d_sae, generator=torch.Generator().manual_seed(0)) < 0.1).to(loaded.device)

    def sae_step(ours: bool, sparse_backward: bool | None = None) -> None:
        with torch.no_grad():
            acts = capture_resid_post(loaded.model, ids, None, layers)
        for layer in layers:
            x = acts[layer].flatten(0, 1).float()
            if ours:
                sae, opt = train_saes[layer], opts[layer]
                mse, aux, _, _ = topk_training_losses(
                    sae, x, dead, torch.bfloat16, params[layer]["W_enc_rows"], sparse_backward
                )
                loss = mse + aux
            else:
                sae, opt = lens_saes[layer], lens_opts[layer]
                loss = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

    t_sae, _, r_sae = paired(lambda: sae_step(True), capture, 9)
    _, _, r_sae_lens = paired(lambda: sae_step(True), lambda: sae_step(False), 2)
    rows.append(("SAE training (all layers) cost vs forward alone", r_sae, "<= 1.5"))
    rows.append(("SAE training speed-up over SAELens training_forward_pass", 1 / r_sae_lens, "> 1"))
    try:  # the CPU's sparse backward vs the plain dense ops, on this device (< 1: sparse is faster)
        _, _, r_csr = paired(lambda: sae_step(True, True), lambda: sae_step(True, False), 3)
        rows.append(("SAE step, CSR backward vs dense ops (time ratio)", r_csr, "info"))
    except (RuntimeError, NotImplementedError) as e:
        print(f"CSR backward on {device}: {type(e).__name__}: {str(e).splitlines()[0]}")

    # the grouped top-k of the trainer and the statistics vs torch.topk, on real encoder pre-activations
    from sae_unlearn.saes.loading import pre_activations
    from sae_unlearn.saes.topk import topk_last_dim

    with torch.no_grad():
        pre = pre_activations(saes[0].sae, capture_resid_post(loaded.model, ids, None, layers)[layers[0]].flatten(0, 1))
    k = int(saes[0].sae.cfg.k)

    def repeat(fn: Callable[[], Any]) -> Callable[[], None]:
        def ten() -> None:
            for _ in range(10):
                fn()

        return ten

    _, _, r_topk = paired(repeat(lambda: topk_last_dim(pre, k)), repeat(lambda: pre.topk(k, dim=-1, sorted=False)), 9)
    rows.append(("grouped top-k time vs torch.topk (encoder pre-activations)", r_topk, "< 1"))

    # the whole training loop (forward passes, outlier filter, normalisation, shuffle buffer, SAE steps
    # for all layers) vs its own forward passes, timed inside one 3-epoch run: the two interleave batch
    # by batch, so a drift in machine speed hits both alike. No dead latents this early: aux-k is off.
    from sae_unlearn.concepts.corpus import read_corpus
    from sae_unlearn.evaluation.evaluate import GENERIC_TEXT

    e2e_cfg = SAETrainingConfig(
        layers=layers,
        expansion=cfg.expansion,
        k=cfg.k,
        model_batch=args.batch,
        context_size=args.seq,
        buffer_tokens=8192,
        norm_estimate_tokens=n_tok,
        checkpoint_every=0,
        epochs=3.0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SAETrainer(loaded, e2e_cfg, read_corpus(GENERIC_TEXT), Path(tmp), "bench")
        trainer.train()
    rows.append(
        (
            "train-sae loop vs its own forward passes (3 epochs)",
            trainer.loop_seconds / trainer.forward_seconds,
            "<= 1.5",
        )
    )

    # generation with a clamp intervention vs bare
    from sae_unlearn.methods.interventions import Intervention, LayerEdit, install
    from sae_unlearn.models.generation import generate

    prompts = ["The history of the city of", "Harry Potter is a"] * 4
    t_gen = timed(lambda: generate(loaded.model, loaded.tokenizer, prompts, 16), repeats=1)
    edits = [LayerEdit(s.layer, list(range(10)), "clamp", value=-50.0) for s in saes]
    with install(loaded.model, saes, Intervention("clamp", loaded.spec, args.sae, edits)):
        t_gen_clamp = timed(lambda: generate(loaded.model, loaded.tokenizer, prompts, 16), repeats=1)
    rows.append(("generation tokens/s with clamp vs bare", t_gen / t_gen_clamp, ">= 0.85"))

    # CRISP training step vs a plain LoRA language-modelling step on the same token batches
    # (last: get_peft_model wraps the model in place)
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.methods.adapter_training import AdapterTrainer, epoch_batch
    from sae_unlearn.methods.base import MethodContext
    from sae_unlearn.methods.crisp import CrispConfig, CrispLoss, default_lora_layers
    from sae_unlearn.models.batch import tokenize

    crisp_cfg = CrispConfig()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = MethodContext(loaded, load_pack("harry-potter"), Path(tmp), saes=saes)
        trainer = AdapterTrainer(
            ctx, default_lora_layers(layers), crisp_cfg.target_modules, 4, 8, 0.05, 1e-4, 0, amsgrad=True
        )
        loss_fn = CrispLoss(ctx, crisp_cfg, {s.layer: s for s in saes}, {s.layer: torch.arange(10) for s in saes})
        size, seed = crisp_cfg.batch_size, crisp_cfg.seed  # CRISP's first forget and retain batches
        texts = [epoch_batch(loss_fn.forget, size, seed, 0, 1), epoch_batch(loss_fn.retain, size, seed, 0, 2)]
        texts.append(loss_fn.coherence[:1])
        batches = [tokenize(loaded.tokenizer, t, crisp_cfg.max_length, loaded.device) for t in texts]

        def train_step(lm: bool) -> None:
            if lm:
                losses = [
                    trainer.model(
                        input_ids=b.input_ids,
                        attention_mask=b.attention_mask,
                        labels=b.input_ids.masked_fill(~b.valid, -100),
                    ).loss
                    for b in batches
                ]
                total = torch.stack(losses).sum()
            else:
                total, _ = loss_fn(trainer.model, 0)
            trainer.opt.zero_grad()
            total.backward()
            trainer.opt.step()

        def first_epoch_crisp_step() -> None:  # the frozen reference computed, as in the first epoch
            for reference in (loss_fn.frozen_forget, loss_fn.frozen_retain, loss_fn.frozen_coherence):
                reference.clear()
            train_step(False)

        t_lm = timed(lambda: train_step(True), repeats=2)
        t_crisp = timed(first_epoch_crisp_step, repeats=2)
        t_crisp_cached = timed(lambda: train_step(False), repeats=2)  # later epochs: frozen states reused
    n_train = sum(int(b.valid.sum()) for b in batches)
    rows.append(("CRISP step cost vs plain LoRA LM step, same tokens", t_crisp / t_lm, "<= 2.0"))
    rows.append(("CRISP step, frozen states reused, vs first-epoch step", t_crisp_cached / t_crisp, "< 1"))

    print(f"model {args.model}, SAE layers {layers}, {n_tok} tokens per batch, {torch.get_num_threads()} threads")
    print(f"{'measure':58s} {'ratio':>8s}  target")
    for name, ratio, target in rows:
        print(f"{name:58s} {ratio:8.2f}  {target}")
    absolute = {
        "bare_truncated_forward_tok_s": n_tok / t_bare,
        "capture_tok_s": n_tok / t_capture,
        "statistics_tok_s": n_tok / t_stats,
        "sae_training_tok_s": n_tok / t_sae,
        "crisp_step_s": t_crisp,
        "crisp_step_cached_s": t_crisp_cached,
        "lora_lm_step_s": t_lm,
        "crisp_tokens": n_train,
    }
    print(
        f"absolute: bare truncated forward {n_tok / t_bare:.0f} tok/s, capture {n_tok / t_capture:.0f} tok/s, "
        f"statistics {n_tok / t_stats:.0f} tok/s, SAE training {n_tok / t_sae:.0f} tok/s; CRISP step "
        f"{t_crisp:.2f} s ({t_crisp_cached:.2f} s reusing frozen states) vs LoRA LM step {t_lm:.2f} s "
        f"on {n_train} tokens"
    )
    dtype = dtype_rows(args.model, args.sae, ids.cpu(), 5, args.device)
    for name, ratio, target in dtype:
        print(f"{name:58s} {ratio:8.2f}  {target}")
    write_json(args, rows + dtype, absolute)


def write_json(args: argparse.Namespace, rows: list[tuple[str, float, str]], absolute: dict[str, float]) -> None:
    if args.json is None:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    record = {
        "model": args.model,
        "device": device,
        "tokens_per_batch": args.batch * args.seq,
        "threads": torch.get_num_threads(),
        "rows": [{"measure": name, "ratio": ratio, "target": target} for name, ratio, target in rows],
        "absolute": absolute,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
