"""SAEs: load through SAELens (releases, local dirs, shipped), check against the model, train TopK SAEs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from sae_unlearn.errors import UserError
from sae_unlearn.io import atomic_write_json
from sae_unlearn.models.hooks import check_layers
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.loading import LoadedSAE, check_compatible, load_saes_from_spec, shipped_dir_for
from sae_unlearn.saes.quality import SAEQuality, evaluate_saes
from sae_unlearn.saes.training import SAETrainer, SAETrainingConfig

log = logging.getLogger(__name__)

__all__ = [
    "LoadedSAE",
    "SAEQuality",
    "SAETrainer",
    "SAETrainingConfig",
    "check_compatible",
    "evaluate_saes",
    "load_saes_for",
    "load_saes_from_spec",
    "shipped_dir_for",
    "train_saes",
]


def load_saes_for(loaded: LoadedModel, spec: str = "shipped") -> list[LoadedSAE]:
    """Load SAEs and check they fit the model (hidden size and layer)."""
    saes = load_saes_from_spec(spec, model_spec=loaded.spec, device=str(loaded.device), dtype=loaded.dtype)
    check_compatible(saes, loaded.n_layers, loaded.d_model)
    return saes


def train_saes(
    loaded: LoadedModel,
    cfg: SAETrainingConfig,
    texts: Sequence[str],
    out: Path,
    heldout: Sequence[str] | None = None,
    resume: bool = False,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> list[SAEQuality]:
    """Train one TopK SAE per layer, export them in SAELens format under `out`, and measure them."""
    check_layers(loaded.model, cfg.layers)
    out.mkdir(parents=True, exist_ok=True)
    trainer = SAETrainer(loaded, cfg, texts, out, loaded.spec)
    trainer.train(resume=resume, progress=progress)
    trainer.export(out)
    saes = load_saes_from_spec(str(out), model_spec=loaded.spec, device=str(loaded.device), dtype=loaded.dtype)
    eval_texts = list(heldout) if heldout else list(texts)[-max(1, len(texts) // 20) :]
    if not heldout:
        log.warning("no held-out text given: quality is measured on the last 5%% of the training corpus")
    quality = evaluate_saes(loaded, saes, eval_texts, max_tokens=cfg.eval_tokens)
    atomic_write_json(out / "quality.json", [q.to_dict() for q in quality])
    atomic_write_json(out / "history.json", trainer.state.history)
    if not quality:
        raise UserError("no SAE was trained")
    return quality
