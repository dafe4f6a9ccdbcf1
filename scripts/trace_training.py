"""Print a method's training log (every --every steps) for a few settings, without evaluating them: the
quick check that a loss falls and that activations move (RMU logs forget/retain shifts, NPO the
per-token forget log-ratio).

    PYTHONPATH=. python scripts/trace_training.py --method rmu --try "steps=20 alpha=10" --try "steps=20 alpha=100"
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.errors import UserError
from sae_unlearn.methods import METHODS, unlearn
from sae_unlearn.models import load_model
from sae_unlearn.options import parse_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--concept", default="harry-potter")
    parser.add_argument("--method", default="rmu")
    parser.add_argument("--every", type=int, default=5, help="print every this many steps")
    parser.add_argument("--try", dest="tries", action="append", default=[], help="KEY=VALUE options of one setting")
    args = parser.parse_args()
    if METHODS.get(args.method) is None or METHODS[args.method].needs_saes:
        raise UserError(f"--method {args.method} is not a method without SAEs", "use rmu or npo")
    loaded = load_model(args.model)
    pack = load_pack(args.concept)
    for spec in args.tries or [""]:
        options = parse_options(spec.split()) if spec else {}
        with tempfile.TemporaryDirectory() as tmp:
            run = unlearn(args.method, loaded, pack, Path(tmp) / "run", options=options)
            rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            summary = json.loads((run / "config.json").read_text())["result"]
        print(spec or "defaults", json.dumps({k: v for k, v in summary.items() if k != "final"}), flush=True)
        for row in rows:
            if row["step"] == 1 or row["step"] % args.every == 0 or row is rows[-1]:
                print("  " + " ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
