"""The `sae-unlearn` command line. Thin: every command calls the public API."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from sae_unlearn.cli.app import DeviceOpt, DtypeOpt, ModelOpt, RevisionOpt, SaeOpt, app
from sae_unlearn.cli.common import Reporter, check_device, friendly_errors, parse_layers, setup_logging, stdout, table
from sae_unlearn.errors import UserError

# each command group registers its commands on import, in this order in --help
for _group in ("attack", "chat", "features", "unlearn", "evaluate", "experiment", "export", "concept"):
    importlib.import_module(f"sae_unlearn.cli.{_group}")

__all__ = ["app"]


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    device_map: Annotated[
        str | None,
        typer.Option(
            help="load the model across the visible GPUs (and CPU/disk offload) with accelerate's big-model "
            "loading: auto, balanced, balanced_low_0 or sequential (docs/gpu.md)"
        ),
    ] = None,
    max_memory: Annotated[
        str | None, typer.Option(help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB")
    ] = None,
    offload_folder: Annotated[
        Path | None, typer.Option(help="with --device-map: where disk-offloaded weights go (default: the cache)")
    ] = None,
    processes: Annotated[
        int,
        typer.Option(
            help="run data-parallel in N processes (one per GPU; gloo on CPUs) through accelerate launch: "
            "feature statistics, CRISP/NPO/RMU and SAE training split each global batch"
        ),
    ] = 1,
) -> None:
    from sae_unlearn.distributed import launched, world
    from sae_unlearn.models.loading import Placement, parse_max_memory, set_placement

    setup_logging(verbose, quiet=launched() and not world().is_main)
    if launched() and world().is_main:
        logging.getLogger("sae_unlearn").info("data-parallel: %d processes", world().size)
    elif launched():  # the other ranks: the main rank prints the tables and paths
        stdout.quiet = True
    if processes > 1 and not launched():
        raise typer.Exit(relaunch(processes))
    if max_memory is not None and device_map is None:
        raise UserError("--max-memory applies with --device-map", "add --device-map auto")
    set_placement(Placement(device_map, parse_max_memory(max_memory), str(offload_folder) if offload_folder else None))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relaunch(processes: int) -> int:
    """Run this command line again under `accelerate launch` in `processes` processes (one per GPU when
    there are enough, else gloo on the CPU); its exit status."""
    import os
    import subprocess
    import sys

    import torch

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            args.append(arg)
    # --multi_gpu is accelerate's torchrun-style launcher (one process per rank, RANK/WORLD_SIZE set); its
    # --cpu runs a single process. With --device cpu, or fewer GPUs than processes, ACCELERATE_USE_CPU makes
    # the ranks gloo.
    env = dict(os.environ)
    on_cpu = any(
        a == "--device=cpu" or (a == "--device" and b == "cpu") for a, b in zip(args, [*args[1:], ""], strict=True)
    )
    if on_cpu or torch.cuda.device_count() < processes:
        env["ACCELERATE_USE_CPU"] = "true"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", env.get("MASTER_PORT") or str(_free_port())]  # two runs side by side
    return subprocess.call([*launch, "-m", "sae_unlearn.cli", *args], env=env)


@app.command()
@friendly_errors
def doctor(
    model: ModelOpt = "embedded",
    revision: RevisionOpt = None,
    sae: SaeOpt = "shipped",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Load the model, run one forward pass, load its SAEs and print what was found."""
    import torch

    from sae_unlearn.models import load_model
    from sae_unlearn.models.hooks import capture_resid_post
    from sae_unlearn.saes import load_saes_for

    loaded = load_model(model, dtype=dtype, device=device, revision=revision)
    start = time.perf_counter()
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids.to(loaded.device)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    next_token = loaded.tokenizer.decode(logits[0, -1].argmax())
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    saes = load_saes_for(loaded, sae) if sae != "none" else []
    if saes:
        acts = capture_resid_post(loaded.model, ids, None, [s.layer for s in saes])
        for s in saes:
            s.sae.encode(acts[s.layer].to(s.sae.W_enc.dtype))
    sae_s = time.perf_counter() - start
    n_params = sum(p.numel() for p in loaded.model.parameters())
    stdout.print(
        table(
            "sae-unlearn doctor",
            ["item", "value"],
            [
                [
                    "model",
                    f"{loaded.spec} ({type(loaded.model).__name__}, {n_params / 1e6:.0f}M params)",
                ],
                ["layers / hidden", f"{loaded.n_layers} / {loaded.d_model}"],
                ["dtype / device", f"{str(loaded.dtype).removeprefix('torch.')} / {loaded.device}"],
                ["load seconds", f"{loaded.seconds:.1f}"],
                ["forward seconds", f"{forward_s:.2f} ('The capital of France is' -> {next_token!r})"],
                ["SAEs", ", ".join(f"L{s.layer}: {s.sae.cfg.architecture()} width {s.d_sae}" for s in saes) or "none"],
                ["SAE load+encode seconds", f"{sae_s:.2f}"],
            ],
        )
    )


