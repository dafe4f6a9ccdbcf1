"""Options of the persistent methods meant to make unlearning survive relearning (docs/robustness.md).

- **Sharpness-aware unlearning** (Fan et al. 2025, "Towards LLM Unlearning Resilient to Relearning
  Attacks: A Sharpness-Aware Minimization Perspective and Beyond"; the authors' `SAMIterativeUnlearner`):
  the trainable weights are moved by rho * g/|g| along the forget term's gradient g (|g| the global L2
  norm), the forget gradient is taken there, the weights are restored, and the result is added to the
  retain terms' gradient taken at the unperturbed weights.
- **Disruption masking and unlearning-gradient normalisation** (Sondej et al. 2025, MUDMAN): a running
  mean of the retain gradient (momentum `retain_momentum`, weight 1 - momentum on the new gradient) is
  kept; an element of the unlearning gradient is applied only where its sign agrees with that mean's,
  and the unlearning gradient is rescaled to a fixed global norm (measured before masking, as in the
  reference code). MUDMAN's meta-learning adversary is here too: a fork of the trainable weights,
  refreshed every `adversary_every` steps, takes one SGD step per step toward restoring the frozen
  model's hidden states on forget text (the reference relearns with the LM loss; the representation-level
  objective avoids the vocabulary-sized output layer), and the unlearning gradient is taken at its weights.
- **Embedding rows of the concept's tokens** (`concept_tokens`): the tokens most over-represented in the
  forget training text relative to the retain training text, whose input-embedding rows PEFT then trains
  beside the LoRA matrices (`trainable_token_indices`; saved in the adapter, merged by `merge_and_unload`).
- **SAE-native weight edit** (in the spirit of PISCES, arXiv 2505.22586): the selected features' decoder
  directions are projected out of what chosen blocks' output matrices (attention output, MLP down
  projection) write into the residual stream. Stored as `weight_edit.safetensors` in the run directory
  (one orthonormal basis per edited module) and applied after the adapter: as output hooks by
  `methods.apply`, in the weights when the run is merged (`export --merged`, relearning attacks).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae_unlearn.errors import UserError
from sae_unlearn.models.hooks import decoder_blocks

WEIGHT_EDIT_FILE = "weight_edit.safetensors"

# --------------------------------------------------------------------------------------- gradients


def flat_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors (as one vector)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def grads_of(loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = False) -> list[torch.Tensor]:
    """d loss / d params, zeros where a parameter does not reach the loss."""
    out = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, out, strict=True)]


def sam_gradient(
    params: Sequence[torch.Tensor],
    forget_fn: Callable[[], torch.Tensor],
    grad: Sequence[torch.Tensor],
    rho: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The forget term's gradient at the weights moved by rho * grad/|grad| (sharpness-aware
    unlearning). The weights are restored by copy, bit for bit, even if `forget_fn` raises.
    Returns (gradient at the perturbed weights, the forget loss there)."""
    norm = flat_norm(grad)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            scale = rho / (norm + 1e-12)
            for p, g in zip(params, grad, strict=True):
                p.add_(g.to(p.dtype) * scale.to(p.dtype))
        loss = forget_fn()
        perturbed = grads_of(loss, params)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return perturbed, loss.detach()


def disruption_mask(grad: torch.Tensor, retain_momentum: torch.Tensor) -> torch.Tensor:
    """MUDMAN's mask: keep an unlearning-gradient element only where its sign agrees with the retain
    gradient's running mean (both as gradients to descend); zero elsewhere, zeros included."""
    return grad * (torch.sign(grad) == torch.sign(retain_momentum)).to(grad.dtype)


