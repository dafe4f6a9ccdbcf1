"""Robustness: a relearning attack (a small fine-tune on forget paragraphs disjoint from those used to
unlearn). Adversarial re-asking of target probes lives in adversarial.py."""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sae_unlearn.methods.persistent import tokenize

log = logging.getLogger(__name__)


def relearning_attack(
    attack_model: Any,
    tokenizer: Any,
    paragraphs: Sequence[str],
    measure: Callable[[Any], float],
    steps: int = 20,
    lr: float = 3e-4,
    batch_size: int = 4,
    r: int = 8,
    eval_at: Sequence[int] = (0, 10, 20),
    seed: int = 0,
    max_length: int = 128,
    initial: float | None = None,
) -> dict[str, Any]:
    """Fine-tune a copy of the (unlearned) model with LoRA on every projection; measure along the way.

    `attack_model` is consumed (trained in place); `measure(model)` returns target accuracy;
    `initial` is that accuracy before the attack when it is already known.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    names = {n.rsplit(".", 1)[-1] for n, m in attack_model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = sorted(n for n in names if n.endswith(("proj", "c_attn", "c_proj", "c_fc")) and n != "lm_head")
    model = get_peft_model(attack_model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    device = next(model.parameters()).device
    rng = random.Random(seed)
    curve = []
    for step in range(steps + 1):
        if step in eval_at:
            model.eval()
            acc = initial if step == 0 and initial is not None else measure(model)
            curve.append({"step": step, "target_acc": acc})
        if step == steps:
            break
        model.train()
        batch = tokenize(tokenizer, rng.sample(list(paragraphs), min(batch_size, len(paragraphs))), max_length, device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        valid = batch.valid[:, 1:]
        loss = F.cross_entropy(logits[:, :-1][valid].float(), batch.input_ids[:, 1:][valid])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"steps": steps, "lr": lr, "paragraphs": len(paragraphs), "curve": curve}


def copy_model(model: Any) -> Any:
    """A deep copy that keeps forward hooks (inference-time interventions stay installed)."""
    return copy.deepcopy(model)
