"""Training a LoRA adapter (CRISP, NPO): `AdapterTrainer` wraps the model in PEFT and runs the loop,
with checkpoints (safetensors + JSON), exact resume, NaN handling and fluency-based early stopping
(fluency_check.py). Also the pieces every training method shares (RMU too): seeded epoch batches and
the refusal to train offloaded blocks."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sae_unlearn.distributed import world
from sae_unlearn.errors import UserError
from sae_unlearn.io import atomic_dir, read_checkpoint, write_checkpoint
from sae_unlearn.methods.base import MethodContext
from sae_unlearn.methods.fluency_check import FluencyCheck
from sae_unlearn.models.hooks import decoder_blocks
from sae_unlearn.runs import TrainLog

log = logging.getLogger(__name__)


def epoch_batch(texts: Sequence[str], batch_size: int, seed: int, step: int, salt: int) -> list[str]:
    """Batch `step` of a seeded shuffle of `texts`, reshuffled every epoch; `salt` gives each stream
    (forget, retain) its own order. Deterministic in (seed, salt, step), so a resumed run sees the same data."""
    per_epoch = len(texts) // batch_size
    epoch, i = divmod(step, per_epoch)
    order = list(range(len(texts)))
    random.Random(seed * 1000 + salt * 100 + epoch).shuffle(order)
    return [texts[j] for j in order[i * batch_size : (i + 1) * batch_size]]


LossFn = Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainState:
    step: int = 0
    last_fluent_step: int = 0
    stopped_early: bool = False
    fluency_ratio: float | None = None


def check_not_offloaded(model: Any, layers: Sequence[int], what: str) -> None:
    """Refuse to train blocks that --device-map offloaded (weights on the meta device, loaded per forward
    pass): accelerate's offload serves inference; gradients can pass through such blocks, not train them."""
    blocks = decoder_blocks(model)
    offloaded = [layer for layer in layers if any(p.device.type == "meta" for p in blocks[layer].parameters())]
    if offloaded:
        raise UserError(
            f"{what} would train blocks {offloaded}, which --device-map offloaded to CPU memory or disk",
            "give the devices more room with --max-memory, or train earlier blocks (--set lora_layers=...)",
        )


