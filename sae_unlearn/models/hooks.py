"""Residual-stream hook points for any decoder-only Hugging Face model.

`blocks.L.hook_resid_post` (SAELens/TransformerLens naming) is the output of decoder block L,
which Hugging Face returns as `hidden_states[L + 1]`. This module is the one place that maps
hook names to HF modules; everything else asks it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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

EditFn = Callable[[torch.Tensor, "CallTokens"], torch.Tensor]


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

    Gradients flow if the caller enables them (used by CRISP's losses). The captures come back on the
    device of `input_ids`, wherever a sharded model (--device-map) ran the block.
    """
    return _capture(model, input_ids, attention_mask, layers, stop_early)[0]


def capture_resid_post_and_final(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layers: Sequence[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({layer: resid_post}, final normed hidden state) from one full pass of the body.

    The resid_post of every layer, the last block's included, is the block's output, as in
    `capture_resid_post`; Hugging Face's `hidden_states[-1]` is after the final norm in most models
    and is never used for an SAE layer. The final state is the body's `last_hidden_state`.
    """
    captured, final = _capture(model, input_ids, attention_mask, layers, stop_early=False)
    assert final is not None
    return captured, final


def _capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Sequence[int],
    stop_early: bool,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    if layers:
        check_layers(model, layers)
    blocks = decoder_blocks(model)
    deepest = max(layers) if layers else -1
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[layer] = _block_output(output).to(input_ids.device)  # a no-op unless sharded
            if stop_early and layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in sorted(set(layers))]
    final = None
    try:
        out = decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        final = out.last_hidden_state.to(input_ids.device)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured, final


@dataclass
class CallTokens:
    """The tokens of one forward call, as an edit hook sees them."""

    input_ids: torch.Tensor | None  # None when the caller passed embeddings
    attention_mask: torch.Tensor | None
    starts_sequence: bool  # the call holds position 0 (no KV cache before it)


@contextlib.contextmanager
def edit_resid_post(model: nn.Module, edits: dict[int, EditFn]) -> Iterator[None]:
    """Replace the resid_post of the given blocks by `fn(hidden, tokens)` while inside the block.

    `tokens` (CallTokens) are the ids and attention mask fed to the body in this call, and whether
    the call starts the sequences (so an edit can skip BOS, padding and position 0). Hooks are
    removed on exit, leaving the model bit-identical.
    """
    check_layers(model, list(edits))
    blocks = decoder_blocks(model)
    state = {"tokens": CallTokens(None, None, True)}

    def remember(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache_position = kwargs.get("cache_position")
        past = kwargs.get("past_key_values")
        if isinstance(cache_position, torch.Tensor) and cache_position.numel():
            starts = int(cache_position.reshape(-1)[0]) == 0
        else:
            starts = past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == 0)
        attn = kwargs.get("attention_mask")
        state["tokens"] = CallTokens(
            ids if isinstance(ids, torch.Tensor) else None,
            attn if isinstance(attn, torch.Tensor) and attn.dim() == 2 else None,
            starts,
        )

    def make_hook(fn: EditFn) -> Callable[..., Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            return _replace_output(output, fn(_block_output(output), state["tokens"]))

        return hook

    handles = [decoder_body(model).register_forward_pre_hook(remember, with_kwargs=True)]
    handles += [blocks[layer].register_forward_hook(make_hook(fn)) for layer, fn in edits.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class TokenPolicy:
    """Which positions count in statistics, selection, losses and edits: never padding or the
    special ids (BOS, pad); and never position 0 when the tokenizer adds no BOS, since that first
    token is the attention sink with outsized activations (the CRISP reference always drops it),
    unless `keep_first`."""

    special_ids: tuple[int, ...] = ()
    drop_first: bool = False


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token first when encoding text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def token_policy(tokenizer: Any, keep_first: bool = False) -> TokenPolicy:
    """The positions policy of a tokenizer: see TokenPolicy."""
    return TokenPolicy(tuple(special_token_ids(tokenizer)), drop_first=not keep_first and not adds_bos(tokenizer))


def valid_token_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    policy: TokenPolicy | Sequence[int],
    starts_sequence: bool = True,
) -> torch.Tensor:
    """True on tokens that count: the one place masks are built (see TokenPolicy). A plain list of
    ids is the policy that masks those ids and padding only. `starts_sequence` False: the call
    continues cached sequences, so it holds no position 0."""
    if not isinstance(policy, TokenPolicy):
        policy = TokenPolicy(tuple(policy))
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    mask = attended.clone()
    if policy.special_ids:
        mask &= ~torch.isin(input_ids, torch.tensor(list(policy.special_ids), device=input_ids.device))
    if policy.drop_first and starts_sequence and mask.numel():
        first = attended.int().argmax(-1)  # the first attended position of each row (left or right padding)
        mask[torch.arange(mask.shape[0], device=mask.device), first] = False
    return mask


def call_token_mask(tokens: CallTokens, policy: TokenPolicy) -> torch.Tensor | None:
    """valid_token_mask of one forward call seen by an edit hook; None when its ids are unknown."""
    if tokens.input_ids is None:
        return None
    attn = tokens.attention_mask
    if attn is not None and attn.shape != tokens.input_ids.shape:
        attn = attn[:, -tokens.input_ids.shape[1] :]  # cached generation: the mask covers past tokens too
    return valid_token_mask(tokens.input_ids, attn, policy, tokens.starts_sequence)


def special_token_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.bos_token_id, tokenizer.pad_token_id}
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        ids.discard(tokenizer.eos_token_id)  # padding is masked by attention_mask; eos as text stays
    return sorted(i for i in ids if i is not None)


def lm_head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of final hidden states (softcapped where the model does)."""
    inner = _unwrap(model)
    # contiguous: a strided bfloat16 input sends torch's CPU linear down a far slower path
    logits = inner.get_output_embeddings()(hidden.contiguous()).float().to(hidden.device)  # sharded: lm_head elsewhere
    cap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
