"""Run the pipeline's CLI as a user would, timed, and read back its run.json (shared by the benchmarks)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed_run(config: str, store: Path, overrides: list[str], cache: Path | None = None) -> tuple[float, dict]:
    """Wall seconds and run.json of `python -m flows.finetune_then_quantize` into `store` (exits if it fails)."""
    args = [sys.executable, "-m", "flows.finetune_then_quantize", "--config", config, "--store", str(store)]
    for override in overrides:
        args += ["--set", override]
    env = {**os.environ, **({"FTQ_CACHE_DIR": str(cache)} if cache else {})}
    start = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"the pipeline failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary = Path(result.stdout.strip().splitlines()[-1].removeprefix("run summary: "))
    return seconds, json.loads(summary.read_text())


def pipeline_arguments(description: str, repeats: int, out: str) -> argparse.ArgumentParser:
    """The options every pipeline benchmark takes: --config, --repeats, --set (repeatable), --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="conf/default.yaml")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / out))
    return parser
