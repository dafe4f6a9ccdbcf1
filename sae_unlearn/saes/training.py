"""Train TopK SAEs (SAELens' TopKTrainingSAE and its losses) on several layers from one model pass.

Activations stream through a small shuffle buffer: memory stays flat however large the corpus.
BOS/padding and huge-norm outlier tokens are left out, and inputs are normalised per dimension
(Gemma 3 has a few dimensions that carry most of the variance). The normalisation is folded into
the saved weights with SAELens' `fold_activation_whitening`, so the saved SAE reads raw
activations and loads with plain `SAE.load_from_disk`.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sae_unlearn.errors import UserError
from sae_unlearn.io import atomic_dir, atomic_write_json, read_checkpoint, write_checkpoint
from sae_unlearn.models.hooks import capture_resid_post, hook_name, special_token_ids, valid_token_mask
from sae_unlearn.models.loading import LoadedModel, bf16_is_fast
from sae_unlearn.saes.topk import topk_last_dim

log = logging.getLogger(__name__)


# Exponent of each dimension's std in its scale. per_dim gives Gemma 3's few huge dimensions no more
# weight than any other, so raw-space FVE suffers; none lets them dominate; sqrt_per_dim is between
# (block 12, same budget: raw FVE 0.720 / 0.780 / 0.793, scaled 0.763 / 0.737 / 0.656 for 1 / 0.5 / 0).
NORMALIZATION_EXPONENTS = {"per_dim": 1.0, "sqrt_per_dim": 0.5, "none": 0.0}


@dataclass
class SAETrainingConfig:
    layers: list[int]
    expansion: int = 8
    k: int = 64
    context_size: int = 128
    model_batch: int = 16
    sae_batch_tokens: int = 1024
    buffer_tokens: int = 32768
    epochs: float = 1.0
    lr: float = 2e-3
    lr_warmup_steps: int = 30
    lr_end_fraction: float = 0.1
    aux_loss_coefficient: float = 1 / 32
    dead_after_tokens: int = 250_000
    outlier_factor: float = 4.0
    normalize: str = "sqrt_per_dim"  # per_dim: x / std; sqrt_per_dim: x / sqrt(std); none: one global scale
    norm_estimate_tokens: int = 32768
    checkpoint_every: int = 200
    seed: int = 0
    eval_tokens: int = 8192
    # the ranking encoder product and the dead latents' aux-k products; the rest stays float32.
    # auto: bfloat16 where it runs in hardware and the run computes in bfloat16, else float32
    encoder_matmul_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.encoder_matmul_dtype not in ("auto", "bfloat16", "float32"):
            raise UserError(
                f"unknown encoder matmul dtype {self.encoder_matmul_dtype!r}", "use auto, bfloat16 or float32"
            )
        if self.normalize not in NORMALIZATION_EXPONENTS:
            raise UserError(f"unknown normalisation {self.normalize!r}", "use sqrt_per_dim, per_dim or none")
        if self.k < 1 or self.expansion < 1:
            raise UserError("k and expansion must be positive")


@dataclass
class NormStats:
    """Per-layer input statistics: x_norm = (x - mean) / scale; tokens with ||x|| > max_norm are skipped."""

    mean: torch.Tensor
    scale: torch.Tensor
    max_norm: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


@dataclass
class TrainingState:
    step: int = 0
    sequences_done: int = 0
    tokens_trained: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def pack_sequences(texts: Sequence[str], tokenizer: Any, context_size: int, epoch_seed: int) -> Iterator[list[int]]:
    """Shuffle paragraphs (per epoch) and pack them into BOS + (context_size - 1) token sequences."""
    order = list(range(len(texts)))
    random.Random(epoch_seed).shuffle(order)
    bos = tokenizer.bos_token_id
    sep = tokenizer.eos_token_id
    body = context_size - (1 if bos is not None else 0)
    buf: list[int] = []
    for i in order:
        buf.extend(tokenizer(texts[i], add_special_tokens=False).input_ids)
        if sep is not None:
            buf.append(sep)
        while len(buf) >= body:
            chunk, buf = buf[:body], buf[body:]
            yield ([bos] if bos is not None else []) + chunk


def count_sequences(texts: Sequence[str], tokenizer: Any, context_size: int) -> int:
    return sum(1 for _ in pack_sequences(texts, tokenizer, context_size, 0))


def batch_sequences(seqs: Iterator[list[int]], n: int) -> Iterator[torch.Tensor]:
    batch: list[list[int]] = []
    for seq in seqs:
        batch.append(seq)
        if len(batch) == n:
            yield torch.tensor(batch)
            batch = []
    if batch:
        yield torch.tensor(batch)


def layer_activations(loaded: LoadedModel, ids: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """resid_post of each layer for valid (non-BOS, non-pad) tokens, as float32 [n_tokens, d_model]."""
    ids = ids.to(loaded.device)
    with torch.no_grad():
        acts = capture_resid_post(loaded.model, ids, None, layers)
    mask = valid_token_mask(ids, None, special_token_ids(loaded.tokenizer))
    return {layer: acts[layer][mask].float() for layer in layers}


def normalization_scale(x: torch.Tensor, mean: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-dimension scale: std ** exponent, times one factor that brings the mean norm to sqrt(d_model)."""
    scale = x.std(0).clamp_min(1e-6) ** NORMALIZATION_EXPONENTS[kind]
    return scale * float(((x - mean) / scale).norm(dim=-1).mean() / math.sqrt(x.shape[1]))


