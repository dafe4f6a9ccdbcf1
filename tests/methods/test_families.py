"""End to end on tiny random models of the Gemma 2, Llama and GPT-2 layouts with synthetic SAEs in
SAELens format (JumpReLU, TopK with layer-norm input normalisation, standard, gated), one of them on
the last block, and tokenizers with and without BOS: features -> crisp (published and ablation),
clamp, refusal clamp, ablate -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.evaluation.evaluate import EvalConfig, evaluate
from sae_unlearn.features import find_features, make_strategy
from sae_unlearn.features.statistics import compute_stats, encode_valid_tokens, iter_batches
from sae_unlearn.methods import apply, unlearn
from sae_unlearn.methods.interventions import Intervention, LayerEdit, install
from sae_unlearn.models.hooks import capture_resid_post, token_policy, valid_token_mask
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.loading import load_saes_from_spec
from tests.conftest import FORGET, RETAIN, make_tokenizer, tiny_model
from tests.saes.synthetic import silence_feature, synthetic_sae

N_LAYERS = 3
# family -> (SAE architecture per layer, tokenizer adds BOS); layer 2 is the last block
SETUPS = {
    "gemma2": ({1: "jumprelu", 2: "jumprelu"}, True),
    "llama": ({1: "topk_ln", 2: "topk_ln"}, False),
    "gpt2": ({1: "standard", 2: "gated"}, False),
}
SILENT = 0  # a latent silenced in every SAE: it fires on no token
FAST = EvalConfig(
    probe_split="all", adversarial=False, relearn=False, fluency_tokens=4, max_ppl_texts=2, max_probes_per_ring=1
)


def _setup(family: str, root: Path) -> tuple[LoadedModel, str]:
    archs, with_bos = SETUPS[family]
    tokenizer = make_tokenizer(with_bos)
    model = tiny_model(family, len(tokenizer), n_layers=N_LAYERS).requires_grad_(False)
    loaded = LoadedModel(model, tokenizer, f"tiny-{family}", f"tiny-{family}", 0.0)
    for layer, arch in archs.items():
        sae = synthetic_sae(arch, layer, seed=layer)
        silence_feature(sae, SILENT)
        sae.save_model(str(root / "saes" / f"blocks.{layer}.hook_resid_post"))
    return loaded, str(root / "saes")


def test_token_policy_drops_position_zero_without_bos() -> None:
    with_bos, without = make_tokenizer(True), make_tokenizer(False)
    texts = ["The wizard Zorbo lives", "The farmer"]
    for tok in (with_bos, without):
        tok.padding_side = "right"
        enc = tok(texts, return_tensors="pt", padding=True)
        mask = valid_token_mask(enc.input_ids, enc.attention_mask, token_policy(tok))
        assert not mask[:, 0].any() and mask.sum() == enc.attention_mask.sum() - 2  # BOS, or the first token
        kept = valid_token_mask(enc.input_ids, enc.attention_mask, token_policy(tok, keep_first=True))
        assert kept[:, 0].all() == (tok is without)
    without.padding_side = "left"
    enc = without(texts, return_tensors="pt", padding=True)
    mask = valid_token_mask(enc.input_ids, enc.attention_mask, token_policy(without))
    first = enc.attention_mask.int().argmax(-1)
    assert not mask[torch.arange(2), first].any() and mask.sum() == enc.attention_mask.sum() - 2


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_statistics_equal_counts_from_saelens_encode(family: str, tmp_path: Path) -> None:
    loaded, spec = _setup(family, tmp_path)
    saes = load_saes_from_spec(spec)
    texts = FORGET[:4]
    stats = compute_stats(loaded, saes, texts, RETAIN[:2], batch_size=2, max_length=32, use_cache=False)
    policy = token_policy(loaded.tokenizer)
    for s in saes:
        counts, n = torch.zeros(s.d_sae), 0
        for batch in iter_batches(texts, loaded.tokenizer, 2, 32):
            acts = capture_resid_post(loaded.model, batch["input_ids"], batch["attention_mask"], [s.layer])
            mask = valid_token_mask(batch["input_ids"], batch["attention_mask"], policy)
            z = s.sae.encode(acts[s.layer][mask])
            counts += (z > 0).sum(0)
            n += int(mask.sum())
        assert stats[s.layer].forget_tokens == n
        assert torch.equal(stats[s.layer].forget_count, counts) and counts[SILENT] == 0
        # chunks of latents give the same latents as one dense encode
        batch = next(iter_batches(texts, loaded.tokenizer, 2, 32))
        chunked = encode_valid_tokens(loaded, [s], batch, chunk_latents=16)[s.layer]
        if isinstance(chunked, list):  # not TopK
            assert len(chunked) == s.d_sae // 16
            acts = capture_resid_post(loaded.model, batch["input_ids"], batch["attention_mask"], [s.layer])
            x = acts[s.layer][valid_token_mask(batch["input_ids"], batch["attention_mask"], policy)]
            torch.testing.assert_close(torch.cat(chunked, -1), s.sae.encode(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_features_each_method_and_evaluate(family: str, tmp_path: Path) -> None:
    loaded, spec = _setup(family, tmp_path)
    pack = load_pack(_pack(tmp_path / "pack"))
    saes = load_saes_from_spec(spec)
    selection = find_features(
        loaded, saes, pack, make_strategy("crisp", k=3, min_ratio=0.0), batch_size=4, max_length=32
    )
    assert set(selection.by_layer()) <= {1, 2} and selection.examples
    assert SILENT not in [f.index for f in selection.features]
    ids = loaded.tokenizer(["The wizard Zorbo lives in the tower"], return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = loaded.model(input_ids=ids).logits
        silent = Intervention("clamp", loaded.spec, spec, [LayerEdit(2, [SILENT], "clamp", value=-100.0)])
        with install(loaded.model, saes, silent, token_policy(loaded.tokenizer)):
            assert torch.equal(loaded.model(input_ids=ids).logits, base_logits)  # bit-identical

    crisp = {"steps": 2, "batch_size": 2, "max_length": 32, "fluency_every": 0, "checkpoint_every": 0, "lr": 1e-2}
    runs = {
        "crisp-published": ("crisp", {**crisp, "objective": "published"}),
        "crisp-ablation": ("crisp", {**crisp, "retain_kl_positions": 4}),
        "clamp": ("clamp", {"value": -5.0}),
        "refusal": ("clamp", {"refusal_feature": f"2:{SILENT + 1}", "refusal_value": 5.0}),
        "ablate": ("ablate", {"scale": -3.0}),
    }
    for name, (method, options) in runs.items():
        run = unlearn(
            method, loaded, pack, tmp_path / name, options=options, saes=saes, sae_spec=spec, features=selection
        )
        with torch.no_grad(), apply(loaded, run) as model:
            changed = model(input_ids=ids).logits
        assert torch.isfinite(changed).all() and not torch.equal(changed, base_logits), name
        result = evaluate(loaded, pack, run, cfg=FAST)
        assert result["method"] == method and result["reactivation"] is not None, name
        json.dumps(result)
        with torch.no_grad():
            assert torch.equal(loaded.model(input_ids=ids).logits, base_logits)  # undone after each run


def _pack(root: Path) -> Path:
    from tests.conftest import write_pack

    return write_pack(root)


def test_edit_hooks_leave_position_zero_without_bos(tmp_path: Path) -> None:
    loaded, spec = _setup("llama", tmp_path)
    saes = load_saes_from_spec(spec)
    ids = loaded.tokenizer(["The wizard Zorbo lives in the tower"], return_tensors="pt").input_ids
    everything = Intervention("clamp", loaded.spec, spec, [LayerEdit(1, list(range(1, 96)), "clamp", value=-3.0)])
    with torch.no_grad():
        before = capture_resid_post(loaded.model, ids, None, [1, 2], stop_early=False)
        with install(loaded.model, saes, everything, token_policy(loaded.tokenizer)):
            during = capture_resid_post(loaded.model, ids, None, [1, 2], stop_early=False)
    assert torch.equal(during[1][:, 0], before[1][:, 0])  # the attention sink is never edited
    assert not torch.equal(during[1][:, 1:], before[1][:, 1:])
