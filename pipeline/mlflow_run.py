"""One MLflow run per pipeline run, when a tracking server is configured (`tracking.mlflow_tracking_uri` or
MLFLOW_TRACKING_URI): the config as parameters, each stage's metrics, seconds, key and URI, the fine-tune's per-step
curve (`tracking.report_to: [mlflow]`), the evaluation table, the report files as artifacts, and, for a run that
passed the gate, a new version of the registered model pointing at the release in the store.

Tracking never decides a run's outcome: the first call that fails (a server that is down, a refusal) is logged once
as a warning, kept for run.json, and every later call is skipped; the model is published all the same.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import PipelineConfig
from pipeline.store import redact

logger = logging.getLogger(__name__)

# A tracker that does not answer must not hold the run for minutes: MLflow's own defaults retry 7 times with
# backoff and wait 120 s per request. And MLflow's client writes the run's URL to stdout when the run ends (the
# pipeline logs it once, when the run starts). These apply unless the environment sets MLflow's variables itself.
CLIENT_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
BATCH = 100             # MLflow's log_batch takes at most 100 params or tags and 1000 metrics per request
PARAM_VALUE_MAX = 6000  # MLflow's longest param value
CURVE_KEYS = ("loss", "learning_rate", "grad_norm", "epoch")  # the Trainer's log keys, under train/ as TensorBoard
REPORT_FILES = ("report.md", "metrics.json", "training_loss.png")  # the evaluation stage's files, as artifacts
EVALUATION_KEYS = ("models", "serving", "samples", "notes")  # logged once, as the eval.* table, not per stage


def tracking_uri(cfg: PipelineConfig) -> str | None:
    """The MLflow server this run reports to: the config's, else MLFLOW_TRACKING_URI, else none."""
    return cfg.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_mlflow(cfg: PipelineConfig) -> list[str]:
    """Preflight's problems with the MLflow settings: credentials in the URI, a missing client, `mlflow` in
    report_to with no server to report to."""
    uri = tracking_uri(cfg)
    if uri is None:
        return ["tracking.report_to includes 'mlflow' but no MLflow server is set: set tracking.mlflow_tracking_uri "
                "or MLFLOW_TRACKING_URI (or remove mlflow from tracking.report_to)"] \
            if "mlflow" in cfg.tracking.report_to else []
    where = "tracking.mlflow_tracking_uri" if cfg.tracking.mlflow_tracking_uri else "MLFLOW_TRACKING_URI"
    if redact(uri) != uri:
        return [f"{where} {redact(uri)!r} embeds credentials; remove them and set MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead"]
    if importlib.util.find_spec("mlflow") is None:
        return [f"{where} is set ({uri}) but the 'mlflow' package is not installed: pip install '.[tracking]' "
                "(MLflow's client, mlflow-skinny), or unset it"]
    return []


