"""SAE quality on held-out text: variance explained, L0, dead latents, and the next-token loss
increase when the SAE's reconstruction replaces the residual stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sae_unlearn.models.hooks import capture_resid_post, edit_resid_post, token_policy, valid_token_mask
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.loading import LoadedSAE
from sae_unlearn.saes.training import batch_sequences, pack_sequences


@dataclass
class SAEQuality:
    layer: int
    d_sae: int
    tokens: int
    fve: float  # raw space, huge-norm outlier tokens left out (as in training)
    fve_scaled: float  # each dimension scaled by its std: no single dimension dominates
    fve_all_tokens: float  # raw space, outliers included
    outlier_share: float
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_spliced: float

    @property
    def ce_increase(self) -> float:
        return self.ce_spliced - self.ce_clean

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ce_increase": self.ce_increase}


def _outlier_limit(sae: Any) -> float:
    norm = sae.cfg.metadata.get("normalization") or {}
    return float(norm.get("outlier_max_norm", float("inf")))


def _ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    target_mask = mask[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    loss = loss.view_as(target_mask)[target_mask]
    return float(loss.sum()), int(loss.numel())


@torch.no_grad()
def evaluate_saes(
    loaded: LoadedModel,
    saes: Sequence[LoadedSAE],
    texts: Sequence[str],
    max_tokens: int = 16384,
    ce_tokens: int = 4096,
    context_size: int = 128,
    batch: int = 8,
) -> list[SAEQuality]:
    layers = [s.layer for s in saes]
    specials = token_policy(loaded.tokenizer)
    acc: dict[int, dict[str, Any]] = {
        s.layer: {
            "n": 0,
            "n_all": 0,
            "sse": 0.0,
            "sse_all": 0.0,
            "sx": 0.0,
            "sxx": 0.0,
            "sx_all": 0.0,
            "sxx_all": 0.0,
            "xs": [],
            "err": [],
            "l0": 0.0,
            "fired": torch.zeros(s.d_sae, dtype=torch.bool),
            "ce": [0.0, 0.0, 0],
        }
        for s in saes
    }
    seen = 0
    for ids in batch_sequences(pack_sequences(texts, loaded.tokenizer, context_size, 1234), batch):
        ids = ids.to(loaded.device)
        mask = valid_token_mask(ids, None, specials)
        acts = capture_resid_post(loaded.model, ids, None, layers)
        for s in saes:
            a = acc[s.layer]
            x = acts[s.layer][mask].float()
            feats = s.sae.encode(x.to(s.sae.W_enc.dtype))
            x_hat = s.sae.decode(feats).float()
            keep = x.norm(dim=-1) <= _outlier_limit(s.sae)
            err = (x - x_hat) ** 2
            a["sse_all"] += float(err.sum())
            a["sx_all"] = a["sx_all"] + x.sum(0)
            a["sxx_all"] += float((x**2).sum())
            a["n_all"] += x.shape[0]
            xk = x[keep]
            a["sse"] += float(err[keep].sum())
            a["sx"] = a["sx"] + xk.sum(0)
            a["sxx"] += float((xk**2).sum())
            a["n"] += xk.shape[0]
            a["xs"].append(xk)
            a["err"].append(err[keep])
            a["l0"] += float((feats[keep] > 0).sum())
            a["fired"] |= (feats > 0).any(0).cpu()
        if seen < ce_tokens:
            clean = loaded.model(input_ids=ids).logits
            total, count = _ce(clean, ids, mask)
            for s in saes:

                def splice(
                    hidden: torch.Tensor, _ids: Any, s: LoadedSAE = s, mask: torch.Tensor = mask
                ) -> torch.Tensor:
                    recon = s.sae.decode(s.sae.encode(hidden.to(s.sae.W_enc.dtype))).to(hidden.dtype)
                    return torch.where(mask.unsqueeze(-1), recon, hidden)

                with edit_resid_post(loaded.model, {s.layer: splice}):
                    spliced = loaded.model(input_ids=ids).logits
                acc[s.layer]["ce"][0] += total
                acc[s.layer]["ce"][1] += _ce(spliced, ids, mask)[0]
                acc[s.layer]["ce"][2] += count
        seen += int(mask.sum())
        if seen >= max_tokens:
            break
    results = []
    for s in saes:
        a = acc[s.layer]
        sst = a["sxx"] - float((a["sx"] ** 2).sum()) / max(1, a["n"])
        sst_all = a["sxx_all"] - float((a["sx_all"] ** 2).sum()) / max(1, a["n_all"])
        xs, errs = torch.cat(a["xs"]), torch.cat(a["err"])
        var = xs.var(0).clamp_min(1e-8)
        fve_scaled = 1 - float((errs / var).sum()) / float((((xs - xs.mean(0)) ** 2) / var).sum())
        ce_clean, ce_spliced, n_ce = a["ce"]
        results.append(
            SAEQuality(
                layer=s.layer,
                d_sae=s.d_sae,
                tokens=a["n_all"],
                fve=1 - a["sse"] / sst,
                fve_scaled=fve_scaled,
                fve_all_tokens=1 - a["sse_all"] / sst_all,
                outlier_share=1 - a["n"] / max(1, a["n_all"]),
                l0=a["l0"] / max(1, a["n"]),
                dead_fraction=1 - float(a["fired"].float().mean()),
                ce_clean=ce_clean / max(1, n_ce),
                ce_spliced=ce_spliced / max(1, n_ce),
            )
        )
    return results
