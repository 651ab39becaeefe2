"""One rank of a multi-process fine-tune: `torchrun ... -m tasks.finetune_worker spec.json` (started by the fine-tune
stage, see pipeline/distributed.py). Every rank trains; rank 0 logs, saves the adapter and writes the metrics."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from pipeline.config import LoraConfig, TrainingConfig
from pipeline.data import load_dataset
from pipeline.distributed import CHECKPOINT_PREFIX, LOG_PREFIX, watch_stage
from pipeline.quiet import quiet_dependencies

logger = logging.getLogger("tasks.finetune")


class RecordLine(logging.Formatter):
    """A log record as one `@@log {json}` line, for the stage to re-log under the record's own logger."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if self.rank:
            message = f"rank {self.rank}: {message}"
        return LOG_PREFIX + json.dumps({"level": record.levelno, "name": record.name, "message": message})


def announce_checkpoint(step: int, folder: Path) -> None:
    print(CHECKPOINT_PREFIX + json.dumps({"step": step, "folder": str(folder)}), flush=True)


def main(spec_path: str) -> int:
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(RecordLine(rank))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=[handler], force=True)
    quiet_dependencies()
    watch_stage()
    from tasks.finetune import train_lora  # after the quieting: it imports transformers

    spec = json.loads(Path(spec_path).read_text())
    try:
        metrics = train_lora(
            Path(spec["base_dir"]), load_dataset(Path(spec["data_dir"])), spec["max_length"],
            LoraConfig.model_validate(spec["lora"]), TrainingConfig.model_validate(spec["training"]),
            Path(spec["out_dir"]), Path(spec["checkpoint_dir"]), on_saved=announce_checkpoint,
            trust_remote_code=spec["trust_remote_code"], base_name=spec["base_name"], report_to=spec["report_to"],
            run_name=spec["run_name"])
    except Exception as exc:
        logger.error("%s: %s", type(exc).__name__, exc, exc_info=True)
        raise
    if rank == 0:
        Path(spec["metrics"]).write_text(json.dumps(metrics))
    import torch.distributed as dist

    if dist.is_initialized():  # leave together: a rank gone early makes gloo abort the others at exit
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
