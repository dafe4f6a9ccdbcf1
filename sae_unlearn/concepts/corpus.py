"""Read text corpora: .txt (blank-line separated paragraphs), .jsonl (a `text` field), .csv/.parquet
(a named column), or a Hugging Face dataset (a `save_to_disk` directory, or `hf:NAME[:SPLIT]`)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from sae_unlearn.errors import UserError


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})", "convert it with iconv -t utf-8") from e


def read_corpus(spec: str | Path, column: str = "text") -> list[str]:
    """Return the non-empty documents of a corpus; raise a one-line error on bad input."""
    spec_str = str(spec)
    if spec_str.startswith("hf:"):
        return _read_hub_dataset(spec_str[3:], column)
    path = Path(spec_str).expanduser()
    if not path.exists():
        raise UserError(f"corpus not found: {path}", "check the path")
    if path.is_dir():
        return _read_saved_dataset(path, column)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ""):
        docs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", _read_text_file(path))]
    elif suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(_read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get(column), str):
                raise UserError(
                    f"{path}:{lineno}: no string field {column!r}", f'each line needs {{"{column}": "..."}}'
                )
            docs.append(row[column])
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise UserError(f"{path} has no column {column!r} (columns: {reader.fieldnames})", "pass --column NAME")
            docs = [row[column] or "" for row in reader]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise UserError(f"{path} has no column {column!r} (columns: {table.column_names})", "pass --column NAME")
        docs = [str(x) for x in table.column(column).to_pylist() if x is not None]
    else:
        raise UserError(
            f"unsupported corpus format {suffix!r} for {path}", "use .txt, .jsonl, .csv, .parquet or a dataset dir"
        )
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise UserError(f"corpus {path} is empty", "put text in it (paragraphs separated by blank lines for .txt)")
    return docs


def _column(dataset: object, column: str, where: str) -> list[str]:
    names = getattr(dataset, "column_names", [])
    if column not in names:
        raise UserError(f"dataset {where} has no column {column!r} (columns: {names})", "pass --column NAME")
    docs = [str(x).strip() for x in dataset[column] if x is not None and str(x).strip()]  # type: ignore[index]
    if not docs:
        raise UserError(f"dataset {where} is empty")
    return docs


def _read_saved_dataset(path: Path, column: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(
            f"{path} is a directory but not a saved Hugging Face dataset ({type(e).__name__})",
            "pass a file, or a directory written by Dataset.save_to_disk",
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    return _column(ds, column, str(path))


def _read_hub_dataset(spec: str, column: str) -> list[str]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise UserError(
            f"cannot load dataset {name!r} from the hub ({type(e).__name__})",
            "check the name; offline, save it with save_to_disk and pass the directory",
        ) from e
    return _column(ds, column, name)
