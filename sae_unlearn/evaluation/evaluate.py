"""`evaluate`: forgetting, retention, fluency, feature re-activation and robustness of the base model
or of the base model with a run applied. Only the `report` probe split is scored by default: the
`tune` split is the one settings may be chosen on.

results.json schema (version 1), one object per evaluated model:
    {"version": 1, "name", "model", "run", "method", "probe_split",
     "validity": {"invalid": {field: reason}, "duplicates_removed": {"forget", "retain", "prompts"}},
     "record": {"config", "versions", "pack", "probes_hash", "model", "saes", "run"}   (record.py),
     "probes": {"rings": {ring: {KIND: {"acc", "ci95", "n"}, "chance"}}, "per_probe": {id: bool},
                "items": {id: {"ring", KIND: 0..1}}}   KIND: logprob, logprob_sum, logprob_per_byte, letter,
                                                       letter_all_rotations (scoring.py)
     "retention": {"retain_heldout_ppl", "generic_ppl", "forget_heldout_ppl"},
     "per_text": {"retain_heldout": [[summed NLL, tokens], ...]},
     "fluency": {"coherence": F, "concept_prompts": F}   F = {"base_model_ppl", "repeated_3gram_share", "distinct_2",
                                                             "foreign_script_share", "samples": [{"prompt", "text",
                                                             "base_nll", "repeated_3gram_share"}]},
     "reactivation": {"fraction", "per_layer": {L: fraction}} | null,
     "adversarial": {"templates": {name: acc}, "any_template_accuracy": acc, "n_templates",
                     "chance": {"per_template", "any_template"}} | null   (adversarial.py)
     "relearning": fact-disjoint attacks with controls, see evaluation/relearning.py | null,
     "lm_eval": {task: {metric: value}} | null, "seconds", "stage_seconds": {stage: seconds}}
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_unlearn.concepts.pack import ConceptPack, Probe
from sae_unlearn.errors import UserError
from sae_unlearn.evaluation.adversarial import adversarial
from sae_unlearn.evaluation.record import build_record
from sae_unlearn.evaluation.relearning import RelearnConfig, grid, relearning_evaluation
from sae_unlearn.evaluation.scoring import answer_wins, option_logprobs, score_probes
from sae_unlearn.features import load_features
from sae_unlearn.features.statistics import encode_layers, iter_batches
from sae_unlearn.methods import apply
from sae_unlearn.models.generation import generate
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.runs import read_config
from sae_unlearn.saes.loading import load_saes_from_spec
from sae_unlearn.text_metrics import fluency_metrics, perplexity, text_nlls

log = logging.getLogger(__name__)
RESULTS_VERSION = 1
GENERIC_TEXT = Path(__file__).parent / "data" / "generic_heldout.txt"


@dataclass
class EvalConfig:
    probe_split: str = "report"
    letter: bool = True
    adversarial: bool = True
    relearn: bool = True
    relearn_steps: int = 20  # the default grid's last step (relearn_eval_at past it are dropped)
    relearn_lr: float = 2e-4  # the default grid's LoRA learning rate
    relearn_eval_at: list[int] = field(default_factory=lambda: [0, 10, 20])
    relearn_grid: str = "default"  # default: LoRA r16 + base control; full: see evaluation/relearning.grid
    relearn_seeds: list[int] = field(default_factory=lambda: [0])
    fluency_tokens: int = 32
    max_probes_per_ring: int | None = None
    max_ppl_texts: int = 40
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None
    robustness_for: list[str] | None = None  # models that get the adversarial and relearning attacks (None: all)
    relearn_for: list[str] | None = None  # models that get the relearning attack (None: those of robustness_for)

    def adversarial_for(self, name: str) -> bool:
        return self.adversarial and (self.robustness_for is None or name in self.robustness_for)

    def relearning_for(self, name: str) -> bool:
        attacked = self.robustness_for if self.relearn_for is None else self.relearn_for
        return self.relearn and (attacked is None or name in attacked)


def select_probes(pack: ConceptPack | None, probes: Sequence[Probe] | None, cfg: EvalConfig) -> list[Probe]:
    chosen = list(probes) if probes is not None else (pack.probe_split(cfg.probe_split) if pack else [])
    if not chosen:
        where = f"pack {pack.name}'s {cfg.probe_split!r} split" if pack is not None and probes is None else "--probes"
        raise UserError(f"no probes to evaluate in {where}", "pass --probe-split all, or a probe file with --probes")
    if cfg.max_probes_per_ring is not None:
        by_ring: dict[str, list[Probe]] = {}
        for p in chosen:
            by_ring.setdefault(p.ring, []).append(p)
        chosen = [p for ring in by_ring.values() for p in ring[: cfg.max_probes_per_ring]]
    return chosen


def split_validity(pack: ConceptPack | None, cfg: EvalConfig, given_probes: bool = False) -> dict[str, Any]:
    """{"invalid": {results field: reason}, "duplicates_removed": {...}}: the metrics that this pack's
    splits (or the chosen probe split) do not measure on held-out data; each one is logged as a warning."""
    invalid = pack.split_problems() if pack is not None else {}
    if not given_probes and cfg.probe_split != "report":
        invalid["probes"] = f"scored on the {cfg.probe_split!r} probe split, which settings may be tuned on"
    for key, why in invalid.items():
        log.warning("%s is not a held-out measurement: %s", key, why)
    return {"invalid": invalid, "duplicates_removed": pack.duplicates() if pack is not None else {}}


@contextlib.contextmanager
def model_under_test(loaded: LoadedModel, run_dir: Path | None) -> Iterator[Any]:
    if run_dir is None:
        yield loaded.model
    else:
        with apply(loaded, run_dir) as model:
            yield model


@torch.no_grad()
def feature_levels(loaded: LoadedModel, model: Any, run_dir: Path, texts: Sequence[str]) -> dict[int, float]:
    """Summed activation of the run's selected features over valid tokens of `texts`, per layer."""
    config = read_config(run_dir)
    selection = load_features(run_dir)
    saes = [
        s
        for s in load_saes_from_spec(
            config["sae"], model_spec=config["model"], device=str(loaded.device), dtype=loaded.dtype
        )
        if s.layer in selection.by_layer()
    ]
    probe = dataclasses.replace(loaded, model=model)
    totals = dict.fromkeys(selection.by_layer(), 0.0)
    for batch in iter_batches(texts, loaded.tokenizer, 8, 256):
        latents, mask = encode_layers(probe, saes, batch, columns=selection.by_layer())  # selected latents only
        for layer in selection.by_layer():
            totals[layer] += float((latents[layer].clamp_min(0) * mask.unsqueeze(-1)).sum())
    return totals


