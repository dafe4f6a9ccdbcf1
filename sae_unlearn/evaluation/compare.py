"""`compare` / `demo`: run several methods on one concept pack and evaluate them beside the base model.

DIR/features/          features.json, stats.safetensors, report.html
DIR/runs/METHOD/       one run directory per method
DIR/results.json       {"version", "concept", "model", "compute_dtype": {"dtype", "reason"}, "created", "goals",
                        "verdicts": {method: {goal: ...}}, "record": {"config": CompareConfig, "versions"},
                        "experiment" (the settings that re-run it: compare --config results.json),
                        "methods": {name: evaluate() result + "paired" (differences against base)},
                        "seconds": {"feature_selection", "unlearn_METHOD"..., "total"}} (evaluation
                        time is each result's own "seconds"; paired CIs and verdicts: goals.py)
DIR/report.html        every metric side by side, plots, generations before/after
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_unlearn.concepts.pack import ConceptPack
from sae_unlearn.errors import UserError
from sae_unlearn.evaluation.evaluate import EvalConfig, evaluate, feature_levels
from sae_unlearn.evaluation.goals import GOALS, paired_rings, verdicts
from sae_unlearn.features import find_features, make_strategy
from sae_unlearn.io import atomic_write_json, atomic_write_text
from sae_unlearn.methods import METHODS, unlearn
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.runs import versions

log = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    methods: list[str] = field(default_factory=lambda: ["crisp", "clamp", "ablate", "rmu"])
    sae: str = "shipped"
    strategy: str = "crisp"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    k: int = 10
    max_length: int = 256  # tokens per paragraph for feature statistics
    examples_from: int | None = None  # paragraphs per corpus read for the feature report's contexts
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method {unknown[0]!r}", f"use some of {', '.join(sorted(METHODS))}")
        asked = {*(self.eval.robustness_for or []), *(self.eval.relearn_for or [])}
        not_run = sorted(asked - {"base", *self.methods})
        if not_run:
            raise UserError(
                f"the attacks are asked for {not_run[0]!r}, which is not run",
                f"use all or some of base,{','.join(self.methods)}",
            )


def compare(
    loaded: LoadedModel,
    pack: ConceptPack,
    out: Path,
    cfg: CompareConfig,
    stage: Callable[[str], None] | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    experiment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`experiment`: the settings that reproduce this run (evaluation/experiment.py), embedded in
    results.json; by default the concept's name, the model spec and `cfg`.

    `cfg` is used as given. For the settings `sae-unlearn compare` would use with the same options (the
    experiment files' defaults, e.g. the shipped SAEs' clamp values, and --fast), build it with
    `load_experiment(..., fast=..., overrides=...)` and call `run_experiment`, as the CLI does."""
    cfg.validate()  # again: fields may have changed since construction
    say = stage or (lambda _m: None)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    saes, selection = [], None
    if any(METHODS[m].needs_saes for m in cfg.methods):
        from sae_unlearn.saes import load_saes_for

        say("feature selection")
        saes = load_saes_for(loaded, cfg.sae)
        strategy = make_strategy(cfg.strategy, k=cfg.k, **cfg.strategy_options)
        selection = find_features(
            loaded, saes, pack, strategy, k=cfg.k, max_length=cfg.max_length, examples_from=cfg.examples_from
        )
        selection.write(out / "features")
    results: dict[str, Any] = {
        "version": 1,
        "concept": pack.name,
        "model": loaded.spec,
        "compute_dtype": loaded.compute_dtype.to_dict(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "goals": dict(GOALS),
        "record": {"config": dataclasses.asdict(cfg), "versions": versions()},
        "experiment": experiment or {"concept": pack.name, "model": loaded.spec, **dataclasses.asdict(cfg)},
        "seconds": {"feature_selection": round(time.perf_counter() - started, 1)},
        "methods": {},
    }
    say("evaluate base")
    relearn_cache: dict[Any, Any] = {}  # the base model's attack curves: every method's control
    results["methods"]["base"] = evaluate(
        loaded,
        pack,
        None,
        cfg=cfg.eval,
        name="base",
        progress=lambda m: say(f"evaluate base: {m}"),
        relearn_cache=relearn_cache,
    )
    _write(out, results)
    base_levels: dict[int, float] | None = None
    for method in cfg.methods:
        say(f"unlearn {method}")
        run_dir = out / "runs" / method
        t0 = time.perf_counter()
        unlearn(
            method,
            loaded,
            pack,
            run_dir,
            options=cfg.method_options.get(method, {}),
            saes=saes,
            sae_spec=cfg.sae,
            features=selection,
            progress=progress,
        )
        results["seconds"][f"unlearn_{method}"] = round(time.perf_counter() - t0, 1)
        if base_levels is None and (run_dir / "features.json").exists():  # one selection for every method
            base_levels = feature_levels(loaded, loaded.model, run_dir, pack.forget_split("heldout"))
        say(f"evaluate {method}")
        results["methods"][method] = evaluate(
            loaded,
            pack,
            run_dir,
            cfg=cfg.eval,
            name=method,
            base_levels=base_levels,
            progress=lambda m, method=method: say(f"evaluate {method}: {m}"),
            relearn_cache=relearn_cache,
        )
        results["methods"][method]["paired"] = paired_rings(results["methods"][method], results["methods"]["base"])
        _write(out, results)
    results["seconds"]["total"] = round(time.perf_counter() - started, 1)
    _write(out, results)
    return results


def _write(out: Path, results: dict[str, Any]) -> None:
    from sae_unlearn.evaluation.report import render_compare_report, summary_markdown

    results["verdicts"] = verdicts(results)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.html", render_compare_report(results))
    atomic_write_text(out / "summary.md", summary_markdown(results))
