"""Experiment files: one file that says what a `compare` run does, read alike by Python and the CLI.

An experiment is the concept, the model and every field of CompareConfig (methods, their options,
the feature strategy, the evaluation settings). It is built from layers, later ones winning:

1. `default` (sae_unlearn/experiments/default.toml),
2. the file given (`--config FILE`, or a built-in name: demo, demo-fast, fast), with its `extends`
   chain read first,
3. `fast` when --fast is asked for,
4. the command-line flags and `--set` values,

and then each `[when_sae.NAME]` table of the SAEs chosen fills in what no layer set. results.json
embeds the resolved experiment under "experiment", so `compare --config results.json` re-runs it.

File shape (TOML; JSON with the same keys also works)::

    extends = ["demo"]             # optional: built-in names or paths relative to this file
    concept = "harry-potter"
    model = "embedded"
    methods = ["crisp", "rmu"]
    sae = "shipped"
    strategy = "crisp"
    k = 10
    max_length = 128
    [strategy_options]             # the selection strategy's parameters
    min_ratio = 3.0
    [method_options.crisp]         # each method's config fields
    steps = 100
    [eval]                         # EvalConfig fields
    max_probes_per_ring = 25
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_unlearn.errors import UserError
from sae_unlearn.evaluation.compare import CompareConfig, compare
from sae_unlearn.evaluation.evaluate import EvalConfig
from sae_unlearn.features import make_strategy
from sae_unlearn.methods import METHODS, current_option_names, method_config
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.options import coerce_options, field_names

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "experiments"
_NESTED = ("method_options", "strategy_options", "eval")


def builtin_experiments() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


@dataclass
class Experiment:
    concept: str = "harry-potter"
    model: str = "embedded"
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved experiment: every setting explicit, readable back by `from_dict`."""
        return {"concept": self.concept, "model": self.model, **dataclasses.asdict(self.compare)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        """Check every setting against its dataclass's field types (one-line errors) and build it."""
        allowed = {"concept", "model"} | field_names(CompareConfig)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise UserError(f"experiments have no setting {unknown[0]!r}", f"settings: {', '.join(sorted(allowed))}")
        top = coerce_options(
            CompareConfig,
            {k: v for k, v in data.items() if k in field_names(CompareConfig) and k not in _NESTED},
            owner="the experiment",
        )
        for name in ("concept", "model"):
            if name in data and not isinstance(data[name], str):
                raise UserError(f"{name} must be a string", f"got {data[name]!r}")
        eval_cfg = EvalConfig(**coerce_options(EvalConfig, _table(data, "eval"), owner="eval", prefix="eval."))
        method_options: dict[str, dict[str, Any]] = {}
        for method, options in _table(data, "method_options").items():
            if not isinstance(options, Mapping):
                raise UserError(f"method_options.{method} must be a table of options", f"got {options!r}")
            current = current_option_names(method, dict(options))
            checked = method_config(method, current)  # unknown method/option, wrong type: one line
            method_options[method] = {key: getattr(checked, key) for key in current}
        compare_cfg = CompareConfig(**top, eval=eval_cfg, method_options=method_options)
        strategy_options = _table(data, "strategy_options")
        if "k" in strategy_options:
            raise UserError("strategy_options.k: the number of features is the top-level setting k", "e.g. k = 10")
        strategy = make_strategy(compare_cfg.strategy, k=compare_cfg.k, **strategy_options)
        compare_cfg.strategy_options = {key: getattr(strategy, key) for key in strategy_options}
        return cls(concept=data.get("concept", cls.concept), model=data.get("model", cls.model), compare=compare_cfg)

    def stage_plan(self) -> list[str]:
        """The stages a run goes through, named as compare() reports them."""
        plan = ["load model"]
        if any(METHODS[m].needs_saes for m in self.compare.methods):
            plan.append("feature selection")
        plan.append("evaluate base")
        for method in self.compare.methods:
            plan += [f"unlearn {method}", f"evaluate {method}"]
        return plan


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise UserError(f"{key} must be a table of settings", f"got {value!r}")
    return dict(value)


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`, tables merged key by key (lists and values replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _locate(spec: str | Path, relative_to: Path | None) -> Path:
    candidates = [Path(spec)]
    if relative_to is not None and not Path(spec).is_absolute():
        candidates.insert(0, relative_to / spec)
    for path in candidates:
        if path.is_file():
            return path
    builtin = BUILTIN_DIR / f"{spec}.toml"
    if isinstance(spec, str) and "/" not in spec and builtin.is_file():
        return builtin
    raise UserError(
        f"experiment file not found: {spec}",
        f"pass a .toml file, a results.json, or a built-in name ({', '.join(builtin_experiments())})",
    )


def read_experiment_file(spec: str | Path, relative_to: Path | None = None, _seen: tuple[Path, ...] = ()) -> dict:
    """One file's settings with its `extends` chain merged underneath (not yet checked)."""
    path = _locate(spec, relative_to).resolve()
    if path in _seen:
        raise UserError(f"{path} extends itself", "remove the loop from the extends lists")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "goals" in data and "methods" in data:  # a results.json
                if "experiment" not in data:
                    raise UserError(f"{path} holds no experiment", "it was written before experiment files")
                data = data["experiment"]
        else:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid experiment file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a valid experiment file", "it must hold a table of settings")
    parents = data.pop("extends", [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise UserError(f"{path}: extends must be a name or a list of names", f"got {parents!r}")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = merge(merged, read_experiment_file(parent, path.parent, (*_seen, path)))
    return merge(merged, data)


def load_experiment(
    spec: str | Path | None = None, *, fast: bool = False, overrides: Mapping[str, Any] | None = None
) -> Experiment:
    """The experiment in `spec` (a file, a results.json, or a built-in name; None: the defaults),
    with the --fast settings and `overrides` on top; each value checked against its field's type.

    When `overrides` names the methods but not the attacked models (eval.robustness_for, eval.relearn_for),
    the attack lists of the layers below keep only the methods that run (and base)."""
    overrides = dict(overrides or {})
    eval_overrides = overrides.get("eval", {})
    if "methods" in overrides and isinstance(eval_overrides, Mapping):
        every_method = {"methods": sorted(METHODS)}  # read the file's lists without checking them against its methods
        below = _load_experiment(spec, fast=fast, overrides=every_method).compare.eval
        for key in ("robustness_for", "relearn_for"):
            attacked = getattr(below, key)
            if key not in eval_overrides and attacked is not None:
                keep = [m for m in attacked if m in ("base", *overrides["methods"])]
                eval_overrides = {**eval_overrides, key: keep}
        overrides = {**overrides, "eval": eval_overrides} if eval_overrides else overrides
    return _load_experiment(spec, fast=fast, overrides=overrides)


def _load_experiment(
    spec: str | Path | None = None, *, fast: bool = False, overrides: Mapping[str, Any] | None = None
) -> Experiment:
    data = read_experiment_file("default")
    if spec is not None:
        data = merge(data, read_experiment_file(spec))
    if fast:
        data = merge(data, read_experiment_file("fast"))
    data = merge(data, overrides or {})
    when_sae = data.pop("when_sae", {})
    if not isinstance(when_sae, Mapping):
        raise UserError("when_sae must be a table of SAE names", f"got {when_sae!r}")
    sae = data.get("sae", CompareConfig.sae)
    data = merge(when_sae.get(sae, {}), data)  # fills in only what nothing else set
    return Experiment.from_dict(data)


def run_experiment(
    experiment: Experiment,
    out: Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    stage: Callable[[str], None] | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    loaded: LoadedModel | None = None,
) -> dict[str, Any]:
    """Load the experiment's concept pack and model (unless `loaded` is given) and run compare();
    results.json embeds the experiment."""
    from sae_unlearn.concepts.pack import load_pack
    from sae_unlearn.models import load_model

    pack = load_pack(experiment.concept)
    if stage is not None:
        stage("load model")
    if loaded is None:
        loaded = load_model(experiment.model, dtype=dtype, device=device)
    return compare(
        loaded, pack, out, experiment.compare, stage=stage, progress=progress, experiment=experiment.to_dict()
    )
