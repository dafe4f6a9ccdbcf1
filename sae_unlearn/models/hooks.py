"""Residual-stream hook points for any decoder-only Hugging Face model.

`blocks.L.hook_resid_post` (SAELens/TransformerLens naming) is the output of decoder block L,
which Hugging Face returns as `hidden_states[L + 1]`. This module is the one place that maps
hook names to HF modules; everything else asks it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sae_unlearn.errors import UserError

HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
# Where the list of decoder blocks lives, by architecture family (PEFT wrappers are unwrapped first).
BLOCK_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
)

EditFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def parse_hook_name(name: str) -> int:
    match = HOOK_RE.match(name)
    if match is None:
        raise UserError(
            f"unsupported hook point {name!r}", "only residual-stream SAEs on blocks.L.hook_resid_post are supported"
        )
    return int(match.group(1))


def _unwrap(model: Any) -> Any:
    """The HF model inside a peft.PeftModel (LoRA layers stay in place, so they still run)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        return get_base()
    return model


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    inner = _unwrap(model)
    for path in BLOCK_PATHS:
        blocks = _get_path(inner, path)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise UserError(
        f"cannot find the decoder blocks of {type(inner).__name__}",
        "supported layouts: Llama/Gemma/Qwen/Mistral (model.layers), GPT-2 (transformer.h), GPT-NeoX",
    )


def decoder_body(model: nn.Module) -> nn.Module:
    """The transformer body without the lm_head (calling it never computes logits)."""
    inner = _unwrap(model)
    for attr in ("model", "transformer", "gpt_neox"):
        body = getattr(inner, attr, None)
        if isinstance(body, nn.Module):
            return body
    raise UserError(f"cannot find the transformer body of {type(inner).__name__}")


def check_layers(model: nn.Module, layers: Sequence[int]) -> None:
    n = len(decoder_blocks(model))
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise UserError(
            f"layer {bad[0]} is out of range: the model has blocks 0..{n - 1}", "choose layers in that range"
        )


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _StopForward(Exception):
    pass


def capture_resid_post(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Sequence[int],
    stop_early: bool = True,
) -> dict[int, torch.Tensor]:
    """Run the body once and return {layer: resid_post of that block}; stops after the deepest layer.

    Gradients flow if the caller enables them (used by CRISP's losses).
    """
    check_layers(model, layers)
    blocks = decoder_blocks(model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[layer] = _block_output(output)
            if stop_early and layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in sorted(set(layers))]
    try:
        decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


@contextlib.contextmanager
def edit_resid_post(model: nn.Module, edits: dict[int, EditFn]) -> Iterator[None]:
    """Replace the resid_post of the given blocks by `fn(hidden, token_ids)` while inside the block.

    `token_ids` are the ids fed to the model in this call (so an edit can skip BOS), or None when
    the caller passed embeddings. Hooks are removed on exit, leaving the model bit-identical.
    """
    check_layers(model, list(edits))
    blocks = decoder_blocks(model)
    state: dict[str, torch.Tensor | None] = {"ids": None}

    def remember_ids(_module: nn.Module, args: tuple[Any, ...]) -> None:
        state["ids"] = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def make_hook(fn: EditFn) -> Callable[..., Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            return _replace_output(output, fn(_block_output(output), state["ids"]))

        return hook

    embed = _unwrap(model).get_input_embeddings()  # type: ignore[operator]
    handles = [embed.register_forward_pre_hook(remember_ids)]
    handles += [blocks[layer].register_forward_hook(make_hook(fn)) for layer, fn in edits.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def valid_token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, special_ids: Sequence[int]
) -> torch.Tensor:
    """True on tokens that count in statistics and losses: not padding, not BOS (or other specials)."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if special_ids:
        mask &= ~torch.isin(input_ids, torch.tensor(list(special_ids), device=input_ids.device))
    return mask


def special_token_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.bos_token_id, tokenizer.pad_token_id}
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        ids.discard(tokenizer.eos_token_id)  # padding is masked by attention_mask; eos as text stays
    return sorted(i for i in ids if i is not None)


def lm_head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of final hidden states (softcapped where the model does)."""
    inner = _unwrap(model)
    # contiguous: a strided bfloat16 input sends torch's CPU linear down a path ~200x slower
    logits = inner.get_output_embeddings()(hidden.contiguous()).float()
    cap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
