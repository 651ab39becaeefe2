"""Multi-process training: which ranks to start, the engine's config file, and the torchrun process group itself.

The fine-tune stage stays one function; with `training.distributed` on, it writes a spec (what `train_lora` is
given), starts `torchrun --nproc-per-node N -m tasks.finetune_worker spec.json` and waits. Every rank trains; rank 0
logs, saves the adapter and writes the metrics. Ranks print two kinds of lines the stage reads (everything else is
kept for the error message):
  `@@log {json}`          a log record, re-logged here under its own logger (so it reaches Prefect's run log);
  `@@checkpoint {json}`   every rank has written checkpoint-N: the stage publishes it to the store.
The store is opened here, in the stage's process, only: ranks never hold its credentials.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import CONF_DIR, PipelineConfig, TrainingConfig

logger = logging.getLogger(__name__)

STAGE_PID = "FTQ_STAGE_PID"  # the stage process a rank lives for
LOG_PREFIX = "@@log "
CHECKPOINT_PREFIX = "@@checkpoint "
ENGINE_DEFAULTS = {"fsdp": "full_shard", "deepspeed": "zero2"}


class TrainingRanksFailed(RuntimeError):
    """A rank of the training process group died or raised; the stage fails and publishes nothing."""


def engine_config_path(engine: str, name_or_path: str | None) -> Path:
    """The JSON file of `training.fsdp_config` / `training.deepspeed_config`: a name in conf/<engine>/ or a path."""
    name = name_or_path or ENGINE_DEFAULTS[engine]
    path = Path(name)
    for candidate in (path, CONF_DIR / engine / name, CONF_DIR / engine / f"{name}.json"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in (CONF_DIR / engine).glob("*.json")))
    raise FileNotFoundError(f"training.{engine}_config {name!r} is neither a file nor a name in conf/{engine}/ "
                            f"({shipped})")


def read_engine_config(engine: str, name_or_path: str | None) -> dict[str, Any]:
    path = engine_config_path(engine, name_or_path)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"training.{engine}_config {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"training.{engine}_config {str(path)!r} holds a {type(value).__name__}, not a JSON object")
    return value


def sharding_of(training: TrainingConfig) -> tuple[str, bool]:
    """What the engine spreads over the ranks (none; optimizer: gradients and optimizer states, ZeRO-2; params:
    everything, FSDP and ZeRO-3) and whether it offloads to host RAM: the memory plan's view of the config."""
    if training.distributed == "fsdp":
        return "params", bool(read_engine_config("fsdp", training.fsdp_config).get("cpu_offload"))
    if training.distributed == "deepspeed":
        zero = read_engine_config("deepspeed", training.deepspeed_config).get("zero_optimization") or {}
        offload = bool(zero.get("offload_param") or zero.get("offload_optimizer"))
        return {1: "optimizer", 2: "optimizer", 3: "params"}.get(zero.get("stage", 0), "none"), offload
    return "none", False


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_nproc(training: TrainingConfig, gpus: int) -> int:
    """Ranks to start: `nproc`, or with `auto` one per visible GPU (0 where there is none)."""
    return gpus if training.nproc == "auto" else training.nproc


def resolve_ranks(cfg: PipelineConfig, gpus: int) -> PipelineConfig:
    """The config with `training.nproc: auto` resolved to the rank count that will run (what run.json records)."""
    training = cfg.training
    if training.distributed == "none" or training.nproc != "auto":
        return cfg
    return cfg.model_copy(update={"training": training.model_copy(update={"nproc": resolve_nproc(training, gpus)})})


