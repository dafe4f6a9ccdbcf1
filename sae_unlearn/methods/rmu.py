"""RMU (WMDP paper, arXiv 2403.03218): the standard baseline, no SAE.

On forget text the residual stream after one block is pushed toward c * u (u a fixed random unit
vector), on retain text it is kept at the frozen model's; only a few parameters of the blocks at and
below it are updated (full weights, as published). The loss is the published one (mean squared
errors, retain weighted by `alpha`) on valid tokens only (no BOS, no padding: Gemma's BOS state is
~12x the norm of the others and would set both the coefficient and the loss), divided by the squared
median token norm so its values read the same on any model (Adam does not see the scale).

Gemma 2/3 normalise every sublayer's output (`post_feedforward_layernorm` after the MLP), so
`down_proj` can turn the MLP's output but not grow it; measured on the embedded model it still moves
the forget residual by half its norm within 20 steps, so the default update set stays the published
one (`param_names` can add the norm's gain). What kept the old defaults from forgetting is in
docs/baselines.md. The coefficient comes from the median non-BOS token norm over many forget tokens.
The artifact is rmu_weights.safetensors: the updated parameters, which `install` swaps in (and back on exit).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae_unlearn.concepts.pack import ConceptPack
from sae_unlearn.distributed import world
from sae_unlearn.errors import UserError
from sae_unlearn.methods.adapter_training import check_not_offloaded, epoch_batch
from sae_unlearn.methods.base import Method, MethodContext, TrainingWork, register
from sae_unlearn.models.batch import Batch, hidden_at_layers, tokenize
from sae_unlearn.models.hooks import decoder_blocks
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.runs import TrainLog

log = logging.getLogger(__name__)

# the MLP output projection (updated by default, as published) across architecture families
DOWN_PROJ_NAMES = ("mlp.down_proj.weight", "mlp.c_proj.weight", "mlp.dense_4h_to_h.weight")


@dataclass
class RmuConfig:
    layer: int | None = None
    """Block whose output (resid_post) is steered; default round(7/32 x depth), the published
    Zephyr-7B proportion (layer 7 of 32)."""
    update_layers: list[int] | None = None
    """Blocks whose parameters are updated; default layer-2 .. layer (published: 5, 6, 7)."""
    param_names: list[str] | None = None
    """Parameter names inside each updated block; default the MLP output projection (published). Gemma's
    post-MLP norm gain (`post_feedforward_layernorm.weight`) can be added: at lr 5e-5 it changed nothing
    measurable (docs/baselines.md)."""
    steering_coeff: float | None = None
    """|c|; default `coeff_scale` x the median token norm at `layer` (no BOS, no padding)."""
    coeff_scale: float = 2.0
    """Steering coefficient in units of the median token norm (published: 6.5 at Zephyr's layer 7)."""
    coeff_texts: int = 64
    """Forget-train paragraphs whose tokens give the median norm."""
    alpha: float = 100.0
    """Retain weight on the published scale (both MSEs in the same units): 1200 for Zephyr-7B in the
    WMDP paper; Gemma-2-2B reproductions use about 1 or less. On the embedded model's tune split
    (docs/baselines.md) alpha 100 keeps near/far and retain perplexity within +14% but leaves target
    accuracy at 0.63; alpha 10 brings target accuracy to 0.37 but more than doubles retain perplexity."""
    lr: float = 1e-4
    """AdamW learning rate on a float32 master copy of the updated parameters (published 5e-5; 1e-4 is
    the evaluated setting, docs/baselines.md)."""
    steps: int = 60
    """Optimizer steps, one forget and one retain batch each (published: 150 batches for Zephyr; 60 is
    the evaluated setting)."""
    batch_size: int = 4
    """Paragraphs per forget batch and per retain batch (published: 4)."""
    max_length: int = 128
    """Tokens per paragraph (published: 512; 128 keeps a CPU run to minutes)."""
    seed: int = 0
    """Seeds the random direction u and the batch order."""

    def __post_init__(self) -> None:
        if self.coeff_scale <= 0 or (self.steering_coeff is not None and self.steering_coeff <= 0):
            raise UserError("the RMU steering coefficient must be positive", "e.g. coeff_scale=2")
        if self.alpha < 0 or self.lr <= 0 or self.steps < 0 or self.batch_size < 1 or self.coeff_texts < 1:
            raise UserError(
                "RMU needs alpha >= 0, lr > 0, steps >= 0, batch_size >= 1 and coeff_texts >= 1",
                "check the --set rmu.* options",
            )


def default_param_names(block: torch.nn.Module) -> list[str]:
    """The MLP output projection of the block, whatever the family calls it."""
    own = {name for name, _ in block.named_parameters()}
    names = [n for n in DOWN_PROJ_NAMES if n in own][:1]
    if not names:
        raise UserError(
            f"cannot find the MLP output projection of {type(block).__name__}",
            "name the parameters to update with --set rmu.param_names=...",
        )
    return names


def steering_vector(d_model: int, seed: int) -> torch.Tensor:
    """The published direction: uniform [0, 1) entries, normalised (fixed by `seed`)."""
    u = torch.rand(d_model, generator=torch.Generator().manual_seed(seed))
    return u / u.norm()


def median_token_norm(loaded: Any, texts: list[str], layer: int, max_length: int, batch_size: int = 8) -> float:
    """Median L2 norm of the resid_post at `layer` over the valid (non-BOS, non-padding) tokens of `texts`."""
    norms = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenize(loaded.tokenizer, texts[i : i + batch_size], max_length, loaded.device)
            h = hidden_at_layers(loaded.model, batch, [layer]).hidden[layer]
            norms.append(h.float()[batch.valid].norm(dim=-1))
    return float(torch.cat(norms).median())


def masked_mse(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of the squared L2 distance (the published MSE up to the factor d_model);
    data-parallel, this rank's share (over the global token count)."""
    return ((a.float() - b.float())[valid] ** 2).sum() / world().global_count(valid.sum(), a.device)


def relative_shift(h: torch.Tensor, frozen: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of |h - frozen| / |frozen|: how far training moved the activations
    (data-parallel: this rank's share)."""
    h, frozen = h.float()[valid], frozen.float()[valid]
    n = world().global_count(valid.sum(), h.device)
    return ((h - frozen).norm(dim=-1) / frozen.norm(dim=-1).clamp_min(1e-6)).sum() / n


def steered_layer(cfg: RmuConfig, n_layers: int) -> int:
    """The block whose output RMU steers: `cfg.layer`, else layer 7 of 32 scaled to the model's depth."""
    return cfg.layer if cfg.layer is not None else max(1, round(7 / 32 * n_layers))


@register
class RmuMethod(Method):
    name = "rmu"
    needs_saes = False
    persistent = True
    Config = RmuConfig

    @classmethod
    def training_work(cls, config: RmuConfig, loaded: LoadedModel, pack: ConceptPack) -> TrainingWork:
        """Forward and backward up to the steered layer; the frozen model's retain states there, every step."""
        depth = (steered_layer(config, loaded.n_layers) + 1) / loaded.n_layers
        return TrainingWork(
            config.steps, config.batch_size, config.max_length, depth=depth, frozen_states="retain_each_step"
        )

    def run(self, ctx: MethodContext) -> dict[str, Any]:
        cfg: RmuConfig = self.config
        loaded = ctx.loaded
        n = loaded.n_layers
        layer = steered_layer(cfg, n)
        update = cfg.update_layers if cfg.update_layers is not None else list(range(max(0, layer - 2), layer + 1))
        if not 0 <= layer < n or not update or any(not 0 <= u <= layer for u in update):
            raise UserError(
                f"RMU layer {layer} / update layers {update} do not fit blocks 0..{n - 1}",
                "update layers must be at or below the steered layer",
            )
        forget, retain = ctx.pack.forget_split("train"), ctx.pack.retain_split("train")
        if len(forget) < cfg.batch_size or len(retain) < cfg.batch_size:
            raise UserError("the forget or retain split is smaller than one batch", "lower --set rmu.batch_size")
        ranks = world()
        ranks.check_batch(cfg.batch_size, "rmu.batch_size")
        blocks = decoder_blocks(loaded.model)
        check_not_offloaded(loaded.model, update, "RMU")
        params: dict[str, torch.nn.Parameter] = {}
        for u in update:
            names = cfg.param_names if cfg.param_names is not None else default_param_names(blocks[u])
            for name in names:
                try:
                    params[f"{u}.{name}"] = blocks[u].get_parameter(name)
                except AttributeError as e:
                    own = sorted(p for p, _ in blocks[u].named_parameters())
                    raise UserError(f"block {u} has no parameter {name!r}", f"its parameters: {', '.join(own)}") from e

        median_norm = median_token_norm(loaded, forget[: cfg.coeff_texts], layer, cfg.max_length)
        coeff = cfg.steering_coeff if cfg.steering_coeff is not None else cfg.coeff_scale * median_norm
        log.info(
            "RMU: layer %d, updating %s, c = %.1f (median token norm %.1f)", layer, list(params), coeff, median_norm
        )
        target_vec = (coeff * steering_vector(loaded.d_model, cfg.seed)).to(loaded.device)
        scale = median_norm**2  # loss units: the squared median norm

        originals = {k: p.detach().clone() for k, p in params.items()}
        master = {k: p.detach().float().clone().requires_grad_(True) for k, p in params.items()}
        opt = torch.optim.AdamW(list(master.values()), lr=cfg.lr)
        train_log = TrainLog(ctx.out / "train_log.jsonl")
        terms: dict[str, float] = {}
        try:
            for p in params.values():
                p.requires_grad_(True)
            for step in range(cfg.steps):
                started = time.perf_counter()
                # data-parallel: each rank a share of the global batches; the losses are its shares
                f_texts = ranks.shard(epoch_batch(forget, cfg.batch_size, cfg.seed, step, 1))
                r_texts = ranks.shard(epoch_batch(retain, cfg.batch_size, cfg.seed, step, 2))
                f_batch = tokenize(loaded.tokenizer, f_texts, cfg.max_length, loaded.device)
                r_batch = tokenize(loaded.tokenizer, r_texts, cfg.max_length, loaded.device)
                frozen_f, frozen_r = self._frozen(loaded, params, originals, master, f_batch, r_batch, layer)
                # gradients reach the model-dtype weights; we step a float32 master copy
                h_f = hidden_at_layers(loaded.model, f_batch, [layer]).hidden[layer]
                h_r = hidden_at_layers(loaded.model, r_batch, [layer]).hidden[layer]
                forget_loss = masked_mse(h_f, target_vec.expand_as(h_f), f_batch.valid) / scale
                retain_loss = masked_mse(h_r, frozen_r, r_batch.valid) / scale
                total = forget_loss + cfg.alpha * retain_loss
                if not torch.isfinite(ranks.sum(total)):
                    raise UserError(f"RMU diverged at step {step}", "lower --set rmu.lr")
                for p in params.values():
                    p.grad = None
                total.backward()
                ranks.sum_gradients(list(params.values()))
                for k, p in params.items():
                    master[k].grad = p.grad.float() if p.grad is not None else None
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for k, p in params.items():
                        p.copy_(master[k].to(p.dtype))
                h_f_valid = h_f.detach().float()[f_batch.valid]
                cos = torch.nn.functional.cosine_similarity(h_f_valid, target_vec, dim=-1).sum()
                shares = {
                    "forget": forget_loss,
                    "retain": retain_loss,
                    "forget_shift": relative_shift(h_f.detach(), frozen_f, f_batch.valid),
                    "retain_shift": relative_shift(h_r.detach(), frozen_r, r_batch.valid),
                    "forget_cos_u": cos / ranks.global_count(f_batch.valid.sum(), cos.device),
                    "total": total,
                }
                values = ranks.sum(torch.stack([v.detach().float() for v in shares.values()])).tolist()
                terms = dict(zip(shares, values, strict=True))  # the global terms (each rank holds a share)
                record_total = terms.pop("total")
                if ranks.is_main:
                    seconds = round(time.perf_counter() - started, 3)
                    train_log.write({"step": step + 1, "total": record_total, **terms, "seconds": seconds})
                if ctx.progress is not None and ranks.is_main:
                    ctx.progress(step + 1, cfg.steps, terms)
            weights = {k: master[k].detach().to(loaded.dtype).contiguous() for k in params}
            if ranks.is_main:  # data-parallel: every rank holds the same weights
                tmp = ctx.out / ".rmu_weights.safetensors.tmp"
                save_file(weights, str(tmp), metadata={"layer": str(layer)})
                tmp.replace(ctx.out / "rmu_weights.safetensors")
            ranks.barrier()
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(originals[k])
                    p.requires_grad_(False)
                    p.grad = None
        return {
            "artifact": "rmu_weights.safetensors",
            "layer": layer,
            "update_layers": update,
            "updated_parameters": list(params),
            "steering_coeff": coeff,
            "median_token_norm": median_norm,
            "final": terms,
        }

    @classmethod
    @contextlib.contextmanager
    def install(cls, loaded: LoadedModel, run_dir: Path) -> Iterator[Any]:
        path = run_dir / "rmu_weights.safetensors"
        if not path.exists():
            raise UserError(f"{path} is missing", "the run did not finish")
        weights = load_file(str(path))
        blocks = decoder_blocks(loaded.model)
        params = {}
        for name in weights:
            layer, rest = name.split(".", 1)
            params[name] = blocks[int(layer)].get_parameter(rest)
            if params[name].shape != weights[name].shape:
                raise UserError(
                    f"{path}: {name} has shape {tuple(weights[name].shape)}, the model's is "
                    f"{tuple(params[name].shape)}",
                    "it was made for another base model",
                )
        originals = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k].to(p.device, p.dtype))
        try:
            yield loaded.model
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(originals[k])

    @staticmethod
    def _frozen(
        loaded: Any,
        params: dict[str, torch.nn.Parameter],
        originals: dict[str, torch.Tensor],
        master: dict[str, torch.Tensor],
        f_batch: Batch,
        r_batch: Batch,
        layer: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen model's activations on both batches (original weights swapped in, then back)."""
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(originals[k])
            frozen_f = hidden_at_layers(loaded.model, f_batch, [layer]).hidden[layer]
            frozen_r = hidden_at_layers(loaded.model, r_batch, [layer]).hidden[layer]
            for k, p in params.items():
                p.copy_(master[k].to(p.dtype))
        return frozen_f, frozen_r
