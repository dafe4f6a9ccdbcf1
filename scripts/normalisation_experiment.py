"""Compare SAE input normalisations on one layer at a fixed budget: raw-space and per-dimension-scaled
held-out FVE. Activations are captured once and cached in memory, then one TopK SAE per setting trains
on them with the trainer's own loss (`topk_training_losses`) and learning-rate shape.

    python scripts/normalisation_experiment.py --layer 12 --tokens 150000 --passes 3
"""

from __future__ import annotations

import argparse
import logging

import torch

from sae_unlearn.concepts.corpus import read_corpus
from sae_unlearn.models.loading import load_model
from sae_unlearn.saes.training import (
    NORMALIZATION_EXPONENTS,
    SAETrainingConfig,
    batch_sequences,
    layer_activations,
    learning_rate,
    new_optimizer,
    new_sae,
    normalization_scale,
    pack_sequences,
    topk_training_losses,
    trainable_parameters,
)

log = logging.getLogger("normalisation_experiment")


def capture(loaded, texts: list[str], layer: int, n_tokens: int, seed: int) -> torch.Tensor:
    chunks, n = [], 0
    for ids in batch_sequences(pack_sequences(texts, loaded.tokenizer, 128, seed), 16):
        chunks.append(layer_activations(loaded, ids, [layer])[layer])
        n += chunks[-1].shape[0]
        if n >= n_tokens:
            break
    return torch.cat(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--corpus", default="data/generic/train.txt")
    parser.add_argument("--heldout", default="data/generic/heldout.txt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    loaded = load_model("embedded")
    cfg = SAETrainingConfig(layers=[args.layer])
    train = capture(loaded, read_corpus(args.corpus), args.layer, args.tokens, 5)
    held = capture(loaded, read_corpus(args.heldout), args.layer, 9000, 1234)
    limit = cfg.outlier_factor * train.norm(dim=-1).median()
    train, held = train[train.norm(dim=-1) <= limit], held[held.norm(dim=-1) <= limit]
    mean = train.mean(0)
    bs = cfg.sae_batch_tokens
    total = args.passes * (train.shape[0] // bs)
    for name in NORMALIZATION_EXPONENTS:
        scale = normalization_scale(train, mean, name)
        x_train = (train - mean) / scale
        sae = new_sae(cfg, train.shape[1], args.layer, "embedded")
        params = trainable_parameters(sae)
        opt = new_optimizer(params, cfg.lr)
        since_fired, step = torch.zeros(sae.cfg.d_sae), 0
        for _ in range(args.passes):
            perm = torch.randperm(x_train.shape[0])
            for b in range(x_train.shape[0] // bs):
                for group in opt.param_groups:
                    group["lr"] = learning_rate(step, total, cfg)
                batch, dead = x_train[perm[b * bs : (b + 1) * bs]], since_fired > cfg.dead_after_tokens
                mse, aux, _, fired = topk_training_losses(sae, batch, dead, torch.bfloat16, params["W_enc_rows"])
                opt.zero_grad()
                (mse + aux).backward()
                opt.step()
                step += 1
                since_fired += bs
                since_fired[fired] = 0
        with torch.no_grad():
            recon = topk_training_losses(sae, (held - mean) / scale, None)[2] * scale + mean
            err, centred, var = (recon - held) ** 2, (held - held.mean(0)) ** 2, held.var(0)
            raw = 1 - float(err.sum() / centred.sum())
            scaled = 1 - float((err / var).sum() / (centred / var).sum())
        log.info("%-13s raw FVE %.3f  scaled FVE %.3f  (%d steps)", name, raw, scaled, step)


if __name__ == "__main__":
    main()
