"""Serve the pipeline as a scheduled deployment on this machine (the one-machine way; see prefect.yaml for pools).

    python -m flows.serve [--name nightly] [--cron "0 2 * * *"] [--config default] [--set key=value]...

The deployment's parameters (config name, overrides, run name, store, force) show as a form in the Prefect UI,
so a run can be triggered there with a chosen config; the cron schedule runs it unattended. A triggered run may
change only what the `policy:` of the same-named deployment in prefect.yaml allows (the closed default for a name
not there; docs/operations.md, "Who may run what").
"""

from __future__ import annotations

import argparse
import sys

from flows.finetune_then_quantize import finetune_then_quantize, show_pipeline_logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="nightly", help="deployment name")
    parser.add_argument("--cron", default="0 2 * * *", help="schedule (cron, UTC); default nightly at 02:00")
    parser.add_argument("--config", default="default", help="default `config` parameter (a name in conf/ or a path)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="default `overrides` parameter (repeatable)")
    parser.add_argument("--limit", type=int, default=1, help="flow runs this process executes at once")
    args = parser.parse_args(argv)
    show_pipeline_logs()
    finetune_then_quantize.serve(
        name=args.name,
        cron=args.cron,
        parameters={"config": args.config, "overrides": args.overrides},
        tags=["finetune-then-quantize"],
        description="LoRA fine-tune -> merge -> GPTQ int4; artifacts and run.json in the store.",
        limit=args.limit,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
