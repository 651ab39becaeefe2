"""The pipeline: preflight -> data -> LoRA fine-tune -> merge -> GPTQ int4 -> serve check (vLLM) -> evaluate ->
quality gate -> release, every stage published to the store. For a base that is already quantized, with
`model.quantized_base: adapter`: preflight -> data -> adapter on the quantized base -> serve -> evaluate -> gate ->
release of the adapter (merge and quantize skipped; docs/routes.md).

    python -m flows.finetune_then_quantize --config conf/smoke.yaml [--set key=value]... [--run-name N] [--store URI]

The command line is flows/cli.py; this module is the Prefect flow that deployments and the UI run.
"""

from __future__ import annotations

from pipeline.quiet import quiet_dependencies

# First, before torch, transformers and torchao are imported below: their import-time messages say nothing to a
# user (pipeline/quiet.py names each). Here rather than in flows/__init__.py because a Prefect worker loads this
# file by its path, without the package.
quiet_dependencies()

import logging
import sys
import time
from collections.abc import Callable, Iterable

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from pipeline.base_model import adapter_route
from pipeline.config import PipelineConfig, load_config
from pipeline.data import Dataset
from pipeline.errors import BadInputError
from pipeline.gate import QualityGateError, check_gate, gate_figures
from pipeline.memory import MemoryPlan
from pipeline.mlflow_run import MlflowRun, tracking_uri
from pipeline.policy import Policy, check_config, check_request, deployment_policy
from pipeline.preflight import Checked, preflight
from pipeline.report import run_report
from pipeline.run import RunContext, open_run
from pipeline.stage import StageArtifact, local_copy
from pipeline.store import RUN_SUMMARY, StoreUnavailable, read_json, write_json
from pipeline.summary import RunSummary, StageSummary
from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.evaluate_adapter import evaluate_adapter
from tasks.finetune import finetune
from tasks.merge import merge
from tasks.quantize import quantize
from tasks.release import release, release_adapter
from tasks.serve_check import prepare as prepare_serving
from tasks.serve_check import serve_adapter_check, serve_check

logger = logging.getLogger("flows.finetune_then_quantize")  # not __name__: a worker loads this file by path, as
# module `finetune_then_quantize`, whose logger would be outside PIPELINE_LOGGERS (not shown in the UI)
FLOW_NAME = "finetune-then-quantize"
PIPELINE_LOGGERS = ("pipeline", "tasks", "flows")  # also [tool.prefect.logging] extra_loggers: sent to the UI
# Stages that load a model carry this tag, so `prefect concurrency-limit create gpu 1` lets one of them at a time,
# across all flow runs, hold the GPU (see prefect.yaml).
GPU_TAG = "gpu"
GPU_STAGES = ("finetune", "merge", "quantize", "serve", "evaluate")
REPORT_KEY = "finetune-then-quantize-report"  # the report artifact's key: one history of reports in the UI


def as_task(stage: Callable[..., StageArtifact], name: str) -> Callable[..., StageArtifact]:
    """The one place stages become Prefect tasks. No Prefect caching (the store's stage keys decide reuse) and no
    task retries (the store retries its own operations, and a rerun resumes from the last finished stage)."""
    return task(stage, name=name, tags=[GPU_TAG] if name in GPU_STAGES else [], cache_policy=NO_CACHE,
                persist_result=False)


data_task = as_task(prepare_data, "data")
finetune_task = as_task(finetune, "finetune")
merge_task = as_task(merge, "merge")
quantize_task = as_task(quantize, "quantize")
serve_task = as_task(serve_check, "serve")
evaluate_task = as_task(evaluate, "evaluate")
release_task = as_task(release, "release")
# The adapter route (model.quantized_base: adapter): the same stage names, for an adapter on a quantized base
serve_adapter_task = as_task(serve_adapter_check, "serve")
evaluate_adapter_task = as_task(evaluate_adapter, "evaluate")
release_adapter_task = as_task(release_adapter, "release")
NO_MERGE = ("the base is already quantized (model.quantized_base: adapter): an adapter cannot be merged into integer "
            "weights, so it ships unmerged")
