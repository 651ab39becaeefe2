"""Training data: read rows from a file or hub dataset once, validate and split them, and render them to tokens.

Three forms are accepted: chat (`messages`: [{role, content}, ...]), prompt/completion, and plain text.
Loss is taken on what the model should learn to write: assistant turns, the completion, or all of the text.
The same rendering feeds calibration, so GPTQ sees the distribution the model was tuned on.

A run reads its source once (`read_dataset`, in preflight); the data stage publishes the `Dataset` as files
(`write_dataset`) and every later stage reads those (`load_dataset`), never the source again.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.errors import BadInputError

IGNORE_INDEX = -100
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORM_FIELDS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


class DataError(BadInputError):
    """The dataset is missing, empty, or not in a form the pipeline understands."""


DATASET_FILES = ("train.jsonl", "eval.jsonl", "dataset.json")


@dataclass(frozen=True)
class Dataset:
    """Validated rows in one form, split into train and eval."""

    form: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]

    @cached_property
    def key(self) -> str:
        """sha256 of the form and every row of both splits, in order: the dataset's content key."""
        blob = json.dumps({"form": self.form, "train": self.train, "eval": self.eval}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def write_dataset(dataset: Dataset, folder: Path) -> dict[str, Any]:
    """train.jsonl, eval.jsonl (one row per line, as read) and dataset.json (form, counts, key); returns the latter."""
    folder = Path(folder)
    for name, rows in (("train.jsonl", dataset.train), ("eval.jsonl", dataset.eval)):
        (folder / name).write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows),
                                   encoding="utf-8")
    info = {"form": dataset.form, "train_rows": len(dataset.train), "eval_rows": len(dataset.eval),
            "content_key": dataset.key}
    (folder / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_dataset(folder: Path) -> Dataset:
    """The Dataset a data stage wrote with `write_dataset`."""
    folder = Path(folder)
    info = json.loads((folder / "dataset.json").read_text())

    def rows(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines()]

    return Dataset(form=info["form"], train=rows("train.jsonl"), eval=rows("eval.jsonl"))


def load_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a `builtin:` dataset, a local JSONL/JSON/CSV/parquet file, a local dataset folder, or a hub id."""
    import datasets

    from pipeline.builtin_data import BUILTIN_DATASETS

    if source in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[source]()
    path = Path(source)
    if path.suffix.lower() in FILE_BUILDERS:
        if not path.is_file():
            raise DataError(f"dataset file {source!r} does not exist; set data.path to an existing "
                            f"{'/'.join(FILE_BUILDERS)} file or a hub dataset id")
        if path.stat().st_size == 0:
            raise DataError(f"dataset file {source!r} is empty (0 bytes); it needs at least a few rows")
        if path.suffix.lower() == ".jsonl":
            check_jsonl(path)
        loaded = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
    else:
        try:
            loaded = datasets.load_dataset(source, split=split)
        except Exception as exc:  # datasets raises many types for "not found / offline"
            raise DataError(f"cannot load dataset {source!r} (split {split!r}): {type(exc).__name__}: {exc}. "
                            f"Give a local .jsonl/.json/.csv/.parquet file or a reachable hub dataset id") from exc
    return loaded.to_list()


def check_jsonl(path: Path) -> None:
    """Every non-blank line must be one JSON object; the first bad one is named by line number."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
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


def detect_form(columns: set[str], requested: str) -> str:
    """The data's form: the requested one if its fields are present, else the first form whose fields are."""
    if requested != "auto":
        missing = [f for f in FORM_FIELDS[requested] if f not in columns]
        if missing:
            raise DataError(f"data.format is {requested!r} but the data lacks field(s) {missing}; "
                            f"found columns {sorted(columns)}")
        return requested
    for form, fields in FORM_FIELDS.items():
        if all(f in columns for f in fields):
            return form
    expected = "; ".join(f"{form}: {', '.join(fields)}" for form, fields in FORM_FIELDS.items())
    raise DataError(f"cannot tell the data's form from its columns {sorted(columns)}; expected one of ({expected})")


def check_row(row: dict[str, Any], form: str) -> str | None:
    """Why this row cannot be trained on, or None."""
    if form == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            return "`messages` is not a non-empty list"
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"a message is not {{role: str, content: str}}: {m!r}"[:200]
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message to learn from"
        return None
    for field in FORM_FIELDS[form]:
        if not isinstance(row.get(field), str) or not row[field]:
            return f"`{field}` is missing or empty"
    return None


def read_dataset(cfg: DataConfig) -> Dataset:
    """Train and eval rows read from the source, validated. Eval is `eval_path` if set, else a seeded
    `eval_fraction` of `path`."""
    rows = load_rows(cfg.path, cfg.split)
    if not rows:
        raise DataError(f"dataset {cfg.path!r} has no rows; it needs at least 2 (one to train, one to evaluate)")
    form = detect_form(set(rows[0]), cfg.format)
    bad = [(i, why) for i, row in enumerate(rows) if (why := check_row(row, form))]
    if bad:
        shown = "; ".join(f"row {i}: {why}" for i, why in bad[:3])
        raise DataError(f"{len(bad)} of {len(rows)} rows of {cfg.path!r} are not valid {form} examples ({shown})")
    if cfg.eval_path:
        eval_rows = load_rows(cfg.eval_path, cfg.split)
        train_rows = rows
    else:
        shuffled = rows[:]
        random.Random(cfg.seed).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * cfg.eval_fraction))
        if len(shuffled) - n_eval < 1:
            raise DataError(f"dataset {cfg.path!r} has {len(rows)} row(s): too few to split off an eval set "
                            f"(eval_fraction {cfg.eval_fraction}); add rows or set data.eval_path")
        eval_rows, train_rows = shuffled[:n_eval], shuffled[n_eval:]
    if cfg.max_samples:
        train_rows = train_rows[: cfg.max_samples]
    return Dataset(form=form, train=train_rows, eval=eval_rows)


def tokenize_example(row: dict[str, Any], form: str, tokenizer, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels; labels are IGNORE_INDEX except on the tokens the model should learn to write."""
    if form == "chat":
        ids: list[int] = []
        labels: list[int] = []
        messages = row["messages"]
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
            full = _chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if full[: len(prompt)] != prompt or full[: len(ids)] != ids:
                raise DataError("the tokenizer's chat template does not render a conversation as a prefix of its "
                                "continuation; use prompt/completion data or a template with stable prefixes")
            labels += [IGNORE_INDEX] * (len(prompt) - len(ids)) + full[len(prompt):]
            ids = full
    elif form == "prompt_completion":
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    else:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def render_text(row: dict[str, Any], form: str, tokenizer) -> str:
    """The example as the model sees it in training, as one string (for calibration)."""
    if form == "chat":
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if form == "prompt_completion":
        return row["prompt"] + row["completion"]
    return row["text"]


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