class GradientStep:
    """One training step's gradients from separate unlearning and retain terms: SAM on the unlearning
    term, then disruption masking and normalisation of it, then `param.grad = unlearn + retain`.

    `loss_fn.parts(model, step)` -> (unlearn, retain, terms); `loss_fn.forget_term(model, step)` -> unlearn
    at the current weights (the same batch: batches are deterministic in the step)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        sam_rho: float = 0.0,
        mask: bool = False,
        retain_momentum: float = 0.9,
        unlearn_grad_norm: float | None = None,
        adversary_every: int = 0,
        adversary_lr: float = 1e-2,
    ) -> None:
        if sam_rho < 0:
            raise UserError(f"sam_rho {sam_rho} must be >= 0", "e.g. sam_rho=0.05")
        if not 0 <= retain_momentum < 1:
            raise UserError(f"retain_momentum {retain_momentum} must be in [0, 1)", "e.g. 0.9")
        if unlearn_grad_norm is not None and unlearn_grad_norm <= 0:
            raise UserError(f"unlearn_grad_norm {unlearn_grad_norm} must be > 0", "or leave it unset")
        if adversary_every < 0 or (adversary_every and sam_rho > 0):
            raise UserError("adversary_every must be >= 0 and cannot be combined with sam_rho", "choose one")
        self.params = list(params)
        self.sam_rho, self.mask, self.beta, self.norm = sam_rho, mask, retain_momentum, unlearn_grad_norm
        self.momentum = [torch.zeros_like(p) for p in self.params] if mask else []
        self.adversary_every, self.adversary_lr = adversary_every, adversary_lr
        self.adversary: list[torch.Tensor] | None = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"retain_momentum.{i}": m.clone().contiguous() for i, m in enumerate(self.momentum)}
        out.update({f"adversary.{i}": a.clone().contiguous() for i, a in enumerate(self.adversary or [])})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, m in enumerate(self.momentum):
            if f"retain_momentum.{i}" in tensors:
                m.copy_(tensors[f"retain_momentum.{i}"])
        if "adversary.0" in tensors:
            self.adversary = [tensors[f"adversary.{i}"].clone() for i in range(len(self.params))]

    def adversary_gradient(self, model: Any, loss_fn: Any, step: int) -> tuple[list[torch.Tensor], float]:
        """MUDMAN's meta-learning step: the unlearning gradient at the adversary's weights, and one SGD
        step of the adversary on the relearning term. The trainable weights are restored by copy."""
        if self.adversary is None or step % self.adversary_every == 0:
            self.adversary = [p.detach().clone() for p in self.params]
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, a in zip(self.params, self.adversary, strict=True):
                    p.copy_(a)
            unlearn, relearn = loss_fn.adversary_terms(model, step)
            g_unlearn = grads_of(unlearn, self.params, retain_graph=True)
            g_adversary = grads_of(relearn, self.params)
            for a, g in zip(self.adversary, g_adversary, strict=True):
                a.sub_(g.to(a.dtype), alpha=self.adversary_lr)
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)
        return g_unlearn, float(relearn.detach())

    def __call__(self, model: Any, loss_fn: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        unlearn, retain, terms = loss_fn.parts(model, step)
        g_unlearn = grads_of(unlearn, self.params)
        g_retain = grads_of(retain, self.params)
        if self.adversary_every:
            g_unlearn, terms["adversary_relearn"] = self.adversary_gradient(model, loss_fn, step)
        if self.sam_rho > 0:
            g_unlearn, perturbed = sam_gradient(
                self.params, lambda: loss_fn.forget_term(model, step), g_unlearn, self.sam_rho
            )
            terms["unlearn_sam"] = float(perturbed)
        raw_norm = flat_norm(g_unlearn)
        terms["grad_norm_unlearn"], terms["grad_norm_retain"] = float(raw_norm), float(flat_norm(g_retain))
        if self.mask:
            kept = total = 0
            for i, (g, r) in enumerate(zip(g_unlearn, g_retain, strict=True)):
                self.momentum[i].mul_(self.beta).add_(r, alpha=1 - self.beta)
                g_unlearn[i] = disruption_mask(g, self.momentum[i])
                kept += int((g_unlearn[i] != 0).sum())
                total += g.numel()
            terms["mask_kept"] = kept / max(total, 1)
        if self.norm is not None:
            scale = self.norm / (raw_norm + 1e-12)
            g_unlearn = [g * scale for g in g_unlearn]
        for p, gu, gr in zip(self.params, g_unlearn, g_retain, strict=True):
            p.grad = (gu + gr).to(p.dtype)
        return (unlearn + retain).detach(), terms


# --------------------------------------------------------------------------------------- concept tokens


def concept_tokens(
    tokenizer: Any, forget: Sequence[str], retain: Sequence[str], n: int, min_count: int = 3, min_chars: int = 3
) -> list[int]:
    """The `n` token ids most over-represented in `forget` relative to `retain` (smoothed log ratio of
    relative frequencies), among tokens seen at least `min_count` times in `forget`; special tokens and
    tokens of fewer than `min_chars` letters or digits (word pieces such as "or" or " l", common in any
    text) are left out."""
    if n <= 0:
        return []
    f = Counter(t for text in forget for t in tokenizer(text, add_special_tokens=False).input_ids)
    r = Counter(t for text in retain for t in tokenizer(text, add_special_tokens=False).input_ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    f_total, r_total = max(sum(f.values()), 1), max(sum(r.values()), 1)

    def score(t: int) -> float:
        return math.log((f[t] + 1) / f_total) - math.log((r[t] + 1) / r_total)

    candidates = [
        t
        for t, c in f.items()
        if c >= min_count and t not in special and len(re.findall(r"\w", tokenizer.decode([t]) or "")) >= min_chars
    ]
    candidates.sort(key=lambda t: (-score(t), t))
    return sorted(candidates[:n])


# --------------------------------------------------------------------------------------- weight edit


def _output_modules(block: Any, names: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """{name: (module, norm applied to its output or None)} for the block's residual-writing matrices.
    Gemma 2/3 put a norm on each sublayer's output before the residual add (post_attention_layernorm
    after o_proj, post_feedforward_layernorm after down_proj); Llama-style blocks write directly."""
    sandwich = hasattr(block, "post_feedforward_layernorm")
    out = {}
    for name, module in block.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in names or not hasattr(module, "weight"):
            continue
        norm = None
        if sandwich:
            norm = block.post_attention_layernorm if "attn" in name else block.post_feedforward_layernorm
        out[name] = (module, norm)
    return out


def _norm_scale(norm: Any, d: int, like: torch.Tensor) -> torch.Tensor:
    """The elementwise scale of an RMS norm: its output for an all-ones input (rms 1)."""
    with torch.no_grad():
        return norm(torch.ones(1, d, dtype=like.dtype, device=like.device)).reshape(d).float()


def edit_bases(
    model: Any, directions: dict[int, torch.Tensor], blocks: Sequence[int], modules: Sequence[str]
) -> dict[str, torch.Tensor]:
    """{"<block>.<module path>": U [d_model, k]} orthonormal bases to project out of each module's output.

    `directions[layer]`: decoder rows [k, d_model] of the selected features at SAE layer `layer`. Block b
    gets the directions of the nearest SAE layer at or above it (what it writes reaches that layer). With
    a norm on the module's output (scale s), the output x is made orthogonal to s * d, so that the normed
    write s * x / rms(x) is orthogonal to d."""
    all_blocks = decoder_blocks(model)
    layers = sorted(directions)
    bases: dict[str, torch.Tensor] = {}
    for b in blocks:
        above = [layer for layer in layers if layer >= b]
        if not 0 <= b < len(all_blocks) or not above:
            raise UserError(
                f"weight edit block {b}: no SAE layer at or above it (SAE layers {layers})",
                "choose blocks at or below the deepest SAE layer",
            )
        d = directions[above[0]].float()
        found = _output_modules(all_blocks[b], modules)
        if not found:
            raise UserError(f"block {b} has none of the modules {list(modules)}", "e.g. o_proj down_proj")
        for name, (module, norm) in found.items():
            dirs = d if norm is None else d * _norm_scale(norm, d.shape[-1], module.weight)
            q, r = torch.linalg.qr(dirs.T.cpu())
            keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max().clamp_min(1e-30)
            bases[f"{b}.{name}"] = q[:, keep].contiguous()
    return bases


def save_weight_edit(run_dir: Path, bases: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in bases.items()}, str(run_dir / WEIGHT_EDIT_FILE))


def load_weight_edit(run_dir: Path) -> dict[str, torch.Tensor] | None:
    path = Path(run_dir) / WEIGHT_EDIT_FILE
    return load_file(str(path)) if path.exists() else None


def _resolve(model: Any, key: str) -> Any:
    block, name = key.split(".", 1)
    blocks = decoder_blocks(model)
    try:
        return blocks[int(block)].get_submodule(name)
    except (AttributeError, IndexError) as e:
        raise UserError(f"weight edit: the model has no module {key}", "it was made for another base model") from e


def _out_dim_first(module: Any) -> bool:
    """nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]."""
    return type(module).__name__ != "Conv1D"


def project_weights(model: Any, bases: dict[str, torch.Tensor]) -> None:
    """Apply the edit in the weights: W <- (I - U U^T) W, bias likewise (for merged models)."""
    with torch.no_grad():
        for key, u in bases.items():
            module = _resolve(model, key)
            w = module.weight
            u = u.to(w.device, torch.float32)
            wf = w.float()
            if _out_dim_first(module):
                w.copy_((wf - u @ (u.T @ wf)).to(w.dtype))
            else:
                w.copy_((wf - (wf @ u) @ u.T).to(w.dtype))
            bias = getattr(module, "bias", None)
            if bias is not None:
                bf = bias.float()
                bias.copy_((bf - u @ (u.T @ bf)).to(bias.dtype))


@contextlib.contextmanager
def projected_outputs(model: Any, bases: dict[str, torch.Tensor]) -> Iterator[Any]:
    """Apply the edit as output hooks (reversible; covers an unmerged adapter's contribution too)."""
    handles = []

    def hook(u: torch.Tensor) -> Callable[..., torch.Tensor]:
        def fn(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            uu = u.to(output.device, output.dtype)
            return output - (output @ uu) @ uu.T

        return fn

    try:
        for key, u in bases.items():
            handles.append(_resolve(model, key).register_forward_hook(hook(u)))
        yield model
    finally:
        for h in handles:
            h.remove()
