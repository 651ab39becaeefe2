"""The pipeline: preflight -> LoRA fine-tune -> merge -> GPTQ int4 -> evaluate -> quality gate -> release,
every stage published to the store.

    python -m flows.finetune_then_quantize --config conf/smoke.yaml [--set key=value]... [--run-name N] [--store URI]

Exit codes: 0 done, 2 bad input (nothing written), 1 any other failure or a failed quality gate (run.json records it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback

from prefect import flow, tags
from prefect.artifacts import create_markdown_artifact

from pipeline.config import load_config
from pipeline.errors import BadInputError
from pipeline.gate import QualityGateError, check_gate
from pipeline.preflight import preflight
from pipeline.store import RUN_SUMMARY, StoreUnavailable, open_store, read_json, write_json
from tasks.evaluate import evaluate, metrics_table
from tasks.finetune import finetune
from tasks.merge import merge
from tasks.quantize import quantize
from tasks.release import release

logger = logging.getLogger(__name__)
STAGES = ("finetune", "merge", "quantize", "evaluate")
PIPELINE_LOGGERS = ("pipeline", "tasks", "flows")  # also [tool.prefect.logging] extra_loggers: sent to the UI
# Every stage's task run carries this tag, so `prefect concurrency-limit create gpu 1` lets one stage at a time,
# across all flow runs, hold the GPU (see prefect.yaml).
GPU_TAG = "gpu"
REPORT_KEY = "finetune-then-quantize-report"  # the report artifact's key: one history of reports in the UI


def show_pipeline_logs() -> None:
    """Let INFO from the pipeline's loggers (loss, rate, ETA, reuse) through; Prefect's root level is WARNING."""
    for name in PIPELINE_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


@flow(name="finetune-then-quantize", log_prints=False)
def finetune_then_quantize(
    config: str = "default",
    overrides: list[str] | None = None,
    run_name: str | None = None,
    store: str | None = None,
    force: list[str] | None = None,
) -> str:
    """Fine-tune the full-precision base with LoRA, merge, GPTQ-quantize, evaluate, gate, release; return run.json's path.

    Ends with a markdown report artifact (status, each stage's store URI, metrics, run.json) on the flow run's page.
    The Args below are the descriptions of the deployment's parameter form in the Prefect UI.

    Args:
        config: A config in conf/ by name (smoke, default, qwen2-1.5b-instruct) or a YAML path on the worker.
        overrides: Config overrides, one `dotted.key=value` each (values are YAML), e.g. `training.max_steps=100`.
        run_name: The run's folder in the store; empty: the config's run_name.
        store: Where the run is written (a path or store URI); empty: the config's store.uri.
        force: Stages to recompute even if the store holds them (run.json's stage names, e.g. quantize).
    """
    show_pipeline_logs()
    cfg = load_config(config, overrides or [], run_name=run_name, store=store)
    force = set(force or [])
    unknown = force - set(STAGES)
    if unknown:
        raise BadInputError(f"force names unknown stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
    preflight(cfg)
    artifacts = open_store(cfg.store.uri, cfg.store.credentials_block)
    summary: dict = {"run_name": cfg.run_name, "config": cfg.model_dump(), "stages": {}, "status": "running"}
    started = time.perf_counter()
    try:
        with tags(GPU_TAG):
            adapter = finetune(cfg.model, cfg.data, cfg.lora, cfg.training, cfg.store, cfg.run_name,
                               "finetune" in force)
            summary["stages"]["finetune"] = adapter.summary()
            merged = merge(cfg.model, cfg.data, cfg.merge, adapter, cfg.store, cfg.run_name,
                           "merge" in force or not adapter.reused)
            summary["stages"]["merge"] = merged.summary()
            quantized = quantize(cfg.data, cfg.quantization, merged, cfg.store, cfg.run_name,
                                 "quantize" in force or not merged.reused)
            summary["stages"]["quantize"] = quantized.summary()
            evaluation = evaluate(cfg.model, cfg.data, cfg.evaluate, cfg.quantization, adapter, merged, quantized,
                                  cfg.store, cfg.run_name, "evaluate" in force or not quantized.reused)
            summary["stages"]["evaluate"] = evaluation.summary()
        summary["metrics_uri"] = f"{evaluation.uri}/metrics.json"
        failures = check_gate(evaluation.metrics["models"], cfg.gate)
        if failures:
            raise QualityGateError("the quantized model failed the quality gate, so it is not released and "
                                   "latest.json was not moved: " + "; ".join(failures))
        summary["stages"]["release"] = release(cfg.model, cfg.data, cfg.quantization, quantized, evaluation,
                                               cfg.store, cfg.run_name).summary()
        summary["status"] = "completed"
    except BaseException as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        summary["seconds"] = round(time.perf_counter() - started, 2)
        summary["metrics"] = {name: stage["metrics"] for name, stage in summary["stages"].items()}
        path = artifacts.path(cfg.run_name, RUN_SUMMARY)
        try:
            write_json(artifacts, path, summary, sort_keys=False)  # stages in pipeline order
            logger.info("run %s %s: %s", cfg.run_name, summary["status"], artifacts.url(path))
        except StoreUnavailable as exc:  # keep the run's own error, if any, as the one raised
            logger.error("could not write %s: %s", artifacts.url(path), exc)
            if summary["status"] == "completed":
                raise
        publish_report(artifacts.url(path), summary)
    return artifacts.url(path)


def publish_report(path: str, summary: dict) -> None:
    """The run's report on its flow run page (Artifacts tab): status, each stage's store URI and metrics, run.json."""
    lines = [f"# finetune-then-quantize: {summary['run_name']} {summary['status']}", "", f"run.json: `{path}`", ""]
    if "error" in summary:
        lines += [f"**error:** {summary['error']}", ""]
    lines += ["| stage | store URI | seconds | reused |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | `{stage['uri']}` | {stage['seconds']} | {stage['reused']} |"
              for name, stage in summary["stages"].items()]
    if "evaluate" in summary["stages"]:
        evaluation = summary["stages"]["evaluate"]
        lines += ["", "## Quality", "", metrics_table(evaluation["metrics"]["models"]), "",
                  *[f"> {note}" for note in evaluation["metrics"].get("notes", [])], "",
                  f"Training loss plot: `{evaluation['uri']}/training_loss.png`; full report: "
                  f"`{evaluation['uri']}/report.md`"]
    lines += ["", "## Metrics", ""]
    lines += [f"- **{name}**: " + ", ".join(f"{key} {_brief(value)}" for key, value in (stage.get("metrics") or {}).items())
              for name, stage in summary["stages"].items() if name not in ("evaluate", "release")]
    lines += ["", "## run.json", "", "```json", json.dumps(summary, indent=2, default=str), "```", ""]
    try:
        create_markdown_artifact("\n".join(lines), key=REPORT_KEY, description=f"run {summary['run_name']}: {path}")
    except Exception as exc:  # the run's outcome is in the store; a report that cannot be sent must not change it
        logger.warning("could not publish the report artifact: %s: %s", type(exc).__name__, exc)


def _brief(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, str) else str(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.finetune_then_quantize", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="conf/default.yaml", help="YAML config (path or name in conf/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set quantization.group_size=64 (repeatable)")
    parser.add_argument("--run-name", help="names the run's folder in the store (default: the config's run_name)")
    parser.add_argument("--store", help="store location (default: the config's store.uri)")
    parser.add_argument("--force", action="append", default=[], choices=STAGES, help="recompute this stage")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    show_pipeline_logs()
    # Preflight here first, before Prefect starts a server: bad input is refused in seconds, with nothing written.
    try:
        cfg = load_config(args.config, args.overrides, run_name=args.run_name, store=args.store)
        preflight(cfg)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = open_store(cfg.store.uri, cfg.store.credentials_block)
    summary = store.path(cfg.run_name, RUN_SUMMARY)
    try:
        finetune_then_quantize(args.config, args.overrides, args.run_name, args.store, args.force)
        code = 0
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except QualityGateError as exc:
        print(f"error: {exc}. The report is in the run's evaluate/ folder.", file=sys.stderr)
        code = 1
    except Exception as exc:
        logger.debug("traceback:\n%s", traceback.format_exc())
        print(f"error: the run failed in {_failed_stage(store, summary)}: {type(exc).__name__}: {exc}. The store keeps "
              f"every finished stage; fix the cause and rerun the same command to resume.", file=sys.stderr)
        code = 1
    _stop_temporary_prefect_server()
    print(f"run summary: {store.url(summary)}", flush=True)
    return code


def _stop_temporary_prefect_server() -> None:
    """Stop the throwaway local server Prefect starts when no API is configured, so its goodbye is not our last line."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    SubprocessASGIServer().stop()


def _failed_stage(store, summary: str) -> str:
    try:
        done = (read_json(store, summary) or {})["stages"]
    except Exception:  # the store itself may be what failed
        return "an early step"
    return next((s for s in STAGES if s not in done), "the last step")


if __name__ == "__main__":
    sys.exit(main())
