"""Multiple-choice probe scoring.

- logprob (default for models under ~1B parameters): the log-probability of each option's text after
  "Question: {prompt}\nAnswer:"; the highest wins. Three normalisations, as users compare them:
  `logprob` divides by the option's token count (the per-token mean, the default), `logprob_sum` is
  the summed log-probability (lm-eval's `acc`), `logprob_per_byte` divides the sum by the option's
  UTF-8 byte length (lm-eval's `acc_norm`; its code counts characters, the same for ASCII).
- letter (as WMDP/MMLU): options listed as A, B, C, ... (any number up to 26), compare the next-token
  logits of " A", " B", ... Scored under every cyclic rotation of the options (n rotations for n
  options), so the right answer sits under each letter once: `letter` is the mean over rotations (a
  model that always says "B" scores chance, 1/n, not 0% or 100% as it would if the right answer
  always sat under one letter), `letter_all_rotations` counts a question right only if right under
  all of them (SAEBench).
The lm_head is applied only at the positions that are scored.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from sae_unlearn.concepts.pack import RINGS, Probe
from sae_unlearn.errors import UserError
from sae_unlearn.models.batch import logits_at
from sae_unlearn.models.hooks import decoder_body, lm_head_logits
from sae_unlearn.models.loading import main_device

LETTERS = string.ascii_uppercase


def question_prompt(probe: Probe) -> str:
    return f"Question: {probe.prompt}\nAnswer:"


def letter_prompt(probe: Probe, options: Sequence[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"Question: {probe.prompt}\n{lines}\nAnswer:"


def answer_wins(scores: Sequence[Sequence[float]]) -> np.ndarray:
    """[n_probes] bool: the answer (option 0: Probe.options lists it first) has the highest score."""
    return np.array([int(np.argmax(s)) == 0 for s in scores], dtype=bool)


@dataclass
class OptionScores:
    """Per probe, per option (in probe.options order): summed log-probability and token count."""

    total: list[list[float]]
    tokens: list[list[int]]
    options: list[list[str]]

    @property
    def mean(self) -> list[list[float]]:
        return [
            [t / max(1, n) for t, n in zip(ts, ns, strict=True)] for ts, ns in zip(self.total, self.tokens, strict=True)
        ]

    @property
    def per_byte(self) -> list[list[float]]:
        return [
            [t / max(1, len(o.encode("utf-8"))) for t, o in zip(ts, os, strict=True)]
            for ts, os in zip(self.total, self.options, strict=True)
        ]

    def right(self, kind: str) -> np.ndarray:
        """[n_probes] bool: the answer (option 0) wins under `kind` (logprob, logprob_sum, logprob_per_byte)."""
        scores = {"logprob": self.mean, "logprob_sum": self.total, "logprob_per_byte": self.per_byte}[kind]
        return answer_wins(scores)


@torch.no_grad()
def option_logprobs(model: Any, tokenizer: Any, probes: Sequence[Probe], batch_size: int = 16) -> list[list[float]]:
    """Mean log-probability per token of each option (in probe.options order)."""
    return option_scores(model, tokenizer, probes, batch_size).mean


@torch.no_grad()
def option_scores(model: Any, tokenizer: Any, probes: Sequence[Probe], batch_size: int = 16) -> OptionScores:
    """Summed log-probability and token count of each option (in probe.options order).

    Each question is encoded once and its KV cache shared by its options (questions left-padded, with
    explicit positions so padding shifts nothing): the numbers of scoring every question+option
    sequence on its own, with each question's tokens run once instead of once per option.
    """
    device = main_device(model)  # a sharded model: its first device
    body = decoder_body(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [[0.0] * len(p.options) for p in probes]
    lengths_out = [[0] * len(p.options) for p in probes]
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
            scores[start + r][oi] = float(logp[offset : offset + len(o)].sum())
            lengths_out[start + r][oi] = len(o)
            offset += len(o)
    return OptionScores(scores, lengths_out, [list(p.options) for p in probes])


@torch.no_grad()
def letter_choices(
    model: Any, tokenizer: Any, probes: Sequence[Probe], n_rotations: int | None = None, batch_size: int = 32
) -> list[np.ndarray]:
    """Per probe, [rotations] bool: right answer chosen under each cyclic rotation of its options.

    `n_rotations` None: one rotation per option (the answer sits under every letter once)."""
    if any(len(p.options) > len(LETTERS) for p in probes):
        raise UserError(f"letter scoring takes at most {len(LETTERS)} options", "pass --no-letter")
    device = main_device(model)  # a sharded model: its first device
    letter_ids = [tokenizer(" " + L, add_special_tokens=False).input_ids[-1] for L in LETTERS]
    prompts, answers, n_options, owners = [], [], [], []
    for pi, probe in enumerate(probes):
        options = probe.options
        for shift in range(n_rotations or len(options)):
            order = [(i + shift) % len(options) for i in range(len(options))]
            prompts.append(letter_prompt(probe, [options[i] for i in order]))
            answers.append(order.index(0))
            n_options.append(len(options))
            owners.append(pi)
    right = [False] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    for start in range(0, len(prompts), batch_size):
        chunk = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True, padding_side="right")
        enc = enc.to(device)
        last = enc.attention_mask.sum(-1) - 1
        logits = logits_at(model, enc.input_ids, enc.attention_mask, torch.arange(len(last)), last.cpu()).cpu()
        for row, i in enumerate(chunk):
            right[i] = int(logits[row, letter_ids[: n_options[i]]].argmax()) == answers[i]
    flags = np.array(right, dtype=bool)
    owner = np.array(owners)
    return [flags[owner == pi] for pi in range(len(probes))]


N_RESAMPLES = 2000
SCORE_KINDS = ("logprob", "logprob_sum", "logprob_per_byte", "letter", "letter_all_rotations")


def bootstrap_ci(
    correct: Sequence[bool] | np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (seeded: the same data give the same interval)."""
    values = np.asarray(correct, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_bootstrap(
    stat: Callable[..., float],
    arrays: Sequence[npt.ArrayLike],
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, tuple[float, float]]:
    """`stat(*arrays)` and its percentile bootstrap CI, resampling the rows of all arrays together
    (item i of every array is the same probe, text or prompt, so pairs stay pairs)."""
    data = [np.asarray(a, dtype=float) for a in arrays]
    n = len(data[0])
    if any(len(a) != n for a in data):
        raise ValueError("paired arrays differ in length")
    if n == 0:
        return float("nan"), (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = np.array([stat(*(a[rows] for a in data)) for rows in rng.integers(0, n, size=(n_resamples, n))])
    tail = (1 - level) / 2
    return float(stat(*data)), (float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail)))


