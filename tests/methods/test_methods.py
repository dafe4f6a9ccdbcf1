from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_unlearn.errors import UserError
from sae_unlearn.methods import apply, export_merged, method_config, unlearn
from sae_unlearn.methods.crisp import ablation_target, published_unlearn_loss, relative_mse, retain_kl
from sae_unlearn.methods.interventions import Intervention, LayerEdit, install, make_edit_fn
from sae_unlearn.saes.loading import LoadedSAE
from tests.conftest import tiny_sae


def _sae(layer: int = 1) -> LoadedSAE:
    return LoadedSAE(tiny_sae(layer), layer, "tiny")


def test_clamp_changes_only_selected_latents_and_keeps_error_term() -> None:
    s = _sae()
    x = torch.randn(3, 5, 64)
    feats = [int(i) for i in s.sae.encode(x).reshape(-1, 128).sum(0).topk(3).indices]
    edited = make_edit_fn(s, LayerEdit(1, feats, "clamp", value=-7.0))(x, None)
    z, z_new = s.sae.encode(x), s.sae.encode(x).clone()
    sel = z_new[..., feats]
    z_new[..., feats] = torch.where(sel > 0, torch.full_like(sel, -7.0), sel)
    error = x - s.sae.decode(z)
    torch.testing.assert_close(edited, s.sae.decode(z_new) + error, rtol=1e-4, atol=1e-4)
    untouched = (z[..., feats] <= 0).all(-1)  # tokens where no selected feature fired: bit-identical
    assert torch.equal(edited[untouched], x[untouched])


def test_ablate_scales_firing_latents() -> None:
    s = _sae()
    x = torch.randn(2, 4, 64)
    feats = [0, 5, 9]
    edited = make_edit_fn(s, LayerEdit(1, feats, "scale", scale=-3.0))(x, None)
    z = s.sae.encode(x)[..., feats]
    expected = x + ((-3.0 * z - z) @ s.sae.W_dec[feats])
    torch.testing.assert_close(edited, expected, rtol=1e-4, atol=1e-4)


def test_refusal_clamp_sets_the_refusal_feature() -> None:
    s = _sae()
    x = torch.randn(1, 6, 64)
    z = s.sae.encode(x)
    feat = int(z.reshape(-1, 128).sum(0).argmax())
    edited = make_edit_fn(s, LayerEdit(1, [feat], "refusal", value=5.0, refusal_feature=3))(x, None)
    fires = z[..., feat] > 0
    delta = (5.0 - z[..., 3]) * fires
    torch.testing.assert_close(edited, x + delta.unsqueeze(-1) * s.sae.W_dec[3], rtol=1e-4, atol=1e-4)


def test_no_features_and_removal_are_bit_identical(loaded) -> None:
    s = _sae()
    ids = torch.randint(3, 300, (2, 6))
    with torch.no_grad():
        base = loaded.model(input_ids=ids).logits
        with install(loaded.model, [s], Intervention("clamp", "m", "tiny", [LayerEdit(1, [], "clamp")])):
            same = loaded.model(input_ids=ids).logits
        with install(loaded.model, [s], Intervention("clamp", "m", "tiny", [LayerEdit(1, list(range(128)), "clamp")])):
            changed = loaded.model(input_ids=ids).logits
        after = loaded.model(input_ids=ids).logits
    assert torch.equal(base, same) and torch.equal(base, after) and not torch.equal(base, changed)


