"""Models: loading (hub id, local dir, GGUF, embedded aliases) and residual-stream hooks."""

from sae_unlearn.models.hooks import capture_resid_post, edit_resid_post, hook_name, parse_hook_name
from sae_unlearn.models.loading import EMBEDDED_ALIASES, LoadedModel, load_model

__all__ = [
    "EMBEDDED_ALIASES",
    "LoadedModel",
    "capture_resid_post",
    "edit_resid_post",
    "hook_name",
    "load_model",
    "parse_hook_name",
]
