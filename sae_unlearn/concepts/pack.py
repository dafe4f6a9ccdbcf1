"""Concept packs: what to forget (forget corpus), what to keep (retain corpus), coherence prompts
(used by CRISP) and probes (multiple-choice questions in rings of distance from the concept).

A pack is a directory with `concept.toml`:

    name = "harry-potter"
    description = "..."
    [files.forget]     path = "forget.txt"     provenance = "..."
    [files.retain]     path = "retain.txt"     provenance = "..."
    [files.coherence]  path = "coherence.txt"  provenance = "..."   # one prompt per line
    [files.probes]     path = "probes.jsonl"   provenance = "..."

Probe lines: {"id", "prompt", "answer", "distractors": [strings], "ring": target|near|mid|far}, or the
WMDP/MMLU rows {"question", "choices", "answer": index} and column JSON of mcq.py (`ring = "target"` under
[files.probes] labels a file without ring fields).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sae_unlearn.concepts.corpus import read_corpus
from sae_unlearn.errors import UserError

PACKS_DIR = Path(__file__).parent / "packs"
RINGS = ("target", "near", "mid", "far")
REQUIRED_FILES = ("forget", "retain", "coherence", "probes")
OPTIONAL_FILES = ("prompts",)


@dataclass(frozen=True)
class Probe:
    id: str
    prompt: str
    answer: str
    distractors: tuple[str, ...]
    ring: str

    @property
    def options(self) -> list[str]:
        return [self.answer, *self.distractors]


def normalise(text: str) -> str:
    """Case-folded words only: texts equal under this are duplicates."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def dedup(texts: list[str]) -> list[str]:
    """`texts` without later duplicates (same normalised text), in order."""
    seen: set[str] = set()
    out = []
    for t in texts:
        key = normalise(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _hash_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


@dataclass
class ConceptPack:
    name: str
    description: str
    root: Path
    forget: list[str]
    retain: list[str]
    coherence: list[str]
    probes: list[Probe]
    provenance: dict[str, str] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)  # open concept prompts for fluency; see prompt_split

    def probes_in(self, ring: str) -> list[Probe]:
        return [p for p in self.probes if p.ring == ring]

    def probe_split(self, part: str, tune_fraction: float = 0.5) -> list[Probe]:
        """`tune` probes may steer settings; `report` probes (disjoint, fixed by id hash) are reported."""
        if part not in ("tune", "report", "all"):
            raise UserError(f"unknown probe split {part!r}", "use tune, report or all")
        if part == "all":
            return list(self.probes)
        return [p for p in self.probes if (_hash_fraction(p.id) < tune_fraction) == (part == "tune")]

    def prompt_split(self, part: str, tune_fraction: float = 0.5) -> list[str]:
        """Concept prompts whose continuations are scored for fluency: `tune` ones may steer training
        (CRISP's fluency check), disjoint `report` ones are evaluated (fixed by text hash). Packs
        without a prompts file use the openings of held-out forget paragraphs (at most 8 per part).
        Too few prompts to split: every part gets them all, and `split_problems` says so."""
        if part not in ("tune", "report", "all"):
            raise UserError(f"unknown prompt split {part!r}", "use tune, report or all")
        pool = self._prompt_pool()
        if part == "all":
            return pool
        tune = [p for p in pool if _hash_fraction("prompt:" + p) < tune_fraction]
        report = [p for p in pool if _hash_fraction("prompt:" + p) >= tune_fraction]
        if not tune or not report:
            return pool[:8] if not self.prompts else pool
        chosen = tune if part == "tune" else report
        return chosen if self.prompts else chosen[:8]

    def _prompt_pool(self) -> list[str]:
        if self.prompts:
            return dedup(self.prompts)
        return dedup([" ".join(t.split()[:5]) for t in self.forget_split("heldout")])

    def forget_split(self, part: str, n_relearn: int = 32, n_heldout: int = 24) -> list[str]:
        """Disjoint forget paragraphs: `train` (unlearning), `relearn` (the attack), `heldout` (evaluation),
        fixed by text hash after duplicates (same normalised text) are dropped. A pack with fewer than
        n_relearn + n_heldout + 8 distinct paragraphs gives every part all of them (training needs the
        text); `split_problems` names the metrics that then read training text."""
        if part not in ("train", "relearn", "heldout"):
            raise UserError(f"unknown forget split {part!r}", "use train, relearn or heldout")
        ranked = sorted(dedup(self.forget), key=lambda t: _hash_fraction("forget:" + t))
        if len(ranked) < n_relearn + n_heldout + 8:
            return ranked
        splits = {
            "relearn": ranked[:n_relearn],
            "heldout": ranked[n_relearn : n_relearn + n_heldout],
            "train": ranked[n_relearn + n_heldout :],
        }
        return splits[part]

    def retain_split(self, part: str, heldout_fraction: float = 0.15) -> list[str]:
        """`train` retain paragraphs and disjoint `heldout` ones for measuring retention (duplicates dropped)."""
        if part not in ("train", "heldout"):
            raise UserError(f"unknown retain split {part!r}", "use train or heldout")
        distinct = dedup(self.retain)
        held = [t for t in distinct if _hash_fraction("retain:" + t) < heldout_fraction]
        return held if part == "heldout" else [t for t in distinct if t not in set(held)]

    def split_problems(self) -> dict[str, str]:
        """{results.json field: why it is not measured on held-out text} for the splits this pack allows
        (empty when every split is disjoint). `evaluate` marks these fields invalid and warns."""
        problems: dict[str, str] = {}
        train = set(self.forget_split("train"))
        if train & set(self.forget_split("heldout")):
            why = f"only {len(dedup(self.forget))} distinct forget paragraphs: held-out = training text (need 64)"
            problems["retention.forget_heldout_ppl"] = problems["reactivation"] = why
            if not self.prompts:
                problems["fluency.concept_prompts"] = why + "; the prompts open training paragraphs"
        if set(self.prompt_split("tune")) & set(self.prompt_split("report")):
            problems["fluency.concept_prompts"] = "too few prompts to split: tune and report prompts are the same set"
        heldout = self.retain_split("heldout")
        if not heldout:
            problems["retention.retain_heldout_ppl"] = "no held-out retain paragraphs (add retain text)"
        return problems

    def duplicates(self) -> dict[str, int]:
        """Paragraphs and prompts dropped as duplicates (same normalised text) before splitting."""
        return {
            "forget": len(self.forget) - len(dedup(self.forget)),
            "retain": len(self.retain) - len(dedup(self.retain)),
            "prompts": len(self.prompts) - len(dedup(self.prompts)),
        }

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for part in (
            self.forget,
            self.retain,
            self.coherence,
            self.prompts,
            [json.dumps(p.__dict__, sort_keys=True) for p in self.probes],
        ):
            for text in part:
                h.update(text.encode())
                h.update(b"\0")
        return h.hexdigest()[:16]