def test_published_unlearn_loss_by_hand() -> None:
    s = tiny_sae(1, d_in=4, d_sae=3, k=3)
    with torch.no_grad():
        s.W_enc.copy_(torch.eye(4)[:, :3])
        s.b_enc.zero_()
        s.b_dec.zero_()
    x = torch.tensor([[[1.0, 2.0, 3.0, 0.0], [3.0, 0.0, 0.0, 0.0]]])
    active = torch.tensor([[[True], [True]]])
    valid = torch.tensor([[True, True]])
    # token 1: pre = [1,2,3], margin = |alpha * mean| = 1*2 -> feature 1: 2+2 = 4
    # token 2: pre = [3,0,0], margin = 1 -> feature 1: 0+1 = 1; mean over tokens = 2.5
    loss = published_unlearn_loss(s, x, active, torch.tensor([1]), valid, margin_alpha=1.0)
    assert float(loss) == pytest.approx(2.5)
    inactive = torch.tensor([[[True], [False]]])
    assert float(published_unlearn_loss(s, x, inactive, torch.tensor([1]), valid, margin_alpha=1.0)) == pytest.approx(
        4.0
    )


def test_ablation_target_and_relative_mse() -> None:
    s = tiny_sae(1)
    h = torch.randn(2, 3, 64)
    target = ablation_target(s, h, torch.tensor([2, 7]), scale=1.0)
    torch.testing.assert_close(target, h)  # scale 1 = no change
    valid = torch.ones(2, 3, dtype=torch.bool)
    assert float(relative_mse(h, h, valid)) == 0.0
    assert float(relative_mse(2 * h, h, valid)) == pytest.approx(1.0)


def test_retain_kl_by_hand(loaded) -> None:
    h = torch.randn(2, 5, 64)
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 4])
    assert float(retain_kl(loaded.model, h, h, rows, cols)) == pytest.approx(0.0, abs=1e-6)
    moved = h.clone().requires_grad_(True)
    with torch.no_grad():
        moved[0, 1] += 3.0
    kl = retain_kl(loaded.model, h, moved, rows, cols)
    logits = loaded.model.lm_head(torch.stack([h[0, 1], moved[0, 1]]).detach()).float()
    p, q = torch.log_softmax(logits, -1)
    assert kl.detach().item() == pytest.approx(float((p.exp() * (p - q)).sum()) / 3, rel=1e-4)
    kl.backward()
    assert moved.grad is not None and float(moved.grad[0, 1].abs().sum()) > 0
    assert float(moved.grad[0, 3].abs().sum()) == 0.0  # a position the term does not read


def test_method_options_are_checked() -> None:
    with pytest.raises(UserError, match="unknown method 'forget'"):
        method_config("forget", {})
    with pytest.raises(UserError, match=r"does not apply to method clamp.*belongs to ablate"):
        method_config("clamp", {"scale": -3})
    with pytest.raises(UserError, match="unknown CRISP objective"):
        method_config("crisp", {"objective": "fast"})


def _crisp_options(**kw):
    return {"steps": 4, "batch_size": 2, "max_length": 32, "fluency_every": 0, "checkpoint_every": 2, "lr": 1e-2, **kw}


def test_crisp_run_dir_apply_and_export(setup, tmp_path: Path) -> None:
    loaded, saes, pack, selection, spec = setup
    run = unlearn(
        "crisp", loaded, pack, tmp_path / "run", options=_crisp_options(), saes=saes, sae_spec=spec, features=selection
    )
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "crisp" and (run / "adapter" / "adapter_config.json").exists()
    assert not list(run.rglob("*.pkl")) and not list(run.rglob("*.bin"))
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        base = loaded.model(input_ids=ids).logits
        with apply(loaded, run) as model:
            adapted = model(input_ids=ids).logits
        after = loaded.model(input_ids=ids).logits
    assert not torch.equal(base, adapted) and torch.equal(base, after)
    with pytest.raises(UserError, match="inference-time intervention"):
        run_clamp = unlearn("clamp", loaded, pack, tmp_path / "clamp", saes=saes, sae_spec=spec, features=selection)
        export_merged(loaded, run_clamp, tmp_path / "merged")


def test_crisp_retain_kl_term_is_logged(setup, tmp_path: Path) -> None:
    loaded, saes, pack, selection, spec = setup
    options = _crisp_options(retain_kl_weight=1.0, retain_kl_positions=8)
    run = unlearn(
        "crisp", loaded, pack, tmp_path / "run", options=options, saes=saes, sae_spec=spec, features=selection
    )
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(r["retain_kl"] >= 0 for r in records) and records[-1]["retain_kl"] > 0
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and all(r["seconds"] > 0 for r in records)


