"""Trackers beside the store: what the fine-tune reports to (`tracking.report_to`).

Weights & Biases gets the Trainer's own callback, live. TensorBoard's event files are written from the Trainer's
log history once training ends, into the fine-tune stage's folder, so that the store holds every step's curve,
those before a resume included (a resumed Trainer logs only the steps it runs itself). MLflow gets the same history
in the pipeline's own MLflow run (pipeline/mlflow_run.py), not a second run of the Trainer's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # mlflow: pipeline/mlflow_run.check_mlflow
FROM_HISTORY = ("tensorboard", "mlflow")  # written from the log history by the pipeline, not by the Trainer
TENSORBOARD_DIR = "tensorboard"
SCALARS = ("loss", "learning_rate", "grad_norm", "epoch")  # the Trainer's log keys, under TensorBoard's train/ tag


def missing_trackers(report_to: list[str]) -> list[str]:
    """The trackers in `report_to` whose package is not installed, each with the install command (MLflow's client and
    server are checked by pipeline/mlflow_run.check_mlflow)."""
    return [f"tracking.report_to includes {name!r} but the {PACKAGES[name]!r} package is not installed: pip install "
            f"'.[tracking]' (or set tracking.report_to without it)"
            for name in report_to if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None]


def trainer_report_to(report_to: Sequence[str]) -> list[str]:
    """What the Trainer reports to itself: the trackers not written from the log history."""
    return [name for name in report_to if name not in FROM_HISTORY]


def write_tensorboard(history: list[dict[str, Any]], log_dir: Path) -> None:
    """The Trainer's log history (one entry per logging step) as TensorBoard scalars `train/<key>` at each step."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for entry in history:
            for key in SCALARS:
                if key in entry:
                    writer.add_scalar(f"train/{key}", float(entry[key]), global_step=int(entry["step"]))
    finally:
        writer.close()


def finish_trackers(report_to: Sequence[str]) -> None:
    """End the trackers' runs the Trainer started (its W&B callback leaves the run open, unsynced, after training)."""
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.run.finish()
