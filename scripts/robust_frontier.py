"""One row of the robustness frontier (docs/robustness.md), measured on the TUNE split only.

    python scripts/robust_frontier.py --out robust-out --base --eval-at 0,20,50   # base model + controls, once
    python scripts/robust_frontier.py --out robust-out --name default       # CRISP with its defaults
    python scripts/robust_frontier.py --out robust-out --name sam --set "sam_rho=0.05"
    python scripts/robust_frontier.py --out robust-out --table              # the markdown table of every row

A variant trains CRISP (features selected as in scripts/tune_method.py), evaluates it on the tune probes
and tune prompts (no letter scoring, no adversarial prompts), then runs two fact-disjoint relearning
attacks on the tune split's target probes that fall in the scored half: LoRA r16 lr 2e-4 and a full
fine-tune lr 2e-5, measured at steps 0/20 (--eval-at). The same attacks on the base model (the controls)
are run once by --base (--eval-at 0,20,50) and reused by every variant. Each call writes OUT/<name>.json;
the run directory is kept in OUT/runs/<name> so `sae-unlearn attack` can be pointed at it too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sae_unlearn.concepts.pack import RINGS, load_pack
from sae_unlearn.evaluation.evaluate import EvalConfig, evaluate
from sae_unlearn.evaluation.relearning import Attack, RelearnConfig, relearning_evaluation
from sae_unlearn.features import find_features, make_strategy
from sae_unlearn.methods import unlearn
from sae_unlearn.models import load_model
from sae_unlearn.options import parse_options
from sae_unlearn.saes import load_saes_for


def attacks(eval_at: list[int]) -> list[Attack]:
    return [Attack("lora_r16", "lora", 2e-4, eval_at), Attack("full_ft", "full", 2e-5, eval_at)]


def load_cache(path: Path, eval_at: list[int]) -> dict[Any, Any]:
    """The base model's cached curves; a longer curve also serves a shorter grid (its first points are
    the same run: seeded batches, no dropout, measured before the next step)."""
    if not path.exists():
        return {}
    cache = {tuple(json.loads(k)): v for k, v in json.loads(path.read_text()).items()}
    for key, curve in list(cache.items()):
        if key[0] == "base":
            continue
        spec = json.loads(key[0])
        if set(eval_at) < set(spec["eval_at"]):
            spec["eval_at"] = sorted(eval_at)
            short = (json.dumps(spec, sort_keys=True), *key[1:])
            cache.setdefault(short, [p for p in curve if p["step"] in eval_at])
    return cache


def save_cache(path: Path, cache: dict[Any, Any]) -> None:
    path.write_text(json.dumps({json.dumps(list(k)): v for k, v in cache.items()}))


def summary(result: dict[str, Any]) -> dict[str, Any]:
    rings = result["probes"]["rings"]
    flu = result["fluency"]["concept_prompts"]
    ret = result["retention"]
    return {
        "acc": {ring: rings[ring]["logprob"]["acc"] for ring in RINGS},
        "retain_ppl": ret["retain_heldout_ppl"],
        "generic_ppl": ret["generic_ppl"],
        "fluency_ppl": flu["base_model_ppl"],
        "repetition": flu["repeated_3gram_share"],
    }


def attack_summary(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"acc_base": record.get("acc_base"), "acc_unlearned": record.get("acc_unlearned")}
    out["gap"] = record.get("gap")
    out["scored"] = record.get("split", {}).get("scored")
    for name, a in (record.get("attacks") or {}).items():
        out[name] = {
            "curve": [(p["step"], p["target_acc"], p.get("recovery"), p.get("generic_ppl_ratio")) for p in a["curve"]],
            "control": [(p["step"], p["target_acc"]) for p in (a.get("control") or {}).get("curve", [])],
        }
    out["strongest_attack"] = record.get("strongest_attack")
    return out


def table(out: Path) -> None:
    """Markdown: one row per variant; attacks as scored-half accuracy at step 0 -> 20 (recovery)."""
    base = json.loads((out / "base.json").read_text())
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem not in ("base", "cache")]
    rows = [r for r in rows if "eval" in r and "attack" in r]
    rows.sort(key=lambda r: r.get("started", 0))
    print(
        "| variant | target | near | far | retain ppl | concept-prompt ppl / repeat | LoRA r16, scored half "
        "0 -> 20 (recovery) | full FT, scored half 0 -> 20 (recovery) | adapter kept (step of steps run) | "
        "seconds train / eval / attack |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    b = base["eval"]

    def control(name: str) -> str:
        curve = dict(base["controls"].get(name, []))
        return " -> ".join(f"{curve[s]:.2f}" for s in (0, 20, 50) if s in curve) + " (0/20/50 steps)"

    print(
        f"| base model (control) | {b['acc']['target']:.3f} | {b['acc']['near']:.3f} | {b['acc']['far']:.3f} | "
        f"{b['retain_ppl']:.2f} | {b['fluency_ppl']:.2f} / {b['repetition']:.2f} | {control('lora_r16')} | "
        f"{control('full_ft')} | — | — |"
    )

    def attack(a: dict[str, Any] | None) -> str:
        if not a:
            return "—"
        first, last = a["curve"][0], a["curve"][-1]
        rec = "n/a" if last[2] is None else f"{last[2]:.2f}"
        return f"{first[1]:.2f} -> {last[1]:.2f} ({rec})"

    def kept(train: dict[str, Any]) -> str:
        if not train.get("stopped_early"):
            return f"{train.get('steps_done', '?')} (all)"
        return f"{train.get('last_fluent_step')} of {train.get('steps_done')} (fluency stop)"

    for r in rows:
        e, a, sec = r["eval"], r["attack"], r["seconds"]
        print(
            f"| {r['name']} (`{r['options'] or 'defaults'}`) | {e['acc']['target']:.3f} | {e['acc']['near']:.3f} | "
            f"{e['acc']['far']:.3f} | {e['retain_ppl']:.2f} | {e['fluency_ppl']:.2f} / {e['repetition']:.2f} | "
            f"{attack(a.get('lora_r16'))} | {attack(a.get('full_ft'))} | {kept(r.get('train_summary', {}))} | "
            f"{sec['train']:.0f} / {sec['eval']:.0f} / {sec['attack']:.0f} |"
        )


def edit_on_copy(source: Path, run: Path, options: dict[str, Any], saes: Any, selection: Any, loaded: Any) -> None:
    """The run of `source` with the weight edit of `options` (weight_edit_blocks, weight_edit_modules) added."""
    import shutil

    import torch

    from sae_unlearn.methods import method_config, robust

    cfg = method_config("crisp", options)
    if cfg.weight_edit_blocks is None:
        raise SystemExit("--reuse adds a weight edit: pass --set weight_edit_blocks=...")
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(source, run)
    by_layer = selection.by_layer()
    by_sae = {s.layer: s.sae for s in saes}
    directions = {layer: by_sae[layer].W_dec[torch.tensor(v)].detach() for layer, v in by_layer.items()}
    blocks = cfg.weight_edit_blocks or sorted(by_layer)
    robust.save_weight_edit(run, robust.edit_bases(loaded.model, directions, blocks, cfg.weight_edit_modules))
    config = json.loads((run / "config.json").read_text())
    config["options"].update(options)
    (run / "config.json").write_text(json.dumps(config, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name")
    parser.add_argument("--set", dest="options", default="", help="CRISP options KEY=VALUE, space-separated")
    parser.add_argument("--base", action="store_true", help="evaluate the base model and run the attack controls")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--concept", default="harry-potter")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--eval-at", default="0,20", help="attack steps to measure at (--base: 0,20,50)")
    parser.add_argument("--reuse", help="copy this variant's run and add the weight edit of --set to it")
    args = parser.parse_args()
    if args.table:
        table(args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    pack = load_pack(args.concept)
    cfg = EvalConfig(probe_split="tune", letter=False, adversarial=False, relearn=False, max_ppl_texts=16)
    scored_from = [p for p in pack.probe_split("tune") if p.ring == "target"]
    eval_at = [int(s) for s in args.eval_at.split(",")]
    relearn_cfg = RelearnConfig(attacks=attacks(eval_at), base_control=True)
    cache_path = args.out / "cache.json"
    cache = load_cache(cache_path, eval_at)
    if args.base:
        start = time.perf_counter()
        result = summary(evaluate(loaded, pack, None, cfg=cfg))
        record = relearning_evaluation(loaded, None, pack, scored_from, relearn_cfg, cache)
        save_cache(cache_path, cache)
        controls = {n: [(p["step"], p["target_acc"]) for p in a["curve"]] for n, a in record["attacks"].items()}
        out = {"eval": result, "controls": controls, "acc_base": record["acc_base"], "split": record["split"]}
        out["seconds"] = time.perf_counter() - start
        (args.out / "base.json").write_text(json.dumps(out, indent=1))
        print(json.dumps(out, indent=1))
        return
    if not args.name:
        parser.error("--name is required for a variant")
    options = parse_options(args.options.split()) if args.options else {}
    saes = load_saes_for(loaded, "shipped")
    started = time.time()
    start = time.perf_counter()
    selection = find_features(
        loaded, saes, pack, make_strategy("crisp", k=args.k), k=args.k, max_length=128, with_examples=False
    )
    run = args.out / "runs" / args.name
    if args.reuse:  # the weight edit alone is post-hoc: add it to another variant's trained adapter
        edit_on_copy(args.out / "runs" / args.reuse, run, options, saes, selection, loaded)
    else:
        run = unlearn("crisp", loaded, pack, run, options=options, saes=saes, features=selection)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    result = summary(evaluate(loaded, pack, run, cfg=cfg))
    eval_s = time.perf_counter() - start
    start = time.perf_counter()
    record = relearning_evaluation(loaded, run, pack, scored_from, relearn_cfg, cache)
    attack_s = time.perf_counter() - start
    save_cache(cache_path, cache)
    run_summary = json.loads((run / "config.json").read_text()).get("result", {})
    out = {
        "name": args.name,
        "options": args.options,
        "started": started,
        "eval": result,
        "attack": attack_summary(record),
        "train_summary": {k: v for k, v in run_summary.items() if k != "lora_target_modules"},
        "seconds": {"train": train_s, "eval": eval_s, "attack": attack_s},
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
