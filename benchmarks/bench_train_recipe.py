"""The shipped SAEs' training recipe, run for part of an epoch: the training loop's cost against its own
forward passes (target <= 1.5x), with dead latents and their aux-k loss entering as in the real run.

    python scripts/build_generic_corpus.py --out data/generic       # once
    python benchmarks/bench_train_recipe.py [--epochs 0.25] [--corpus data/generic/train.txt]

A latent counts as dead once it has not fired for `dead_after_tokens` (250k) tokens, so runs shorter
than that never pay for aux-k; 0.25 of an epoch of the 1.66M-token corpus is ~415k tokens. The trainer
times its forward passes and its whole loop itself, interleaved batch by batch, so a drift in machine
speed hits both alike.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sae_unlearn.concepts.corpus import read_corpus
from sae_unlearn.models import load_model
from sae_unlearn.saes.loading import SHIPPED
from sae_unlearn.saes.training import SAETrainer, SAETrainingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--corpus", default="data/generic/train.txt")
    parser.add_argument("--epochs", type=float, default=0.25)
    args = parser.parse_args()

    recipe = json.loads((SHIPPED["embedded"] / "training_config.json").read_text())
    cfg = SAETrainingConfig(**{**recipe, "epochs": args.epochs, "checkpoint_every": 0})
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SAETrainer(loaded, cfg, read_corpus(args.corpus), Path(tmp), args.model)
        trainer.train()
    dead = [round(float((t > cfg.dead_after_tokens).float().mean()), 3) for t in trainer.since_fired.values()]
    print(f"recipe of the shipped SAEs, layers {cfg.layers}, {args.epochs} epoch of {args.corpus}")
    print(f"{trainer.state.step} steps, {trainer.state.tokens_trained} tokens; dead latents at the end {dead}")
    print(f"loop {trainer.loop_seconds:.0f} s, of which forward passes {trainer.forward_seconds:.0f} s")
    print(f"train-sae loop vs its own forward passes: {trainer.loop_seconds / trainer.forward_seconds:.2f}  (<= 1.5)")


if __name__ == "__main__":
    main()