def check_distributed(training: TrainingConfig, gpus: int, cpus: int, quantized_base: bool = False,
                      hidden_size: int | None = None) -> list[str]:
    """Everything about `training.distributed` that can be refused before a weight is read."""
    problems = []
    engine = training.distributed
    for other in ("fsdp", "deepspeed"):
        if getattr(training, f"{other}_config") is not None and engine != other:
            problems.append(f"training.{other}_config is set ({getattr(training, f'{other}_config')!r}) but "
                            f"training.distributed is {engine!r}, which does not use it: set "
                            f"training.distributed={other}, or drop the {other}_config")
    if engine == "none":
        if training.nproc not in ("auto", 1):
            problems.append(f"training.nproc is {training.nproc} but training.distributed is none (one process): "
                            "set training.distributed=ddp (or fsdp, deepspeed) to train with several ranks")
        return problems
    nproc = resolve_nproc(training, gpus)
    if training.nproc == "auto" and gpus == 0:
        problems.append(f"training.distributed is {engine} with nproc auto, but no GPU is visible: set "
                        "training.distributed=none, or training.nproc=2 for CPU ranks (gloo; they share this "
                        "machine's RAM, so nothing is saved: for tests)")
    elif nproc < 2:
        problems.append(f"training.distributed is {engine} but only one rank would run (nproc {nproc}, {gpus} GPU(s) "
                        "visible): set training.distributed=none for one device, or run where 2 or more GPUs are "
                        "visible (CUDA_VISIBLE_DEVICES)")
    elif gpus and nproc > gpus:
        problems.append(f"training.nproc is {nproc} but only {gpus} GPU(s) are visible: set training.nproc to at "
                        f"most {gpus}, or auto")
    elif not gpus and nproc > cpus:
        problems.append(f"training.nproc is {nproc} CPU ranks but this machine has {cpus} cores: set at most {cpus}")
    if quantized_base and engine != "ddp":
        problems.append(f"training.distributed is {engine}, but the base is GPTQ-quantized: its packed int4 weights "
                        f"cannot be sharded; use training.distributed=ddp (each rank holds the quantized base)")
    if engine == "deepspeed":
        if not gpus:
            problems.append("training.distributed is deepspeed, but DeepSpeed trains on CUDA GPUs only (no GPU is "
                            "visible): use ddp or fsdp on CPU")
        problems += check_deepspeed_config(training, hidden_size)
    if engine == "fsdp":
        try:
            config = read_engine_config("fsdp", training.fsdp_config)
        except (OSError, ValueError) as exc:
            problems.append(str(exc))
        else:
            if config.get("version", 2) != 2:
                problems.append(f"training.fsdp_config sets version {config['version']!r}: only FSDP2 (version 2) "
                                "is supported (FSDP1 is deprecated in transformers); remove the key or set 2")
    return problems