class AdapterTrainer:
    def __init__(
        self,
        ctx: MethodContext,
        lora_layers: list[int],
        target_modules: list[str],
        r: int,
        alpha: int,
        dropout: float,
        lr: float,
        seed: int,
        amsgrad: bool = False,
        trainable_tokens: list[int] | None = None,
    ) -> None:
        """`trainable_tokens`: token ids whose input-embedding rows are trained beside the LoRA matrices."""
        from peft import LoraConfig, get_peft_model

        self.ctx = ctx
        base = ctx.loaded.model
        names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        targets = [t for t in target_modules if t in names]
        if not targets:
            raise UserError(
                f"none of the LoRA target modules {target_modules} exist in this model",
                f"choose among its linear layers, e.g. {sorted(n for n in names if n.endswith('proj'))[:8]}",
            )
        n_layers = ctx.loaded.n_layers
        if any(not 0 <= layer < n_layers for layer in lora_layers):
            raise UserError(f"LoRA layers {lora_layers} are outside the model's blocks 0..{n_layers - 1}")
        check_not_offloaded(base, lora_layers, "LoRA")
        torch.manual_seed(seed)
        extra: dict[str, Any] = {"trainable_token_indices": trainable_tokens} if trainable_tokens else {}
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            layers_to_transform=lora_layers,
            bias="none",
            task_type="CAUSAL_LM",
            **extra,
        )
        self.model = get_peft_model(base, config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, amsgrad=amsgrad)
        self.state = TrainState()
        self.ckpt = ctx.out / "checkpoint"
        self.lora_layers, self.targets = lora_layers, targets
        self.step_fn: Any = None  # set by train(): its state (e.g. a retain-gradient momentum) is checkpointed

    # -- checkpoints (safetensors + JSON; no pickles) ---------------------------------------------
    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)

    def save_checkpoint(self, fluent: dict[str, torch.Tensor] | None) -> None:
        tensors = {f"adapter.{n}": t for n, t in self._adapter_tensors().items()}
        for i, p in enumerate(self.params):
            for key, value in self.opt.state.get(p, {}).items():
                tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
        tensors["rng"] = torch.get_rng_state()
        if torch.cuda.is_available():  # LoRA dropout on a GPU draws from its generator
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"cuda_rng.{i}"] = state
        if self.step_fn is not None:
            tensors.update({f"step.{k}": v for k, v in self.step_fn.state_tensors().items()})
        if fluent is not None:
            tensors.update({f"fluent.{n}": t for n, t in fluent.items()})
        if world().is_main:  # data-parallel: every rank holds the same adapter and optimiser state
            write_checkpoint(self.ckpt, tensors, asdict(self.state))
        world().barrier()

    def load_checkpoint(self) -> dict[str, torch.Tensor] | None:
        tensors, saved = read_checkpoint(self.ckpt, self.ctx.out)
        self._load_adapter_tensors({k[len("adapter.") :]: v for k, v in tensors.items() if k.startswith("adapter.")})
        for i, p in enumerate(self.params):
            state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if state:
                self.opt.state[p] = state
        torch.set_rng_state(tensors["rng"])
        cuda_states = [tensors[f"cuda_rng.{i}"] for i in range(len(tensors)) if f"cuda_rng.{i}" in tensors]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
        if self.step_fn is not None:
            self.step_fn.load_state_tensors({k[len("step.") :]: v for k, v in tensors.items() if k.startswith("step.")})
        self.state = TrainState(**saved)
        fluent = {k[len("fluent.") :]: v for k, v in tensors.items() if k.startswith("fluent.")}
        log.info("resumed at step %d", self.state.step)
        return fluent or None

    # -- the loop ----------------------------------------------------------------------------------
    def train(
        self,
        loss_fn: LossFn,
        steps: int,
        checkpoint_every: int,
        fluency_every: int = 0,
        max_fluency_ratio: float = 2.0,
        max_repetition_increase: float | None = None,
        step_fn: Any = None,
    ) -> dict[str, Any]:
        """`step_fn(model, loss_fn, step)` (e.g. `robust.GradientStep`), when given, sets the gradients
        itself and returns (loss, terms). Early stopping (when `fluency_every`): training ends, restoring the
        last fluent adapter, once the fluency ratio exceeds `max_fluency_ratio` or the repeated-3-gram share
        exceeds the base model's by more than `max_repetition_increase`."""
        ctx = self.ctx
        ranks = world()
        train_log = TrainLog(ctx.out / "train_log.jsonl")
        self.step_fn = step_fn
        fluent = self.load_checkpoint() if ctx.resume else None
        # the tune half of the concept prompts: the evaluation scores the disjoint report half
        check = FluencyCheck(self.model, ctx.loaded.tokenizer, ctx.pack.prompt_split("tune")) if fluency_every else None
        if check is not None and fluent is None and self.state.step == 0:
            fluent = self._adapter_tensors()  # the untrained adapter: what a failed first check restores
        try:
            while self.state.step < steps and not self.state.stopped_early:
                started = time.perf_counter()
                self.model.train()
                self.opt.zero_grad(set_to_none=True)
                try:
                    if step_fn is not None:
                        total, terms = step_fn(self.model, loss_fn, self.state.step)
                    else:
                        total, terms = loss_fn(self.model, self.state.step)
                except FloatingPointError as e:
                    raise UserError(
                        f"training stopped at step {self.state.step}: {e}",
                        "the last good checkpoint is kept; lower --lr or resume with --resume",
                    ) from e
                if step_fn is None:
                    total.backward()
                ranks.sum_gradients(self.params)  # data-parallel: `total` is this rank's share of the loss
                self.opt.step()
                self.state.step += 1
                record = {"step": self.state.step, "total": float(ranks.sum(total)), **terms}
                if check is not None and self.state.step % fluency_every == 0:
                    reading = ranks.broadcast(check.read(self.model) if ranks.is_main else None)  # one decision
                    assert reading is not None
                    ratio = reading.ratio
                    record["fluency_ratio"], record["repetition"] = ratio, reading.repetition
                    repetitive = (
                        max_repetition_increase is not None
                        and reading.repetition > check.base_repetition + max_repetition_increase
                    )
                    if ratio > max_fluency_ratio or repetitive:
                        log.warning(
                            "fluency ratio %.2f (max %.2f), repeated 3-grams %.2f (base %.2f) at step %d: "
                            "keeping the adapter of step %d",
                            ratio,
                            max_fluency_ratio,
                            reading.repetition,
                            check.base_repetition,
                            self.state.step,
                            self.state.last_fluent_step,
                        )
                        if fluent is not None:
                            self._load_adapter_tensors(fluent)
                        self.state.stopped_early = True
                    else:
                        fluent, self.state.last_fluent_step, self.state.fluency_ratio = (
                            self._adapter_tensors(),
                            self.state.step,
                            ratio,
                        )
                record["seconds"] = round(time.perf_counter() - started, 3)  # the step and its fluency check
                if ranks.is_main:
                    train_log.write(record)
                if ctx.progress is not None and ranks.is_main:
                    ctx.progress(self.state.step, steps, terms)
                if checkpoint_every and self.state.step % checkpoint_every == 0:
                    self.save_checkpoint(fluent)
            if ranks.is_main:
                with atomic_dir(ctx.out / "adapter", overwrite=True) as tmp:
                    self.model.save_pretrained(str(tmp))
            ranks.barrier()
        finally:
            self.model.unload()  # removes the LoRA layers: ctx.loaded.model is the base model again, unchanged
        return {
            "steps_done": self.state.step,
            "stopped_early": self.state.stopped_early,
            "last_fluent_step": self.state.last_fluent_step,
            "fluency_ratio": self.state.fluency_ratio,
            "lora_target_modules": self.targets,
        }
