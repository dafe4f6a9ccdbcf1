from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_unlearn.errors import UserError
from sae_unlearn.saes.loading import check_compatible, load_saes_from_spec
from sae_unlearn.saes.training import (
    NormStats,
    SAETrainer,
    SAETrainingConfig,
    new_optimizer,
    topk_training_losses,
    trainable_parameters,
)
from tests.conftest import FORGET, RETAIN


def test_round_trip_save_load(sae_dir: Path) -> None:
    from sae_lens import SAE

    saes = load_saes_from_spec(str(sae_dir))
    assert [s.layer for s in saes] == [1, 2]
    direct = SAE.load_from_disk(str(sae_dir / "blocks.1.hook_resid_post"))
    x = torch.randn(5, 64)
    assert torch.equal(saes[0].sae.encode(x), direct.encode(x))


def test_mismatch_errors_say_what_differs(sae_dir: Path) -> None:
    saes = load_saes_from_spec(str(sae_dir))
    with pytest.raises(UserError, match="reads vectors of size 64 but the model's hidden size is 576"):
        check_compatible(saes, n_layers=30, d_model=576)
    with pytest.raises(UserError, match=r"reads blocks.2.hook_resid_post but the model has blocks 0..1"):
        check_compatible(saes, n_layers=2, d_model=64)


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown SAE spec"):
        load_saes_from_spec("nonsense")
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="holds no SAE"):
        load_saes_from_spec(str(tmp_path / "x"))
    d = tmp_path / "y"
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps({"architecture": "topk"}))
    with pytest.raises(UserError, match=r"no sae_weights\.safetensors"):
        load_saes_from_spec(str(d))


