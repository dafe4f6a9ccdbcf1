"""Multiple-choice probe files, in three formats (told apart per row / by the file's top level):

- the pack format, JSONL rows {"id", "prompt", "answer": str, "distractors": [str, ...], "ring"};
- the WMDP/MMLU format, JSONL rows {"question", "choices": [str, ...], "answer": index (or letter)}
  (optional "id" and "ring");
- the column-oriented JSON some research repositories ship, one object
  {"questions": [...], "choices": [[...], ...], "answers": [index, ...]} (optional "ids", "rings"),
  or a JSON array of WMDP-style rows.

Rows without a ring take `ring` (the `--ring` option, or `ring = "..."` under [files.probes] in a
pack's concept.toml); rows without an id get FILE-STEM:LINE (or FILE-STEM:INDEX). Every malformed
row raises a one-line `UserError` naming `file:line` (JSON: `file: entry N`) and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_unlearn.concepts.pack import RINGS, Probe
from sae_unlearn.errors import UserError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _text(path: Path) -> str:
    if not path.exists():
        raise UserError(f"probe file not found: {path}", "check the path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text", "convert it with iconv -t utf-8") from e


def _nonempty(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field {key!r} is missing or not a non-empty string")
    return value.strip()


def _ring(row: dict[str, Any], ring: str | None, where: str) -> str:
    value = row.get("ring", ring)
    if value is None:
        raise UserError(f"{where}: no 'ring' field", "pass --ring NAME (target, near, mid or far) to label the file")
    if value not in RINGS:
        raise UserError(f"{where}: field 'ring' is {value!r}", f"use one of {', '.join(RINGS)}")
    return str(value)


def _answer_index(answer: Any, n: int, where: str) -> int:
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    else:
        raise UserError(f"{where}: field 'answer' is {answer!r}", "give the index of the right choice (0-based)")
    if not 0 <= index < n:
        raise UserError(f"{where}: field 'answer' is {answer!r} but there are {n} choices", "use 0 to n-1")
    return index


def _options(answer: str, distractors: list[Any], where: str, field: str) -> tuple[str, ...]:
    if not all(isinstance(d, str) and d.strip() for d in distractors):
        raise UserError(f"{where}: field {field!r} must be a list of non-empty strings")
    lowered = [d.strip().lower() for d in distractors]
    if answer.lower() in lowered:
        raise UserError(f"{where}: field {field!r} contains the answer {answer!r} twice")
    if len(set(lowered)) != len(lowered):
        raise UserError(f"{where}: field {field!r} repeats an option")
    return tuple(d.strip() for d in distractors)


def probe_from_row(row: Any, where: str, default_id: str, ring: str | None) -> Probe:
    """One probe from a pack-format or WMDP-format row; `where` prefixes every error."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    pid = row.get("id", default_id)
    if not isinstance(pid, str | int) or isinstance(pid, bool) or not str(pid).strip():
        raise UserError(f"{where}: field 'id' is {pid!r}", "use a non-empty string")
    if "question" in row or "choices" in row:  # WMDP / MMLU
        question = _nonempty(row, "question", where)
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise UserError(f"{where}: field 'choices' must be a list of at least 2 strings")
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise UserError(f"{where}: field 'choices' must be a list of non-empty strings")
        if "answer" not in row:
            raise UserError(f"{where}: field 'answer' is missing", "give the index of the right choice (0-based)")
        index = _answer_index(row["answer"], len(choices), where)
        answer = choices[index].strip()
        rest = [c for i, c in enumerate(choices) if i != index]
        return Probe(
            str(pid).strip(), question, answer, _options(answer, rest, where, "choices"), _ring(row, ring, where)
        )
    prompt, answer = _nonempty(row, "prompt", where), _nonempty(row, "answer", where)
    distractors = row.get("distractors")
    if not isinstance(distractors, list) or len(distractors) < 1:
        raise UserError(f"{where}: field 'distractors' must be a list of non-empty strings")
    return Probe(
        str(pid).strip(), prompt, answer, _options(answer, distractors, where, "distractors"), _ring(row, ring, where)
    )


def _columns(data: dict[str, Any], path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Column-oriented JSON as (where, row) pairs."""
    for key in ("questions", "choices", "answers"):
        if not isinstance(data.get(key), list):
            raise UserError(
                f"{path}: field {key!r} is missing or not a list", 'use {"questions", "choices", "answers"}'
            )
    n = len(data["questions"])
    lengths = {k: len(data[k]) for k in ("questions", "choices", "answers", "ids", "rings") if k in data}
    if any(v != n for v in lengths.values()):
        raise UserError(f"{path}: the columns differ in length ({lengths})", "give one entry per question in each")
    rows = []
    for i in range(n):
        row: dict[str, Any] = {
            "question": data["questions"][i],
            "choices": data["choices"][i],
            "answer": data["answers"][i],
        }
        if "ids" in data:
            row["id"] = data["ids"][i]
        if "rings" in data:
            row["ring"] = data["rings"][i]
        rows.append((f"{path}: entry {i}", row))
    return rows


def read_probe_file(path: Path, ring: str | None = None) -> list[Probe]:
    """Probes from a .jsonl (pack or WMDP rows) or .json (columns, or an array of rows) file."""
    if ring is not None and ring not in RINGS:
        raise UserError(f"unknown ring {ring!r}", f"use one of {', '.join(RINGS)}")
    text = _text(path)
    rows: list[tuple[str, str, Any]] = []  # (where, default id, row)
    if path.suffix.lower() == ".json":
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        if isinstance(data, dict):
            rows = [(where, f"{path.stem}:{i}", row) for i, (where, row) in enumerate(_columns(data, path))]
        elif isinstance(data, list):
            rows = [(f"{path}: entry {i}", f"{path.stem}:{i}", row) for i, row in enumerate(data)]
        else:
            raise UserError(f"{path}: expected a JSON object with questions/choices/answers, or a list of rows")
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rows.append((where, f"{path.stem}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from e
    probes: list[Probe] = []
    seen: set[str] = set()
    for where, default_id, row in rows:
        probe = probe_from_row(row, where, default_id, ring)
        if probe.id in seen:
            raise UserError(f"{where}: field 'id' {probe.id!r} is used twice")
        seen.add(probe.id)
        probes.append(probe)
    if not probes:
        raise UserError(f"probe file {path} has no probes")
    return probes
