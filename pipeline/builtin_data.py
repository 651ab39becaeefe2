"""Datasets the project generates in code (no download): `data.path: builtin:<name>`.

`iso-dates`: normalise a date written one of many ways to ISO 8601 (YYYY-MM-DD). Every answer is checkable
exactly, a small instruct model gets few right unprompted, and a short LoRA fine-tune learns it.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
from collections.abc import Callable
from typing import Any

MONTHS = list(calendar.month_name)[1:]
ABBREVIATIONS = list(calendar.month_abbr)[1:]
WEEKDAYS = list(calendar.day_name)
QUESTIONS = (
    "Convert this date to ISO 8601 (YYYY-MM-DD): {date}",
    "Rewrite the date {date} in ISO 8601 format.",
    "What is {date} in YYYY-MM-DD form?",
    "Normalize this date to ISO 8601: {date}",
    "Give the ISO 8601 date (YYYY-MM-DD) for: {date}",
)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# Each renders a date unambiguously (numeric forms say their order).
FORMATS: list[Callable[[dt.date], str]] = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{ABBREVIATIONS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day:02d}-{ABBREVIATIONS[d.month - 1]}-{d.year}",
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month/day/year)",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)",
    lambda d: f"{d.day}.{d.month}.{d.year} (day.month.year)",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d: f"{d.year}{d.month:02d}{d.day:02d} (YYYYMMDD)",
    lambda d: f"{MONTHS[d.month - 1].upper()} {d.day} {d.year}",
]


def iso_dates(n: int = 3000, seed: int = 1234) -> list[dict[str, Any]]:
    """`n` chat examples; the assistant's answer is the ISO date and nothing else."""
    rng = random.Random(seed)
    start, span = dt.date(1900, 1, 1).toordinal(), dt.date(2099, 12, 31).toordinal() - dt.date(1900, 1, 1).toordinal()
    rows = []
    for _ in range(n):
        date = dt.date.fromordinal(start + rng.randrange(span + 1))
        question = rng.choice(QUESTIONS).format(date=rng.choice(FORMATS)(date))
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": date.isoformat()}]})
    return rows


BUILTIN_DATASETS: dict[str, Callable[[], list[dict[str, Any]]]] = {"builtin:iso-dates": iso_dates}
