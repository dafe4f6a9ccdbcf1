"""The one feature edit and the column-sparse encode against SAELens' own encode/decode, for every
architecture the papers used (JumpReLU, TopK with layer-norm input normalisation, standard, gated)."""

from __future__ import annotations

import pytest
import torch

from sae_unlearn.methods.crisp import published_unlearn_loss
from sae_unlearn.saes.edit import (
    apply_feature_edit,
    clamp_values,
    encode_columns,
    linear_decoder,
    refusal_values,
    scale_values,
)
from tests.saes.synthetic import ARCHS, silence_feature, synthetic_sae

COLS = [3, 17, 40, 41, 90]


def _x(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(3, 7, 64) * 2 + 0.5


def _saelens_edit(sae, x: torch.Tensor, cols: list[int], new_values) -> torch.Tensor:
    """x + decode(z') - decode(z) the plain way: an encode before each decode (layer-norm decode
    consumes the statistics its encode stored)."""
    z = sae.encode(x)
    z_new = z.clone()
    z_new[..., cols] = new_values(z[..., cols])
    decoded_new = sae.decode(z_new)
    sae.encode(x)
    return x + decoded_new - sae.decode(z)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_columns_equals_saelens_encode(arch: str) -> None:
    sae = synthetic_sae(arch, 1)
    x = _x()
    expected = sae.encode(x)[..., COLS]
    assert (expected > 0).any() and (expected == 0).any()
    torch.testing.assert_close(encode_columns(sae, x, COLS), expected, rtol=1e-5, atol=1e-5)


def test_jumprelu_threshold_is_applied() -> None:
    sae = synthetic_sae("jumprelu", 1)
    x = _x()
    pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
    under = (pre > 0) & (pre <= sae.threshold)  # ReLU would report these; the SAE does not
    assert under.any()
    z = encode_columns(sae, x, list(range(sae.cfg.d_sae)))
    assert (z[under] == 0).all() and torch.equal(z > 0, pre > sae.threshold)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "new_values",
    [clamp_values(0.0, -7.0), scale_values(0.0, -3.0), refusal_values(0.0, 5.0)],
    ids=["clamp", "scale", "refusal"],
)
def test_edit_equals_saelens_decode_difference(arch: str, new_values) -> None:
    sae = synthetic_sae(arch, 1)
    x = _x()
    assert linear_decoder(sae) == (arch != "topk_ln")
    edited = apply_feature_edit(sae, x, COLS, new_values)  # one encode, one decode: no ln_std crash
    expected = _saelens_edit(sae, x, COLS, new_values)
    torch.testing.assert_close(edited, expected, rtol=1e-4, atol=1e-4)
    z = sae.encode(x)[..., COLS]
    unchanged = (new_values(z) == z).all(-1)
    assert (~unchanged).any()
    assert torch.equal(edited[unchanged], x[unchanged])  # bit-identical where nothing changed


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_mask_and_silent_feature_leave_x_bit_identical(arch: str) -> None:
    sae = synthetic_sae(arch, 1)
    silence_feature(sae, 5)
    x = _x().to(torch.bfloat16)
    assert torch.equal(apply_feature_edit(sae, x, [5], clamp_values(0.0, -100.0)), x)
    keep = torch.zeros(x.shape[:-1], dtype=torch.bool)
    keep[:, 3:] = True
    edited = apply_feature_edit(sae, x, COLS, clamp_values(0.0, -100.0), keep)
    assert torch.equal(edited[:, :3], x[:, :3]) and not torch.equal(edited[:, 3:], x[:, 3:])
    assert edited.dtype == torch.bfloat16


def test_published_loss_jumprelu_by_hand() -> None:
    """One JumpReLU latent of three, d_in 3, identity encoder: the reference formula by hand."""
    from sae_lens.saes import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=3, d_sae=3, dtype="float32", device="cpu")).requires_grad_(False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.copy_(torch.tensor([0.0, 3.5, 0.0]))
    x = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 2.0, 0.0], [3.0, 3.0, 3.0], [0.0, 9.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])
    active = torch.tensor([[[True], [True], [False], [True]]])
    # margins |1.0 * mean(pre)|: 1, 1, 3, 3. Feature 1: token 0: 1+1 = 2 <= 3.5 -> 0 (ReLU alone: 2);
    # token 1: 2+1 = 3 -> 0; token 2: not frozen-active, 3 -> 0; token 3: invalid. No positive: 0.
    assert float(published_unlearn_loss(sae, x, active, torch.tensor([1]), valid, 1.0)) == 0.0
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.0, 2.5, 0.0]))
    # now token 1 (3 > 2.5) and token 2 (3 > 2.5) fire; token 0 (2) does not: mean of positives (3 + 3) / 2
    assert float(published_unlearn_loss(sae, x, active, torch.tensor([1]), valid, 1.0)) == pytest.approx(3.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_published_loss_equals_the_reference_formula(arch: str) -> None:
    sae = synthetic_sae(arch, 1)
    x = _x()
    feats = torch.tensor(COLS)
    active = sae.encode(x)[..., COLS] > 0
    valid = torch.ones(x.shape[:-1], dtype=torch.bool)
    valid[:, 0] = False
    alpha = 2.0
    # the reference: dense pre-activations, margin on frozen-active selected entries, the SAE's activation
    sae_in = sae.process_sae_in(x)
    magnitude = arch == "gated"  # a gated SAE's pre-activations are its magnitude path
    pre = sae_in @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag if magnitude else sae_in @ sae.W_enc + sae.b_enc
    margin = (alpha * pre.mean(-1, keepdim=True)).abs()
    pre[..., COLS] = torch.where(active, pre[..., COLS] + margin, pre[..., COLS])
    if arch == "jumprelu":
        acts = pre.relu() * (pre > sae.threshold)
    elif arch == "gated":
        acts = pre.relu() * ((sae_in @ sae.W_enc + sae.b_gate) > 0)
    else:
        acts = sae.activation_fn(pre)
    selected = acts[..., COLS] * valid.unsqueeze(-1)
    expected = selected[selected > 0].mean()
    loss = published_unlearn_loss(sae, x, active, feats, valid, alpha)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