@app.command("train-sae")
@friendly_errors
def train_sae(
    corpus: Annotated[
        list[str], typer.Option("--corpus", help="text files (.txt/.jsonl/.csv/.parquet) or dataset dirs")
    ],
    out: Annotated[Path, typer.Option("--out", help="directory for the SAEs (SAELens format, one subdir per layer)")],
    model: ModelOpt = "embedded",
    revision: RevisionOpt = None,
    layers: Annotated[str, typer.Option(help="comma-separated block indices, e.g. 3,6,9,12")] = "3,6,9,12",
    heldout: Annotated[list[str] | None, typer.Option(help="held-out text for the quality table")] = None,
    expansion: Annotated[int, typer.Option(help="SAE width as a multiple of the hidden size")] = 8,
    k: Annotated[int, typer.Option(help="active latents per token (TopK)")] = 64,
    epochs: Annotated[float, typer.Option(help="passes over the corpus")] = 1.0,
    lr: Annotated[float, typer.Option(help="peak learning rate (cosine decay to 10%)")] = 2e-3,
    batch: Annotated[int, typer.Option(help="sequences per model forward")] = 16,
    context_size: Annotated[int, typer.Option(help="tokens per sequence, BOS included")] = 128,
    sae_batch_tokens: Annotated[int, typer.Option(help="tokens per SAE optimiser step")] = 1024,
    normalize: Annotated[
        str,
        typer.Option(
            help="input scale per dimension, folded into the saved weights: "
            "sqrt_per_dim (x / sqrt(std)), per_dim (x / std) or none"
        ),
    ] = "sqrt_per_dim",
    outlier_factor: Annotated[
        float, typer.Option(help="skip tokens whose norm exceeds this multiple of the median")
    ] = 4.0,
    checkpoint_every: Annotated[int, typer.Option(help="optimiser steps between checkpoints")] = 200,
    encoder_matmul_dtype: Annotated[
        str,
        typer.Option(
            help="dtype of the encoder's ranking product and the dead latents' products: auto (bfloat16 where "
            "the device runs it in hardware and --dtype is bfloat16), bfloat16 or float32"
        ),
    ] = "auto",
    sparse_kernel: Annotated[
        bool,
        typer.Option(
            "--sparse-kernel/--reference-step",
            help="the sparse TopK kernel, or SAELens' dense training step it reproduces (same losses and gradients)",
        ),
    ] = True,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="continue from the checkpoint in --out")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace SAEs already in --out")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Train TopK SAEs on several layers at once (streaming; one model pass per batch)."""
    from sae_unlearn.concepts.corpus import read_corpus
    from sae_unlearn.models import load_model
    from sae_unlearn.saes import SAETrainingConfig, train_saes

    layer_list = parse_layers(layers)
    check_device(device)
    if out.exists() and any(out.glob("blocks.*")) and not (resume or overwrite):
        raise UserError(
            f"{out} already holds trained SAEs", "pass --resume to continue, --overwrite to replace, or another --out"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file", "choose a directory for --out")
    texts = [doc for spec in corpus for doc in read_corpus(spec)]
    held = [doc for spec in heldout for doc in read_corpus(spec)] if heldout else None
    cfg = SAETrainingConfig(
        layers=layer_list,
        expansion=expansion,
        k=k,
        epochs=epochs,
        lr=lr,
        model_batch=batch,
        context_size=context_size,
        sae_batch_tokens=sae_batch_tokens,
        normalize=normalize,
        outlier_factor=outlier_factor,
        checkpoint_every=checkpoint_every,
        encoder_matmul_dtype=encoder_matmul_dtype,
        sparse_kernel=sparse_kernel,
        seed=seed,
    )
    with Reporter("train-sae", ["load model", "train SAEs"]) as reporter:
        reporter.stage("load model")
        loaded = load_model(model, dtype=dtype, device=device, revision=revision)
        reporter.stage("train SAEs")

        def progress(done: int, total: int, metrics: dict[str, float]) -> None:
            fves = [v for key, v in metrics.items() if key.endswith(".fve")]
            reporter.update(done, total, info=f"fve {min(fves):.3f}..{max(fves):.3f}" if fves else "")

        quality = train_saes(loaded, cfg, texts, out, heldout=held, resume=resume, progress=progress)
    stdout.print(
        table(
            f"SAE quality ({quality[0].tokens} held-out tokens)",
            ["layer", "width", "FVE", "FVE scaled", "FVE all tok", "L0", "dead", "CE clean", "CE +SAE", "ΔCE"],
            [
                [
                    q.layer,
                    q.d_sae,
                    q.fve,
                    q.fve_scaled,
                    q.fve_all_tokens,
                    q.l0,
                    q.dead_fraction,
                    q.ce_clean,
                    q.ce_spliced,
                    q.ce_increase,
                ]
                for q in quality
            ],
        )
    )
    stdout.print(f"SAEs written to {out} (load with sae_lens.SAE.load_from_disk or --sae {out})")