@contextmanager
def client_settings() -> Iterator[None]:
    """MLflow's client settings for the duration of one call (few retries, a short timeout, no printing), unless the
    user set them."""
    added = {name: value for name, value in CLIENT_SETTINGS.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as `a.b.c` keys and leaf values."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The entries that are numbers (not flags, not text): what MLflow can plot."""
    return {key: float(v) for key, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def as_param(value: Any) -> str:
    """A config value as MLflow keeps it: text, a URL's user and password removed (an index URL in
    `serving.pip_args` may carry a token), cut to MLflow's longest value."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = redact(text)
    return text if len(text) <= PARAM_VALUE_MAX else text[:PARAM_VALUE_MAX - 3] + "..."


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """Where the run is in MLflow's UI, for an http(s) server."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class MlflowRun:
    """The pipeline run's MLflow run. Every method is safe to call whatever happened before: after a failure, or
    without a server configured, it does nothing."""

    def __init__(self, uri: str | None):
        self.uri = uri
        self.client: Any = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.registered: dict[str, str] | None = None
        self.error: str | None = None

    @property
    def active(self) -> bool:
        return self.uri is not None and self.error is None

    def call(self, what: str, action: Callable[[], Any]) -> Any:
        """`action()` unless tracking already failed; the first failure is logged once and kept."""
        if not self.active:
            return None
        try:
            with client_settings():
                return action()
        except Exception as exc:  # any failure of the tracker: the run goes on without it
            self.fail(what, exc)
            return None

    def fail(self, what: str, exc: Exception) -> None:
        """Say once that tracking failed and why; keep it for run.json."""
        self.error = f"{what}: {type(exc).__name__}: {str(exc)[:500]}"
        logger.warning("MLflow tracking at %s failed, and the run goes on without it (the model is published as "
                       "usual; run.json records this): %s", redact(self.uri or ""), self.error)

    def start(self, cfg: PipelineConfig, run_folder: str, tags: dict[str, str]) -> None:
        """Open the run in the config's experiment, with the config as parameters."""
        def start() -> None:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = experiment(self.client, cfg.tracking.experiment or cfg.run_name)
            run = self.client.create_run(self.experiment_id, run_name=cfg.run_name, tags={
                "ftq.run_name": cfg.run_name, "ftq.run_folder": run_folder, **tags})
            self.run_id = run.info.run_id
            self.log(params={key: as_param(v) for key, v in flatten(cfg.model_dump(mode="json")).items()})
            logger.info("MLflow: run %s in experiment %r at %s", self.run_id, cfg.tracking.experiment or cfg.run_name,
                        self.url or redact(self.uri or ""))

        self.call("starting the MLflow run", start)

    @property
    def url(self) -> str | None:
        if self.uri is None or self.experiment_id is None or self.run_id is None:
            return None
        return run_url(self.uri, self.experiment_id, self.run_id)

    def log(self, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
            tags: dict[str, str] | None = None, step: int = 0) -> None:
        """Params, metrics (at `step`) and tags, in batches MLflow accepts."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        entities = ([("params", Param(k, v)) for k, v in (params or {}).items()]
                    + [("tags", RunTag(k, v)) for k, v in (tags or {}).items()]
                    + [("metrics", Metric(k, v, now, step)) for k, v in (metrics or {}).items()])
        for start in range(0, len(entities), BATCH):
            chunk = entities[start:start + BATCH]
            self.client.log_batch(self.run_id, **{kind: [e for k, e in chunk if k == kind]
                                                  for kind in ("params", "metrics", "tags")})

    def stage(self, name: str, artifact: Any) -> None:
        """A stage's key, URI and whether it was reused (tags), its metrics, and its seconds when built here (a
        reused stage is not measured again: its metrics are those of the run that built it)."""
        tags = {f"ftq.stage.{name}.key": artifact.key, f"ftq.stage.{name}.uri": artifact.uri,
                f"ftq.stage.{name}.reused": str(artifact.reused).lower()}
        own = {key: v for key, v in artifact.metrics.items() if key not in EVALUATION_KEYS}
        metrics = {f"{name}.{key}": v for key, v in numeric(flatten(own)).items()}
        if not artifact.reused:
            metrics[f"{name}.seconds"] = round(artifact.seconds, 2)
        self.call(f"logging the {name} stage", lambda: self.log(metrics=metrics, tags=tags))

    def curve(self, history: Callable[[], list[dict[str, Any]]]) -> None:
        """The fine-tune's log history (`training_log.json`, read when called) as per-step metrics `train/<key>`,
        the Trainer's names: the whole curve, steps before a resume included, and a reused fine-tune's too."""
        def log_curve() -> None:
            from mlflow.entities import Metric
            from mlflow.utils.time import get_current_time_millis

            now = get_current_time_millis()
            points = [Metric(f"train/{key}", float(entry[key]), now, int(entry["step"]))
                      for entry in history() for key in CURVE_KEYS if entry.get(key) is not None]
            for start in range(0, len(points), 1000):
                self.client.log_batch(self.run_id, metrics=points[start:start + 1000])

        self.call("logging the training curve", log_curve)

    def evaluation(self, metrics: dict[str, Any], folder: Callable[[], Path]) -> None:
        """The evaluation table (each model's and vLLM's figures) as metrics, the report files in the evaluation's
        `folder()` (a download from an object store, made only when tracking) as artifacts."""
        table = {f"eval.{model}.{key}": v for model, scores in metrics.get("models", {}).items()
                 for key, v in numeric(flatten(scores)).items()}
        table |= {f"eval.vllm.{key}": v for key, v in numeric(flatten(metrics.get("serving") or {})).items()}

        def log_evaluation() -> None:
            self.log(metrics=table)
            files = folder()
            for name in REPORT_FILES:
                if (files / name).is_file():
                    self.client.log_artifact(self.run_id, str(files / name))

        self.call("logging the evaluation", log_evaluation)

    def register(self, model_name: str, source: str, release_key: str, figures: dict[str, float]) -> None:
        """A new version of `model_name` pointing at the release's URI (no weights copied), tagged with the gate's
        figures; the same release (same key) registered before is not registered again."""
        if "://" not in source and urlsplit(self.uri or "").scheme in ("http", "https"):
            self.registered = {"name": model_name, "skipped": (
                f"the release {source} is on this machine's disk, which the MLflow server and its users cannot "
                "reach (the server refuses local paths as a model's source); releases in a shared store (s3://...) are "
                "registered")}
            logger.warning("MLflow: the release was not registered: %s", self.registered["skipped"])
            return

        def register() -> None:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(model_name, description="Released by finetune-then-quantize")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            for version in self.client.search_model_versions(f"name = '{model_name}'"):
                if version.tags.get("ftq.release_key") == release_key:
                    logger.info("MLflow: %s version %s is this release already", model_name, version.version)
                    self.registered = {"name": model_name, "version": str(version.version)}
                    return
            tags = {"ftq.release_key": release_key, **{f"gate.{key}": f"{v:.6g}" for key, v in figures.items()}}
            version = self.client.create_model_version(model_name, source, run_id=self.run_id, tags=tags,
                                                       description=f"Release {source}")
            self.registered = {"name": model_name, "version": str(version.version)}
            self.log(tags={"ftq.registered_model": f"{model_name}/{version.version}"})
            logger.info("MLflow: registered %s version %s -> %s", model_name, version.version, source)

        self.call(f"registering the release as {model_name!r}", register)

    def end(self, status: str) -> None:
        """FINISHED for a released run, FAILED otherwise; tried even after a failure (a refusal leaves the server
        up), quietly: the failure was said once already."""
        if self.run_id is None:
            return
        try:
            with client_settings():
                self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED")
        except Exception as exc:  # the tracker is gone or refuses; said once, kept for run.json
            if self.error is None:
                self.fail("ending the MLflow run", exc)

    def record(self) -> dict[str, Any] | None:
        """What run.json keeps: where the run is, what was registered, and why tracking stopped if it did."""
        if self.uri is None:
            return None
        return {"tracking_uri": redact(self.uri), "experiment_id": self.experiment_id, "run_id": self.run_id,
                "run_url": self.url, "registered_model": self.registered, "error": self.error}


def experiment(client: Any, name: str) -> str:
    """The experiment's id, created on first use (two runs creating it at once both end up with it)."""
    from mlflow.exceptions import MlflowException

    if (found := client.get_experiment_by_name(name)) is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id