def evaluate(
    loaded: LoadedModel,
    pack: ConceptPack | None = None,
    run_dir: Path | None = None,
    probes: Sequence[Probe] | None = None,
    cfg: EvalConfig | None = None,
    name: str | None = None,
    base_levels: dict[int, float] | None = None,
    progress: Callable[[str], None] | None = None,
    relearn_cache: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """`relearn_cache`: one dict shared by the evaluations of one comparison (the base-model controls)."""
    cfg = cfg or EvalConfig()
    start = time.perf_counter()
    stages: dict[str, float] = {}
    current, since = "", start

    def say(stage: str) -> None:
        nonlocal current, since
        now = time.perf_counter()
        if current:
            stages[current] = round(now - since, 1)
        current, since = stage, now
        if stage and progress is not None:
            progress(stage)

    chosen = select_probes(pack, probes, cfg)
    method = read_config(run_dir)["method"] if run_dir is not None else "base"
    targets = [p for p in chosen if p.ring == "target"]
    result: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "name": name or method,
        "model": loaded.spec,
        "run": str(run_dir) if run_dir else None,
        "method": method,
        "probe_split": cfg.probe_split if probes is None else "given",
    }
    result["validity"] = split_validity(pack, cfg, given_probes=probes is not None)
    result["record"] = build_record(loaded, pack, run_dir, cfg, chosen)
    prompt_part = cfg.probe_split if probes is None else "report"  # the same half as the probes
    prompts = {
        "coherence": pack.coherence[:8] if pack else [],
        "concept_prompts": pack.prompt_split(prompt_part) if pack else [],
    }
    generations: dict[str, list[str]] = {}
    with model_under_test(loaded, run_dir) as model:
        say("probes")
        result["probes"] = score_probes(model, loaded.tokenizer, chosen, letter=cfg.letter)
        say("perplexity")
        retain_texts = pack.retain_split("heldout")[: cfg.max_ppl_texts] if pack else []
        retain_nlls = text_nlls(model, loaded.tokenizer, retain_texts) if retain_texts else []
        result["retention"] = {
            "retain_heldout_ppl": _ppl(retain_nlls) if pack else None,
            "generic_ppl": perplexity(model, loaded.tokenizer, _generic_texts()[: cfg.max_ppl_texts]),
            "forget_heldout_ppl": perplexity(model, loaded.tokenizer, pack.forget_split("heldout")[: cfg.max_ppl_texts])
            if pack
            else None,
        }
        result["per_text"] = {"retain_heldout": [list(x) for x in retain_nlls]}  # [summed NLL, tokens] per text
        say("generations")
        for key, ps in prompts.items():
            generations[key] = generate(model, loaded.tokenizer, ps, cfg.fluency_tokens) if ps else []
        if run_dir is not None and pack is not None and (run_dir / "features.json").exists():
            say("feature re-activation")
            levels = feature_levels(loaded, model, run_dir, pack.forget_split("heldout"))
            result["reactivation_levels"] = levels
        if targets and cfg.adversarial_for(name or method):
            say("adversarial prompts")
            per_probe = result["probes"]["per_probe"]
            result["adversarial"] = adversarial(
                model,
                loaded.tokenizer,
                targets,
                pack.probe_split("tune") if pack else targets,
                plain_right=[per_probe[p.id] for p in targets],
            )
        if cfg.lm_eval_tasks:
            from sae_unlearn.evaluation.lm_eval_bridge import run_lm_eval

            say("lm-eval")
            result["lm_eval"] = run_lm_eval(
                model,
                loaded.tokenizer,
                cfg.lm_eval_tasks,
                limit=cfg.lm_eval_limit,
                include_path=cfg.lm_eval_include,
                device=str(loaded.device),
            )
    say("fluency")
    result["fluency"] = {
        key: fluency_metrics(loaded.model, loaded.tokenizer, prompts[key], texts)
        for key, texts in generations.items()
        if texts
    }
    if "reactivation_levels" in result:
        levels = result.pop("reactivation_levels")
        assert run_dir is not None and pack is not None  # levels are only measured for a run with a pack
        base = (
            base_levels
            if base_levels is not None
            else feature_levels(loaded, loaded.model, run_dir, pack.forget_split("heldout"))
        )
        per_layer = {str(k): (levels[k] / base[k] if base.get(k) else float("nan")) for k in levels}
        result["reactivation"] = {
            "fraction": sum(levels.values()) / max(1e-9, sum(base.values())),
            "per_layer": per_layer,
        }
    else:
        result["reactivation"] = None
    result.setdefault("adversarial", None)
    result.setdefault("lm_eval", None)
    if pack is not None and targets and cfg.relearning_for(name or method):
        say("relearning attack")
        result["relearning"] = relearn(loaded, run_dir, pack, targets, cfg, relearn_cache)
    else:
        result["relearning"] = None
    say("")
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["stage_seconds"] = stages
    return result