def list_packs() -> list[str]:
    return sorted(p.name.replace("_", "-") for p in PACKS_DIR.iterdir() if (p / "concept.toml").exists())


def resolve_pack_dir(spec: str | Path) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    builtin = PACKS_DIR / str(spec).replace("-", "_")
    if builtin.is_dir():
        return builtin
    raise UserError(f"unknown concept pack {spec!r}", f"use a built-in pack ({', '.join(list_packs())}) or a directory")


def load_probes(path: Path, ring: str | None = None) -> list[Probe]:
    """Read and validate a probe file (pack JSONL, WMDP/MMLU JSONL or column JSON: see mcq.py); errors
    name the file, line and field. `ring` labels rows that have no ring field."""
    from sae_unlearn.concepts.mcq import read_probe_file

    return read_probe_file(Path(path), ring)


def _nonempty_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_pack(spec: str | Path) -> ConceptPack:
    root = resolve_pack_dir(spec)
    toml_path = root / "concept.toml"
    if not toml_path.exists():
        raise UserError(f"{root} has no concept.toml", "add one naming the forget, retain, coherence and probes files")
    try:
        meta = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{toml_path}: {e}") from e
    files = meta.get("files", {})
    for key in (*REQUIRED_FILES, *(k for k in OPTIONAL_FILES if k in files)):
        entry = files.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UserError(f"{toml_path}: [files.{key}] with a path is missing", f'add [files.{key}] path = "..."')
        if not (root / entry["path"]).exists():
            raise UserError(
                f"{root / entry['path']} (files.{key} in {toml_path}) does not exist", "add the file or fix the path"
            )
    coherence_path = root / files["coherence"]["path"]
    coherence = _nonempty_lines(coherence_path)
    if not coherence:
        raise UserError(f"{coherence_path} is empty", "add one coherence prompt per line")
    prompts = _nonempty_lines(root / files["prompts"]["path"]) if "prompts" in files else []
    return ConceptPack(
        name=str(meta.get("name", root.name)),
        description=str(meta.get("description", "")),
        root=root,
        forget=read_corpus(root / files["forget"]["path"]),
        retain=read_corpus(root / files["retain"]["path"]),
        coherence=coherence,
        probes=load_probes(root / files["probes"]["path"], ring=files["probes"].get("ring")),
        provenance={k: str(v.get("provenance", "")) for k, v in files.items() if isinstance(v, dict)},
        prompts=prompts,
    )
