"""Feature discovery: statistics, selection strategies, examples and the features.json / report.html output.

features.json schema (version 1):
    {"version": 1, "model": spec, "model_source": path-or-id, "saes": [{"layer", "spec", "d_sae", "neuronpedia_id"}],
     "concept": name, "concept_fingerprint": hash, "strategy": name, "params": {...},
     "tokens": {"forget": n, "retain": n}, "stats_key": hash,
     "features": [{"layer", "index", "score", "forget_count", "retain_count", "forget_sum", "retain_sum",
                   "forget_max", "retain_max", "forget_rate", "retain_rate", "relative"}]}
Counts and sums are raw over valid tokens; `relative` uses counts and sums balanced to equal token
counts, as the CRISP rule does. stats.safetensors beside it holds the full per-latent statistics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_unlearn.concepts.pack import ConceptPack
from sae_unlearn.errors import UserError
from sae_unlearn.features.contexts import FeatureExamples, collect_examples
from sae_unlearn.features.selection import STRATEGIES, SelectedFeature, Strategy, make_strategy
from sae_unlearn.features.statistics import LayerStats, compute_stats, stats_key
from sae_unlearn.io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.loading import LoadedSAE

__all__ = ["STRATEGIES", "FeatureSelection", "SelectedFeature", "find_features", "load_features", "make_strategy"]
FEATURES_VERSION = 1


@dataclass
class FeatureSelection:
    model: str
    model_source: str
    saes: list[dict[str, Any]]
    concept: str
    concept_fingerprint: str
    strategy: str
    params: dict[str, Any]
    tokens: dict[str, int]
    stats_key: str
    features: list[SelectedFeature]
    stats: dict[int, LayerStats] = field(default_factory=dict, repr=False)
    examples: dict[tuple[int, int], FeatureExamples] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[int]:
        return sorted({f.layer for f in self.features})

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for f in self.features:
            out.setdefault(f.layer, []).append(f.index)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FEATURES_VERSION,
            "model": self.model,
            "model_source": self.model_source,
            "saes": self.saes,
            "concept": self.concept,
            "concept_fingerprint": self.concept_fingerprint,
            "strategy": self.strategy,
            "params": self.params,
            "tokens": self.tokens,
            "stats_key": self.stats_key,
            "features": [f.to_dict() for f in self.features],
        }

    def write(self, out: Path) -> None:
        """stats.safetensors and report.html first, features.json (what readers look for) last; each atomic."""
        out.mkdir(parents=True, exist_ok=True)
        if self.stats:
            tensors = {}
            for s in self.stats.values():
                tensors.update(s.tensors())
            tokens = {str(s.layer): [s.forget_tokens, s.retain_tokens] for s in self.stats.values()}
            atomic_save_safetensors(out / "stats.safetensors", tensors, metadata={"tokens": json.dumps(tokens)})
        if self.examples:
            from sae_unlearn.features.report import render_report

            atomic_write_text(out / "report.html", render_report(self))
        atomic_write_json(out / "features.json", self.to_json())


def load_features(path: str | Path) -> FeatureSelection:
    path = Path(path)
    if path.is_dir():
        path = path / "features.json"
    if not path.exists():
        raise UserError(f"features file not found: {path}", "run sae-unlearn features first, or pass its --out")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != FEATURES_VERSION:
            raise UserError(f"{path} has version {data.get('version')}, expected {FEATURES_VERSION}")
        feats = [SelectedFeature(**f) for f in data["features"]]
        return FeatureSelection(**{k: v for k, v in data.items() if k not in ("version", "features")}, features=feats)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid features.json ({type(e).__name__}: {e})") from e


def find_features(
    loaded: LoadedModel,
    saes: Sequence[LoadedSAE],
    pack: ConceptPack,
    strategy: Strategy | str = "crisp",
    *,
    k: int = 10,
    use_cache: bool = True,
    with_examples: bool = True,
    batch_size: int = 8,
    max_length: int = 256,
    examples_from: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureSelection:
    """Compute statistics on the pack's training splits and select features with `strategy`.

    `examples_from`: read the selected features' top contexts from at most this many paragraphs of
    each corpus (None: all of them; the statistics always use all).
    """
    if isinstance(strategy, str):
        strategy = make_strategy(strategy, k=k)
    forget, retain = pack.forget_split("train"), pack.retain_split("train")
    if len(forget) < batch_size or len(retain) < batch_size:
        raise UserError(
            f"the concept pack has {len(forget)} forget and {len(retain)} retain paragraphs for training, "
            f"fewer than one batch ({batch_size})",
            "add text, or pass a smaller --batch",
        )
    stats = compute_stats(
        loaded,
        saes,
        forget,
        retain,
        batch_size=batch_size,
        max_length=max_length,
        use_cache=use_cache,
        progress=progress,
    )
    selected = strategy.select(stats)
    if not selected:
        raise UserError(
            f"strategy {strategy.name} selected no feature",
            "loosen its filters (e.g. a lower min_ratio) or use more forget text",
        )
    first = next(iter(stats.values()))
    selection = FeatureSelection(
        model=loaded.spec,
        model_source=loaded.source,
        saes=[{"layer": s.layer, "spec": s.spec, "d_sae": s.d_sae, "neuronpedia_id": s.neuronpedia_id} for s in saes],
        concept=pack.name,
        concept_fingerprint=pack.fingerprint(),
        strategy=strategy.name,
        params=strategy.params(),
        tokens={"forget": first.forget_tokens, "retain": first.retain_tokens},
        stats_key=stats_key(loaded, saes, forget, retain, max_length),
        features=selected,
        stats=stats,
    )
    if with_examples:
        corpora = {"forget": forget[:examples_from], "retain": retain[:examples_from]}
        selection.examples = collect_examples(
            loaded, saes, selected, corpora, batch_size=batch_size, max_length=max_length
        )
    return selection
