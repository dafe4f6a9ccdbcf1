"""`sae-unlearn attack RUN_DIR`: fact-disjoint relearning attacks on any run (adapter, RMU weights,
clamp/ablate hooks, or a merged export), with the base-model and generic-text controls."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from sae_unlearn.cli.app import DeviceOpt, DtypeOpt, app
from sae_unlearn.cli.common import check_out_file, friendly_errors, stdout, table
from sae_unlearn.errors import UserError

MERGED_MARKER = "sae_unlearn_run.json"  # written by `sae-unlearn export --merged`


def run_config(run_dir: Path) -> tuple[dict[str, Any], bool]:
    """The run's config and whether RUN_DIR is a merged export (a full model) rather than a run directory."""
    from sae_unlearn.runs import read_config

    marker = run_dir / MERGED_MARKER
    if marker.exists():
        try:
            return json.loads(marker.read_text(encoding="utf-8")), True
        except json.JSONDecodeError as e:
            raise UserError(f"{marker} is not valid JSON ({e.msg})", "export the run again") from e
    return read_config(run_dir), False


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """A comma-separated list of non-negative integers (seeds or steps)."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise UserError(f"{option} {text!r} is not a comma-separated list of integers", f"e.g. {option} 0,1,2") from e
    if not values or min(values) < 0:
        raise UserError(f"{option} {text!r} must list integers >= 0", f"e.g. {option} 0,1,2")
    return sorted(set(values))


@app.command("attack")
@friendly_errors
def attack(
    run_dir: Annotated[
        Path, typer.Argument(help="a run directory (crisp, rmu, clamp, ablate) or a merged export (export --merged)")
    ],
    grid_name: Annotated[
        str,
        typer.Option(
            "--grid",
            help="default: LoRA r16 lr 2e-4 at steps 0/10/20; full: LoRA r16 lr 2e-4 and full fine-tune lr 2e-5, "
            "on the attack half and on generic text, at steps 0/5/10/20/50",
        ),
    ] = "default",
    concept: Annotated[
        str | None, typer.Option("--concept", "-c", help="pack name or directory (default: the run's)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="JSON to write (default: RUN_DIR/attack.json)")] = None,
    seeds: Annotated[str, typer.Option(help="comma-separated seeds; curves are averaged over them")] = "0",
    eval_at: Annotated[
        str | None, typer.Option(help="steps to measure at, for every attack of the grid (e.g. 0,5,10)")
    ] = None,
    probe_split: Annotated[str, typer.Option(help="probes to score: report (held out from tuning), tune or all")] = (
        "report"
    ),
    ppl_ratio_max: Annotated[
        float, typer.Option(help="attacks raising generic perplexity past this ratio to base are not counted")
    ] = 1.5,
    no_control: Annotated[bool, typer.Option("--no-control", help="skip the base-model control (not advised)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Relearning attacks that measure what a run left in the weights (Deeb & Roger 2024 protocol)."""
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.evaluation.relearning import RelearnConfig, grid, relearning_evaluation, relearning_rows
    from sae_unlearn.io import atomic_write_json
    from sae_unlearn.models import load_model

    config, merged = run_config(run_dir)
    target = out or run_dir / "attack.json"
    check_out_file(target, overwrite)
    if ppl_ratio_max <= 1:
        raise UserError(f"--ppl-ratio-max {ppl_ratio_max} must be above 1", "e.g. --ppl-ratio-max 1.5")
    attacks = grid(grid_name)
    if eval_at is not None:
        steps = parse_seeds(eval_at, "--eval-at")
        attacks = [dataclasses.replace(a, eval_at=steps) for a in attacks]
    cfg = RelearnConfig(
        attacks=attacks, seeds=parse_seeds(seeds), base_control=not no_control, ppl_ratio_max=ppl_ratio_max
    )
    spec = concept or config.get("concept")
    if not spec:
        raise UserError(f"{run_dir} does not name its concept", "pass --concept PACK")
    pack = load_pack(spec)
    if concept is None and config.get("concept_fingerprint") not in (None, pack.fingerprint()):
        raise UserError(
            f"the pack {spec!r} found here differs from the one the run was made with",
            "pass --concept with the pack directory the run used",
        )
    scored_from = [p for p in pack.probe_split(probe_split) if p.ring == "target"]
    if not scored_from:
        raise UserError(f"the {probe_split} split of {pack.name} has no target probes", "use --probe-split all")
    start = time.perf_counter()
    loaded = load_model(config["model"], dtype=dtype, device=device)
    under_test: Any = run_dir
    if merged:
        under_test = load_model(str(run_dir), dtype=dtype, device=device)
    with stdout.status(f"attacking {run_dir} ({grid_name} grid)"):
        record = relearning_evaluation(loaded, under_test, pack, scored_from, cfg)
    result = {
        "version": 1,
        "run": str(run_dir),
        "merged_export": merged,
        "method": config.get("method"),
        "model": loaded.spec,
        "concept": pack.name,
        "grid": grid_name,
        "probe_split": probe_split,
        "relearning": record,
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(target, result)
    columns = ["method", "attack", "steps", "target acc", "base control", "recovery", "ppl ratio", "leaked"]
    stdout.print(table("relearning attacks (scored half)", columns, relearning_rows(str(config["method"]), record)))
    strongest = record.get("strongest_attack")
    gap = record.get("gap") or {}
    if strongest:
        stdout.print(
            f"strongest attack within {ppl_ratio_max}x generic perplexity: recovery {strongest['recovery']:.2f} "
            f"({strongest['attack']}, step {strongest['step']})"
        )
    elif record.get("attacks"):
        value, noise = gap.get("value"), gap.get("noise")
        stdout.print(
            f"recovery undefined: base - unlearned = {value if value is None else round(value, 3)} is within the "
            f"noise ({noise if noise is None else round(noise, 3)}) or every attack broke the model"
        )
    for name, why in (record.get("skipped") or {}).items():
        stdout.print(f"[yellow]skipped[/] {name}: {why}")
    stdout.print(f"wrote {target}")
