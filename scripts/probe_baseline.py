"""Accuracy of a model on a concept pack's probes by log-probability, per ring, before any unlearning.

python scripts/probe_baseline.py --model embedded --concept harry-potter [--show-wrong]
"""

from __future__ import annotations

import argparse

import numpy as np

from sae_unlearn.concepts.pack import RINGS, load_pack
from sae_unlearn.evaluation.scoring import accuracy, answer_wins, option_logprobs
from sae_unlearn.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--concept", default="harry-potter")
    parser.add_argument("--show-wrong", action="store_true")
    args = parser.parse_args()
    loaded = load_model(args.model)
    pack = load_pack(args.concept)
    scores = option_logprobs(loaded.model, loaded.tokenizer, pack.probes)
    right = answer_wins(scores)
    for ring in RINGS:
        idx = [i for i, p in enumerate(pack.probes) if p.ring == ring]
        acc = accuracy(right[idx])
        print(f"{ring:7s} n={acc.n:4d} accuracy {acc.acc:.3f}  95% CI [{acc.ci[0]:.3f}, {acc.ci[1]:.3f}]")
    if args.show_wrong:
        for probe, ok, s in zip(pack.probes, right, scores, strict=True):
            if not ok:
                chosen = probe.options[int(np.argmax(s))]
                print(f"  wrong {probe.id}: {probe.prompt} -> {chosen!r} (answer {probe.answer!r})")


if __name__ == "__main__":
    main()
