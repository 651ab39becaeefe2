"""The command line: `python -m flows.finetune_then_quantize` (argparse, exit codes, the last line it prints).

Exit codes: 0 done; 2 bad input (config, model, data or store), refused before anything is written; 1 any other
failure or a failed quality gate (run.json records which stage failed and why).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from prefect.settings import get_current_settings

from flows.finetune_then_quantize import StageFailed, run_checked, show_pipeline_logs
from pipeline.config import load_config
from pipeline.errors import BadInputError
from pipeline.gate import QualityGateError
from pipeline.preflight import preflight
from pipeline.run import STAGES, open_run
from pipeline.store import RUN_SUMMARY

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.finetune_then_quantize",
                                     description="LoRA fine-tune, merge, GPTQ int4, evaluate, gate and release.")
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
    # Check everything here, before Prefect starts a server: bad input is refused in seconds, with nothing written.
    try:
        cfg = load_config(args.config, args.overrides, run_name=args.run_name, store=args.store)
        dataset = preflight(cfg)
        run = open_run(cfg, args.force)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = run.store.url(run.store.path(run.name, RUN_SUMMARY))
    starts_server = not get_current_settings().api.url  # then Prefect starts a temporary local server
    try:
        run_checked(cfg, dataset, args.force)
        code = 0
    except BadInputError as exc:  # found only once the run had started (e.g. a data source changed under it)
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except QualityGateError as exc:
        print(f"error: {exc}. The report is in the run's evaluate/ folder.", file=sys.stderr)
        code = 1
    except StageFailed as exc:
        logger.debug("traceback:\n%s", traceback.format_exc())
        print(f"error: the run failed in {exc.stage}: {type(exc.cause).__name__}: {exc.cause}. The store keeps "
              f"every finished stage; fix the cause and rerun the same command to resume.", file=sys.stderr)
        code = 1
    except Exception as exc:  # outside any stage: Prefect itself, or writing run.json
        logger.debug("traceback:\n%s", traceback.format_exc())
        print(f"error: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    if starts_server:
        stop_temporary_prefect_server()
    print(f"run summary: {summary}", flush=True)
    return code


def stop_temporary_prefect_server() -> None:
    """Stop the throwaway local server Prefect starts when no API is configured, so its goodbye is not our last line."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    SubprocessASGIServer().stop()


if __name__ == "__main__":
    sys.exit(main())
