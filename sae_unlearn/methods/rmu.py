"""RMU (WMDP paper, arXiv 2403.03218): the standard baseline, no SAE.

On forget text the activations at one layer are pushed toward c * u (u a fixed random unit vector),
on retain text they are kept at the frozen model's; only the MLP output projections of a few layers
below it are updated (full weights, as published). Layer, update layers and c default to the same
fraction of depth and scale as the published Zephyr-7B setting (layer 7 of 32, layers 5-7, c = 6.5
at a residual norm of a few units): here c defaults to `coeff_scale` x the mean activation norm.
The artifact is rmu_weights.safetensors: the updated down_proj weights, which `apply` swaps in.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file

from sae_unlearn.errors import UserError
from sae_unlearn.methods.base import Method, MethodContext, register
from sae_unlearn.methods.persistent import hidden_at_layers, relative_mse, tokenize
from sae_unlearn.models.hooks import decoder_blocks
from sae_unlearn.runs import TrainLog

log = logging.getLogger(__name__)


@dataclass
class RmuConfig:
    layer: int | None = None  # default: round(7/32 of depth)
    update_layers: list[int] | None = None  # default: layer-2 .. layer
    param_name: str = "mlp.down_proj"
    steering_coeff: float | None = None  # default: coeff_scale x mean forget-activation norm
    coeff_scale: float = 2.0
    alpha: float = 100.0  # retain weight (published 1200 on raw MSE; ours is a relative MSE)
    lr: float = 5e-5
    steps: int = 150
    batch_size: int = 4
    max_length: int = 128
    seed: int = 0


@register
class RmuMethod(Method):
    name = "rmu"
    needs_saes = False
    persistent = True
    Config = RmuConfig

    def run(self, ctx: MethodContext) -> dict[str, Any]:
        cfg: RmuConfig = self.config
        loaded = ctx.loaded
        n = loaded.n_layers
        layer = cfg.layer if cfg.layer is not None else max(1, round(7 / 32 * n))
        update = cfg.update_layers if cfg.update_layers is not None else list(range(max(0, layer - 2), layer + 1))
        if not 0 <= layer < n or any(not 0 <= u <= layer for u in update):
            raise UserError(
                f"RMU layer {layer} / update layers {update} do not fit blocks 0..{n - 1}",
                "update layers must be at or below the steered layer",
            )
        blocks = decoder_blocks(loaded.model)
        params: dict[str, torch.nn.Parameter] = {}
        for u in update:
            module = blocks[u].get_submodule(cfg.param_name)
            params[f"{u}.{cfg.param_name}.weight"] = module.weight  # type: ignore[assignment]
        originals = {k: p.detach().clone() for k, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        master = {k: p.detach().float().clone().requires_grad_(True) for k, p in params.items()}
        opt = torch.optim.AdamW(list(master.values()), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        u_vec = torch.rand(loaded.d_model, generator=gen)
        u_vec = (u_vec / u_vec.norm()).to(loaded.device)
        forget, retain = ctx.pack.forget_split("train"), ctx.pack.retain_split("train")
        rng = random.Random(cfg.seed)
        train_log = TrainLog(ctx.out / "train_log.jsonl")
        coeff = cfg.steering_coeff
        try:
            for step in range(cfg.steps):
                f_batch = tokenize(loaded.tokenizer, rng.sample(forget, cfg.batch_size), cfg.max_length, loaded.device)
                r_batch = tokenize(loaded.tokenizer, rng.sample(retain, cfg.batch_size), cfg.max_length, loaded.device)
                with torch.no_grad():
                    for k, p in params.items():
                        p.copy_(originals[k])
                    frozen_r = hidden_at_layers(loaded.model, r_batch, [layer]).hidden[layer]
                    if coeff is None:
                        h = hidden_at_layers(loaded.model, f_batch, [layer]).hidden[layer]
                        coeff = cfg.coeff_scale * float(h.float()[f_batch.valid].norm(dim=-1).mean())
                        log.info("RMU steering coefficient %.1f (%.1f x mean norm)", coeff, cfg.coeff_scale)
                    for k, p in params.items():
                        p.copy_(master[k].to(p.dtype))
                # gradients reach the bf16 weights; we step a float32 master copy
                h_f = hidden_at_layers(loaded.model, f_batch, [layer]).hidden[layer].float()
                target = (coeff * u_vec).expand_as(h_f)
                forget_loss = relative_mse(h_f, target, f_batch.valid)
                h_r = hidden_at_layers(loaded.model, r_batch, [layer]).hidden[layer]
                retain_loss = relative_mse(h_r, frozen_r, r_batch.valid)
                total = forget_loss + cfg.alpha * retain_loss
                if not torch.isfinite(total.detach()):
                    raise UserError(f"RMU diverged at step {step}", "lower --lr")
                for p in params.values():
                    p.grad = None
                total.backward()
                for k, p in params.items():
                    master[k].grad = p.grad.float() if p.grad is not None else None
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for k, p in params.items():
                        p.copy_(master[k].to(p.dtype))
                terms = {"forget": float(forget_loss.detach()), "retain": float(retain_loss.detach())}
                train_log.write({"step": step + 1, "total": float(total.detach()), **terms})
                if ctx.progress is not None:
                    ctx.progress(step + 1, cfg.steps, terms)
            weights = {k: master[k].detach().to(loaded.dtype).contiguous() for k in params}
            tmp = ctx.out / ".rmu_weights.safetensors.tmp"
            save_file(weights, str(tmp), metadata={"param_name": cfg.param_name})
            tmp.replace(ctx.out / "rmu_weights.safetensors")
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(originals[k])
                    p.requires_grad_(False)
                    p.grad = None
        return {"artifact": "rmu_weights.safetensors", "layer": layer, "update_layers": update, "steering_coeff": coeff}
