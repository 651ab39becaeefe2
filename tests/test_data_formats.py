"""Data is read exactly as written in every format, and every kind of broken file is refused before training: exit 2,
one message naming the file and the fix, no traceback, nothing written (the fault catalogue)."""

import csv
import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from pipeline.config import DataConfig
from pipeline.data import read_dataset

# Text that type inference or a careless reader changes: dates, leading zeros, null-looking words, numbers,
# booleans, non-ASCII, surrounding spaces, a comma and quotes (CSV), a newline.
TRICKY = [
    {"prompt": "When?", "completion": "2078-12-15"},
    {"prompt": "007", "completion": "0042"},
    {"prompt": "null", "completion": "None"},
    {"prompt": "NaN", "completion": "nan"},
    {"prompt": "TRUE", "completion": "false"},
    {"prompt": "1e5", "completion": "3.14159265358979323846"},
    {"prompt": "Zürich – 東京 🚀", "completion": "naïve café"},
    {"prompt": "  padded  ", "completion": " x "},
    {"prompt": 'say "a, b"', "completion": "line one\nline two"},
    {"prompt": "12:30", "completion": "2021-03-05T12:30:00Z"},
    {"prompt": "separators\u2028inside\x85a string", "completion": "tab\there\u2029"},
]


def write(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    """`rows` in the file format its suffix names, all columns as strings."""
    if path.suffix == ".jsonl":
        path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    elif path.suffix == ".json":
        path.write_bytes(json.dumps(rows, ensure_ascii=False).encode(encoding))
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding=encoding) as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["prompt", "completion"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        columns = list(rows[0]) if rows else ["prompt", "completion"]
        table = pyarrow.table({c: pyarrow.array([r[c] for r in rows], type=pyarrow.string()) for c in columns})
        pyarrow.parquet.write_table(table, path)
    return path


FORMATS = [".jsonl", ".json", ".csv", ".parquet"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_text_round_trips_unchanged(tmp_path, suffix):
    path = write(tmp_path / f"tricky{suffix}", TRICKY)
    dataset = read_dataset(DataConfig(path=str(path), eval_fraction=0.2))
    assert dataset.form == "prompt_completion"
    read = sorted(dataset.train + dataset.eval, key=lambda r: r["prompt"])
    assert read == sorted(TRICKY, key=lambda r: r["prompt"])  # every value a str, byte for byte
    assert all(type(v) is str for row in read for v in row.values())


def test_the_data_stage_files_give_back_the_same_rows(tmp_path):
    from pipeline.data import load_dataset, write_dataset

    dataset = read_dataset(DataConfig(path=str(write(tmp_path / "tricky.jsonl", TRICKY)), eval_fraction=0.2))
    write_dataset(dataset, tmp_path)
    assert load_dataset(tmp_path) == dataset and load_dataset(tmp_path).key == dataset.key


def test_latin1_file_reads_when_its_encoding_is_declared(tmp_path):
    rows = [{"prompt": "Où est la gare ?", "completion": "À gauche, après le café."}] * 10
    path = write(tmp_path / "export.csv", rows, encoding="latin-1")
    dataset = read_dataset(DataConfig(path=str(path), encoding="latin-1"))
    assert dataset.train[0] == rows[0]


def test_a_few_empty_answers_are_dropped_within_the_allowed_share(tmp_path, caplog):
    rows = [{"prompt": f"q{i}", "completion": "" if i < 2 else f"a{i}"} for i in range(40)]
    path = write(tmp_path / "some-empty.jsonl", rows)
    dataset = read_dataset(DataConfig(path=str(path), max_empty_share=0.1))
    assert len(dataset.train) + len(dataset.eval) == 38
    assert "dropping 2 of 40 rows whose completion is empty or blank" in caplog.text


# --- the fault catalogue ----------------------------------------------------------------------------------------

def latin1(path: Path) -> str:
    write(path, [{"prompt": "Où ?", "completion": "Là."}] * 3, encoding="latin-1")
    return "is not utf-8 text: byte 0x"


def binary(path: Path) -> str:
    path.write_bytes(bytes(range(256)) * 4)
    return "is not a readable parquet file" if path.suffix == ".parquet" else "is not utf-8 text: byte 0x80 at line"


def zero_bytes(path: Path) -> str:
    path.write_bytes(b"")
    return "is empty (0 bytes)"


def no_rows(path: Path) -> str:
    if path.suffix == ".jsonl":
        path.write_text("\n\n")
    else:
        write(path, [])
    return {".jsonl": "has no rows, only blank lines", ".json": "is an empty list, []",
            ".csv": "has only its header line, no rows", ".parquet": "has 0 rows"}[path.suffix]


def empty_answers(path: Path) -> str:
    write(path, [{"prompt": f"q{i}", "completion": ["", "   ", "\n"][i % 3]} for i in range(12)])
    return "12 of 12 rows of data.path"


def wrong_types(path: Path) -> str:
    rows = [{"prompt": f"q{i}", "completion": i} for i in range(6)]
    if path.suffix == ".parquet":
        pyarrow.parquet.write_table(pyarrow.table({"prompt": [r["prompt"] for r in rows],
                                                   "completion": [r["completion"] for r in rows]}), path)
    else:
        write(path, rows)
    return "`completion` is int 0, not text; store it as a string"


def wrong_columns(path: Path) -> str:
    write(path, [{"question": "q", "answer": "a"}] * 4)
    return "cannot tell the data's form from its columns ['answer', 'question']"


BROKEN = {f.__name__: f for f in (latin1, binary, zero_bytes, no_rows, empty_answers, wrong_types, wrong_columns)}
# Not made: a Latin-1 parquet (binary: no text encoding to get wrong) and wrong types in CSV (every field is text).
CASES = [(kind, suffix) for kind in BROKEN for suffix in FORMATS
         if (kind, suffix) not in {("latin1", ".parquet"), ("wrong_types", ".csv")}]


@pytest.mark.parametrize("kind, suffix", CASES, ids=[f"{k}{s}" for k, s in CASES])
def test_broken_data_exits_2_with_one_message_and_writes_nothing(kind, suffix, tmp_path, capsys):
    from flows.cli import main

    path = tmp_path / f"{kind}{suffix}"
    expected = BROKEN[kind](path)
    store = tmp_path / "store"
    assert main(["--config", "smoke", "--set", f"data.path={path}", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert str(path) in err and "Traceback" not in err
    assert not store.exists()


def test_calibration_and_eval_files_get_the_same_checks(tmp_path, capsys):
    from flows.cli import main

    blank = write(tmp_path / "blank.jsonl", [{"text": "  "}] * 5)
    empty_eval = write(tmp_path / "eval.csv", [])
    store = tmp_path / "store"
    assert main(["--config", "smoke", "--set", f"quantization.calibration.source={blank}",
                 "--set", f"data.eval_path={empty_eval}", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"data.eval_path {str(empty_eval)!r} has only its header line" in err
    assert f"5 of 5 rows of quantization.calibration.source {str(blank)!r} have an empty or blank text" in err
    assert not store.exists()


@pytest.mark.slow
def test_a_prompt_completion_file_of_iso_dates_trains(tmp_path):
    """The default job's own task exported as JSONL: completions that look like dates stay text and train."""
    from pipeline.builtin_data import iso_dates
    from tests.conftest import run_cli

    rows = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
            for r in iso_dates(n=300)]
    path = write(tmp_path / "dates.jsonl", rows)
    result = run_cli("--config", "smoke", "--set", f"data.path={path}", "--store", str(tmp_path / "store"),
                     "--set", "training.max_steps=4", "--set", "quantization.calibration.n_samples=8")
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "store" / "smoke" / "run.json").read_text())
    assert run["status"] == "completed" and run["metrics"]["data"]["form"] == "prompt_completion"
    published = (tmp_path / "store" / "smoke" / "data" / "train.jsonl").read_text().splitlines()
    assert json.loads(published[0])["completion"] in {r["completion"] for r in rows}
