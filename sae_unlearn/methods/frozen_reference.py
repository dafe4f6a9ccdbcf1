"""The frozen model's hidden states per text (the adapter disabled), kept after the first pass so later
epochs of adapter training skip that forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sae_unlearn.models.batch import Batch, Hidden, hidden_at_layers


class FrozenReference:
    """Hidden states of the frozen model (adapter disabled) per text, kept after the first pass over it:
    later epochs reuse them instead of a forward pass of the frozen model. With right
    padding and causal attention a text's states do not depend on its batch. Texts past `max_bytes`
    are not kept (they are recomputed)."""

    def __init__(self, layers: Sequence[int] | None, final: bool = False, max_bytes: int = 2 << 30) -> None:
        self.layers, self.final, self.max_bytes = layers, final, max_bytes
        self.store: dict[str, Hidden] = {}
        self.bytes = 0

    def clear(self) -> None:
        self.store, self.bytes = {}, 0

    def __call__(self, model: Any, texts: Sequence[str], batch: Batch) -> Hidden:
        if all(t in self.store for t in texts):
            return self._assemble([self.store[t] for t in texts], batch.input_ids.shape[1])
        with model.disable_adapter(), torch.no_grad():
            out = hidden_at_layers(model, batch, self.layers, final=self.final)
        for i, (text, n) in enumerate(zip(texts, batch.attention_mask.sum(-1).tolist(), strict=True)):
            row = Hidden(
                {layer: h[i, :n].clone() for layer, h in out.hidden.items()},
                out.final[i, :n].clone() if out.final is not None else None,
            )
            size = sum(t.numel() * t.element_size() for t in [*row.hidden.values(), row.final] if t is not None)
            if text not in self.store and self.bytes + size <= self.max_bytes:
                self.store[text], self.bytes = row, self.bytes + size
        return out

    @staticmethod
    def _assemble(rows: list[Hidden], width: int) -> Hidden:
        def pad(parts: list[torch.Tensor]) -> torch.Tensor:
            out = parts[0].new_zeros(len(parts), width, parts[0].shape[-1])
            for i, part in enumerate(parts):
                out[i, : part.shape[0]] = part
            return out

        hidden = {layer: pad([r.hidden[layer] for r in rows]) for layer in rows[0].hidden}
        final = pad([r.final for r in rows]) if rows[0].final is not None else None  # type: ignore[misc]
        return Hidden(hidden, final)
