"""Compare a method's settings on the TUNE probe split (the demo and the README report on the other half).

    python scripts/tune_method.py --method crisp --set steps=40 \
        --try "" --try "ablation_scale=-12" --try "features.max_retain_rate=0.02 retain_weight=3"
    python scripts/tune_method.py --method clamp --try "value=-5" --try "value=-10 threshold=1"

Each --try is a space-separated list of method options KEY=VALUE and selection-strategy options
features.KEY=VALUE, applied over the --set ones; "" is the defaults. Prints one row per setting plus
the base model, with the quality goals' quantities: per-ring log-prob accuracy, retain and generic
perplexity, and the base model's perplexity of forget-prompt generations (fluency).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from sae_unlearn.concepts.pack import RINGS, load_pack
from sae_unlearn.evaluation.evaluate import EvalConfig, evaluate
from sae_unlearn.features import find_features, make_strategy
from sae_unlearn.methods import METHODS, unlearn
from sae_unlearn.models import load_model
from sae_unlearn.options import parse_options
from sae_unlearn.saes import load_saes_for


def row(name: str, r: dict[str, Any], seconds: float) -> str:
    rings = r["probes"]["rings"]
    acc = " ".join(f"{rings[ring]['logprob']['acc']:.3f}" for ring in RINGS)
    ret = r["retention"]
    flu = r["fluency"]["concept_prompts"]
    react = (r.get("reactivation") or {}).get("fraction", float("nan"))
    return (
        f"{name:60s} {acc}  {ret['retain_heldout_ppl']:7.2f} {ret['generic_ppl']:7.2f} "
        f"{ret['forget_heldout_ppl']:8.1f} {flu['base_model_ppl']:6.2f} {flu['repeated_3gram_share']:6.2f} "
        f"{react:6.2f} {seconds:5.0f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sae", default="shipped")
    parser.add_argument("--concept", default="harry-potter")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--method", default="crisp")
    parser.add_argument("--set", dest="common", default="", help="method options shared by every --try")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per paragraph for statistics")
    parser.add_argument("--skip-base", action="store_true", help="do not evaluate the base model")
    parser.add_argument("--try", dest="tries", action="append", default=[], help="options of one setting")
    args = parser.parse_args()
    loaded = load_model(args.model)
    pack = load_pack(args.concept)
    needs_saes = METHODS[args.method].needs_saes  # rmu and npo: no SAEs, no feature selection
    saes = load_saes_for(loaded, args.sae) if needs_saes else []
    cfg = EvalConfig(probe_split="tune", letter=False, adversarial=False, relearn=False, max_ppl_texts=16)
    rings = " ".join(f"{r:5s}" for r in RINGS)
    header = f"{'setting':60s} {rings}  retain  generic  forget  fluency repeat react  time"
    print(header)
    if not args.skip_base:
        start = time.perf_counter()
        print(row("base", evaluate(loaded, pack, None, cfg=cfg), time.perf_counter() - start), flush=True)
    for spec in args.tries or [""]:
        opts = parse_options(spec.split()) if spec else {}
        feat_opts = {k.split(".", 1)[1]: v for k, v in opts.items() if k.startswith("features.")}
        common = parse_options(args.common.split()) if args.common else {}
        method_opts = common | {k: v for k, v in opts.items() if not k.startswith("features.")}
        start = time.perf_counter()
        selection = None
        if needs_saes:
            strategy = make_strategy("crisp", k=args.k, **feat_opts)
            selection = find_features(
                loaded, saes, pack, strategy, k=args.k, max_length=args.max_length, with_examples=False
            )
        with tempfile.TemporaryDirectory() as tmp:
            run = unlearn(
                args.method, loaded, pack, Path(tmp) / "run", options=method_opts, saes=saes, features=selection
            )
            result = evaluate(loaded, pack, run, cfg=cfg)
            summary = json.loads((run / "config.json").read_text()).get("result", {})
        print(row(spec or "defaults", result, time.perf_counter() - start), flush=True)
        if summary.get("final"):  # rmu: the last step's loss terms and activation shifts
            print("  final training terms: " + json.dumps(summary["final"]), flush=True)
        if summary.get("stopped_early"):
            print(f"  stopped early: kept the adapter of step {summary['last_fluent_step']}", flush=True)


if __name__ == "__main__":
    main()
