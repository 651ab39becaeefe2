"""The command line: `python -m flows.finetune_then_quantize` (argparse, exit codes, the last line it prints).

Exit codes: 0 done; 2 bad input (config, model, data or store), refused before anything is written; 1 any other
failure or a failed quality gate (run.json records which stage failed and why).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback

from prefect.settings import get_current_settings

from flows.finetune_then_quantize import StageFailed, run_checked, show_pipeline_logs
from pipeline.base_model import read_model_config
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import BadInputError, ConfigError
from pipeline.gate import QualityGateError
from pipeline.gguf_base import is_gguf
from pipeline.memory import fit_problems, plan_run, planned_cuda, render_plan, visible_device
from pipeline.preflight import preflight, refuse_gguf
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
    parser.add_argument("--plan", action="store_true", help="print each stage's memory plan for this machine and exit")
    parser.add_argument("--json", action="store_true", help="with --plan: the plan as one JSON object")
    parser.add_argument("--plan-for", choices=["cuda"], help="plan a run on a CUDA GPU from this machine (implies "
                        "--plan): bf16, fused kernels as the gpu extra installs them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    show_pipeline_logs()
    # Check everything here, before Prefect starts a server: bad input is refused in seconds, with nothing written.
    try:
        cfg = load_config(args.config, args.overrides, run_name=args.run_name, store=args.store)
        if args.plan or args.plan_for or args.json:
            return show_plan(cfg, args)
        checked = preflight(cfg)
        run = open_run(checked.cfg, args.force)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = run.store.url(run.store.path(run.name, RUN_SUMMARY))
    starts_server = not get_current_settings().api.url  # then Prefect starts a temporary local server
    try:
        run_checked(checked, args.force)
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


def show_plan(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """`--plan`: the memory plan (text, or one JSON object with --json) from the config and the base's config
    alone: no data read, nothing written. Exit 0, or 2 with the planned fine-tune not fitting this machine."""
    if args.json and not (args.plan or args.plan_for):
        raise ConfigError("--json goes with --plan: python -m flows.finetune_then_quantize --plan --json")
    if is_gguf(cfg.model.name_or_path) and not cfg.model.dequantize_gguf:
        raise ConfigError(refuse_gguf(cfg.model.name_or_path))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the plan alone, whatever a library prints
        model_config = read_model_config(cfg.model.name_or_path, cfg.model.revision)
        device = planned_cuda() if args.plan_for == "cuda" else visible_device()
        try:
            plan = plan_run(cfg, model_config, device)
        except Exception as exc:
            raise ConfigError(f"no memory plan for base {cfg.model.name_or_path!r}: {type(exc).__name__}: {exc}") \
                from exc
    print(json.dumps(plan.as_dict(), indent=2) if args.json else render_plan(plan), flush=True)
    problems = fit_problems(cfg, model_config, device, plan)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if problems else 0


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
