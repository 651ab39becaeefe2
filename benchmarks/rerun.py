"""Rerun cost: a first run into an empty store, then the same command again (every stage reused), side by side.

    .venv/bin/python benchmarks/rerun.py [--config conf/default.yaml] [--repeats 3] [--set key=value]...

Prints first-run and rerun wall times (median of --repeats pairs, each pair in a fresh store and cache) and their
ratio, and writes benchmarks/rerun.json. The issue's target: a rerun under 25% of the first run's time.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from pipeline_run import pipeline_arguments, timed_run  # noqa: E402

logger = logging.getLogger("benchmarks.rerun")


def main() -> int:
    args = pipeline_arguments(__doc__.split("\n")[0], repeats=3, out="rerun.json").parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pairs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            store, cache = Path(tmp) / "store", Path(tmp) / "cache"
            first, _ = timed_run(args.config, store, args.overrides, cache)
            again, run = timed_run(args.config, store, args.overrides, cache)
            reused = all(stage["reused"] for stage in run["stages"].values())
            pairs.append({"first_s": round(first, 2), "rerun_s": round(again, 2), "all_reused": reused})
            logger.info("pair %d: first %.1f s, rerun %.1f s (%.0f%%), every stage reused: %s",
                        i + 1, first, again, 100 * again / first, reused)
    first = statistics.median(p["first_s"] for p in pairs)
    again = statistics.median(p["rerun_s"] for p in pairs)
    result = {"config": args.config, "overrides": args.overrides, "pairs": pairs, "median_first_s": first,
              "median_rerun_s": again, "ratio": round(again / first, 3)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"| config | first run (s) | rerun (s) | rerun / first |\n| --- | --- | --- | --- |\n"
          f"| {args.config} {' '.join(args.overrides)} | {first:.1f} | {again:.1f} | {100 * again / first:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