NO_QUANTIZE = "the base is already quantized (model.quantized_base: adapter): quantizing it again would only lose more"


class StageFailed(RuntimeError):
    """A stage failed with an error that is not bad input; `stage` names it, `cause` is the error (also chained)."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage, self.cause = stage, cause
        super().__init__(f"{stage} failed: {type(cause).__name__}: {cause}")


@flow(name=FLOW_NAME, log_prints=False)
def finetune_then_quantize(
    config: str = "default",
    overrides: list[str] | None = None,
    run_name: str | None = None,
    store: str | None = None,
    force: list[str] | None = None,
) -> str:
    """Fine-tune the full-precision base with LoRA, merge, GPTQ-quantize, check in vLLM, evaluate, gate, release;
    return run.json's path.

    Ends with a markdown report artifact (status, each stage's store URI, metrics, run.json) on the flow run's page.
    The Args below are the descriptions of the deployment's parameter form in the Prefect UI.

    A run triggered from a deployment may set only what the deployment's policy in the worker's prefect.yaml allows
    (docs/operations.md, "Who may run what"); it is refused before anything is read otherwise.

    Args:
        config: A config in conf/ by name (smoke, default, qwen2-1.5b-instruct) or a YAML path on the worker.
        overrides: Config overrides, one `dotted.key=value` each (values are YAML), e.g. `training.max_steps=100`;
            for a triggered run, only the keys its deployment's policy allows.
        run_name: The run's folder in the store; empty: the config's run_name.
        store: Where the run is written (a path or store URI); empty: the config's store.uri.
        force: Stages to recompute even if the store holds them (data, finetune, merge, quantize, serve,
            evaluate).
    """
    show_pipeline_logs()
    policy = triggered_run_policy()
    if policy is not None:  # before the config is read: a refused trigger reads and writes nothing
        check_request(policy, config, overrides or [], force or [])
    cfg = load_config(config, overrides or [], run_name=run_name, store=store)
    if policy is not None:
        check_config(policy, cfg, config)
    checked = preflight(cfg)
    return run_pipeline(open_run(checked.cfg, force or []), checked.dataset, checked.plan)


def triggered_run_policy() -> Policy | None:
    """The policy of the deployment this flow run was triggered from (prefect.yaml on this worker), or None when the
    flow is called directly (the command line, a test): then nothing is checked beyond the config itself."""
    from prefect.runtime import deployment

    if deployment.id is None:
        return None
    return deployment_policy(deployment.name)


def run_pipeline(run: RunContext, dataset: Dataset, plan: MemoryPlan | None = None) -> str:
    """The stages in order, for a run whose inputs passed preflight; writes run.json (finished or failed, with
    preflight's memory plan), posts the report artifact, and returns run.json's URI."""
    summary = RunSummary(run_name=run.name, config=run.cfg.model_dump(),
                         memory_plan=plan.as_dict() if plan else None)
    started = time.perf_counter()
    reached = "data"
    mlflow = MlflowRun(tracking_uri(run.cfg))  # does nothing without a tracking server
    mlflow.start(run.cfg, run.store.url(run.store.path(run.name)), prefect_tags())

    def stage(name: str, stage_task: Callable[..., StageArtifact], *inputs) -> StageArtifact:
        nonlocal reached
        reached = name
        artifact = stage_task(run, *inputs)
        summary.stages[name] = StageSummary(**artifact.summary())
        mlflow.stage(name, artifact)
        return artifact

    try:
        prepare_serving(run)  # vLLM's environment, if this machine has none, builds beside the fine-tune
        data = stage("data", data_task, quote(dataset))  # quote: Prefect does not walk every row for task inputs
        adapter = stage("finetune", finetune_task, data)
        if "mlflow" in run.cfg.tracking.report_to:
            mlflow.curve(lambda: read_json(run.store, f"{adapter.store_path}/training_log.json") or [])
        if adapter_route(run.cfg):  # an adapter trained on a quantized base ships as it is
            summary.skipped = {"merge": NO_MERGE, "quantize": NO_QUANTIZE}
            served = stage("serve", serve_adapter_task, data, adapter)
            evaluation = stage("evaluate", evaluate_adapter_task, data, served)
            shipped, release_stage = adapter, release_adapter_task
        else:
            merged = stage("merge", merge_task, data, adapter)
            quantized = stage("quantize", quantize_task, data, merged)
            served = stage("serve", serve_task, data, quantized)
            evaluation = stage("evaluate", evaluate_task, data, served)
            shipped, release_stage = quantized, release_task
        summary.metrics_uri = f"{evaluation.uri}/metrics.json"
        mlflow.evaluation(evaluation.metrics, lambda: local_copy(run.store, evaluation))
        reached = "gate"
        if failures := check_gate(evaluation.metrics, run.cfg.gate):
            raise QualityGateError("the model failed the quality gate, so it is not released and "
                                   "latest.json was not moved: " + "; ".join(failures))
        released = stage("release", release_stage, shipped, evaluation)
        mlflow.register(run.cfg.tracking.registered_model or run.name, released.uri, released.key,
                        gate_figures(evaluation.metrics))
        summary.status = "completed"
    except BaseException as exc:
        summary.status, summary.failed_stage, summary.error = "failed", reached, f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (BadInputError, QualityGateError)) or not isinstance(exc, Exception):
            raise
        raise StageFailed(reached, exc) from exc
    finally:
        summary.seconds = round(time.perf_counter() - started, 2)
        mlflow.end(summary.status)
        summary.mlflow = mlflow.record()
        path = run.store.path(run.name, RUN_SUMMARY)
        try:
            write_json(run.store, path, summary.model_dump(mode="json"), sort_keys=False)  # stages in pipeline order
            logger.info("run %s %s: %s", run.name, summary.status, run.store.url(path))
        except (StoreUnavailable, OSError) as exc:  # keep the run's own error, if any, as the one raised
            logger.error("could not write %s: %s", run.store.url(path), exc)
            if summary.status == "completed":
                raise
        publish_report(summary, run.store.url(path))
    return run.store.url(path)


def run_checked(checked: Checked, force: Iterable[str] = ()) -> str:
    """Run the pipeline as a flow from a config that already passed preflight, with the dataset and memory plan
    preflight made: what the command line does after checking its input before Prefect starts, so neither preflight
    nor the data source runs twice. The flow run's parameters in the UI are the typed config and the stages forced."""

    @flow(name=FLOW_NAME, log_prints=False)
    def checked_run(config: PipelineConfig, force: list[str]) -> str:
        show_pipeline_logs()
        return run_pipeline(open_run(config, force), checked.dataset, checked.plan)

    return checked_run(checked.cfg, list(force))


def prefect_tags() -> dict[str, str]:
    """The flow run this pipeline run is, for the MLflow run's tags (none when called outside a flow)."""
    from prefect.runtime import flow_run

    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_url": flow_run.ui_url}
    return {name: str(value) for name, value in tags.items()
            if value and not str(value).startswith("None/")}  # ui_url without a UI (PREFECT_UI_URL unset)


def publish_report(summary: RunSummary, path: str) -> None:
    """The run's report on its flow run page (Artifacts tab)."""
    try:
        create_markdown_artifact(run_report(summary, path), key=REPORT_KEY,
                                 description=f"run {summary.run_name}: {path}")
    except Exception as exc:  # the run's outcome is in the store; a report that cannot be sent must not change it
        logger.warning("could not publish the report artifact: %s: %s", type(exc).__name__, exc)


def show_pipeline_logs() -> None:
    """Let INFO from the pipeline's loggers (loss, rate, ETA, reuse) through; Prefect's root level is WARNING."""
    for name in PIPELINE_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main())
