"""Stage 5, only for a run that passed the gate: the shippable folder (GPTQ model + model card + metrics), and the
store's `latest.json` moved to it. A failed or regressed run never touches either."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.base_model import resolve_model_dir
from pipeline.keys import code_version
from pipeline.report import adapter_card, model_card
from pipeline.run import RunContext
from pipeline.stage import StageArtifact, local_copy, run_stage
from pipeline.store import check_room, describe_files, write_json

LATEST = "latest.json"


def release(run: RunContext, quantized: StageArtifact, evaluation: StageArtifact) -> StageArtifact:
    """Copy the GPTQ checkpoint and the evaluation's report into `<store>/<run>/release/` with a model card, then
    point `<store>/latest.json` at it."""

    def build(out_dir: Path) -> dict[str, Any]:
        model, report = local_copy(run.store, quantized), local_copy(run.store, evaluation)
        check_room("release", out_dir, sum(p.stat().st_size for p in model.glob("*") if p.is_file())
                   + sum(p.stat().st_size for p in report.glob("*") if p.is_file()))
        shutil.copytree(model, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json", "gptq_logs"))
        metrics = json.loads((report / "metrics.json").read_text())
        for name in ("metrics.json", "report.md", "training_loss.png"):
            shutil.copy2(report / name, out_dir / name)
        (out_dir / "README.md").write_text(model_card(run.cfg, metrics))
        return {"models": metrics["models"]}

    card = {"base_model": run.cfg.model.name_or_path, "data": run.cfg.data.path}
    artifact = run_stage(run, "release", {"card": card, "code": code_version(__name__)}, build,
                         inputs={"quantized": quantized, "evaluation": evaluation})
    point_latest(run, artifact)
    return artifact


def release_adapter(run: RunContext, adapter: StageArtifact, evaluation: StageArtifact) -> StageArtifact:
    """The adapter route's release: the adapter (unmerged), the identity of the quantized base it needs (name,
    revision, each weights file's sha256: BASE.json), the evaluation's report and a model card, then latest.json."""
    model = run.cfg.model

    def build(out_dir: Path) -> dict[str, Any]:
        trained, report = local_copy(run.store, adapter), local_copy(run.store, evaluation)
        base_dir = resolve_model_dir(model.name_or_path, model.revision)
        base = {"name_or_path": model.name_or_path, "revision": model.revision,
                "quantization": adapter.metrics["base_quantization"],
                "files": {name: d["sha256"] for name, d in describe_files(base_dir).items()
                          if name.endswith((".safetensors", "config.json"))}}
        shutil.copytree(trained, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        (out_dir / "BASE.json").write_text(json.dumps(base, indent=2) + "\n")
        metrics = json.loads((report / "metrics.json").read_text())
        for name in ("metrics.json", "report.md", "training_loss.png"):
            shutil.copy2(report / name, out_dir / name)
        (out_dir / "README.md").write_text(adapter_card(run.cfg, metrics, base))
        return {"models": metrics["models"], "base": base}

    card = {"base_model": model.name_or_path, "data": run.cfg.data.path}
    artifact = run_stage(run, "release", {"card": card, "code": code_version(__name__)}, build,
                         inputs={"adapter": adapter, "evaluation": evaluation})
    point_latest(run, artifact)
    return artifact


def point_latest(run: RunContext, release: StageArtifact) -> None:
    """Move the store's latest.json to this release."""
    write_json(run.store, run.store.path(LATEST), {
        "run_name": run.name, "uri": release.uri, "key": release.key,
        "released_at": datetime.now(UTC).isoformat(timespec="seconds")})
