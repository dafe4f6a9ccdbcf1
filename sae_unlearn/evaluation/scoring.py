"""Multiple-choice probe scoring.

- logprob (default for models under ~1B parameters): the length-normalised log-probability of each
  option's text after "Question: {prompt}\\nAnswer:"; the highest wins.
- letter (as WMDP/MMLU): options listed as A-D, compare the next-token logits of " A".." D". Scored
  under every cyclic rotation of the options, so the right answer sits under each letter once:
  `letter` is the mean over rotations (a model that always says "B" scores chance, 25%, not 0% or
  100% as it would if the right answer always sat under one letter), `letter_all_permutations` counts
  a question right only if right under all of them (SAEBench).
The lm_head is applied only at the positions that are scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from sae_unlearn.concepts.pack import Probe
from sae_unlearn.models.hooks import decoder_body, lm_head_logits

LETTERS = "ABCDEFGH"


def question_prompt(probe: Probe) -> str:
    return f"Question: {probe.prompt}\nAnswer:"


def letter_prompt(probe: Probe, options: Sequence[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"Question: {probe.prompt}\n{lines}\nAnswer:"


def logits_at(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits [n, vocab] at (rows, cols) only: the body runs once, the lm_head only where needed."""
    hidden = decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return lm_head_logits(model, hidden[rows, cols])


@torch.no_grad()
def option_logprobs(model: Any, tokenizer: Any, probes: Sequence[Probe], batch_size: int = 16) -> list[list[float]]:
    """Mean log-probability per token of each option (in probe.options order).

    Each question is encoded once and its KV cache shared by its options (questions left-padded, with
    explicit positions so padding shifts nothing): the numbers of scoring every question+option
    sequence on its own, at about a third of the cost.
    """
    device = next(model.parameters()).device
    body = decoder_body(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [[0.0] * len(p.options) for p in probes]
    for start in range(0, len(probes), batch_size):
        chunk = probes[start : start + batch_size]
        questions = [tokenizer(question_prompt(p)).input_ids for p in chunk]
        width = max(map(len, questions))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, q in enumerate(questions):
            ids[r, width - len(q) :], mask[r, width - len(q) :] = torch.tensor(q), 1
        ids, mask = ids.to(device), mask.to(device)
        out = body(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True)
        last_question = out.last_hidden_state[:, -1]
        items = [
            (r, oi, tokenizer(" " + option, add_special_tokens=False).input_ids)
            for r, probe in enumerate(chunk)
            for oi, option in enumerate(probe.options)
        ]
        owner = torch.tensor([r for r, _, _ in items], device=device)
        cache = out.past_key_values
        cache.batch_select_indices(owner)
        opt_width = max(len(o) for _, _, o in items)
        opt_ids = torch.full((len(items), opt_width), pad, dtype=torch.long)
        opt_mask = torch.zeros_like(opt_ids)
        for i, (_, _, o) in enumerate(items):
            opt_ids[i, : len(o)], opt_mask[i, : len(o)] = torch.tensor(o), 1
        opt_ids, opt_mask = opt_ids.to(device), opt_mask.to(device)
        lengths = torch.tensor([len(q) for q in questions], device=device)[owner]
        positions = lengths.unsqueeze(-1) + torch.arange(opt_width, device=device)
        hidden = body(
            input_ids=opt_ids,
            attention_mask=torch.cat([mask[owner], opt_mask], dim=-1),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        # option token j is predicted by the question's last position (j = 0) or option position j - 1
        rows = [torch.cat([last_question[r : r + 1], hidden[i, : len(o) - 1]]) for i, (r, _, o) in enumerate(items)]
        targets = torch.tensor([t for _, _, o in items for t in o], device=device)
        logp = torch.log_softmax(lm_head_logits(model, torch.cat(rows)), -1)[torch.arange(len(targets)), targets].cpu()
        offset = 0
        for r, oi, o in items:
            scores[start + r][oi] = float(logp[offset : offset + len(o)].mean())
            offset += len(o)
    return scores


@torch.no_grad()
def letter_choices(
    model: Any, tokenizer: Any, probes: Sequence[Probe], n_permutations: int = 4, batch_size: int = 32
) -> np.ndarray:
    """[n_probes, n_permutations] bool: right answer chosen under each cyclic rotation of the options."""
    device = next(model.parameters()).device
    letter_ids = [tokenizer(" " + L, add_special_tokens=False).input_ids[-1] for L in LETTERS[:4]]
    prompts, answers = [], []
    for probe in probes:
        options = probe.options
        for shift in range(n_permutations):
            order = [(i + shift) % len(options) for i in range(len(options))]
            prompts.append(letter_prompt(probe, [options[i] for i in order]))
            answers.append(order.index(0))
    tokenizer.padding_side = "right"
    right = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        last = enc.attention_mask.sum(-1) - 1
        logits = logits_at(model, enc.input_ids, enc.attention_mask, torch.arange(len(last)), last.cpu())
        picks = logits[:, letter_ids[: len(probes[0].options)]].argmax(-1).cpu().tolist()
        right.extend(p == a for p, a in zip(picks, answers[start : start + batch_size], strict=True))
    return np.array(right, dtype=bool).reshape(len(probes), n_permutations)


def bootstrap_ci(
    correct: Sequence[bool] | np.ndarray, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    values = np.asarray(correct, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_resamples, len(values)), replace=True).mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


@dataclass
class Accuracy:
    acc: float
    ci: tuple[float, float]
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "ci95": list(self.ci), "n": self.n}


def accuracy(correct: npt.ArrayLike) -> Accuracy:
    """Mean correctness (per-question values may be fractions, e.g. the share of rotations right)."""
    values = np.asarray(correct, dtype=float)
    return Accuracy(float(values.mean()) if len(values) else float("nan"), bootstrap_ci(values), len(values))


def score_probes(model: Any, tokenizer: Any, probes: Sequence[Probe], letter: bool = True) -> dict[str, Any]:
    """Per-ring accuracies with 95% bootstrap CIs, and per-probe correctness for worst-case analysis."""
    lp = option_logprobs(model, tokenizer, probes)
    lp_right = np.array([int(np.argmax(s)) == 0 for s in lp])
    letter_right = letter_choices(model, tokenizer, probes) if letter else None
    out: dict[str, Any] = {"rings": {}, "per_probe": {p.id: bool(r) for p, r in zip(probes, lp_right, strict=True)}}
    for ring in sorted({p.ring for p in probes}, key=["target", "near", "mid", "far"].index):
        idx = [i for i, p in enumerate(probes) if p.ring == ring]
        entry = {"logprob": accuracy(lp_right[idx]).to_dict()}
        if letter_right is not None:
            entry["letter"] = accuracy(letter_right[idx].mean(1)).to_dict()
            entry["letter_all_permutations"] = accuracy(letter_right[idx].all(1)).to_dict()
        out["rings"][ring] = entry
    return out
