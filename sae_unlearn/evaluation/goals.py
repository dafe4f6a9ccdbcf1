"""Quality goals judged with uncertainty: paired differences against the base model and verdicts.

Every unlearning method in a compare run (any result whose `method` is not `base`) is judged on every
goal that its results can measure; the goals do not depend on a method's name. A verdict is
  - `met`: the whole 95% CI of the measured quantity satisfies the goal,
  - `missed`: the whole CI violates it,
  - `inconclusive`: the CI straddles the limit, or the metric was not measured validly (the reason
    is in `note`).
Differences are paired: the same probes (texts, prompts) under the same scoring for the method and
the base model, resampled together (see `scoring.paired_bootstrap`).

results.json (compare) gains, per method, `"paired": {"reference": "base", "rings": {ring: {kind:
{"diff", "ci95", "n"}}}}` and top-level `"verdicts": {method: {goal: {"limit", "value", "ci95",
"verdict", "note"}}}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from sae_unlearn.evaluation.result_keys import current_results_keys
from sae_unlearn.evaluation.scoring import SCORE_KINDS, paired_bootstrap, paired_difference

GOALS: dict[str, float] = {
    "target_within_chance_points": 10,
    "far_drop_max_points": 2,
    "near_drop_max_points": 8,
    "retain_ppl_rise_max": 0.05,
    "forget_prompt_fluency_ratio_max": 2.0,
    "forget_prompt_repetition_rise_max": 0.0,  # repeated-3-gram share: no worse than the base model
    "relearn_recovery_max": 0.5,
}
VERDICTS = ("met", "missed", "inconclusive")


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def nested(d: Any, *keys: Any) -> Any:
    """d[k1][k2]..., or None where a level is missing or not a dict (results.json readers)."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def paired_rings(method: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Per ring and scoring kind: mean per-probe difference method - base with its paired 95% CI, over
    the probes both results scored."""
    items_m, items_b = nested(method, "probes", "items") or {}, nested(base, "probes", "items") or {}
    shared = [pid for pid in items_m if pid in items_b]
    rings: dict[str, Any] = {}
    for ring in dict.fromkeys(items_m[pid]["ring"] for pid in shared):
        ids = [pid for pid in shared if items_m[pid]["ring"] == ring]
        rings[ring] = {
            kind: paired_difference([items_m[i][kind] for i in ids], [items_b[i][kind] for i in ids]).to_dict()
            for kind in SCORE_KINDS
            if all(kind in items_m[i] and kind in items_b[i] for i in ids)
        }
    return {"reference": "base", "rings": rings}


def _within(lo: float, hi: float, limit: float) -> str:
    """Verdict for `value <= limit` from the CI [lo, hi]."""
    if hi <= limit + 1e-9 * max(1.0, abs(limit)):
        return "met"
    if lo > limit + 1e-9 * max(1.0, abs(limit)):
        return "missed"
    return "inconclusive"


Measure = tuple[float, tuple[float, float]] | None


def _ring_drop(method: dict[str, Any], base: dict[str, Any], ring: str) -> Measure:
    """Points lost on `ring` (base - method, logprob scoring), paired CI."""
    d = nested(method, "paired", "rings", ring, "logprob") or nested(
        paired_rings(method, base), "rings", ring, "logprob"
    )
    if not d or not d.get("n"):
        return None
    lo, hi = d["ci95"]
    return -100 * d["diff"], (-100 * hi, -100 * lo)


def _target_vs_chance(method: dict[str, Any], _base: dict[str, Any]) -> Measure:
    entry = nested(method, "probes", "rings", "target")
    acc, chance = _finite(nested(entry, "logprob", "acc")), _finite(nested(entry, "chance"))
    if acc is None:
        return None
    chance = 0.25 if chance is None else chance
    lo, hi = entry["logprob"]["ci95"]
    return 100 * (acc - chance), (100 * (lo - chance), 100 * (hi - chance))


def _paired_texts(method: dict[str, Any], base: dict[str, Any], key: str) -> Measure:
    """Perplexity ratio - 1 on the same texts, resampled together."""
    m, b = nested(method, "per_text", key), nested(base, "per_text", key)
    if not m or not b or len(m) != len(b):
        return None
    mt, mc = zip(*m, strict=True)
    bt, bc = zip(*b, strict=True)

    def rise(mt: np.ndarray, mc: np.ndarray, bt: np.ndarray, bc: np.ndarray) -> float:
        return math.exp(mt.sum() / max(1, mc.sum()) - bt.sum() / max(1, bc.sum())) - 1

    return paired_bootstrap(rise, [mt, mc, bt, bc])


def _paired_samples(
    method: dict[str, Any], base: dict[str, Any], field: str, stat: Callable[[np.ndarray, np.ndarray], float]
) -> Measure:
    """`stat` of a per-generation quantity over the concept prompts both models continued."""
    ms = {s["prompt"]: s.get(field) for s in nested(method, "fluency", "concept_prompts", "samples") or []}
    bs = {s["prompt"]: s.get(field) for s in nested(base, "fluency", "concept_prompts", "samples") or []}
    pairs = [(_finite(ms[p]), _finite(bs[p])) for p in ms if p in bs]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    return paired_bootstrap(stat, [[a for a, _ in pairs], [b for _, b in pairs]])


def _relearn_recovery(method: dict[str, Any], base: dict[str, Any]) -> Measure:
    """The strongest fact-disjoint attack's recovery fraction (relearning.py); for records without it,
    (acc after the attack - acc before) / (base acc - acc before) from the curve. A point estimate (the
    curves carry no per-probe data), so its CI is the point itself; see `note`."""
    strongest = _finite(nested(method, "relearning", "strongest_attack", "recovery"))
    if strongest is not None:
        return strongest, (strongest, strongest)
    if isinstance(nested(method, "relearning", "attacks"), dict):
        return None  # attacks ran but no recovery is defined (gap within noise, or every attack broke the model)
    curve = sorted(
        (p["step"], p["target_acc"]) for p in nested(method, "relearning", "curve") or [] if "target_acc" in p
    )
    base_acc = _finite(nested(base, "probes", "rings", "target", "logprob", "acc"))
    if len(curve) < 2 or base_acc is None or base_acc - curve[0][1] <= 0:
        return None
    value = (curve[-1][1] - curve[0][1]) / (base_acc - curve[0][1])
    return value, (value, value)


MEASURES: dict[str, Callable[[dict[str, Any], dict[str, Any]], Measure]] = {
    "target_within_chance_points": _target_vs_chance,
    "far_drop_max_points": lambda m, b: _ring_drop(m, b, "far"),
    "near_drop_max_points": lambda m, b: _ring_drop(m, b, "near"),
    "retain_ppl_rise_max": lambda m, b: _paired_texts(m, b, "retain_heldout"),
    "forget_prompt_fluency_ratio_max": lambda m, b: _paired_samples(
        m, b, "base_nll", lambda x, y: math.exp(x.mean() - y.mean())
    ),
    "forget_prompt_repetition_rise_max": lambda m, b: _paired_samples(
        m, b, "repeated_3gram_share", lambda x, y: float(x.mean() - y.mean())
    ),
    "relearn_recovery_max": _relearn_recovery,
}
# the results.json fields each goal reads: a goal whose field is marked invalid gets no verdict
GOAL_FIELDS = {
    "target_within_chance_points": "probes",
    "far_drop_max_points": "probes",
    "near_drop_max_points": "probes",
    "retain_ppl_rise_max": "retention.retain_heldout_ppl",
    "forget_prompt_fluency_ratio_max": "fluency.concept_prompts",
    "forget_prompt_repetition_rise_max": "fluency.concept_prompts",
    "relearn_recovery_max": "relearning",
}


def judge(key: str, limit: Any, method: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """One goal for one method: {"limit", "value", "ci95", "verdict", "note"}."""
    row: dict[str, Any] = {"limit": limit, "value": None, "ci95": None, "verdict": "inconclusive", "note": ""}
    g = _finite(limit)
    invalid = {str(k): str(v) for k, v in (nested(method, "validity", "invalid") or {}).items()}
    invalid.update({str(k): str(v) for k, v in (nested(base, "validity", "invalid") or {}).items()})
    field = GOAL_FIELDS.get(key)
    if key not in MEASURES or g is None:
        row["note"] = "unknown goal" if key not in MEASURES else "limit is not a number"
        return row
    if base is None:
        row["note"] = "no base model in the run"
        return row
    if field in invalid:
        row["note"] = f"invalid: {invalid[field]}"
        return row
    measured = MEASURES[key](method, base)
    if measured is None:
        row["note"] = "not measured"
        return row
    value, (lo, hi) = measured
    row.update(value=value, ci95=[lo, hi])
    if key == "target_within_chance_points":  # two-sided: |acc - chance| <= limit
        row["verdict"] = "met" if -g <= lo and hi <= g else "missed" if lo > g or hi < -g else "inconclusive"
    else:
        row["verdict"] = _within(lo, hi, g)
    if key == "relearn_recovery_max":
        row["note"] = "point estimate (no CI)"
    return row


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{method name: {goal: judge(...)}} for every non-base method of a compare results dict (results.json
    files with older key names too)."""
    methods = current_results_keys(results).get("methods") or {}
    base = methods.get("base")
    goals = results.get("goals") or {}
    return {
        name: {str(key): judge(str(key), limit, r, base) for key, limit in goals.items()}
        for name, r in methods.items()
        if isinstance(r, dict) and r.get("method", name) != "base"
    }
