"""Run one stage against the store: reuse a complete stage with the same key, else build and publish it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pipeline.store import find_reusable, library_versions, publish, stage_key, staging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageArtifact:
    """What a stage hands to the next: where its output lies and what it measured; never tensors."""

    stage: str
    uri: str
    key: str
    reused: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.uri)

    def summary(self) -> dict[str, Any]:
        return {"uri": self.uri, "key": self.key, "reused": self.reused, "seconds": round(self.seconds, 2),
                "metrics": self.metrics}


def run_stage(
    stage: str,
    stage_dir: Path,
    determinants: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    inputs: dict[str, StageArtifact] = {},
    force: bool = False,
) -> StageArtifact:
    """Reuse `stage_dir` if it holds this key (and `force` is off); else `build(tmp_dir) -> metrics` and publish."""
    start = time.perf_counter()
    key = stage_key(stage, {**determinants, "inputs": {name: a.key for name, a in inputs.items()}})
    if not force and (manifest := find_reusable(stage_dir, key)) is not None:
        logger.info("%s: reusing %s (key %s...), finished %s", stage, stage_dir, key[:12], manifest.get("created_at"))
        return StageArtifact(stage, str(stage_dir), key, True, time.perf_counter() - start, manifest["metrics"])
    logger.info("%s: building into %s (key %s...)", stage, stage_dir, key[:12])
    with staging(stage_dir) as tmp:
        metrics = build(tmp)
        publish(tmp, stage_dir, {
            "stage": stage,
            "key": key,
            "config": determinants,
            "inputs": {name: _input_manifest(a) for name, a in inputs.items()},
            "versions": library_versions(),
            "metrics": metrics,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    return StageArtifact(stage, str(stage_dir), key, False, time.perf_counter() - start, metrics)


def _input_manifest(artifact: StageArtifact) -> dict[str, Any]:
    from pipeline.store import read_manifest

    return read_manifest(artifact.path) or {"uri": artifact.uri, "key": artifact.key}