def learning_rate(step: int, total_steps: int, cfg: SAETrainingConfig) -> float:
    """Linear warm-up, then cosine decay to `lr_end_fraction` of the peak."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    progress = min(1.0, (step - cfg.lr_warmup_steps) / max(1, total_steps - cfg.lr_warmup_steps))
    end = cfg.lr * cfg.lr_end_fraction
    return end + 0.5 * (cfg.lr - end) * (1 + math.cos(math.pi * progress))


def estimate_norm_stats(batches: Iterator[dict[int, torch.Tensor]], cfg: SAETrainingConfig) -> dict[int, NormStats]:
    pooled: dict[int, list[torch.Tensor]] = {layer: [] for layer in cfg.layers}
    n = 0
    for acts in batches:
        for layer, x in acts.items():
            pooled[layer].append(x)
        n += next(iter(acts.values())).shape[0]
        if n >= cfg.norm_estimate_tokens:
            break
    stats = {}
    for layer, chunks in pooled.items():
        x = torch.cat(chunks)
        norms = x.norm(dim=-1)
        max_norm = float(cfg.outlier_factor * norms.median())
        keep = x[norms <= max_norm]
        mean = keep.mean(0)
        scale = normalization_scale(keep, mean, cfg.normalize)
        stats[layer] = NormStats(mean, scale, max_norm)
        top = (keep.var(0) / keep.var(0).sum()).topk(3).values.tolist()
        log.info(
            "layer %d: median norm %.0f, outliers %.2f%%, variance share of top-3 dims %s",
            layer,
            float(norms.median()),
            100 * float((norms > max_norm).float().mean()),
            [round(v, 3) for v in top],
        )
    return stats


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


def topk_training_losses(
    sae: Any,
    x: torch.Tensor,
    dead_mask: torch.Tensor | None,
    matmul_dtype: torch.dtype | None = None,
    W_enc_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAELens TopKTrainingSAE's MSE and aux-k losses, same values and gradients, computed sparsely.

    Returns (mse, aux, reconstruction, fired latent ids). Several times cheaper than
    `training_forward_pass` on CPU: one dense encoder product (in `matmul_dtype`, without gradient)
    ranks the latents, and `_TopKCodec` decodes and back-propagates through the selected and dead
    latents only. The decoder-norm rescaling cancels in value and gradient (relu(a*n)/n = relu(a) for
    n > 0), so it only enters the rankings. Pass `W_enc_rows` from `trainable_parameters` to train the
    encoder through that leaf; otherwise the gradient goes to `sae.W_enc`.
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
    decoded, vals, aux_decoded = _TopKCodec.apply(
        centred, rows, b_enc, b_dec, W_dec, pre, idx, pre_dead, dead, matmul_dtype
    )
    recon = decoded + b_dec
    mse = (recon - x).pow(2).sum(-1).mean()
    aux = mse.new_zeros(())
    if len(dead):
        scale = min(len(dead) / k_aux, 1.0)
        aux = cfg.aux_loss_coefficient * scale * (aux_decoded - (x - recon).detach()).pow(2).sum(-1).mean()
    return mse, aux, recon, idx[vals > 0]


def _sparse_times_dense(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    # `sparse @ dense` zero-fills a [d_sae, d_in] tensor and copies it into its output before the
    # product: two passes over 13 MB that took as long as the product. With beta=0, `out` is never read.
    out = dense.new_empty(sparse.shape[0], dense.shape[1])
    return torch.addmm(out, sparse, dense, beta=0.0, out=out)


def _matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b computed in `dtype` (float32 out): bfloat16 runs ~3x faster on CPUs with AVX512-BF16."""
    return a @ b if dtype is None else (a.to(dtype) @ b.to(dtype)).float()


