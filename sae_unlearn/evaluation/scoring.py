"""Multiple-choice probe scoring.

- logprob (default for models under ~1B parameters): the length-normalised log-probability of each
  option's text after "Question: {prompt}\\nAnswer:"; the highest wins.
- letter (as WMDP/MMLU): options listed as A-D, compare the next-token logits of " A".." D"; also
  counted under all cyclic permutations of the options (SAEBench: right only if right under all).
The lm_head is applied only at the positions that are scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sae_unlearn.concepts.pack import Probe
from sae_unlearn.models.hooks import _unwrap, decoder_body

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
    inner = _unwrap(model)
    logits = inner.get_output_embeddings()(hidden[rows, cols]).float()
    cap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def option_logprobs(model: Any, tokenizer: Any, probes: Sequence[Probe], batch_size: int = 32) -> list[list[float]]:
    """Mean log-probability per token of each option (in probe.options order)."""
    device = next(model.parameters()).device
    items = []
    for pi, probe in enumerate(probes):
        prompt_ids = tokenizer(question_prompt(probe)).input_ids
        for oi, option in enumerate(probe.options):
            opt_ids = tokenizer(" " + option, add_special_tokens=False).input_ids
            items.append((pi, oi, prompt_ids + opt_ids, len(prompt_ids), len(opt_ids)))
    scores = [[0.0] * len(p.options) for p in probes]
    pad = tokenizer.pad_token_id
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(it[2]) for it in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows, cols, targets = [], [], []
        for r, (_, _, seq, n_prompt, n_opt) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            for j in range(n_opt):
                rows.append(r)
                cols.append(n_prompt - 1 + j)
                targets.append(seq[n_prompt + j])
        logits = logits_at(model, ids.to(device), mask.to(device), torch.tensor(rows), torch.tensor(cols))
        logp = torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)].cpu()
        offset = 0
        for pi, oi, _, _, n_opt in chunk:
            scores[pi][oi] = float(logp[offset : offset + n_opt].mean())
            offset += n_opt
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


def accuracy(correct: Sequence[bool] | np.ndarray) -> Accuracy:
    values = np.asarray(correct, dtype=bool)
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
            entry["letter"] = accuracy(letter_right[idx, 0]).to_dict()
            entry["letter_all_permutations"] = accuracy(letter_right[idx].all(1)).to_dict()
        out["rings"][ring] = entry
    return out
