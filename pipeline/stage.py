"""Run one stage against the store: reuse a complete stage with the same key, else build and publish it."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.keys import stage_key
from pipeline.memory import peak_rss_bytes, reset_peak_rss
from pipeline.run import RunContext
from pipeline.store import (
    StageCorrupt,
    Store,
    disk_full_as_one_sentence,
    find_reusable,
    index_path,
    library_versions,
    materialize,
    new_scratch,
    publish,
    read_json,
    read_manifest,
    remove_leftovers,
    write_json,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageArtifact:
    """What a stage hands to the next: where its output lies, what it measured and what it was built from; never
    tensors."""

    stage: str
    uri: str          # as users write it: a local path or s3://bucket/...
    store_path: str   # the same place as a path in the store's filesystem
    key: str
    reused: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, StageArtifact] = field(default_factory=dict)  # its lineage: input name -> artifact

    def summary(self) -> dict[str, Any]:
        return {"uri": self.uri, "key": self.key, "reused": self.reused, "seconds": round(self.seconds, 2),
                "metrics": self.metrics}


def local_copy(store: Store, artifact: StageArtifact) -> Path:
    """A local folder with the artifact's verified files (the store folder itself when the store is local)."""
    manifest = read_manifest(store, artifact.store_path)
    if manifest is None or manifest["key"] != artifact.key:
        raise StageCorrupt(f"{artifact.uri} no longer holds {artifact.stage} {artifact.key[:12]}...; rerun to rebuild it")
    return materialize(store, artifact.store_path, manifest)


def key_of(stage: str, determinants: dict[str, Any], inputs: dict[str, StageArtifact]) -> str:
    """The stage's key: its determinants and its inputs' keys."""
    return stage_key(stage, {**determinants, "inputs": {name: a.key for name, a in inputs.items()}})


def run_stage(
    run: RunContext,
    stage: str,
    determinants: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    inputs: dict[str, StageArtifact] | None = None,
) -> StageArtifact:
    """Reuse a complete stage with this key (this run's, or any run's via the index), else `build(scratch_dir) ->
    metrics` and publish the scratch folder as `<run>/<stage>`.

    A stage is rebuilt, whatever the store holds, when the run forces it or when one of its inputs was rebuilt in
    this run: what follows a recomputed stage is measured again. A write that runs out of disk space fails as one
    StoreFull sentence (a build that knows its size calls `check_room` first), and the partial folder is removed.
    """
    start = time.perf_counter()
    inputs = inputs or {}
    store = run.store
    key = key_of(stage, determinants, inputs)
    own = store.path(run.name, stage)
    force = stage in run.force or any(not a.reused for a in inputs.values())
    if not force:
        for candidate in _candidates(store, own, stage, key):
            if (manifest := find_reusable(store, candidate, key)) is not None:
                logger.info("%s: reusing %s (key %s..., built %s)", stage, store.url(candidate), key[:12],
                            manifest.get("created_at"))
                return StageArtifact(stage, store.url(candidate), candidate, key, True,
                                     time.perf_counter() - start, manifest["metrics"], inputs)
    logger.info("%s: building %s (key %s...)", stage, store.url(own), key[:12])
    scratch = new_scratch(store, own)
    reset_peak_rss()
    try:
        with disk_full_as_one_sentence(stage, store.url(own), scratch):
            metrics = build(scratch)
            # what the build held at most in this process's RAM (a stage may record a narrower one: training's)
            metrics.setdefault("host_peak_bytes", peak_rss_bytes())
            publish(store, scratch, own, {
                "stage": stage,
                "key": key,
                "config": determinants,
                "inputs": {name: read_manifest(store, a.store_path) for name, a in inputs.items()},
                "versions": library_versions(),
                "metrics": metrics,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            })
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    remove_leftovers(store, own)
    write_json(store, index_path(store, stage, key), {"stage": stage, "key": key, "run_name": run.name})
    return StageArtifact(stage, store.url(own), own, key, False, time.perf_counter() - start, metrics, inputs)


def _candidates(store: Store, own: str, stage: str, key: str) -> list[str]:
    """This run's stage folder first, then wherever the index says another run published the same key."""
    entry = read_json(store, index_path(store, stage, key))
    other = store.path(entry["run_name"], stage) if entry else None
    return [own] + ([other] if other and other != own else [])
