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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_unlearn.distributed import world
from sae_unlearn.errors import UserError
from sae_unlearn.io import atomic_dir, atomic_write_json, read_checkpoint, write_checkpoint
from sae_unlearn.models.hooks import hook_name
from sae_unlearn.models.loading import LoadedModel, bf16_is_fast
from sae_unlearn.saes.topk_kernel import reference_training_losses, topk_training_losses, trainable_parameters
from sae_unlearn.saes.train_config import NORMALIZATION_EXPONENTS, SAETrainingConfig  # noqa: F401  (re-exported)
from sae_unlearn.saes.train_data import (  # noqa: F401  (re-exported)
    NormStats,
    batch_sequences,
    count_sequences,
    estimate_norm_stats,
    layer_activations,
    normalization_scale,
    pack_sequences,
)

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    step: int = 0
    sequences_done: int = 0
    tokens_trained: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def learning_rate(step: int, total_steps: int, cfg: SAETrainingConfig) -> float:
    """Linear warm-up, then cosine decay to `lr_end_fraction` of the peak."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    progress = min(1.0, (step - cfg.lr_warmup_steps) / max(1, total_steps - cfg.lr_warmup_steps))
    end = cfg.lr * cfg.lr_end_fraction
    return end + 0.5 * (cfg.lr - end) * (1 + math.cos(math.pi * progress))


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
    means float32 products); emulated bfloat16 products are far slower than float32 on CPUs without bf16
    instructions."""
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "auto" and loaded.dtype == torch.bfloat16 and bf16_is_fast(loaded.device):
        return torch.bfloat16
    return None


def new_optimizer(params: dict[str, torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    # fused: one kernel per parameter instead of several passes over each of the SAE's large matrices
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
        self.params = {
            layer: trainable_parameters(s) if cfg.sparse_kernel else dict(s.named_parameters())
            for layer, s in self.saes.items()
        }
        self.optimizers = {layer: new_optimizer(p, cfg.lr) for layer, p in self.params.items()}
        d_sae = loaded.d_model * cfg.expansion
        self.since_fired = {layer: torch.zeros(d_sae, device=loaded.device) for layer in cfg.layers}
        self.state = TrainingState()
        self.stats: dict[int, NormStats] = {}
        self.leftover: dict[int, torch.Tensor] = {}
        self.last_checkpoint_step = 0
        self.matmul_dtype = encoder_matmul_dtype(cfg.encoder_matmul_dtype, loaded)
        if cfg.sparse_kernel:
            log.info("sparse TopK kernel, encoder matmul dtype: %s", self.matmul_dtype or torch.float32)
        else:
            log.info("dense reference step (SAELens' training_forward_pass), float32")
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
        """Activations of each model batch. Data-parallel, each rank runs the model on its share of the
        batch's sequences and the ranks gather the rows (in batch order), so every rank holds the whole
        batch, exactly as one process would: same buffers, same shuffles, same SAE batches."""
        ranks = world()
        for ids in batch_sequences(self._sequence_stream(start), self.cfg.model_batch):
            self.state.sequences_done += ids.shape[0]
            began = time.perf_counter()
            first, stop = ranks.bounds(ids.shape[0])
            if stop > first:
                acts = layer_activations(self.loaded, ids[first:stop], self.cfg.layers)
            else:  # a last batch smaller than the number of ranks
                acts = {
                    layer: torch.zeros(0, self.loaded.d_model, device=self.loaded.device) for layer in self.cfg.layers
                }
            acts = {layer: ranks.gather_rows(x) for layer, x in acts.items()}
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
        ranks = world()
        for layer, x_all in batch.items():
            sae, opt = self.saes[layer], self.optimizers[layer]
            for group in opt.param_groups:
                group["lr"] = lr
            dead_mask = self.since_fired[layer] > self.cfg.dead_after_tokens
            # data-parallel: each rank a share of the batch's tokens; (mse + aux) x share is its share of
            # the batch's loss, and the summed gradients are the whole batch's (one process: share 1)
            first, stop = ranks.bounds(x_all.shape[0])
            x, share = x_all[first:stop], (stop - first) / x_all.shape[0]
            if self.cfg.sparse_kernel:
                rows = self.params[layer]["W_enc_rows"]
                mse, aux, _, fired = topk_training_losses(sae, x, dead_mask, matmul_dtype, rows)
            else:
                mse, aux, _, fired = reference_training_losses(sae, x, dead_mask, self.state.step)
            opt.zero_grad(set_to_none=True)
            ((mse + aux) * share).backward()
            ranks.sum_gradients(self.params[layer].values())
            opt.step()
            with torch.no_grad():
                if ranks.active:
                    mse = ranks.sum(mse * share)
                    hit = torch.zeros_like(self.since_fired[layer])
                    hit[fired] = 1.0
                    fired = ranks.max(hit).nonzero().squeeze(1)
                self.since_fired[layer] += x_all.shape[0]
                self.since_fired[layer][fired] = 0
                fve = 1 - mse * x_all.shape[0] / ((x_all - x_all.mean(0)) ** 2).sum()  # mse: squared error per token
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
        if world().is_main:  # data-parallel: every rank holds the same SAEs and optimiser state
            write_checkpoint(self.out / "checkpoint", tensors, meta, indent=1)
        world().barrier()
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
            if progress is not None and world().is_main:
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
            if world().is_main:
                with atomic_dir(target, overwrite=overwrite) as tmp:
                    sae = self.inference_sae(layer)
                    sae.to("cpu").to(torch.bfloat16)
                    sae.save_model(str(tmp))
            paths.append(target)
        if world().is_main:
            atomic_write_json(final_dir / "training_config.json", asdict(self.cfg))
        world().barrier()
        return paths
