"""Bridge to EleutherAI's lm-evaluation-harness (lm-eval 0.4.13).

The model is evaluated as given: an in-memory transformers model (possibly a peft.PeftModel, possibly with
forward hooks on its decoder blocks) is wrapped in lm-eval's HFLM by object, never re-loaded by name, so
adapters and inference-time interventions stay active during the benchmark.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from sae_unlearn.errors import UserError

logger = logging.getLogger(__name__)

_INSTALL_FIX = "install it with `pip install lm-eval==0.4.13`"
_TASK_FIX = "check the name with `lm-eval --tasks list`, or pass --lm-eval-include DIR for local task YAMLs"


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    include_path: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on `model` as is; return {task: {metric: value}} with numeric metrics only.

    `limit` caps the number of documents per task; `include_path` is a folder of extra task YAMLs.
    `device` is passed to HFLM, which keeps a pre-built model where it already is.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError("lm-eval is not installed", _INSTALL_FIX) from exc

    if not tasks:
        raise UserError("no lm-eval task given", _TASK_FIX)
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"lm-eval include path {include_path} is not a folder", "pass a folder of task YAMLs")
    task_manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(task_manager.all_tasks)
    for name in tasks:
        if name not in known and not Path(name).is_file():
            raise UserError(f"unknown lm-eval task '{name}'", _TASK_FIX)

    logger.info("lm-eval: tasks=%s limit=%s batch_size=%d", ",".join(tasks), limit, batch_size)
    # lm-eval's decorators hide these signatures from type checkers
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)  # pyright: ignore[reportCallIssue]
    options = {"model": hflm, "tasks": list(tasks), "limit": limit, "task_manager": task_manager}
    output = lm_eval.simple_evaluate(**options, log_samples=False)  # pyright: ignore[reportCallIssue]
    if output is None:  # non-zero rank in a distributed run
        return {}
    results: dict[str, dict[str, float]] = {}
    for task_name, metrics in output["results"].items():  # pyright: ignore[reportTypedDictNotRequiredAccess]
        # Metric keys are "metric,filter" (e.g. "acc,none"); skip alias/sample_len and "N/A" or NaN stderrs.
        numeric = {
            key: float(value)
            for key, value in metrics.items()
            if "," in key and isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
        }
        results[task_name] = numeric
        logger.info("lm-eval %s: %s", task_name, numeric)
    return results
