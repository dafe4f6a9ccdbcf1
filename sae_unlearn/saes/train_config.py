"""The SAE trainer's settings (saes/training.py runs them)."""

from __future__ import annotations

from dataclasses import dataclass

from sae_unlearn.errors import UserError

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
    sparse_kernel: bool = True
    """The training step: True, `topk_kernel.topk_training_losses` (the latents ranked in one product
    without gradient, then decoded and back-propagated through the selected and dead latents only);
    False, the dense reference it reproduces, SAELens' own `TopKTrainingSAE.training_forward_pass` (the
    same losses and gradients to float tolerance, every latent's pre-activation kept for the backward).
    `encoder_matmul_dtype` applies to the sparse kernel only; the reference computes in float32."""

    def __post_init__(self) -> None:
        if self.encoder_matmul_dtype not in ("auto", "bfloat16", "float32"):
            raise UserError(
                f"unknown encoder matmul dtype {self.encoder_matmul_dtype!r}", "use auto, bfloat16 or float32"
            )
        if self.normalize not in NORMALIZATION_EXPONENTS:
            raise UserError(f"unknown normalisation {self.normalize!r}", "use sqrt_per_dim, per_dim or none")
        if self.k < 1 or self.expansion < 1:
            raise UserError("k and expansion must be positive")
