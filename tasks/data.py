"""Stage 0: publish the run's dataset, as preflight read and validated it, so every later stage reads these files
and never the source again. Keyed by content: the same rows under another file name reuse it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data import Dataset, load_dataset, write_dataset
from pipeline.keys import code_version
from pipeline.run import RunContext
from pipeline.stage import StageArtifact, local_copy, run_stage


def prepare_data(run: RunContext, dataset: Dataset) -> StageArtifact:
    """Write `dataset` to `<store>/<run>/data/` (train.jsonl, eval.jsonl, dataset.json), or reuse the same content."""

    def build(out_dir: Path) -> dict[str, Any]:
        return write_dataset(dataset, out_dir)

    determinants = {"content": dataset.key, "code": code_version(__name__)}
    return run_stage(run, "data", determinants, build)


def read_data(run: RunContext, data: StageArtifact) -> Dataset:
    """The dataset a data stage published."""
    return load_dataset(local_copy(run.store, data))
