"""The default job's quality measurements: run the pipeline, then print base / merged / RTN / GPTQ side by side.

    .venv/bin/python benchmarks/quality.py [--config conf/default.yaml] [--repeats 1] [--set key=value]...

Each repeat runs the whole pipeline into a fresh store (the machine cache, with the dequantized base, is kept),
reads the run's own `metrics.json`, and times the run. Prints the table (accuracy figures from the last run, which
are deterministic for a config; wall time as the median of the repeats) and writes benchmarks/quality.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from pipeline_run import pipeline_arguments, timed_run  # noqa: E402


def main() -> int:
    from pipeline.report import metrics_table

    args = pipeline_arguments(__doc__.split("\n")[0], repeats=1, out="quality.json").parse_args()
    times, run, metrics = [], {}, {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            seconds, run = timed_run(args.config, Path(tmp), args.overrides)
            metrics = json.loads(Path(run["metrics_uri"]).read_text())
            times.append(round(seconds, 1))
    models = metrics["models"]
    summary = {"config": args.config, "overrides": args.overrides, "wall_seconds": times,
               "median_wall_seconds": statistics.median(times), "models": models,
               "stage_seconds": {name: stage["seconds"] for name, stage in run["stages"].items()}}
    if all(models[m].get("exact_match") is not None for m in ("base", "merged", "gptq")):
        gain = models["merged"]["exact_match"] - models["base"]["exact_match"]
        summary["gptq_gain_kept"] = (models["gptq"]["exact_match"] - models["base"]["exact_match"]) / gain \
            if gain else None
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(metrics_table(models))
    print(f"\nwall time: median {summary['median_wall_seconds']:.1f} s of {times}; stages (s): "
          + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items()))
    if summary.get("gptq_gain_kept") is not None:
        print(f"GPTQ keeps {summary['gptq_gain_kept']:.1%} of the fine-tune's exact-match gain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
