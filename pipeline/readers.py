"""Read rows from a data source exactly as written: text stays text.

JSONL, JSON and CSV are read with the standard library, so no column type is ever inferred (the `datasets` JSON
loader turns "2078-12-15" into a timestamp and would drop leading zeros from "007"); parquet and hub datasets
carry their own declared column types, which validation checks. A file that is not text in its encoding is named
with the byte, line and column where decoding stopped.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import BadInputError

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
EMPTY = {"csv": "has only its header line, no rows", "json": "is an empty list, []", "parquet": "has 0 rows",
         "jsonl": "has no rows, only blank lines"}


class DataError(BadInputError):
    """The dataset is missing, empty, unreadable, or not in a form the pipeline understands."""


@dataclass(frozen=True)
class SourceRows:
    """Rows as read from one source, and the file line each one starts on (JSONL and CSV) for messages."""

    source: str
    rows: list[dict[str, Any]]
    lines: list[int] | None = None
    kind: str = "dataset"  # jsonl, json, csv, parquet, builtin or hub: how an empty source is described

    @property
    def empty_text(self) -> str:
        """How this source looks when it holds no rows, in the user's terms."""
        return EMPTY.get(self.kind, "has no rows")

    def where(self, index: int) -> str:
        """Where row `index` is, as a user finds it: `file:line`, else its 1-based row number."""
        return f"{self.source}:{self.lines[index]}" if self.lines else f"{self.source} row {index + 1}"


def read_source(source: str, split: str = "train", encoding: str = "utf-8") -> SourceRows:
    """Rows of a `builtin:` dataset, a local JSONL/JSON/CSV/parquet file, a local dataset folder, or a hub id."""
    from pipeline.builtin_data import BUILTIN_DATASETS

    if source in BUILTIN_DATASETS:
        return SourceRows(source, BUILTIN_DATASETS[source](), kind="builtin")
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        return _read_hub(source, split)
    if not path.is_file():
        raise DataError(f"dataset file {source!r} does not exist; set data.path to an existing "
                        f"{'/'.join(FILE_FORMATS)} file or a hub dataset id")
    if path.stat().st_size == 0:
        raise DataError(f"dataset file {source!r} is empty (0 bytes); it needs at least a few rows")
    if suffix == ".parquet":
        return _read_parquet(path)
    text = decode(path, encoding)
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": one JSON value per line, i.e. JSON Lines named .json
                raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); a .json "
                                "file holds one list of objects, [{...}, {...}], or one object per line") from exc
        else:
            return _json_rows(path, value)
    return _read_jsonl(path, text)


def decode(path: Path, encoding: str) -> str:
    """The file's text; a byte that is not `encoding` is refused with its line and column and how to convert."""
    raw = path.read_bytes()
    try:
        return raw.decode(encoding).removeprefix("\ufeff")  # the byte-order mark spreadsheets put first
    except LookupError as exc:
        raise DataError(f"data.encoding {encoding!r} is not an encoding Python knows; use e.g. utf-8 or latin-1") from exc
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path} is not {encoding} text: byte 0x{raw[exc.start]:02x} at line {line}, column {column} "
                        f"cannot be decoded. If it is text in another encoding, convert it (e.g. `iconv -f latin1 -t "
                        f"utf-8 {path.name} > {path.stem}.utf8{path.suffix}`) or set data.encoding (e.g. "
                        f"data.encoding=latin-1); if it is not text, point data.path at the real data") from None


def _read_jsonl(path: Path, text: str) -> SourceRows:
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 or U+0085 may sit inside a string
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}): "
                            f"{line.strip()[:80]!r}; each line must be one JSON object") from exc
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: a JSON {type(value).__name__}, not an object; each line must be "
                            'one object like {"messages": [...]}')
        rows.append(value)
        lines.append(number)
    return SourceRows(str(path), rows, lines, kind="jsonl")


def _json_rows(path: Path, value: Any) -> SourceRows:
    if not isinstance(value, list):
        raise DataError(f"{path} holds a JSON {type(value).__name__}; a .json dataset is one list of objects, "
                        "[{...}, {...}], or one object per line")
    for index, row in enumerate(value):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {index + 1} is a JSON {type(row).__name__}, not an object; each item must "
                            'be one object like {"prompt": ..., "completion": ...}')
    return SourceRows(str(path), value, kind="json")


def _read_csv(path: Path, text: str) -> SourceRows:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, lines = [], []
    try:
        for row in reader:
            lines.append(reader.line_num)  # where the record ends; a record with no newline inside starts there
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more fields than the header's {len(reader.fieldnames)} "
                                f"columns {reader.fieldnames}; quote fields that contain commas")
            rows.append(row)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from exc
    return SourceRows(str(path), rows, lines, kind="csv")


def _read_parquet(path: Path) -> SourceRows:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.ArrowException as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc})") from exc
    return SourceRows(str(path), table.to_pylist(), kind="parquet")


def _read_hub(source: str, split: str) -> SourceRows:
    import datasets

    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise DataError(f"cannot load dataset {source!r} (split {split!r}): {type(exc).__name__}: {exc}. "
                        f"Give a local .jsonl/.json/.csv/.parquet file or a reachable hub dataset id") from exc
    return SourceRows(source, loaded.to_list(), kind="hub")
