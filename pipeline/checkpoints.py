"""Fine-tune checkpoints in the store, so a run killed on one machine resumes on any machine that sees the store.

The Trainer saves checkpoints to local scratch; `CheckpointSync` publishes each one to
`<run>/.work/finetune-<key>/checkpoint-N/` with its manifest last (a checkpoint cut off mid-upload is ignored) and
keeps the newest `keep`. `restore_latest` brings the newest complete one back into a local folder.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from pipeline.store import (
    MANIFEST,
    StageCorrupt,
    Store,
    disk_full_as_one_sentence,
    materialize,
    new_scratch,
    publish,
    read_manifest,
    retrying,
)

logger = logging.getLogger(__name__)
STEP = re.compile(r"checkpoint-(\d+)$")


def published_checkpoints(store: Store, prefix: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under prefix, oldest first."""
    manifests = retrying("listing checkpoints", lambda: store.fs.glob(f"{prefix}/checkpoint-*/{MANIFEST}"))
    found = []
    for manifest in manifests:
        folder = manifest.rsplit("/", 1)[0]
        if match := STEP.search(folder):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def restore_latest(store: Store, prefix: str, local_dir: Path) -> Path | None:
    """Copy the newest complete, checksum-valid checkpoint into local_dir; None if there is none."""
    for step, folder in reversed(published_checkpoints(store, prefix)):
        manifest = read_manifest(store, folder)
        try:
            source = materialize(store, folder, manifest)
        except StageCorrupt as exc:
            logger.warning("checkpoint %s is damaged (%s); trying an older one", store.url(folder), exc)
            continue
        target = Path(local_dir) / f"checkpoint-{step}"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(MANIFEST), dirs_exist_ok=True)
        logger.info("restored %s from the store", store.url(folder))
        return target
    return None


def publish_checkpoint(store: Store, prefix: str, local: Path, step: int, keep: int = 2) -> None:
    """Publish the local `checkpoint-<step>` folder to `<prefix>/checkpoint-<step>`; keep the newest `keep` there."""
    target = f"{prefix}/checkpoint-{step}"
    scratch = new_scratch(store, target)
    try:
        with disk_full_as_one_sentence("finetune", store.url(target), scratch):
            shutil.copytree(local, scratch, dirs_exist_ok=True)
            publish(store, scratch, target, {"stage": "checkpoint", "key": f"{Path(prefix).name}-{step}", "step": step})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for _, old in published_checkpoints(store, prefix)[:-keep]:
        retrying("pruning an old checkpoint", lambda old=old: store.fs.rm(old, recursive=True))


class CheckpointSync(TrainerCallback):
    """Publish each checkpoint the Trainer writes to the store; keep the newest `keep` there."""

    def __init__(self, store: Store, prefix: str, keep: int = 2):
        self.store, self.prefix, self.keep = store, prefix, keep

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        publish_checkpoint(self.store, self.prefix, Path(args.output_dir) / f"checkpoint-{step}", step, self.keep)
