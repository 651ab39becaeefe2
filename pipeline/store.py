"""The artifact store: `<store>/<run-name>/<stage>/` folders, each published whole with a manifest written last.

A stage is complete only when its `manifest.json` exists; files are staged in a hidden temporary folder and
moved into place in one rename, so readers never see half a model. A stage's `key` hashes what determines its
output (its config and its inputs' keys); a rerun whose key matches a complete, checksum-valid stage reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_SUMMARY = "run.json"
VERSIONED = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "gptqmodel", "optimum", "prefect")


def run_path(store_uri: str, run_name: str) -> Path:
    return Path(store_uri.removeprefix("file://")).expanduser().absolute() / run_name


def stage_key(stage: str, determinants: dict[str, Any]) -> str:
    """sha256 of everything that determines a stage's output, canonically serialised."""
    blob = json.dumps({"stage": stage, **determinants}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} of every file under root except the manifest."""
    return {
        str(p.relative_to(root)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def find_reusable(stage_dir: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete stage with this key whose files still match their checksums, else None."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return None
    if manifest.get("key") != key:
        logger.info("%s holds a different %s (key %s..., want %s...): recomputing",
                    stage_dir, manifest.get("stage"), str(manifest.get("key"))[:12], key[:12])
        return None
    for rel, info in manifest["files"].items():
        path = stage_dir / rel
        if not path.is_file() or path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
            logger.warning("%s: %s is missing or fails its checksum; treating the stage as missing", stage_dir, rel)
            return None
    return manifest


@contextmanager
def staging(stage_dir: Path) -> Iterator[Path]:
    """A fresh hidden folder beside stage_dir to write into; removed if the block raises."""
    stage_dir = Path(stage_dir)
    tmp = stage_dir.parent / f".{stage_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, stage_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum tmp's files, write the manifest last, then move tmp into place (replacing an older stage)."""
    manifest = {**manifest, "files": describe_files(tmp)}
    _write_json_atomic(tmp / MANIFEST, manifest)
    old = None
    if stage_dir.exists():
        old = stage_dir.parent / f".{stage_dir.name}.old-{uuid.uuid4().hex[:8]}"
        stage_dir.rename(old)
    tmp.rename(stage_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("published %s (%d files)", stage_dir, len(manifest["files"]))
    return manifest


def write_run_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / RUN_SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, summary)
    return path


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
