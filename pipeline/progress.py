"""A Trainer callback that logs loss, rate and ETA every `logging_steps` through the standard logger."""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

logger = logging.getLogger("tasks.finetune")
SHOWN = ("loss", "grad_norm", "learning_rate", "eval_loss")


class ProgressLogger(TrainerCallback):
    def __init__(self) -> None:
        self.start = None
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.start is None or not ({"loss", "eval_loss"} & set(logs)):
            return
        done = state.global_step - self.start_step
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (state.max_steps - state.global_step) / rate if rate > 0 else float("nan")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if k in SHOWN)
        logger.info("step %d/%d: %s | %.2f steps/s, ETA %.0f s", state.global_step, state.max_steps, shown, rate, eta)