@pytest.mark.parametrize("limits", [{"max_fluency_ratio": 0.0}, {"max_repetition_increase": -1.0}])
def test_crisp_fluency_check_stops_and_restores_the_last_fluent_adapter(setup, tmp_path: Path, limits) -> None:
    loaded, saes, pack, selection, spec = setup
    options = _crisp_options(fluency_every=2, steps=6, **limits)
    run = unlearn(
        "crisp", loaded, pack, tmp_path / "run", options=options, saes=saes, sae_spec=spec, features=selection
    )
    result = json.loads((run / "config.json").read_text())["result"]
    assert result["stopped_early"] and result["steps_done"] == 2 and result["last_fluent_step"] == 0
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert "repetition" in records[-1] and "fluency_ratio" in records[-1]
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        base = loaded.model(input_ids=ids).logits
        with apply(loaded, run) as model:  # the untrained adapter was restored: the base model's logits
            torch.testing.assert_close(model(input_ids=ids).logits, base)


def test_crisp_fluency_check_lets_fluent_training_run(setup, tmp_path: Path) -> None:
    loaded, saes, pack, selection, spec = setup
    options = _crisp_options(fluency_every=2, steps=4, max_fluency_ratio=1e9, max_repetition_increase=None)
    run = unlearn(
        "crisp", loaded, pack, tmp_path / "run", options=options, saes=saes, sae_spec=spec, features=selection
    )
    result = json.loads((run / "config.json").read_text())["result"]
    assert not result["stopped_early"] and result["steps_done"] == 4 and result["last_fluent_step"] == 4