def trainable_parameters(sae: Any) -> dict[str, torch.nn.Parameter]:
    """The SAE's parameters to train, the encoder as a contiguous [d_sae, d_in] leaf `W_enc_rows`.

    `sae.W_enc` becomes a transposed view of that leaf, so the SAE always holds the trained weights.
    The sparse backward makes dW_enc latent by latent, [d_sae, d_in]: a leaf of that layout takes it
    as it is, where [d_in, d_sae] makes autograd copy it transposed (~7 ms a layer a step on 2 cores,
    as much as one of the backward's sparse products), and fused Adam wants a contiguous tensor.
    """
    rows = torch.nn.Parameter(sae.W_enc.detach().t().contiguous())
    sae.W_enc = torch.nn.Parameter(rows.data.t(), requires_grad=False)
    return {"W_enc_rows": rows, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}


def new_sae(cfg: SAETrainingConfig, d_model: int, layer: int, model_spec: str, device: str = "cpu") -> Any:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_model,
        d_sae=d_model * cfg.expansion,
        k=cfg.k,
        dtype="float32",
        device=device,
        aux_loss_coefficient=cfg.aux_loss_coefficient,
        apply_b_dec_to_input=True,
        normalize_activations="none",
    )
    sae_cfg.metadata.hook_name = hook_name(layer)
    sae_cfg.metadata.model_name = model_spec
    sae_cfg.metadata.context_size = cfg.context_size
    sae_cfg.metadata.prepend_bos = True
    return TopKTrainingSAE(sae_cfg)


def encoder_matmul_dtype(choice: str, loaded: LoadedModel) -> torch.dtype | None:
    """The trainer's ranking/dead-latent product dtype (None: float32, the weights' own). `auto` is bfloat16
    only where the device runs it in hardware and the run's compute dtype is bfloat16 (so --dtype float32
    means float32 products); emulated bfloat16 products cost ~64x float32 on CPUs without bf16 instructions."""
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "auto" and loaded.dtype == torch.bfloat16 and bf16_is_fast(loaded.device):
        return torch.bfloat16
    return None


