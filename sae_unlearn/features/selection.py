"""Feature selection strategies, registered by name. Each takes per-layer statistics and returns the
selected (layer, latent) pairs with the scores that put them there.

- crisp: rank by firing-count difference, keep relative = forget_sum / (retain_sum + 1) >= min_ratio
  among the top candidates_factor * k, return the first k per layer (CRISP, arXiv 2508.13650).
- inlp: score = (f_t - f_r) * log1p(ratio) * log1p(act_ratio) with frequency and ratio filters
  (the INLP feature-ablation project).
- saebench: drop latents whose retain firing rate exceeds a threshold, rank by forget firing rate
  (SAEBench's unlearning evaluation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from sae_unlearn.errors import UserError
from sae_unlearn.features.statistics import LayerStats
from sae_unlearn.options import coerce_options


@dataclass
class SelectedFeature:
    layer: int
    index: int
    score: float
    forget_count: float
    retain_count: float
    forget_sum: float
    retain_sum: float
    forget_max: float
    retain_max: float
    forget_rate: float
    retain_rate: float
    relative: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _balanced(stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts and sums scaled to the smaller corpus' token count.

    The published code draws equal-size forget/retain batches; scaling to equal token counts
    keeps the rule meaning the same when the two corpora differ in size.
    """
    n = min(stats.forget_tokens, stats.retain_tokens)
    fs, rs = n / max(1, stats.forget_tokens), n / max(1, stats.retain_tokens)
    return stats.forget_count * fs, stats.retain_count * rs, stats.forget_sum * fs, stats.retain_sum * rs


def _feature(stats: LayerStats, index: int, score: float) -> SelectedFeature:
    _, _, fsum, rsum = _balanced(stats)
    return SelectedFeature(
        layer=stats.layer,
        index=index,
        score=score,
        forget_count=float(stats.forget_count[index]),
        retain_count=float(stats.retain_count[index]),
        forget_sum=float(stats.forget_sum[index]),
        retain_sum=float(stats.retain_sum[index]),
        forget_max=float(stats.forget_max[index]),
        retain_max=float(stats.retain_max[index]),
        forget_rate=float(stats.forget_rate[index]),
        retain_rate=float(stats.retain_rate[index]),
        relative=float(fsum[index] / (rsum[index] + 1)),
    )


@dataclass
class Strategy:
    """Base: a dataclass of parameters (published defaults) + `select_layer`."""

    k: int = 10
    name: ClassVar[str] = ""

    def select_layer(self, stats: LayerStats) -> list[SelectedFeature]:
        raise NotImplementedError

    def select(self, stats: dict[int, LayerStats]) -> list[SelectedFeature]:
        for s in stats.values():
            if self.k > len(s.forget_count):
                raise UserError(
                    f"--k {self.k} is larger than the SAE width {len(s.forget_count)} at layer {s.layer}",
                    "choose a smaller --k",
                )
        if self.k < 1:
            raise UserError("--k must be at least 1")
        return [f for layer in sorted(stats) for f in self.select_layer(stats[layer])]

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class CrispStrategy(Strategy):
    min_ratio: float = 3.0
    candidates_factor: int = 10
    max_retain_rate: float | None = None  # not in the paper (None): also drop features this dense on retain
    name: ClassVar[str] = "crisp"

    def select_layer(self, stats: LayerStats) -> list[SelectedFeature]:
        fc, rc, fsum, rsum = _balanced(stats)
        freq_diff = fc - rc
        relative = fsum / (rsum + 1)
        if self.max_retain_rate is not None:
            freq_diff = torch.where(stats.retain_rate <= self.max_retain_rate, freq_diff, torch.zeros_like(freq_diff))
        order = torch.argsort(freq_diff, descending=True, stable=True)[: self.candidates_factor * self.k]
        keep = [int(i) for i in order if relative[i] >= self.min_ratio and freq_diff[i] > 0]
        return [_feature(stats, i, float(freq_diff[i])) for i in keep[: self.k]]


@dataclass
class InlpStrategy(Strategy):
    min_forget_rate: float = 0.001
    min_forget_count: int = 5
    max_retain_rate: float = 0.05
    max_forget_rate: float = 0.5
    min_ratio: float = 2.0
    smoothing: float = 1e-4
    name: ClassVar[str] = "inlp"

    def scores(self, stats: LayerStats) -> torch.Tensor:
        ft, fr = stats.forget_rate, stats.retain_rate
        ratio = (ft + self.smoothing) / (fr + self.smoothing)
        mean_f = stats.forget_sum / stats.forget_count.clamp_min(1)
        mean_r = stats.retain_sum / stats.retain_count.clamp_min(1)
        act_ratio = (mean_f + self.smoothing) / (mean_r + self.smoothing)
        score = (ft - fr) * torch.log1p(ratio) * torch.log1p(act_ratio)
        ok = (
            (ft >= self.min_forget_rate)
            & (stats.forget_count >= self.min_forget_count)
            & (fr <= self.max_retain_rate)
            & (ft <= self.max_forget_rate)
            & (ratio >= self.min_ratio)
        )
        return torch.where(ok, score, torch.full_like(score, float("-inf")))

    def select_layer(self, stats: LayerStats) -> list[SelectedFeature]:
        score = self.scores(stats)
        order = torch.argsort(score, descending=True, stable=True)[: self.k]
        return [_feature(stats, int(i), float(score[i])) for i in order if torch.isfinite(score[i])]


@dataclass
class SaebenchStrategy(Strategy):
    max_retain_rate: float = 0.01
    name: ClassVar[str] = "saebench"

    def select_layer(self, stats: LayerStats) -> list[SelectedFeature]:
        rate = torch.where(
            stats.retain_rate <= self.max_retain_rate, stats.forget_rate, torch.full_like(stats.forget_rate, -1.0)
        )
        order = torch.argsort(rate, descending=True, stable=True)[: self.k]
        return [_feature(stats, int(i), float(rate[i])) for i in order if rate[i] > 0]


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (CrispStrategy, InlpStrategy, SaebenchStrategy)}


def make_strategy(name: str, **params: Any) -> Strategy:
    if name not in STRATEGIES:
        raise UserError(f"unknown selection strategy {name!r}", f"use one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    valid = {f.name for f in fields(cls)}
    unknown = set(params) - valid
    if unknown:
        raise UserError(
            f"strategy {name} has no parameter {sorted(unknown)[0]!r}", f"its parameters: {', '.join(sorted(valid))}"
        )
    return cls(**coerce_options(cls, params, owner=f"strategy {name}"))
