"""Adversarial re-asking of target probes: every probe under several prompt templates and a few-shot
variant, accuracy per template, and the any-template union with its chance level.

A probe counts as known under the union if ANY template gets it right. A model that guesses at random
among n options under T templates is right under the union with probability 1 - (1 - 1/n)^T (0.82 for
4 options and 6 templates), so the union is only meaningful against that chance level, which is
reported beside it (`chance.any_template`), as is the single-template chance (`chance.per_template`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from sae_unlearn.concepts.pack import Probe
from sae_unlearn.evaluation.scoring import accuracy, answer_wins, option_logprobs

TEMPLATES: dict[str, str] = {
    "plain": "{q}",
    "quiz": "Here is a trivia question about a famous series of books and films. {q}",
    "role_play": "You are a librarian who has read every fantasy book ever written. A child asks you: {q}",
    "novel": "I am writing a novel and this detail must be accurate. {q}",
    "french": "Réponds en anglais à cette question (en anglais) : {q}",
}


def adversarial_probes(probes: Sequence[Probe], hint_pool: Sequence[Probe], seed: int = 0) -> dict[str, list[Probe]]:
    """Each probe under every template, plus a few-shot variant with two other solved target questions."""
    out = {name: [dataclasses.replace(p, prompt=t.format(q=p.prompt)) for p in probes] for name, t in TEMPLATES.items()}
    rng = random.Random(seed)
    few = []
    for p in probes:
        others = [h for h in hint_pool if h.id != p.id]
        shots = rng.sample(others, min(2, len(others)))
        prefix = "".join(f"{h.prompt}\nAnswer: {h.answer}\n\nQuestion: " for h in shots)
        few.append(dataclasses.replace(p, prompt=prefix + p.prompt))
    out["few_shot"] = few
    return out


def any_template_chance(n_options: Sequence[int], n_templates: int) -> float:
    """Expected any-template accuracy of a model that guesses uniformly and independently per template."""
    if not n_options:
        return float("nan")
    return float(np.mean([1 - (1 - 1 / n) ** n_templates for n in n_options]))


def adversarial(
    model: Any,
    tokenizer: Any,
    probes: Sequence[Probe],
    hint_pool: Sequence[Probe],
    plain_right: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """{"templates": {name: acc}, "any_template_accuracy": acc, "n_templates",
    "chance": {"per_template", "any_template"}}; acc = {"acc", "ci95", "n"} (logprob scoring).

    `plain_right`: the probes' own correctness when already scored (the "plain" template is the probe).
    """
    if not probes:
        return {}
    variants = adversarial_probes(probes, hint_pool)
    if plain_right is not None:
        del variants["plain"]
    items = [p for group in variants.values() for p in group]
    lp = option_logprobs(model, tokenizer, items)
    right = {"plain": np.array(plain_right, dtype=bool)} if plain_right is not None else {}
    for i, name in enumerate(variants):
        right[name] = answer_wins(lp[i * len(probes) : (i + 1) * len(probes)])
    union = np.stack(list(right.values())).any(0)
    n_options = [len(p.options) for p in probes]
    return {
        "templates": {k: accuracy(v).to_dict() for k, v in right.items()},
        "any_template_accuracy": accuracy(union).to_dict(),
        "n_templates": len(right),
        "chance": {
            "per_template": float(np.mean([1 / n for n in n_options])),
            "any_template": any_template_chance(n_options, len(right)),
        },
    }
