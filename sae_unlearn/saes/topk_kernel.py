"""The TopK SAE training step's sparse kernel: SAELens TopKTrainingSAE's MSE and aux-k losses with the
same values and gradients, decoded and back-propagated through the selected and dead latents only; and
the dense reference step it reproduces (`reference_training_losses`, SAELens' own forward pass), which
the trainer runs instead with `SAETrainingConfig.sparse_kernel = False`."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from sae_unlearn.saes.topk import topk_last_dim


class _TopKCodec(torch.autograd.Function):
    """TopK decoding and the aux-k decoding of dead latents, with a backward that reads only them.

    Inputs come from the dense encoder product that ranked the latents, computed without gradient:
    `pre` [tokens, k] holds the pre-activations (x - b_dec) @ W_enc + b_enc of the selected latents
    `idx`, and `pre_dead` [tokens, n_dead] those of the dead latents `dead` (zero where the aux-k
    selection drops them). Backward never forms a dense [tokens, d_sae] gradient: the activations'
    gradient is a sampled product (SDDMM), dW_enc and dW_dec are sparse-dense products over the k
    active latents plus small dense ones over the dead columns (in `dead_dtype`), so the step's one
    big matmul is the forward encoder product. The encoder comes in as rows, W_enc.T [d_sae, d_in]: the
    layout its gradient is made in.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        centred: torch.Tensor,
        W_enc_rows: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        W_dec: torch.Tensor,
        pre: torch.Tensor,
        idx: torch.Tensor,
        pre_dead: torch.Tensor,
        dead: torch.Tensor,
        dead_dtype: torch.dtype | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        acts = pre.relu()
        W_dec_dead = W_dec[dead]
        ctx.save_for_backward(centred, W_enc_rows, W_dec, idx, acts, pre_dead, dead, W_dec_dead)
        ctx.dead_dtype = dead_dtype
        ctx.mark_non_differentiable(acts)
        decoded = F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")
        return decoded, acts, _matmul(pre_dead, W_dec_dead, dead_dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_decoded: torch.Tensor, _: Any, grad_aux: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        centred, W_enc_rows, W_dec, idx, acts, pre_dead, dead, W_dec_dead = ctx.saved_tensors
        (n, k), d_sae, device = idx.shape, W_dec.shape[0], idx.device
        flat = idx.flatten()
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            by_token = torch.sparse_csr_tensor(
                torch.arange(0, n * k + 1, k, dtype=torch.int32, device=device),
                flat.int(),
                torch.ones(n * k, device=device),
                (n, d_sae),
            )
            grad_acts = torch.sparse.sampled_addmm(by_token, grad_decoded, W_dec.t(), beta=0.0).values()
            grad_pre = grad_acts * (acts.flatten() > 0)
            order = flat.argsort()
            # int32 indices: MKL's sparse product takes them as-is
            crow = torch.zeros(d_sae + 1, dtype=torch.int32, device=device)
            crow[1:] = torch.bincount(flat, minlength=d_sae).cumsum(0)
            tokens = torch.arange(n, dtype=torch.int32, device=device).repeat_interleave(k)[order]

            def by_latent(values: torch.Tensor) -> torch.Tensor:
                return torch.sparse_csr_tensor(crow, tokens, values[order], (d_sae, n))

            grad_W_dec = _sparse_times_dense(by_latent(acts.flatten()), grad_decoded)
            grad_W_enc_rows = _sparse_times_dense(by_latent(grad_pre), centred)  # dead rows are added below
        grad_b_enc = grad_pre.new_zeros(d_sae).index_add_(0, flat, grad_pre)
        if len(dead):
            dtype = ctx.dead_dtype
            grad_pre_dead = _matmul(grad_aux, W_dec_dead.t(), dtype) * (pre_dead != 0)
            grad_W_dec.index_add_(0, dead, _matmul(pre_dead.t(), grad_aux, dtype))
            grad_W_enc_rows.index_add_(0, dead, _matmul(grad_pre_dead.t(), centred, dtype))
            grad_b_enc.index_add_(0, dead, grad_pre_dead.sum(0))
        return None, grad_W_enc_rows, grad_b_enc, -(grad_b_enc @ W_enc_rows), grad_W_dec, None, None, None, None, None


# Devices whose training step uses `_TopKCodec`'s sparse (CSR) backward. It is a CPU optimisation (MKL's
# sparse products); on a GPU the plain dense ops below are the well-trodden path (cuBLAS), used unless a
# benchmark there shows otherwise (scripts/gpu_check.sh runs bench_pipeline.py on a lent GPU).
SPARSE_BACKWARD_DEVICES = ("cpu",)


def _dense_codec(
    x: torch.Tensor,
    rows: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    W_dec: torch.Tensor,
    idx: torch.Tensor,
    dead: torch.Tensor,
    dead_kept: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_TopKCodec`'s (decoded, acts, aux_decoded) with plain autograd ops in float32: the dense encoder
    product, a scatter of the k selected activations and a dense decoder product (SAELens' TopK path)."""
    pre_all = (x - b_dec) @ rows.t() + b_enc
    acts = pre_all.gather(-1, idx).relu()
    decoded = torch.zeros_like(pre_all).scatter(-1, idx, acts) @ W_dec
    aux_decoded = (pre_all[:, dead] * dead_kept) @ W_dec[dead]
    return decoded, acts.detach(), aux_decoded


def topk_training_losses(
    sae: Any,
    x: torch.Tensor,
    dead_mask: torch.Tensor | None,
    matmul_dtype: torch.dtype | None = None,
    W_enc_rows: torch.Tensor | None = None,
    sparse_backward: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAELens TopKTrainingSAE's MSE and aux-k losses, same values and gradients, computed sparsely.

    Returns (mse, aux, reconstruction, fired latent ids). Cheaper than `training_forward_pass`: one
    dense encoder product (in `matmul_dtype`, without gradient) ranks the latents, and `_TopKCodec`
    decodes and back-propagates through the selected and dead latents only. The decoder-norm rescaling
    cancels in value and gradient (relu(a*n)/n = relu(a) for n > 0), so it only enters the rankings.
    Pass `W_enc_rows` from `trainable_parameters` to train the encoder through that leaf; otherwise the
    gradient goes to `sae.W_enc`. `sparse_backward` (default: on the devices in SPARSE_BACKWARD_DEVICES,
    the CPU) picks `_TopKCodec`; otherwise `_dense_codec` (same values and gradients, plain ops).
    """
    cfg = sae.cfg
    if W_enc_rows is None and torch.is_grad_enabled() and not sae.W_enc.requires_grad:
        raise ValueError("this SAE trains its encoder through W_enc_rows: pass trainable_parameters(sae)'s")
    rows = sae.W_enc.t() if W_enc_rows is None else W_enc_rows
    b_enc, W_dec, b_dec = sae.b_enc, sae.W_dec, sae.b_dec
    with torch.no_grad():
        centred = x - b_dec
        # ranking = ((x - b_dec) @ W_enc + b_enc) * ||W_dec||: one matmul, the bias as an extra input
        # column, the weights scaled and cast in one pass
        norm = W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else W_dec.new_ones(W_dec.shape[0])
        d_sae, d_in = rows.shape
        weights = torch.empty(d_sae, d_in + 1, dtype=matmul_dtype or x.dtype, device=x.device)
        torch.mul(rows, norm[:, None], out=weights[:, :d_in])
        torch.mul(b_enc, norm, out=weights[:, d_in])
        ranking = torch.cat([centred, centred.new_ones(len(x), 1)], 1).to(weights.dtype) @ weights.t()
        idx = topk_last_dim(ranking, cfg.k)[1]
        pre = ranking.gather(-1, idx).float() / norm[idx]
        dead = idx.new_zeros(0) if dead_mask is None else dead_mask.nonzero().squeeze(1)
        k_aux = x.shape[-1] // 2  # SAELens / EleutherAI heuristic
        ranking_dead = ranking[:, dead]
        pre_dead = ranking_dead.float() / norm[dead]
        if len(dead) > k_aux:
            keep = ranking_dead.topk(k_aux, dim=-1, sorted=False).indices
            pre_dead = torch.zeros_like(pre_dead).scatter(-1, keep, pre_dead.gather(-1, keep))
    if sparse_backward if sparse_backward is not None else x.device.type in SPARSE_BACKWARD_DEVICES:
        decoded, vals, aux_decoded = _TopKCodec.apply(
            centred, rows, b_enc, b_dec, W_dec, pre, idx, pre_dead, dead, matmul_dtype
        )
    else:
        decoded, vals, aux_decoded = _dense_codec(x, rows, b_enc, b_dec, W_dec, idx, dead, pre_dead != 0)
    recon = decoded + b_dec
    mse = (recon - x).pow(2).sum(-1).mean()
    aux = mse.new_zeros(())
    if len(dead):
        scale = min(len(dead) / k_aux, 1.0)
        aux = cfg.aux_loss_coefficient * scale * (aux_decoded - (x - recon).detach()).pow(2).sum(-1).mean()
    return mse, aux, recon, idx[vals > 0]


def reference_training_losses(
    sae: Any, x: torch.Tensor, dead_mask: torch.Tensor | None, step: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_training_losses`' (mse, aux, reconstruction, fired latent ids) from SAELens'
    `TopKTrainingSAE.training_forward_pass`: the dense step, gradients to the SAE's own parameters."""
    from sae_lens.saes.sae import TrainStepInput

    out = sae.training_forward_pass(TrainStepInput(x, {}, dead_mask, step, False))
    fired = out.feature_acts.nonzero()[:, -1]
    return out.losses["mse_loss"], out.losses["auxiliary_reconstruction_loss"], out.sae_out, fired


def _sparse_times_dense(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    # `sparse @ dense` zero-fills a [d_sae, d_in] tensor and copies it into its output before the
    # product: two passes over the whole output for nothing. With beta=0, `out` is never read.
    out = dense.new_empty(sparse.shape[0], dense.shape[1])
    return torch.addmm(out, sparse, dense, beta=0.0, out=out)


def _matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b computed in `dtype` (float32 out): bfloat16 is the faster choice where the CPU has bf16
    instructions (AVX512-BF16, AMX)."""
    return a @ b if dtype is None else (a.to(dtype) @ b.to(dtype)).float()


def trainable_parameters(sae: Any) -> dict[str, torch.nn.Parameter]:
    """The SAE's parameters to train, the encoder as a contiguous [d_sae, d_in] leaf `W_enc_rows`.

    `sae.W_enc` becomes a transposed view of that leaf, so the SAE always holds the trained weights.
    The sparse backward makes dW_enc latent by latent, [d_sae, d_in]: a leaf of that layout takes it
    as it is, where [d_in, d_sae] makes autograd copy it transposed every step (a pass over the largest
    matrix, comparable to one of the backward's sparse products), and fused Adam wants a contiguous tensor.
    """
    rows = torch.nn.Parameter(sae.W_enc.detach().t().contiguous())
    sae.W_enc = torch.nn.Parameter(rows.data.t(), requires_grad=False)
    return {"W_enc_rows": rows, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