@dataclass
class PairedDifference:
    """Mean of (method - base) over the same items, with its paired bootstrap 95% CI."""

    diff: float
    ci: tuple[float, float]
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"diff": self.diff, "ci95": list(self.ci), "n": self.n}


def paired_difference(
    method: npt.ArrayLike, base: npt.ArrayLike, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> PairedDifference:
    """Per-item differences method - base (same probes, same scoring), mean and bootstrap CI."""
    d = np.asarray(method, dtype=float) - np.asarray(base, dtype=float)
    if len(d) == 0:
        return PairedDifference(float("nan"), (float("nan"), float("nan")), 0)
    return PairedDifference(float(d.mean()), bootstrap_ci(d, n_resamples=n_resamples, seed=seed), len(d))


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
    """Per-ring accuracies with 95% bootstrap CIs and chance levels, and per-probe scores (for paired
    differences against the base model and the adversarial union).

    {"rings": {ring: {kind: {"acc", "ci95", "n"}, "chance"}}, "per_probe": {id: bool (logprob)},
     "items": {id: {"ring", kind: 0..1}}} with kind in SCORE_KINDS (the letter ones only if `letter`).
    """
    scores = option_scores(model, tokenizer, probes)
    per_kind: dict[str, np.ndarray] = {k: scores.right(k).astype(float) for k in SCORE_KINDS[:3]}
    if letter:
        rotations = letter_choices(model, tokenizer, probes)
        per_kind["letter"] = np.array([r.mean() for r in rotations])
        per_kind["letter_all_rotations"] = np.array([float(r.all()) for r in rotations])
    out: dict[str, Any] = {
        "rings": {},
        "per_probe": {p.id: bool(r) for p, r in zip(probes, per_kind["logprob"], strict=True)},
        "items": {
            p.id: {"ring": p.ring, **{k: float(v[i]) for k, v in per_kind.items()}} for i, p in enumerate(probes)
        },
    }
    order = {ring: i for i, ring in enumerate(RINGS)}
    for ring in sorted({p.ring for p in probes}, key=lambda r: (order.get(r, len(order)), r)):
        idx = [i for i, p in enumerate(probes) if p.ring == ring]
        entry: dict[str, Any] = {k: accuracy(v[idx]).to_dict() for k, v in per_kind.items()}
        entry["chance"] = float(np.mean([1 / len(probes[i].options) for i in idx]))
        out["rings"][ring] = entry
    return out
