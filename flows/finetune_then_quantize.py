"""The pipeline: preflight -> LoRA fine-tune -> merge -> GPTQ int4, every stage published to the store.

    python -m flows.finetune_then_quantize --config conf/smoke.yaml [--set key=value]... [--run-name N] [--store URI]

Exit codes: 0 done, 2 bad input (nothing written), 1 any other failure (run.json records it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

from prefect import flow

from pipeline.config import load_config
from pipeline.errors import BadInputError
from pipeline.preflight import preflight
from pipeline.store import run_path, write_run_summary
from tasks.finetune import finetune
from tasks.merge import merge
from tasks.quantize import quantize

logger = logging.getLogger(__name__)
STAGES = ("finetune", "merge", "quantize")
PIPELINE_LOGGERS = ("pipeline", "tasks", "flows")  # also [tool.prefect.logging] extra_loggers: sent to the UI


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
    """Fine-tune the full-precision base with LoRA, merge the adapter, GPTQ-quantize; return run.json's path.

    config: a YAML in conf/ (`smoke`, `default`, ...) or a path; overrides: `dotted.key=value` strings;
    force: stages to recompute even if the store holds them.
    """
    show_pipeline_logs()
    cfg = load_config(config, overrides or [], run_name=run_name, store=store)
    force = set(force or [])
    unknown = force - set(STAGES)
    if unknown:
        raise BadInputError(f"force names unknown stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
    preflight(cfg)
    run_dir = run_path(cfg.store.uri, cfg.run_name)
    summary: dict = {"run_name": cfg.run_name, "config": cfg.model_dump(), "stages": {}, "status": "running"}
    started = time.perf_counter()
    try:
        adapter = finetune(cfg.model, cfg.data, cfg.lora, cfg.training, run_dir, "finetune" in force)
        summary["stages"]["finetune"] = adapter.summary()
        merged = merge(cfg.model, cfg.data, cfg.merge, adapter, run_dir, "merge" in force or not adapter.reused)
        summary["stages"]["merge"] = merged.summary()
        quantized = quantize(cfg.data, cfg.quantization, merged, run_dir, "quantize" in force or not merged.reused)
        summary["stages"]["quantize"] = quantized.summary()
        summary["status"] = "completed"
    except BaseException as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        summary["seconds"] = round(time.perf_counter() - started, 2)
        summary["metrics"] = {name: stage["metrics"] for name, stage in summary["stages"].items()}
        path = write_run_summary(run_dir, summary)
        logger.info("run %s %s: %s", cfg.run_name, summary["status"], path)
    return str(path)


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
    summary = run_path(cfg.store.uri, cfg.run_name) / "run.json"
    try:
        finetune_then_quantize(args.config, args.overrides, args.run_name, args.store, args.force)
        code = 0
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        logger.debug("traceback:\n%s", traceback.format_exc())
        print(f"error: the run failed in {_failed_stage(summary)}: {type(exc).__name__}: {exc}. The store keeps "
              f"every finished stage; fix the cause and rerun the same command to resume.", file=sys.stderr)
        code = 1
    _stop_temporary_prefect_server()
    print(f"run summary: {summary}", flush=True)
    return code


def _stop_temporary_prefect_server() -> None:
    """Stop the throwaway local server Prefect starts when no API is configured, so its goodbye is not our last line."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    SubprocessASGIServer().stop()


def _failed_stage(summary: Path) -> str:
    import json

    try:
        done = json.loads(summary.read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return "an early step"
    return next((s for s in STAGES if s not in done), "the last step")


if __name__ == "__main__":
    sys.exit(main())
