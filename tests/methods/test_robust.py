"""The robustness options of CRISP (methods/robust.py): SAM, disruption masking, normalisation, concept-token
embedding rows and the SAE-native weight edit, on hand-made tensors and tiny models."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_unlearn.methods import apply, apply_merged, unlearn
from sae_unlearn.methods.adapter_training import AdapterTrainer
from sae_unlearn.methods.base import MethodContext
from sae_unlearn.methods.robust import (
    WEIGHT_EDIT_FILE,
    GradientStep,
    concept_tokens,
    disruption_mask,
    edit_bases,
    project_weights,
    projected_outputs,
    sam_gradient,
)
from sae_unlearn.models.hooks import decoder_blocks
from tests.conftest import FORGET, RETAIN, tiny_model

# ------------------------------------------------------------------------------------------- SAM


def _quadratic() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = torch.randn(5, 5)
    a = m @ m.T + torch.eye(5)  # f(theta) = 0.5 theta^T A theta, gradient A theta
    theta = torch.randn(5, requires_grad=True)
    return a, theta, a @ theta.detach()


def test_sam_gradient_is_the_gradient_at_the_perturbed_point_and_restores_the_weights() -> None:
    a, theta, g = _quadratic()
    before = theta.detach().clone()
    rho = 0.3
    grad, _ = sam_gradient([theta], lambda: 0.5 * theta @ a @ theta, [g], rho)
    expected = a @ (before + rho * g / g.norm())
    torch.testing.assert_close(grad[0], expected)
    assert not torch.allclose(grad[0], g)  # the perturbation did change the gradient
    assert torch.equal(theta.detach(), before)  # restored bit for bit, not by subtraction
    grad0, _ = sam_gradient([theta], lambda: 0.5 * theta @ a @ theta, [g], 0.0)
    torch.testing.assert_close(grad0[0], g)
    assert torch.equal(theta.detach(), before)


def test_sam_gradient_restores_the_weights_when_the_forget_pass_fails() -> None:
    _a, theta, g = _quadratic()
    before = theta.detach().clone()

    def boom() -> torch.Tensor:
        assert not torch.equal(theta.detach(), before)  # perturbed while the forget pass runs
        raise FloatingPointError("diverged")

    with pytest.raises(FloatingPointError):
        sam_gradient([theta], boom, [g], 0.5)
    assert torch.equal(theta.detach(), before)


# ------------------------------------------------------------------------------------------- MUDMAN


def test_disruption_mask_zeroes_exactly_the_disagreeing_elements() -> None:
    grad = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5, 2.0, 0.0])
    momentum = torch.tensor([2.0, -1.0, -3.0, 4.0, 0.0, 1e-8, -1.0])
    out = disruption_mask(grad, momentum)
    assert torch.equal(out, torch.tensor([1.0, -2.0, 0.0, 0.0, 0.0, 2.0, 0.0]))


class _LinearLoss:
    """unlearn = g_u . p, retain = g_r . p: the gradients are the hand-made vectors."""

    def __init__(self, p: torch.Tensor, g_u: list[torch.Tensor], g_r: list[torch.Tensor]) -> None:
        self.p, self.g_u, self.g_r = p, g_u, g_r

    def parts(self, model, step):
        return self.g_u[step] @ self.p, self.g_r[step] @ self.p, {}

    def forget_term(self, model, step):
        return self.g_u[step] @ self.p


def test_gradient_step_masks_with_the_retain_momentum_then_normalises() -> None:
    p = torch.zeros(4, requires_grad=True)
    g_u = [torch.tensor([3.0, -4.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, -1.0, 1.0])]
    g_r = [torch.tensor([1.0, 1.0, 1.0, -1.0]), torch.tensor([-3.0, 1.0, 1.0, 1.0])]
    step = GradientStep([p], mask=True, retain_momentum=0.5, unlearn_grad_norm=1.0)
    loss = _LinearLoss(p, g_u, g_r)
    step(None, loss, 0)
    # momentum 0.5 * g_r[0]: signs + + + -; g_u[0] signs + - + +: keep elements 0 and 2; norm |g_u[0]| = sqrt(27)
    expected = torch.tensor([3.0, 0.0, 1.0, 0.0]) / 27**0.5 + g_r[0]
    torch.testing.assert_close(p.grad, expected)
    step(None, loss, 1)
    momentum = 0.5 * (0.5 * g_r[0]) + 0.5 * g_r[1]  # [-1.0, 0.75, 0.75, 0.25]
    torch.testing.assert_close(step.momentum[0], momentum)
    expected = torch.tensor([0.0, 1.0, 0.0, 1.0]) / 2.0 + g_r[1]
    torch.testing.assert_close(p.grad, expected)


class _QuadraticLoss:
    """unlearn = 0.5 p^T A p, retain = r . p, relearn = 0.5 |p - t|^2 (the adversary's pull toward t)."""

    def __init__(self, p: torch.Tensor) -> None:
        torch.manual_seed(0)
        m = torch.randn(3, 3)
        self.p, self.a, self.r, self.t = p, m @ m.T, torch.tensor([1.0, -1.0, 0.5]), torch.tensor([2.0, 0.0, -2.0])

    def parts(self, model, step):
        return 0.5 * self.p @ self.a @ self.p, self.r @ self.p, {}

    def adversary_terms(self, model, step):
        return 0.5 * self.p @ self.a @ self.p, 0.5 * ((self.p - self.t) ** 2).sum()


def test_adversary_gradient_is_taken_at_the_fork_which_never_leaks_into_the_weights() -> None:
    p = torch.tensor([0.5, -1.0, 1.5], requires_grad=True)
    loss = _QuadraticLoss(p)
    step = GradientStep([p], adversary_every=2, adversary_lr=0.5)
    fork = p.detach().clone()
    for i in range(4):
        if i % 2 == 0:
            fork = p.detach().clone()  # forked from the current weights
        before = p.detach().clone()
        step(None, loss, i)
        assert torch.equal(p.detach(), before)  # the adversary's weights were swapped out again
        torch.testing.assert_close(p.grad, loss.a @ fork + loss.r)  # unlearning gradient at the fork
        fork = fork - 0.5 * (fork - loss.t)  # its SGD step toward t
        torch.testing.assert_close(step.adversary[0], fork)
        assert not torch.allclose(step.adversary[0], p.detach())
        with torch.no_grad():
            p.sub_(0.1 * p.grad)  # the main weights move on their own


# ------------------------------------------------------------------------------------------- runs


def _options(**kw):
    return {"steps": 3, "batch_size": 2, "max_length": 32, "fluency_every": 0, "checkpoint_every": 0, "lr": 1e-2, **kw}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _run(setup, out: Path, **kw) -> Path:
    loaded, saes, pack, selection, spec = setup
    return unlearn("crisp", loaded, pack, out, options=_options(**kw), saes=saes, sae_spec=spec, features=selection)


def test_sam_with_a_null_radius_trains_the_plain_adapter_and_a_real_radius_another(setup, tmp_path: Path) -> None:
    plain = _adapter(_run(setup, tmp_path / "plain", lora_dropout=0.0))
    # a radius far below float32 resolution: the split-gradient path, the perturbation and its undoing
    null = _adapter(_run(setup, tmp_path / "null", lora_dropout=0.0, sam_rho=1e-30))
    sam = _adapter(_run(setup, tmp_path / "sam", lora_dropout=0.0, sam_rho=0.5))
    assert plain.keys() == null.keys() == sam.keys()
    for k in plain:
        torch.testing.assert_close(null[k], plain[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(sam[k], plain[k], rtol=1e-3, atol=1e-5) for k in plain)


@pytest.mark.parametrize(
    ("kw", "term"),
    [
        ({"disruption_mask": True, "unlearn_grad_norm": 1.0, "sam_rho": 0.05}, "unlearn_sam"),
        ({"disruption_mask": True, "adversary_every": 3, "adversary_lr": 1.0}, "adversary_relearn"),
    ],
)
def test_masked_run_resumes_to_the_same_adapter(setup, tmp_path: Path, kw, term) -> None:
    loaded, saes, pack, selection, _spec = setup
    kw = {**kw, "steps": 4, "checkpoint_every": 2}
    full = _adapter(_run(setup, tmp_path / "full", **kw))
    assert full.keys() == _adapter(_run(setup, tmp_path / "plain")).keys()  # nothing of the adversary is saved

    def interrupt(step: int, total: int, terms: dict) -> None:
        assert 0 <= terms["mask_kept"] <= 1 and term in terms
        if step == 3:
            raise KeyboardInterrupt

    options = _options(**kw)
    with pytest.raises(KeyboardInterrupt):
        unlearn(
            "crisp", loaded, pack, tmp_path / "part", options=options, saes=saes, features=selection, progress=interrupt
        )
    part = unlearn(
        "crisp", loaded, pack, tmp_path / "part", options=options, saes=saes, features=selection, resume=True
    )
    resumed = _adapter(part)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


# ------------------------------------------------------------------------------------------- concept tokens


def test_concept_tokens_are_forget_specific(tokenizer) -> None:
    ids = concept_tokens(tokenizer, FORGET, RETAIN, 5)
    assert len(ids) == 5
    retain_ids = {t for text in RETAIN for t in tokenizer(text, add_special_tokens=False).input_ids}
    forget_ids = {t for text in FORGET for t in tokenizer(text, add_special_tokens=False).input_ids}
    assert set(ids) <= forget_ids and not set(ids) & retain_ids  # the shared words ("The", "lives") are not chosen


def test_concept_token_rows_train_merge_and_leave_the_base_model_alone(setup, tmp_path: Path) -> None:
    loaded = setup[0]
    embed = loaded.model.get_input_embeddings().weight
    before = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    run = _run(setup, tmp_path / "run", concept_tokens=4, lr=5e-2)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())  # unloaded cleanly
    assert any("trainable_tokens" in k for k in _adapter(run))
    ids = concept_tokens(loaded.tokenizer, setup[2].forget_split("train"), setup[2].retain_split("train"), 4)
    private = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    with apply_merged(private, run) as merged:
        new = merged.get_input_embeddings().weight.detach()
    changed = (new != embed.detach()).any(-1).nonzero().flatten().tolist()
    assert changed == ids  # exactly the concept tokens' rows moved
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_disabled_adapter_with_token_rows_is_the_base_model(setup, tmp_path: Path) -> None:
    loaded, saes, pack, selection, _ = setup
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        base = loaded.model(input_ids=ids).logits
    ctx = MethodContext(loaded=loaded, pack=pack, out=tmp_path, saes=saes, features=selection)
    trainer = AdapterTrainer(ctx, [0, 1], ["q_proj", "down_proj"], 2, 4, 0.0, 1e-2, 0, trainable_tokens=[5, 6, 7])
    try:
        with torch.no_grad():
            for p in trainer.params:
                p.add_(0.5)
            with trainer.model.disable_adapter():  # the frozen reference CRISP reads
                torch.testing.assert_close(trainer.model(input_ids=ids).logits, base)
            assert not torch.allclose(trainer.model(input_ids=ids).logits, base)
    finally:
        loaded.model = trainer.model.unload()


# ------------------------------------------------------------------------------------------- weight edit


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_weight_edit_removes_the_decoded_directions_from_the_writes(family: str) -> None:
    model = tiny_model(family, 300, n_layers=3)
    with torch.no_grad():  # non-trivial post-norm scales (Gemma's sandwich norms)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.5, 0.3)
    torch.manual_seed(1)
    directions = {2: torch.randn(3, 64)}
    bases = edit_bases(model, directions, [1, 2], ["o_proj", "down_proj"])
    assert set(bases) == {f"{b}.{m}" for b in (1, 2) for m in ("self_attn.o_proj", "mlp.down_proj")}
    block = decoder_blocks(model)[1]
    sandwich = family == "gemma3_text"
    x = torch.randn(7, block.self_attn.o_proj.in_features)
    h = torch.randn(7, block.mlp.down_proj.in_features)

    def writes(m) -> dict[str, torch.Tensor]:
        b = decoder_blocks(m)[1]
        attn, mlp = b.self_attn.o_proj(x), b.mlp.down_proj(h)
        if sandwich:  # what reaches the residual stream
            attn, mlp = b.post_attention_layernorm(attn), b.post_feedforward_layernorm(mlp)
        return {"attn": attn, "mlp": mlp}

    with torch.no_grad():
        original = writes(model)
        edited_model = copy.deepcopy(model)
        project_weights(edited_model, bases)
        edited = writes(edited_model)
        with projected_outputs(model, bases):
            hooked = writes(model)
        after_hooks = writes(model)
    d = directions[2]
    q = torch.linalg.qr(d.T).Q
    for k in original:
        assert (original[k] @ d.T).abs().max() > 1e-2  # the directions were there
        assert (edited[k] @ d.T).abs().max() < 1e-4 * original[k].abs().max()  # and are gone
        torch.testing.assert_close(hooked[k], edited[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after_hooks[k], original[k])  # hooks removed
        if not sandwich:  # without a norm, the rest of the write is unchanged
            rest = original[k] - (original[k] @ q) @ q.T
            torch.testing.assert_close(edited[k], rest, rtol=1e-4, atol=1e-5)


def test_weight_edit_run_applies_as_hooks_and_merges_to_the_same_model(setup, tmp_path: Path) -> None:
    loaded = setup[0]
    plain = _run(setup, tmp_path / "plain")
    run = _run(setup, tmp_path / "edit", weight_edit_blocks=[])
    assert (run / WEIGHT_EDIT_FILE).exists() and not (plain / WEIGHT_EDIT_FILE).exists()
    ids = torch.randint(3, 300, (1, 10))
    with torch.no_grad():
        with apply(loaded, plain) as model:
            adapter_only = model(input_ids=ids).logits
        with apply(loaded, run) as model:
            hooked = model(input_ids=ids).logits
        private = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
        with apply_merged(private, run) as merged_model:
            merged = merged_model(input_ids=ids).logits
    assert not torch.allclose(hooked, adapter_only, atol=1e-4)
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-4)