def check_deepspeed_config(training: TrainingConfig, hidden_size: int | None) -> list[str]:
    """The DeepSpeed config read, its `auto` values filled as the Trainer fills them, and parsed by DeepSpeed's own
    config classes (`pip install '.[distributed]'`)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return ["training.distributed is deepspeed, but DeepSpeed is not installed: pip install '.[distributed]'"]
    try:
        validate_deepspeed_config(read_engine_config("deepspeed", training.deepspeed_config), training,
                                  hidden_size or 1024)
    except (OSError, ValueError) as exc:
        return [str(exc)]
    return []


def validate_deepspeed_config(config: dict[str, Any], training: TrainingConfig, hidden_size: int) -> dict[str, Any]:
    """Fill `config`'s `auto` values from `training` with transformers' own code (what the Trainer does at run
    time, for one rank here: the batch arithmetic then holds for any rank count), then parse the result with
    DeepSpeed's config classes. Raise ValueError naming what was refused; return the filled config.

    Checked here as DeepSpeed does not: an `auto` the Trainer cannot fill (DeepSpeed drops nested ones silently,
    e.g. a stage of `auto` becomes stage 0) and parameter offload below stage 3 (ignored by DeepSpeed)."""
    import tempfile
    import types

    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    micro = training.per_device_train_batch_size if isinstance(training.per_device_train_batch_size, int) else 1
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, use_cpu=True, report_to=[], per_device_train_batch_size=micro,
                                 gradient_accumulation_steps=training.gradient_accumulation_steps,
                                 learning_rate=training.learning_rate, weight_decay=training.weight_decay,
                                 bf16=training.precision == "bf16")
    filled = HfTrainerDeepSpeedConfig(config)
    try:
        filled.trainer_config_process(args)
        model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=hidden_size))
        filled.trainer_config_finalize(args, model, num_training_steps=max(training.max_steps, 100))
        result = filled.config
    except ValueError as exc:
        raise ValueError(f"training.deepspeed_config disagrees with the training settings: {exc}") from exc
    finally:
        unset_hf_deepspeed_config()  # the filling marks ZeRO-3 as on for this whole process otherwise
    zero = result.get("zero_optimization") or {}
    if zero.get("offload_param") and zero.get("stage") != 3:
        raise ValueError(f"training.deepspeed_config offloads parameters (zero_optimization.offload_param) at stage "
                         f"{zero.get('stage')}: only stage 3 partitions parameters; set stage 3 or drop offload_param")
    try:
        DeepSpeedConfig(result)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed raises pydantic's ValidationError, AssertionError, TypeError
        raise ValueError(f"training.deepspeed_config was refused by DeepSpeed's parser: {type(exc).__name__}: "
                         f"{exc}") from exc
    if left := list(_autos(result)):
        raise ValueError(f"training.deepspeed_config leaves {left} as auto, which the Trainer does not fill: set "
                         "values (DeepSpeed would silently drop them)")
    return result


def _autos(node: Any, path: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _autos(value, f"{path}.{key}" if path else key)
    elif node == "auto":
        yield path


def launch_ranks(spec: Path, nproc: int, on_checkpoint: Callable[[dict[str, Any]], None]) -> None:
    """Run `tasks.finetune_worker spec` as a torchrun process group of `nproc` ranks on this machine and wait for
    it, relaying rank 0's log records and calling `on_checkpoint` for each checkpoint all ranks have written.
    Raise TrainingRanksFailed when a rank fails (torchrun then stops the others)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "-m", "tasks.finetune_worker", str(spec)]
    logger.info("training as %d ranks: %s", nproc, " ".join(command[1:]))
    project = str(Path(__file__).resolve().parent.parent)  # `-m tasks.finetune_worker` from a checkout too
    env = {**os.environ, "PYTHONUNBUFFERED": "1", STAGE_PID: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    tail: collections.deque[str] = collections.deque(maxlen=80)
    errors: list[str] = []
    # In this process's group: whatever stops the run's group (Ctrl-C, a worker cancelling the flow run, a
    # container or pod stopped) stops the ranks too; a stage process killed alone is noticed by each rank's watch.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(LOG_PREFIX):
                record = json.loads(line[len(LOG_PREFIX):])
                logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])
                if record["level"] >= logging.ERROR:
                    errors.append(record["message"])
            elif line.startswith(CHECKPOINT_PREFIX):
                on_checkpoint(json.loads(line[len(CHECKPOINT_PREFIX):]))
            elif line.strip():
                tail.append(line)
        code = proc.wait()
    except BaseException:
        proc.terminate()  # the stage is stopping (an error here, or the flow cancelled): torchrun stops its ranks
        proc.wait()
        raise
    if code != 0:
        raise TrainingRanksFailed(describe_failure(code, nproc, errors, list(tail)))


ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def watch_stage(interval: float = 2.0) -> None:
    """In a rank: exit once the stage process that launched the group is gone (killed on its own, e.g. by the OOM
    killer), so no rank trains on for nobody."""
    import threading
    import time

    stage = int(os.environ.get(STAGE_PID, "0"))

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(stage, 0)
            except ProcessLookupError:
                logger.error("the stage process %d is gone; this rank stops", stage)
                os._exit(1)
            except PermissionError:  # alive, another user's
                pass

    if stage:
        threading.Thread(target=watch, name="watch-stage", daemon=True).start()


def describe_failure(code: int, nproc: int, errors: list[str], tail: list[str]) -> str:
    """One message: which rank failed and how (from torchrun's root-cause summary), and the error a rank logged."""
    text = "\n".join(tail)
    summary = text.split("Root Cause", 1)[1] if "Root Cause" in text else ""
    how = f"torchrun exited with {code}"
    if match := ROOT_CAUSE.search(summary):
        rank, exitcode = int(match.group(1)), int(match.group(2))
        killed = f" (killed by {signal.Signals(-exitcode).name})" if exitcode < 0 and -exitcode in signal.valid_signals() else ""
        how = f"rank {rank} of {nproc} exited with {exitcode}{killed}"
    # the first error a rank logged is the cause; later ones are usually the others losing their peer
    detail = errors[0].splitlines()[0] if errors else next((line for line in reversed(tail) if "Error" in line), "")
    return (f"the training process group failed: {how}" + (f"; {detail}" if detail else "")
            + ". Nothing was published; checkpoints already in the store stay, and a rerun resumes from the newest.")