def test_crisp_resume_gives_the_same_adapter(setup, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    loaded, saes, pack, selection, spec = setup
    full = unlearn(
        "crisp", loaded, pack, tmp_path / "full", options=_crisp_options(), saes=saes, sae_spec=spec, features=selection
    )
    part_dir = tmp_path / "part"

    def interrupt(step: int, total: int, terms: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unlearn(
            "crisp",
            loaded,
            pack,
            part_dir,
            options=_crisp_options(),
            saes=saes,
            sae_spec=spec,
            features=selection,
            progress=interrupt,
        )
    resumed = unlearn(
        "crisp",
        loaded,
        pack,
        part_dir,
        options=_crisp_options(),
        saes=saes,
        sae_spec=spec,
        features=selection,
        resume=True,
    )
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rmu_and_ablate_runs_apply_cleanly(setup, tmp_path: Path) -> None:
    loaded, saes, pack, selection, spec = setup
    rmu = unlearn(
        "rmu",
        loaded,
        pack,
        tmp_path / "rmu",
        options={"steps": 3, "batch_size": 2, "max_length": 32, "layer": 2, "lr": 1e-2},
    )
    ablate = unlearn("ablate", loaded, pack, tmp_path / "ablate", saes=saes, sae_spec=spec, features=selection)
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        base = loaded.model(input_ids=ids).logits
        for run in (rmu, ablate):
            with apply(loaded, run) as model:
                assert not torch.equal(model(input_ids=ids).logits, base)
            assert torch.equal(loaded.model(input_ids=ids).logits, base)


def test_apply_refuses_another_base_model(setup, tmp_path: Path) -> None:
    loaded, saes, pack, selection, spec = setup
    run = unlearn("ablate", loaded, pack, tmp_path / "a", saes=saes, sae_spec=spec, features=selection)
    other = type(loaded)(loaded.model, loaded.tokenizer, "other-model", "other-source", 0.0)
    with pytest.raises(UserError, match="was made for model 'tiny-llama'"), apply(other, run):
        pass


def test_frozen_reference_reuses_states_that_match_a_fresh_pass(loaded) -> None:
    from peft import LoraConfig, get_peft_model

    from sae_unlearn.methods.frozen_reference import FrozenReference
    from sae_unlearn.models.batch import hidden_at_layers, tokenize

    model = get_peft_model(loaded.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    try:
        texts = ["a short one", "a somewhat longer text about the old mill by the river", "mid length text here"]
        reference = FrozenReference([0, 1], final=True)
        for batch_texts in (texts[:2], texts[1:]):
            reference(model, batch_texts, tokenize(loaded.tokenizer, batch_texts, 32, loaded.device))
        assert set(reference.store) == set(texts) and reference.bytes > 0
        order = [texts[2], texts[0], texts[1]]
        batch = tokenize(loaded.tokenizer, order, 32, loaded.device)
        cached = reference(model, order, batch)
        with model.disable_adapter(), torch.no_grad():
            fresh = hidden_at_layers(model, batch, [0, 1], final=True)
        valid = batch.attention_mask.bool()
        for layer in (0, 1):
            torch.testing.assert_close(cached.hidden[layer][valid], fresh.hidden[layer][valid])
        torch.testing.assert_close(cached.final[valid], fresh.final[valid])
        with torch.no_grad():
            adapted = hidden_at_layers(model, batch, [1]).hidden[1]
        assert not torch.allclose(adapted[valid], fresh.hidden[1][valid])  # the adapter was really disabled
        capped = FrozenReference([0], max_bytes=0)
        capped(model, order, batch)
        assert not capped.store
    finally:
        loaded.model = model.unload()


def test_clamp_defaults_derive_from_forget_statistics_and_explicit_values_win(setup, tmp_path: Path) -> None:
    from sae_unlearn.methods.clamp import derived_clamp

    loaded, saes, pack, selection, spec = setup
    run = unlearn("clamp", loaded, pack, tmp_path / "derived", saes=saes, sae_spec=spec, features=selection)
    edits = json.loads((run / "intervention.json").read_text())["edits"]
    for edit in edits:
        feats = [f for f in selection.features if f.layer == edit["layer"]]
        means = sorted(f.forget_sum / f.forget_count for f in feats if f.forget_count)
        maxima = sorted(f.forget_max for f in feats if f.forget_max > 0)
        median = lambda v: (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2  # noqa: E731
        assert edit["threshold"] == pytest.approx(0.5 * median(means))
        assert edit["value"] == pytest.approx(-median(maxima)) and edit["value"] < 0
        assert edit["basis"]["value"] == "derived" and edit["basis"]["median_max_forget_activation"] > 0
        assert derived_clamp(feats, 0.5, 1.0)["value"] == pytest.approx(edit["value"])
    run = unlearn(
        "clamp",
        loaded,
        pack,
        tmp_path / "explicit",
        options={"value": -5.0},
        saes=saes,
        sae_spec=spec,
        features=selection,
    )
    edits = json.loads((run / "intervention.json").read_text())["edits"]
    assert all(e["value"] == -5.0 and e["basis"]["value"] == "explicit" for e in edits)
    assert Intervention.load(run / "intervention.json").edits[0].value == -5.0


def test_refusal_clamp_keeps_the_other_layers_clamps(setup, tmp_path: Path) -> None:
    loaded, saes, pack, selection, spec = setup
    layers = sorted(selection.by_layer())
    assert len(layers) == 2
    options = {"refusal_feature": f"{layers[0]}:7", "value": -4.0}
    run = unlearn(
        "clamp", loaded, pack, tmp_path / "refusal", options=options, saes=saes, sae_spec=spec, features=selection
    )
    edits = {e["layer"]: e for e in json.loads((run / "intervention.json").read_text())["edits"]}
    assert edits[layers[0]]["mode"] == "refusal" and edits[layers[0]]["refusal_feature"] == 7
    assert edits[layers[0]]["value"] == 4.0  # default: the refusal feature turned on, |value|
    assert edits[layers[1]]["mode"] == "clamp" and edits[layers[1]]["value"] == -4.0
