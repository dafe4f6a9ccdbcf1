from __future__ import annotations

import pytest
import torch

from sae_unlearn.errors import UserError
from sae_unlearn.models.hooks import (
    CallTokens,
    capture_resid_post,
    decoder_blocks,
    edit_resid_post,
    hook_name,
    parse_hook_name,
    special_token_ids,
    valid_token_mask,
)
from tests.conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_equals_hidden_states_l_plus_1(family: str) -> None:
    model = tiny_model(family, vocab_size=300)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        captured = capture_resid_post(model, ids, None, [0, 1, 2])
    for layer in (0, 1, 2):  # the last block's hidden_states entry is after the final norm in some models
        torch.testing.assert_close(captured[layer], hidden[layer + 1], rtol=0, atol=0)


def test_capture_stops_after_deepest_layer() -> None:
    model = tiny_model("llama", 300)
    ran = []
    for i, block in enumerate(decoder_blocks(model)):
        block.register_forward_hook(lambda *_a, i=i: ran.append(i))
    head_calls = []
    model.lm_head.register_forward_hook(lambda *_a: head_calls.append(1))
    capture_resid_post(model, torch.randint(3, 300, (1, 5)), None, [1])
    assert ran == [0, 1] and head_calls == []


def test_edit_changes_only_its_layer_and_is_removed() -> None:
    model = tiny_model("gemma3_text", 300)
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        before = capture_resid_post(model, ids, None, [0, 1, 2], stop_early=False)
        out_before = model(input_ids=ids).logits
        with edit_resid_post(model, {1: lambda h, _ids: h + 1.0}):
            during = capture_resid_post(model, ids, None, [0, 1, 2], stop_early=False)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(during[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(during[1], before[1] + 1.0)
    assert not torch.equal(during[2], before[2])
    assert torch.equal(out_before, after)


def test_edit_hook_sees_token_ids() -> None:
    model = tiny_model("llama", 300)
    seen = {}
    ids = torch.randint(3, 300, (1, 4))

    def fn(h: torch.Tensor, tokens: CallTokens) -> torch.Tensor:
        seen.setdefault("calls", []).append(tokens)
        return h

    with torch.no_grad(), edit_resid_post(model, {0: fn}):
        model(input_ids=ids)
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=2)
    first, *generation = seen["calls"]
    assert torch.equal(first.input_ids, ids) and first.starts_sequence
    assert generation[0].starts_sequence and not generation[-1].starts_sequence  # the prompt, then cached steps


def test_masks_bos_and_padding(tokenizer) -> None:
    enc = tokenizer(["a b c", "a"], return_tensors="pt", padding=True)
    mask = valid_token_mask(enc.input_ids, enc.attention_mask, special_token_ids(tokenizer))
    assert not mask[:, 0].any()  # BOS
    assert mask.sum() == enc.attention_mask.sum() - 2


def test_hook_names_and_bad_layers() -> None:
    assert parse_hook_name(hook_name(7)) == 7
    with pytest.raises(UserError, match="unsupported hook point"):
        parse_hook_name("blocks.3.hook_mlp_out")
    with pytest.raises(UserError, match="out of range"):
        capture_resid_post(tiny_model("llama", 300), torch.ones(1, 3, dtype=torch.long), None, [9])


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_last_block_resid_post_is_the_block_output_not_the_normed_state(family: str) -> None:
    from sae_unlearn.models.batch import Batch, hidden_at_layers

    model = tiny_model(family, vocab_size=300)
    last = len(decoder_blocks(model)) - 1
    ids = torch.randint(3, 300, (2, 6))
    final_norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    seen = {}
    final_norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("into_norm", args[0]))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        captured = capture_resid_post(model, ids, None, [last])[last]
        batch = Batch(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
        both = hidden_at_layers(model, batch, [1, last], final=True)
    torch.testing.assert_close(captured, seen["into_norm"], rtol=0, atol=0)  # the block output
    torch.testing.assert_close(both.hidden[last], captured, rtol=0, atol=0)  # one path, with or without final
    torch.testing.assert_close(both.final, out.hidden_states[-1], rtol=0, atol=0)  # the final normed state
    assert not torch.allclose(captured, out.hidden_states[-1])
