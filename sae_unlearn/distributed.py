"""Data-parallel runs through accelerate: `accelerate launch -m sae_unlearn.cli ...` (or `--processes N`).

Every rank loads the whole model and runs the same deterministic schedule (same seeds, same batches);
each takes a contiguous share of every global batch and of the statistics' paragraphs. accelerate
creates the process group (NCCL on GPUs, gloo with `--cpu` or without CUDA) and does the collectives.

The models are never wrapped in DistributedDataParallel: CRISP, NPO and RMU call the decoder body
directly through hooks (DDP's reducer only runs through the wrapper's forward), and the SAE trainer
steps per-layer optimisers. Instead, after `backward`, `sum_gradients` all-reduces the trainable
gradients in one flat bucket (with accelerate's `reduce`). For the result to equal a single process
on the same global batch, every loss is written as this rank's share of the global loss: a mean over
tokens (or sequences) is the local sum divided by the global count (`global_count`), never a mean of
per-rank means. Summed over ranks the shares are the global loss, so the summed gradients are its
gradient, whatever the ranks' token counts. Without a launcher (WORLD_SIZE unset or 1) every helper is
the identity and nothing from accelerate is initialised.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def launched() -> bool:
    """Whether a launcher (accelerate launch, torchrun) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@functools.cache
def _state() -> Any:
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


class World:
    """This process's place among the data-parallel ranks (one process: rank 0 of 1)."""

    @property
    def size(self) -> int:
        return int(_state().num_processes) if launched() else 1

    @property
    def rank(self) -> int:
        return int(_state().process_index) if launched() else 0

    @property
    def local_rank(self) -> int:
        return int(_state().local_process_index) if launched() else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of n items (sizes differ by at most one)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, items: Sequence[T]) -> list[T]:
        start, stop = self.bounds(len(items))
        return list(items[start:stop])

    def check_batch(self, batch_size: int, option: str) -> None:
        """Refuse a global batch that leaves a rank without data."""
        if batch_size < self.size:
            from sae_unlearn.errors import UserError

            raise UserError(
                f"{option}={batch_size} is smaller than the {self.size} data-parallel processes",
                f"raise {option} to at least {self.size} (it is the global batch, split across processes)",
            )

    # -- collectives (identity on one process) -----------------------------------------------------
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor, no gradient)."""
        if not self.active:
            return tensor.detach().clone()
        from accelerate.utils import reduce

        out: torch.Tensor = reduce(tensor.detach().contiguous(), reduction="sum")  # type: ignore[assignment]
        return out

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks (a new tensor, no gradient)."""
        if not self.active:
            return tensor.detach().clone()
        from accelerate.utils import gather

        stacked: torch.Tensor = gather(tensor.detach().contiguous().unsqueeze(0))  # type: ignore[assignment]
        return stacked.amax(0)

    def global_count(self, count: torch.Tensor | float | int, device: torch.device | None = None) -> torch.Tensor:
        """The global number of tokens/sequences a mean divides by (summed over ranks, at least 1)."""
        local = torch.as_tensor(count, dtype=torch.float32, device=device)
        return self.sum(local).clamp_min(1.0)

    def sum_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """All-reduce (sum) the gradients of `params` in one flat bucket; a missing gradient counts as zero."""
        if not self.active:
            return
        params = [p for p in params]
        if not params:
            return
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten() for p in params]
        )
        total = self.sum(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = total[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of every rank, concatenated in rank order (ranks may hold different numbers of rows)."""
        if not self.active:
            return tensor
        from accelerate.utils import gather, pad_across_processes

        sizes: list[int] = gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()  # type: ignore[union-attr]
        padded: torch.Tensor = gather(pad_across_processes(tensor.contiguous(), dim=0))  # type: ignore[assignment]
        width = max(sizes)
        return torch.cat([padded[i * width : i * width + n] for i, n in enumerate(sizes)])

    def broadcast(self, obj: T) -> T:
        """The main rank's `obj` on every rank (any picklable object)."""
        if not self.active:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def barrier(self) -> None:
        if self.active:
            _state().wait_for_everyone()


WORLD = World()


def world() -> World:
    return WORLD


def device_for_rank(device: str) -> str:
    """`cuda`/`auto` become this rank's device when launched: its own GPU (cuda:LOCAL_RANK), or the CPU for
    a gloo run (`accelerate launch --cpu`, or no GPU)."""
    if not launched() or device not in ("auto", "cuda"):
        return device
    own = torch.device(_state().device)
    if own.type == "cpu":
        return "cpu" if device == "auto" else device  # cuda without a GPU: resolve_device says so
    return str(own)
