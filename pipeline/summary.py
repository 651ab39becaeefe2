"""run.json: the summary every run writes to `<store>/<run_name>/run.json`, finished or failed. Its schema is this
model (docs/run-summary.md is generated from it)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, computed_field


class StageSummary(BaseModel):
    """One stage of the run, built or reused."""

    uri: str = Field(description="Where the stage's files are: `<store>/<run_name>/<stage>`, or another run's "
                                 "folder holding the same key.")
    key: str = Field(description="sha256 of everything that determines the stage's output (config values, inputs' "
                                 "keys, code).")
    reused: bool = Field(description="True when a complete stage with this key was found in the store.")
    seconds: float = Field(description="Wall seconds the stage took in this run (a reuse takes well under one).")
    metrics: dict[str, Any] = Field(description="What the stage measured, as recorded in its manifest.")


class RunSummary(BaseModel):
    """A pipeline run: its config, each stage reached, and how it ended."""

    run_name: str = Field(description="The run's folder in the store.")
    config: dict[str, Any] = Field(description="The full config the run used, overrides applied.")
    stages: dict[str, StageSummary] = Field(default_factory=dict, description="Stages reached, in pipeline order.")
    skipped: dict[str, str] = Field(default_factory=dict, description="Stages this run's route does not have, and "
                                    "why (an adapter on a quantized base: no merge, no quantize).")
    memory_plan: dict[str, Any] | None = Field(
        default=None, description="Preflight's memory plan: the device, and each stage's predicted device and host "
                                  "peaks in bytes with their parts (docs/memory.md); measured peaks are in the "
                                  "stages' metrics.")
    status: Literal["running", "completed", "failed"] = Field(
        default="running", description="`completed` once released; `failed` on any error or a missed quality gate.")
    failed_stage: str | None = Field(default=None, description="The stage (or `gate`) where a failed run stopped.")
    error: str | None = Field(default=None, description="`ExceptionType: message` of a failed run.")
    seconds: float | None = Field(default=None, description="Wall seconds of the whole run.")
    metrics_uri: str | None = Field(default=None, description="The evaluation's metrics.json, once evaluated.")
    mlflow: dict[str, Any] | None = Field(
        default=None, description="The run's MLflow run, when a tracking server is set: `tracking_uri` (credentials "
                                  "removed), `experiment_id`, `run_id`, `run_url` (its page in MLflow's UI), "
                                  "`registered_model` (`name` and `version` of the registered release, or why it was "
                                  "`skipped`), and `error`: why tracking stopped, if it did (the run goes on).")

    @computed_field(description="Each stage's metrics, by stage name (the same figures as in `stages`).")
    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        return {name: stage.metrics for name, stage in self.stages.items()}

    @computed_field(description="The compute dtype each stage used (`bf16` or `fp32`) and why: the setting that "
                                "forced it, or the probe's timing of bf16 against fp32 on the machine that ran it "
                                "(its figures in the stage's `precision_choice`); for the evaluate stage, per model.")
    @property
    def precision(self) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for name, stage in self.stages.items():
            if name == "release":  # it republishes the evaluation's figures
                continue
            if "precision_choice" in stage.metrics:
                choice = stage.metrics["precision_choice"]
                chosen[name] = {"precision": choice["precision"], "reason": choice["reason"]}
            elif isinstance(stage.metrics.get("models"), dict):
                scored = {model: {"precision": m["precision"], "reason": m["precision_reason"]}
                          for model, m in stage.metrics["models"].items() if "precision" in m}
                if scored:
                    chosen[name] = scored
        return chosen

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)