def new_optimizer(params: dict[str, torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    # fused: one kernel per parameter instead of several passes over 3.3M-entry matrices (~3x on CPU)
    return torch.optim.Adam(params.values(), lr=lr, betas=(0.9, 0.999), fused=True)


class SAETrainer:
    """Trains one TopK SAE per layer from a single forward pass per batch."""

    def __init__(
        self, loaded: LoadedModel, cfg: SAETrainingConfig, texts: Sequence[str], out: Path, model_spec: str
    ) -> None:
        if not texts:
            raise UserError("the training corpus is empty", "pass --corpus files with text in them")
        self.loaded, self.cfg, self.texts, self.out, self.model_spec = loaded, cfg, list(texts), out, model_spec
        torch.manual_seed(cfg.seed)
        self.seq_per_epoch = count_sequences(self.texts, loaded.tokenizer, cfg.context_size)
        if self.seq_per_epoch < cfg.model_batch:
            raise UserError(
                f"the corpus makes only {self.seq_per_epoch} sequences of {cfg.context_size} tokens",
                "give more text or a smaller --batch",
            )
        self.total_sequences = int(self.seq_per_epoch * cfg.epochs)
        self.saes = {layer: new_sae(cfg, loaded.d_model, layer, model_spec, str(loaded.device)) for layer in cfg.layers}
        self.params = {layer: trainable_parameters(s) for layer, s in self.saes.items()}
        self.optimizers = {layer: new_optimizer(p, cfg.lr) for layer, p in self.params.items()}
        d_sae = loaded.d_model * cfg.expansion
        self.since_fired = {layer: torch.zeros(d_sae, device=loaded.device) for layer in cfg.layers}
        self.state = TrainingState()
        self.stats: dict[int, NormStats] = {}
        self.leftover: dict[int, torch.Tensor] = {}
        self.last_checkpoint_step = 0
        self.matmul_dtype = encoder_matmul_dtype(cfg.encoder_matmul_dtype, loaded)
        log.info("encoder matmul dtype: %s", self.matmul_dtype or torch.float32)
        self.forward_seconds = 0.0  # in the model's forward passes, since the training loop began
        self.loop_seconds = 0.0  # in the whole training loop (forward passes, data pipeline, SAE steps)

    # -- data ---------------------------------------------------------------------------------
    def _sequence_stream(self, start: int) -> Iterator[list[int]]:
        epoch, done = 0, 0
        while done < self.total_sequences:
            for seq in pack_sequences(self.texts, self.loaded.tokenizer, self.cfg.context_size, self.cfg.seed + epoch):
                if done >= start:
                    yield seq
                done += 1
                if done >= self.total_sequences:
                    return
            epoch += 1

    def _activation_stream(self, start: int) -> Iterator[dict[int, torch.Tensor]]:
        for ids in batch_sequences(self._sequence_stream(start), self.cfg.model_batch):
            self.state.sequences_done += ids.shape[0]
            began = time.perf_counter()
            acts = layer_activations(self.loaded, ids, self.cfg.layers)
            self.forward_seconds += time.perf_counter() - began
            yield acts

    def _training_batches(self) -> Iterator[dict[int, torch.Tensor]]:
        """Shuffle-buffered SAE batches of normalised, outlier-free activations, all layers in step.

        Each buffer fill is shuffled with a generator seeded by the stream position, and what is left
        over after the full batches is kept in checkpoints: a resumed run sees exactly the same batches.
        """
        buffer: dict[int, list[torch.Tensor]] = {layer: [t] for layer, t in self.leftover.items()}
        buffer = {layer: buffer.get(layer, []) for layer in self.cfg.layers}
        size = sum(t.shape[0] for t in buffer[self.cfg.layers[0]])
        for acts in self._activation_stream(self.state.sequences_done):
            keep = torch.ones(next(iter(acts.values())).shape[0], dtype=torch.bool, device=self.loaded.device)
            for layer, x in acts.items():
                keep &= x.norm(dim=-1) <= self.stats[layer].max_norm
            for layer, x in acts.items():
                buffer[layer].append(self.stats[layer].apply(x[keep]))
            size += int(keep.sum())
            if size < self.cfg.buffer_tokens:
                continue
            yield from self._drain(buffer)
            size = sum(t.shape[0] for t in buffer[self.cfg.layers[0]])
            self._boundary()
        yield from self._drain(buffer)

    def _drain(self, buffer: dict[int, list[torch.Tensor]]) -> Iterator[dict[int, torch.Tensor]]:
        joined = {layer: torch.cat(chunks) for layer, chunks in buffer.items() if chunks}
        if not joined:
            return
        n = next(iter(joined.values())).shape[0]
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.state.sequences_done)
        perm = torch.randperm(n, generator=gen)
        bs = self.cfg.sae_batch_tokens
        n_out = n // bs
        rest = perm[n_out * bs :]
        self.leftover = {layer: x[rest] for layer, x in joined.items()}
        for layer in buffer:
            buffer[layer] = [self.leftover[layer]]
        for b in range(n_out):
            idx = perm[b * bs : (b + 1) * bs]
            yield {layer: x[idx] for layer, x in joined.items()}

    def _boundary(self) -> None:
        """Between buffer fills: the only points where a checkpoint captures the whole data state."""
        if self.cfg.checkpoint_every and self.state.step - self.last_checkpoint_step >= self.cfg.checkpoint_every:
            self.save_checkpoint()

    # -- optimisation -------------------------------------------------------------------------
    def _step(self, batch: dict[int, torch.Tensor], total_steps: int) -> dict[str, float]:
        lr = learning_rate(self.state.step, total_steps, self.cfg)
        matmul_dtype = self.matmul_dtype
        metrics: dict[str, float] = {}
        for layer, x in batch.items():
            sae, opt = self.saes[layer], self.optimizers[layer]
            for group in opt.param_groups:
                group["lr"] = lr
            dead_mask = self.since_fired[layer] > self.cfg.dead_after_tokens
            mse, aux, _, fired = topk_training_losses(sae, x, dead_mask, matmul_dtype, self.params[layer]["W_enc_rows"])
            opt.zero_grad(set_to_none=True)
            (mse + aux).backward()
            opt.step()
            with torch.no_grad():
                self.since_fired[layer] += x.shape[0]
                self.since_fired[layer][fired] = 0
                fve = 1 - mse * x.shape[0] / ((x - x.mean(0)) ** 2).sum()  # mse: squared error per token
            metrics[f"L{layer}.fve"] = float(fve)
            metrics[f"L{layer}.mse"] = float(mse.detach())
        self.state.step += 1
        self.state.tokens_trained += next(iter(batch.values())).shape[0]
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for layer in self.cfg.layers:
            for name, p in self.saes[layer].state_dict().items():
                tensors[f"L{layer}.sae.{name}"] = p.contiguous()
            opt = self.optimizers[layer]
            for pname, param in self.params[layer].items():
                for key, value in opt.state.get(param, {}).items():
                    tensors[f"L{layer}.adam.{pname}.{key}"] = torch.as_tensor(value).contiguous()
            tensors[f"L{layer}.since_fired"] = self.since_fired[layer]
            tensors[f"L{layer}.norm.mean"] = self.stats[layer].mean
            tensors[f"L{layer}.norm.scale"] = self.stats[layer].scale
            if layer in self.leftover:
                tensors[f"L{layer}.leftover"] = self.leftover[layer].contiguous()
        meta = {
            "state": asdict(self.state),
            "config": asdict(self.cfg),
            "max_norm": {str(layer): s.max_norm for layer, s in self.stats.items()},
        }
        write_checkpoint(self.out / "checkpoint", tensors, meta, indent=1)
        self.last_checkpoint_step = self.state.step

    def load_checkpoint(self) -> None:
        tensors, meta = read_checkpoint(self.out / "checkpoint", self.out, device=str(self.loaded.device))
        saved_cfg = {k: v for k, v in meta["config"].items() if k not in ("checkpoint_every", "eval_tokens")}
        now_cfg = {k: v for k, v in asdict(self.cfg).items() if k not in ("checkpoint_every", "eval_tokens")}
        if saved_cfg != now_cfg:
            diff = [k for k in now_cfg if now_cfg[k] != saved_cfg.get(k)]
            raise UserError(
                f"the checkpoint in {self.out} was made with other settings ({', '.join(diff)})",
                "resume with the same options, or start a new --out",
            )
        for layer in self.cfg.layers:
            sae = self.saes[layer]
            sae.load_state_dict({n: tensors[f"L{layer}.sae.{n}"] for n in sae.state_dict()})
            opt = self.optimizers[layer]
            for pname, param in self.params[layer].items():
                prefix = f"L{layer}.adam.{pname}."
                state = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
                if not state and meta["state"]["step"]:
                    raise UserError(
                        f"the checkpoint in {self.out} has no optimiser state for {pname} (an older version made it)",
                        "start a new --out",
                    )
                if state:
                    opt.state[param] = state
            self.since_fired[layer] = tensors[f"L{layer}.since_fired"]
            self.stats[layer] = NormStats(
                tensors[f"L{layer}.norm.mean"], tensors[f"L{layer}.norm.scale"], float(meta["max_norm"][str(layer)])
            )
            if f"L{layer}.leftover" in tensors:
                self.leftover[layer] = tensors[f"L{layer}.leftover"]
        self.state = TrainingState(**meta["state"])
        self.last_checkpoint_step = self.state.step
        log.info("resumed at step %d (%d sequences done)", self.state.step, self.state.sequences_done)

    # -- main loop ----------------------------------------------------------------------------------
    def train(self, resume: bool = False, progress: Callable[[int, int, dict[str, float]], None] | None = None) -> None:
        if resume:
            self.load_checkpoint()
        else:
            self.stats = estimate_norm_stats(self._activation_stream(0), self.cfg)
            self.state = TrainingState()
        total_steps = max(1, int(self.total_sequences * (self.cfg.context_size - 1) * 0.97 / self.cfg.sae_batch_tokens))
        start, self.forward_seconds = time.perf_counter(), 0.0
        for batch in self._training_batches():
            metrics = self._step(batch, total_steps)
            if self.state.step % 20 == 0:
                metrics["tokens_per_s"] = self.state.tokens_trained / max(1e-9, time.perf_counter() - start)
                self.state.history.append({"step": self.state.step, **metrics})
            if progress is not None:
                progress(self.state.sequences_done, self.total_sequences, metrics)
        self.loop_seconds = time.perf_counter() - start
        log.info(
            "training loop %.0f s, of which the model's forward passes %.0f s: %.2fx the forward alone",
            self.loop_seconds,
            self.forward_seconds,
            self.loop_seconds / max(1e-9, self.forward_seconds),
        )
        self.save_checkpoint()

    # -- export ---------------------------------------------------------------------------------
    def inference_sae(self, layer: int) -> Any:
        """A copy of the layer's SAE with the normalisation folded in: it reads raw activations."""
        import copy

        from sae_lens import SAE

        sae = copy.deepcopy(self.saes[layer])
        stats = self.stats[layer]
        sae.fold_activation_whitening(stats.mean, torch.diag(1 / stats.scale), torch.diag(stats.scale))
        cfg = sae.cfg.get_inference_sae_cfg_dict()
        cfg["metadata"] = {
            **cfg.get("metadata", {}),
            "normalization": {
                "kind": self.cfg.normalize,
                "folded_into_weights": True,
                "outlier_max_norm": stats.max_norm,
            },
        }
        inference = SAE.from_dict(cfg)
        state = sae.state_dict()
        sae.process_state_dict_for_saving_inference(state)
        inference.load_state_dict({k: v for k, v in state.items() if k in inference.state_dict()})
        return inference

    def export(self, final_dir: Path, overwrite: bool = True) -> list[Path]:
        paths = []
        for layer in self.cfg.layers:
            target = final_dir / hook_name(layer)
            with atomic_dir(target, overwrite=overwrite) as tmp:
                sae = self.inference_sae(layer)
                sae.to("cpu").to(torch.bfloat16)
                sae.save_model(str(tmp))
            paths.append(target)
        atomic_write_json(final_dir / "training_config.json", asdict(self.cfg))
        return paths
