"""The fluency check of adapter training: greedy continuations of concept prompts, scored by the base
model (the adapter disabled) the way evaluation scores them, against the base model's own continuations.
`AdapterTrainer` reads it every `fluency_every` steps and stops early when fluency breaks."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sae_unlearn.models.generation import generate
from sae_unlearn.text_metrics import fluency_metrics

log = logging.getLogger(__name__)


@dataclass
class FluencyReading:
    ratio: float  # base-model perplexity of the adapted model's continuations / of the base's own
    repetition: float  # share of repeated word 3-grams in the adapted model's continuations


class FluencyCheck:
    """Greedy continuations of concept prompts, scored as in evaluation (`fluency_metrics`, 32 tokens):
    the base model's perplexity of them relative to its own continuations, and their repeated-3-gram
    share."""

    def __init__(self, peft_model: Any, tokenizer: Any, prompts: list[str], new_tokens: int = 32) -> None:
        self.tokenizer, self.prompts, self.new_tokens = tokenizer, prompts, new_tokens
        with peft_model.disable_adapter():
            base = fluency_metrics(peft_model, tokenizer, prompts, generate(peft_model, tokenizer, prompts, new_tokens))
        self.base_own_ppl, self.base_repetition = base["base_model_ppl"], base["repeated_3gram_share"]

    def read(self, peft_model: Any) -> FluencyReading:
        was_training = peft_model.training
        peft_model.eval()
        texts = generate(peft_model, self.tokenizer, self.prompts, self.new_tokens)
        with peft_model.disable_adapter():
            metrics = fluency_metrics(peft_model, self.tokenizer, self.prompts, texts)
        peft_model.train(was_training)
        log.info(
            "fluency check: %s",
            " | ".join(re.sub(r"\s+", " ", p + t)[:70] for p, t in zip(self.prompts, texts, strict=True)),
        )
        return FluencyReading(metrics["base_model_ppl"] / self.base_own_ppl, metrics["repeated_3gram_share"])