def target_accuracy(model: Any, tokenizer: Any, targets: Sequence[Probe]) -> float:
    lp = option_logprobs(model, tokenizer, targets)
    return float(np.mean(answer_wins(lp)))


def relearn_config(cfg: EvalConfig) -> RelearnConfig:
    if cfg.relearn_grid == "default":
        eval_at = sorted({0, cfg.relearn_steps, *(s for s in cfg.relearn_eval_at if s <= cfg.relearn_steps)})
        attacks = grid("default", eval_at=eval_at, lr=cfg.relearn_lr)
    else:
        attacks = grid(cfg.relearn_grid)
    return RelearnConfig(attacks=attacks, seeds=list(cfg.relearn_seeds), ppl_texts=min(16, cfg.max_ppl_texts))


def relearn(
    loaded: LoadedModel,
    run_dir: Path | None,
    pack: ConceptPack,
    targets: Sequence[Probe],
    cfg: EvalConfig,
    cache: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Fact-disjoint relearning attacks on private copies of the model under test, with controls."""
    return relearning_evaluation(loaded, run_dir, pack, targets, relearn_config(cfg), cache)


def _ppl(nlls: Sequence[tuple[float, int]]) -> float:
    return math.exp(sum(t for t, _ in nlls) / max(1, sum(n for _, n in nlls)))


def _generic_texts() -> list[str]:
    text = GENERIC_TEXT.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]
