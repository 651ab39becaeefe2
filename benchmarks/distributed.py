"""One process against a torchrun group on this machine: the same fine-tune (same global batch), its time, its
losses and its host memory against the plan's. On a CPU the ranks are gloo processes sharing the cores and the RAM,
so this measures the launch's cost and the plan's sum over ranks, not a speed-up (that needs GPUs).

    .venv/bin/python benchmarks/distributed.py [--config default] [--steps 30] [--repeats 2] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1024 ** 2


def run_once(config: str, steps: int, store: Path, ranks: int, batch: int) -> dict:
    from pipeline.config import load_config
    from pipeline.preflight import preflight
    from pipeline.run import open_run
    from tasks.data import prepare_data
    from tasks.finetune import finetune

    overrides = [f"training.max_steps={steps}", f"training.save_steps={steps}", f"training.per_device_train_batch_size={batch}"]
    if ranks > 1:
        overrides += ["training.distributed=ddp", f"training.nproc={ranks}"]
    checked = preflight(load_config(config, overrides, store=str(store)))
    run = open_run(checked.cfg)
    data = prepare_data(run, checked.dataset)
    start = time.perf_counter()
    artifact = finetune(run, data)
    metrics = artifact.metrics
    return {"ranks": ranks, "micro_batch": batch, "stage_seconds": time.perf_counter() - start,
            "train_seconds": metrics["train_seconds"], "train_loss": metrics["train_loss"],
            "eval_loss_after": metrics["eval_loss_after"], "host_peak_mib": metrics["host_peak_bytes"] / MIB,
            "planned_host_mib": checked.plan.stages["finetune"].host_peak_bytes / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="the global micro-batch: split over the ranks")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for ranks in (1, args.nproc):
                row = run_once(args.config, args.steps, Path(scratch) / f"{repeat}-{ranks}", ranks, args.batch // ranks)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("| ranks x micro-batch | stage s (median) | train s (median) | train loss | eval loss after | host peak MiB "
          "(median) | planned MiB | planned / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for ranks in (1, args.nproc):
        mine = [r for r in rows if r["ranks"] == ranks]
        peak = statistics.median(r["host_peak_mib"] for r in mine)
        print(f"| {ranks} x {mine[0]['micro_batch']} | {statistics.median(r['stage_seconds'] for r in mine):.1f} | "
              f"{statistics.median(r['train_seconds'] for r in mine):.1f} | {mine[0]['train_loss']:.4f} | "
              f"{mine[0]['eval_loss_after']:.4f} | {peak:.0f} | {mine[0]['planned_host_mib']:.0f} | "
              f"{mine[0]['planned_host_mib'] / peak:.3f} |")


if __name__ == "__main__":
    main()
