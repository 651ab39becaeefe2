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
import logging
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.readers import DataError, SourceRows, read_source

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORM_FIELDS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


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
        text = (folder / name).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.split("\n") if line]  # not splitlines(): see readers._read_jsonl

    return Dataset(form=info["form"], train=rows("train.jsonl"), eval=rows("eval.jsonl"))


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
        value = row.get(field)
        if value is None:
            return f"`{field}` is missing"
        if not isinstance(value, str):
            return f"`{field}` is {type(value).__name__} {repr(value)[:40]}, not text; store it as a string"
    return None


def target_text(row: dict[str, Any], form: str) -> str:
    """What the model learns to write from this row: its assistant turns, its completion, or its text."""
    if form == "chat":
        return "".join(m["content"] for m in row["messages"] if m["role"] == "assistant")
    return row["completion"] if form == "prompt_completion" else row["text"]


def validate_rows(source: SourceRows, requested_form: str, max_empty_share: float, what: str) -> tuple[str, list[dict]]:
    """The form and the trainable rows of `source`; refuses a source with no rows, unknown columns, malformed rows,
    or more than `max_empty_share` of rows whose target is empty or blank (those below the share are dropped).
    `what` names the setting the source came from in messages (data.path, data.eval_path, ...)."""
    rows = source.rows
    if not rows:
        raise DataError(f"{what} {source.source!r} {source.empty_text}; it needs rows to train and evaluate on")
    try:
        form = detect_form(set(rows[0]), requested_form)
    except DataError as exc:
        raise DataError(f"{what} {source.source!r}: {exc}") from None
    bad = [(i, why) for i, row in enumerate(rows) if (why := check_row(row, form))]
    if bad:
        shown = "; ".join(f"{source.where(i)}: {why}" for i, why in bad[:3])
        raise DataError(f"{len(bad)} of {len(rows)} rows of {what} {source.source!r} are not valid {form} examples "
                        f"({shown})")
    empty = [i for i, row in enumerate(rows) if not target_text(row, form).strip()]
    if empty:
        target = {"chat": "assistant turns", "prompt_completion": "completion", "text": "text"}[form]
        if len(empty) == len(rows) or len(empty) > max_empty_share * len(rows):
            raise DataError(
                f"{len(empty)} of {len(rows)} rows of {what} {source.source!r} have an empty or blank {target}, "
                f"nothing to learn (first: {source.where(empty[0])}); fill or remove them, or set "
                f"data.max_empty_share to drop up to that share of rows (now {max_empty_share})")
        logger.warning("%s: dropping %d of %d rows whose %s is empty or blank (first: %s; data.max_empty_share %s)",
                       source.source, len(empty), len(rows), target, source.where(empty[0]), max_empty_share)
        dropped = set(empty)
        rows = [row for i, row in enumerate(rows) if i not in dropped]
    return form, rows


def read_dataset(cfg: DataConfig) -> Dataset:
    """Train and eval rows read from the source, validated. Eval is `eval_path` if set, else a seeded
    `eval_fraction` of `path`."""
    form, rows = validate_rows(load_source(cfg.path, cfg), cfg.format, cfg.max_empty_share, "data.path")
    if cfg.eval_path:
        _, eval_rows = validate_rows(load_source(cfg.eval_path, cfg), form, cfg.max_empty_share, "data.eval_path")
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


def read_calibration(source: str, cfg: DataConfig) -> tuple[str, list[dict[str, Any]]]:
    """The form and validated rows of a calibration file or dataset (read with the data config's split and encoding)."""
    return validate_rows(load_source(source, cfg), "auto", cfg.max_empty_share, "quantization.calibration.source")


def load_source(source: str, cfg: DataConfig) -> SourceRows:
    """Rows of `source` read with the data config's split and encoding."""
    return read_source(source, cfg.split, cfg.encoding)


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


def split_prompt(row: dict[str, Any], form: str) -> tuple[Any, str | None]:
    """(prompt, reference answer) of an eval row; text rows have no reference."""
    if form == "chat":
        messages = row["messages"]
        if messages[-1]["role"] == "assistant":
            return messages[:-1], messages[-1]["content"]
        return messages, None
    if form == "prompt_completion":
        return row["prompt"], row["completion"]
    return row["text"], None
