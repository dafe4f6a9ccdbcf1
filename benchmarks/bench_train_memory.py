"""Peak memory of `train-sae` for two corpus sizes: it should stay flat (activations stream through a
fixed-size shuffle buffer; nothing scales with the corpus but the token list of one paragraph at a time).

    python benchmarks/bench_train_memory.py [--model embedded-small] [--paragraphs 300]

Each run is a separate process; peak RSS comes from the operating system (ru_maxrss of the child).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from sae_unlearn.concepts.pack import load_pack

WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of `cmd`, measured by a fresh wrapper process so runs do not share a high-water mark."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-small")
    parser.add_argument("--paragraphs", type=int, default=300, help="size of the small corpus (the large is 4x)")
    args = parser.parse_args()
    pack = load_pack("harry-potter")
    texts = pack.retain + pack.forget
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 4):
            n = args.paragraphs * factor
            corpus = Path(tmp) / f"corpus{factor}.txt"
            corpus.write_text("\n\n".join(texts[i % len(texts)] + f" ({i})" for i in range(n)))
            cmd = [
                sys.executable,
                "-m",
                "sae_unlearn.cli",
                "train-sae",
                "--model",
                args.model,
                "--layers",
                "4,8",
                "--corpus",
                str(corpus),
                "--out",
                str(Path(tmp) / f"out{factor}"),
                "--expansion",
                "2",
                "--k",
                "16",
                "--epochs",
                "1",
                "--checkpoint-every",
                "0",
            ]
            results.append((n, peak_rss_mb(cmd)))
    (n1, m1), (n2, m2) = results
    print(
        f"train-sae peak RSS: {n1} paragraphs {m1:.0f} MB, {n2} paragraphs {m2:.0f} MB, ratio {m2 / m1:.2f} "
        f"(flat means ~1.0 for a {n2 // n1}x corpus)"
    )


if __name__ == "__main__":
    main()