def test_folded_normalisation_reads_raw_activations(loaded) -> None:
    cfg = SAETrainingConfig(
        layers=[1],
        expansion=2,
        k=4,
        model_batch=4,
        context_size=16,
        sae_batch_tokens=32,
        buffer_tokens=64,
        norm_estimate_tokens=64,
        checkpoint_every=0,
    )
    trainer = SAETrainer(loaded, cfg, RETAIN * 3, Path("unused"), "tiny")
    mean, scale = torch.randn(64), torch.rand(64) + 0.5
    trainer.stats = {1: NormStats(mean, scale, 1e9)}
    x = torch.randn(10, 64) * 3
    inner = trainer.saes[1]
    expected_acts = inner.encode(trainer.stats[1].apply(x))
    expected_out = inner.decode(expected_acts) * scale + mean
    folded = trainer.inference_sae(1)
    torch.testing.assert_close(folded.encode(x), expected_acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.decode(folded.encode(x)), expected_out, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("sparse_backward", [True, False], ids=["csr-backward", "dense-ops"])
@pytest.mark.parametrize("n_dead", [0, 20, 40, 200])
def test_fast_topk_losses_match_sae_lens(n_dead: int, sparse_backward: bool) -> None:
    """Same loss values and gradients as SAELens' own training_forward_pass, aux-k loss included: the CPU's
    sparse (CSR) backward and the plain dense ops that CUDA uses."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=64, d_sae=512, k=8, aux_loss_coefficient=1 / 32, apply_b_dec_to_input=True)
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():  # off the initialisation, where several gradients vanish
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(512, 1) + 0.5)
    x = torch.randn(100, 64) * 3
    dead = torch.zeros(512, dtype=torch.bool)
    dead[torch.randperm(512)[:n_dead]] = True
    ref = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    mse, aux, recon, fired = topk_training_losses(sae, x, dead, sparse_backward=sparse_backward)
    (mse + aux).backward()
    assert aux.item() > 0 if n_dead else aux.item() == 0
    torch.testing.assert_close(mse + aux, ref.loss)
    torch.testing.assert_close(recon, ref.sae_out, rtol=1e-5, atol=1e-4)
    assert set(fired.tolist()) == set(ref.feature_acts.nonzero()[:, 1].tolist())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_kernel_and_dense_reference_step_agree(loaded) -> None:
    """SAETrainingConfig.sparse_kernel: the trainer's step through the sparse kernel and through SAELens'
    dense training_forward_pass give the same losses, gradients and fired latents, dead latents included."""
    trainers = {}
    for sparse in (True, False):
        cfg = SAETrainingConfig(
            layers=[1, 2],
            expansion=4,
            k=8,
            model_batch=4,
            dead_after_tokens=10,
            checkpoint_every=0,
            sparse_kernel=sparse,
        )
        trainers[sparse] = SAETrainer(loaded, cfg, RETAIN * 3, Path("unused"), "tiny")
    sparse, dense = trainers[True], trainers[False]
    assert set(sparse.params[1]) == {"W_enc_rows", "b_enc", "W_dec", "b_dec"}
    assert set(dense.params[1]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    torch.manual_seed(1)
    batch = {layer: torch.randn(96, 64) * 3 for layer in (1, 2)}
    for trainer in (sparse, dense):
        for layer, sae in trainer.saes.items():
            with torch.no_grad():  # off the initialisation, where several gradients vanish
                sae.b_dec.copy_(torch.linspace(-1, 1, 64))
                sae.b_enc.copy_(torch.linspace(-0.1, 0.1, 256))
            trainer.since_fired[layer][::5] = 100.0  # every fifth latent dead: the aux-k loss is on
    torch.testing.assert_close(sparse.saes[1].W_enc, dense.saes[1].W_enc)  # the same initial SAEs
    metrics = {sparse_: t._step(batch, total_steps=10) for sparse_, t in trainers.items()}
    assert metrics[True].keys() == metrics[False].keys()
    for key in metrics[True]:
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-5), key
    for layer in (1, 2):
        s, d = sparse.params[layer], dense.params[layer]
        torch.testing.assert_close(s["W_enc_rows"].grad, d["W_enc"].grad.t(), rtol=1e-4, atol=1e-5)
        for name in ("b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(s[name].grad, d[name].grad, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(sparse.since_fired[layer], dense.since_fired[layer])


def test_encoder_rows_leaf_trains_the_same_weights() -> None:
    """trainable_parameters' [d_sae, d_in] leaf gets W_enc's gradient transposed, and sae.W_enc follows it."""
    import copy

    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    plain = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=64, d_sae=512, k=8, apply_b_dec_to_input=True))
    rowwise = copy.deepcopy(plain)
    params = trainable_parameters(rowwise)
    x, dead = torch.randn(100, 64) * 3, torch.rand(512) < 0.1
    for sae, rows in ((plain, None), (rowwise, params["W_enc_rows"])):
        mse, aux, _, _ = topk_training_losses(sae, x, dead, None, rows)
        (mse + aux).backward()
    torch.testing.assert_close(params["W_enc_rows"].grad, plain.W_enc.grad.t())
    for name in ("b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(params[name].grad, getattr(plain, name).grad, msg=name)
    new_optimizer(params, 0.1).step()
    torch.testing.assert_close(rowwise.W_enc, params["W_enc_rows"].t())
    assert not torch.equal(rowwise.W_enc, plain.W_enc)
    with pytest.raises(ValueError, match="W_enc_rows"):
        topk_training_losses(rowwise, x, dead)


def test_training_runs_checkpoints_and_resumes(loaded, tmp_path: Path) -> None:
    texts = (RETAIN + FORGET) * 4
    cfg = SAETrainingConfig(
        layers=[1, 2],
        expansion=2,
        k=4,
        model_batch=4,
        context_size=16,
        sae_batch_tokens=32,
        buffer_tokens=64,
        norm_estimate_tokens=64,
        checkpoint_every=1,
        epochs=1.0,
    )
    full = SAETrainer(loaded, cfg, texts, tmp_path / "a", "tiny")
    full.train()
    assert full.state.step > 3
    assert 0 < full.forward_seconds < full.loop_seconds
    # interrupted after a checkpoint, then resumed: same weights as the uninterrupted run
    part = SAETrainer(loaded, cfg, texts, tmp_path / "b", "tiny")

    def stop(done: int, total: int, metrics: dict) -> None:
        if part.state.step == full.state.step - 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        part.train(progress=stop)
    assert 0 < part.last_checkpoint_step < full.state.step - 1
    resumed = SAETrainer(loaded, cfg, texts, tmp_path / "b", "tiny")
    resumed.train(resume=True)
    assert resumed.state.step == full.state.step
    for layer in (1, 2):
        torch.testing.assert_close(resumed.saes[layer].W_enc, full.saes[layer].W_enc)
    paths = full.export(tmp_path / "out")
    assert [p.name for p in paths] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert len(load_saes_from_spec(str(tmp_path / "out"))) == 2


def test_empty_corpus_is_refused(loaded, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="corpus is empty"):
        SAETrainer(loaded, SAETrainingConfig(layers=[1]), [], tmp_path, "tiny")


def test_pretrained_release_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"cannot load SAE gemma-scope-2b-pt-res-canonical:.*HF_HUB_OFFLINE") as e:
        load_saes_from_spec("gemma-scope-2b-pt-res-canonical:layer_7/width_16k/canonical")
    assert "\n" not in str(e.value)


def test_fast_topk_losses_in_bfloat16_stay_close_to_float32() -> None:
    """The bfloat16 encoder product only ranks latents; values and gradients stay near float32's."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=64, d_sae=512, k=8, apply_b_dec_to_input=True))
    x = torch.randn(200, 64) * 3
    dead = torch.rand(512) < 0.1
    results = []
    for dtype in (None, torch.bfloat16):
        sae.zero_grad()
        mse, aux, _, _ = topk_training_losses(sae, x, dead, dtype)
        (mse + aux).backward()
        results.append((mse.item(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (mse32, grads32), (mse16, grads16) = results
    assert mse16 == pytest.approx(mse32, rel=0.02)
    for name, grad in grads32.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), grads16[name].flatten(), dim=0)
        assert cosine > 0.98, name
