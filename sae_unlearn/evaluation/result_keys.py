"""results.json keys that were renamed, and how readers take an older file: `current_keys` returns a
result (one evaluated model, evaluate.py's schema) with the old names read as the new ones, and
`current_results_keys` does so for every model of a compare results dict. A result written with the
new names comes back unchanged; the input is never modified."""

from __future__ import annotations

import copy
from typing import Any

# {old name: new name} at each place a key was renamed
FLUENCY_PARTS = {"forget_prompts": "concept_prompts"}  # the pack's concept prompts, not forget text
FLUENCY_METRICS = {"base_ppl": "base_model_ppl"}  # the base model's perplexity of the tested model's text
RELEARNING = {"worst_case": "strongest_attack"}  # the attack with the highest recovery
INVALID_FIELDS = {"fluency.forget_prompts": "fluency.concept_prompts"}


def _renamed(d: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """`d` with each old key under its new name (a new key already there wins)."""
    out = {}
    for key, value in d.items():
        new = names.get(key)
        if new is None:
            out[key] = value
        elif new not in d:
            out[new] = value
    return out


def current_keys(result: Any) -> Any:
    """One evaluated model's result with renamed keys under their current names (a copy where any changed)."""
    if not isinstance(result, dict):
        return result
    out = copy.copy(result)
    fluency = out.get("fluency")
    if isinstance(fluency, dict):
        fluency = _renamed(fluency, FLUENCY_PARTS)
        out["fluency"] = {k: _renamed(v, FLUENCY_METRICS) if isinstance(v, dict) else v for k, v in fluency.items()}
    relearning = out.get("relearning")
    if isinstance(relearning, dict):
        out["relearning"] = _renamed(relearning, RELEARNING)
    validity = out.get("validity")
    if isinstance(validity, dict) and isinstance(validity.get("invalid"), dict):
        out["validity"] = {**validity, "invalid": _renamed(validity["invalid"], INVALID_FIELDS)}
    return out


def current_results_keys(results: dict[str, Any]) -> dict[str, Any]:
    """A compare results dict ({"methods": {name: result}, ...}) with every result's keys current."""
    methods = results.get("methods")
    if not isinstance(methods, dict):
        return results
    return {**results, "methods": {name: current_keys(r) for name, r in methods.items()}}
