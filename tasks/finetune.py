"""Stage 1: LoRA fine-tune of the full-precision base (bf16 mixed precision where the hardware has bf16 arithmetic, else
fp32), or QLoRA: the same adapter trained over an nf4 copy of the base (bitsandbytes, CUDA or CPU)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from pipeline.base_model import quantization_of, resolve_model_dir
from pipeline.cache import cache_root
from pipeline.checkpoints import CheckpointSync, publish_checkpoint, restore_latest
from pipeline.config import LoraConfig, TrainingConfig
from pipeline.data import Dataset, tokenize_example
from pipeline.distributed import launch_ranks, resolve_nproc, visible_gpus
from pipeline.errors import StageCheckError
from pipeline.keys import code_version
from pipeline.memory import peak_rss_bytes, plan_run, reset_peak_rss, resolve_batch, visible_device
from pipeline.output_head import selective_head
from pipeline.precision import PrecisionChoice, choose_precision, device_name, widest_projection
from pipeline.run import RunContext
from pipeline.shared_prefix import PrefixSharing, prefix_packed, shared_prefix_length
from pipeline.stage import StageArtifact, key_of, local_copy, run_stage
from pipeline.store import describe_files, retrying
from pipeline.tracking import TENSORBOARD_DIR, finish_trackers, trainer_report_to, write_tensorboard
from tasks.data import read_data

logger = logging.getLogger(__name__)


def train_lora(base_dir: Path, dataset: Dataset, max_length: int, lora: LoraConfig, training: TrainingConfig,
               out_dir: Path, checkpoint_dir: Path, sync: CheckpointSync | None = None,
               on_saved: Callable[[int, Path], None] | None = None,
               trust_remote_code: bool = False, base_name: str | None = None, report_to: Sequence[str] = (),
               run_name: str | None = None) -> dict[str, Any]:
    """Train a LoRA adapter on `base_dir` with `dataset` (examples cut to `max_length` tokens), write it to
    `out_dir`, return eval losses before and after. The adapter names its base `base_name` (the user's hub id or
    source), not `base_dir`, a folder of this machine. The steps' loss, learning rate and gradient norm go to the
    trackers in `report_to` (`tracking.report_to`), as run `run_name`; TensorBoard's files into `out_dir`.

    Checkpoints go to `checkpoint_dir` every `save_steps`, and with `sync` to the store as well; training resumes
    from the newest complete one (the store's, restored into `checkpoint_dir`, else the folder's own).

    Run as one rank of a torchrun process group (`training.distributed`), every rank trains its share of each
    global batch; `on_saved(step, folder)` is called on rank 0 once every rank has written a checkpoint, and rank 0
    alone writes `out_dir`.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import PromptTuningConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )
    from transformers.trainer_utils import get_last_checkpoint

    from pipeline.progress import ProgressLogger

    set_seed(training.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set = [tokenize_example(r, dataset.form, tokenizer, max_length) for r in dataset.train]
    # A quick held-out check that training lowers the loss; the evaluate stage scores every eval row.
    eval_set = [tokenize_example(r, dataset.form, tokenizer, max_length)
                for r in dataset.eval[: training.eval_samples]]
    n_tokens = sum(sum(label != -100 for label in ex["labels"]) for ex in train_set)
    logger.info("data: %s form, %d train / %d eval examples, %d trained tokens per epoch",
                dataset.form, len(train_set), len(eval_set), n_tokens)

    on_gpu = torch.cuda.is_available()
    base_config = json.loads((Path(base_dir) / "config.json").read_text())
    quantized = quantization_of(base_config)
    precision = training_precision(training, base_config, train_set, quantized, on_gpu)
    bf16 = precision.bf16
    # bf16 is mixed precision: bf16 arithmetic (autocast); on a GPU the frozen base is held in bf16 too, to halve
    # its memory; on a CPU it stays fp32, which costs nothing in speed there
    sharded = training.distributed in ("fsdp", "deepspeed")  # the model's parameters spread over the ranks
    load_kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if bf16 and on_gpu else torch.float32,
                                   "trust_remote_code": trust_remote_code}
    if quantized:  # an adapter on a GPTQ base (preflight let only GPTQ through): gptqmodel's trainable torch kernel,
        from transformers import GPTQConfig  # which computes in bf16 or fp16, not fp32

        load_kwargs |= {"dtype": torch.bfloat16, "quantization_config": GPTQConfig(
            bits=base_config["quantization_config"]["bits"], backend="auto_trainable")}
        logger.info("the base is quantized (%s): training an adapter on it as it is, to ship unmerged", quantized)
    if training.qlora:
        from transformers import BitsAndBytesConfig

        # nf4 with double quantization (QLoRA's recipe); bitsandbytes >= 0.46 runs it on CPU as well as CUDA.
        # Sharded (FSDP, ZeRO-3), the packed weights are stored in the compute dtype: a shard holds one dtype.
        compute = torch.bfloat16 if bf16 else torch.float32
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, **({"bnb_4bit_quant_storage": compute} if sharded else {}))
    # before the model: with ZeRO-3 in them, transformers then partitions the weights as they load (zero.Init)
    fused = fused_kernels_available(training.fused_kernels, on_gpu)
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=training.num_train_epochs,
        max_steps=training.max_steps,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.per_device_train_batch_size,
        per_device_eval_batch_size=training.per_device_eval_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        lr_scheduler_type=training.lr_scheduler_type,
        logging_steps=training.logging_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        bf16=bf16,
        activation_checkpointing=training.gradient_checkpointing,  # transformers 5's name for it
        seed=training.seed,
        data_seed=training.seed,
        report_to=trainer_report_to(report_to),
        run_name=run_name,
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not on_gpu,
        use_liger_kernel=fused,  # AdamW is already the fused one: transformers' default with torch >= 2.8
        **engine_arguments(training),
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir, **load_kwargs)
    if training.qlora:
        model = prepare_model_for_kbit_training(model, training.gradient_checkpointing)
    if training.qlora or quantized:
        keep_training_layout(model)
    if training.method == "prompt_tuning":
        adapter = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=training.num_virtual_tokens)
        described = f"prompt tuning, {training.num_virtual_tokens} virtual tokens"
    else:
        adapter = PeftLoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        described = f"LoRA r={lora.r} on {','.join(lora.target_modules)}"
    model = get_peft_model(model, adapter)
    trainable, total = model.get_nb_trainable_parameters()
    nf4_layers = count_nf4_layers(model) if training.qlora else 0
    if training.qlora:
        logger.info("QLoRA: %d linear layers of the base held in nf4 (double-quantized) while training", nf4_layers)
    logger.info("%s: %d trainable of %d parameters (%.3f%%)", described, trainable, total, 100 * trainable / total)

    # Padding-free packing: one row per micro-batch with per-example positions; transformers derives a
    # block-diagonal causal mask from the restarting position ids, so no token attends across examples.
    shared = prefix_sharing(training, model)
    collator = TokenCounter(DataCollatorWithFlattening(separator_id=-100) if training.packing
                            else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                            # Liger's fused loss never builds the full logits anyway
                            selective_head=not fused and selective_head(model), shared_prefix=shared)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
        callbacks=[ProgressLogger()] + ([sync] if sync else []) + ([RanksSaved(on_saved)] if on_saved else []),
    )
    trainer.remove_callback(PrinterCallback)  # it prints each log dict to stdout; ProgressLogger logs them already
    if training.distributed == "fsdp" and not on_gpu:
        shard_on_cpu(trainer)
    # Over several ranks the loss before training is measured after it, with the adapter switched off: the model
    # before training (LoRA starts as the identity, B = 0). Evaluating first breaks both engines: transformers cannot
    # evaluate a sharded (FSDP2, ZeRO) model before training, and under DDP accelerate marks the evaluated model
    # prepared and then skips the DDP wrap, so every rank would train alone with no gradient sync (accelerate 1.15;
    # the DDP test compares the gradient norms with one process's).
    measured_after = training.distributed != "none"
    eval_before = None if measured_after else trainer.evaluate()["eval_loss"]
    if sync is not None:
        restore_latest(sync.store, sync.prefix, Path(checkpoint_dir))
    resume = get_last_checkpoint(str(checkpoint_dir)) if Path(checkpoint_dir).is_dir() else None
    if resume:
        logger.info("resuming from %s", resume)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    collator.tokens = collator.tokens_not_computed = 0
    result = trainer.train(resume_from_checkpoint=resume)
    train_tokens, not_computed = collator.tokens, collator.tokens_not_computed
    eval_after = trainer.evaluate()["eval_loss"]
    if measured_after:
        with model.disable_adapter():
            eval_before = trainer.evaluate()["eval_loss"]
    logger.info("eval loss %.4f -> %.4f", eval_before, eval_after)

    name_base(model, base_name or str(base_dir))
    state_dict = gather_adapter(trainer, on_gpu) if sharded else None
    history = [e for e in trainer.state.log_history if "loss" in e]
    if trainer.is_world_process_zero():
        model.save_pretrained(out_dir, state_dict=state_dict,
                              save_embedding_layers=False)  # the vocabulary is never resized here
        tokenizer.save_pretrained(out_dir)
        (Path(out_dir) / "training_log.json").write_text(json.dumps(history, indent=2))
        if "tensorboard" in report_to:
            write_tensorboard(history, Path(out_dir) / TENSORBOARD_DIR)
    finish_trackers(report_to)
    return {
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "trained_tokens_per_epoch": n_tokens,
        "resumed_from": Path(resume).name if resume else None,
        "precision": precision.precision,
        "precision_choice": precision.as_metrics(),
        "method": training.method,
        "base_quantization": quantized,
        "qlora": training.qlora,
        "nf4_layers": nf4_layers,
        "packing": training.packing,
        "shared_prefix": shared is not None,
        "tokens_not_computed": not_computed,  # a shared prefix's repeats and the padding its batches did without
        "fused_kernels": fused,
        "distributed": training.distributed,
        "ranks": trainer.args.world_size,
        "train_seconds": result.metrics["train_runtime"],
        "train_tokens": train_tokens,
        "tokens_per_second": train_tokens / result.metrics["train_runtime"],
        **peaks_of_ranks(on_gpu),
    }


def peaks_of_ranks(on_gpu: bool) -> dict[str, Any]:
    """Memory while training: `peak_memory_bytes`, the device's allocator peak (the largest over the ranks: what
    one GPU held); `host_peak_bytes`, the resident high-water mark (Linux) summed over the ranks (what the host
    held), with each rank's in `rank_host_peak_bytes` when there are several. A collective: every rank calls it."""
    import torch
    import torch.distributed as dist

    mine = (torch.cuda.max_memory_allocated() if on_gpu else None, peak_rss_bytes())
    ranks = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    hosts = [host for _, host in ranks]
    peaks = {"peak_memory_bytes": max(device for device, _ in ranks) if on_gpu else None,
             "host_peak_bytes": None if None in hosts else sum(hosts)}
    return peaks | ({"rank_host_peak_bytes": hosts} if len(ranks) > 1 else {})


def engine_arguments(training: TrainingConfig) -> dict[str, Any]:
    """The Trainer's arguments for `training.distributed`: none for one process or DDP (torchrun's environment is
    enough), the FSDP2 or DeepSpeed config read from its JSON file."""
    from pipeline.distributed import read_engine_config

    if training.distributed == "fsdp":
        return {"fsdp": True, "fsdp_config": read_engine_config("fsdp", training.fsdp_config)}
    if training.distributed == "deepspeed":
        return {"deepspeed": read_engine_config("deepspeed", training.deepspeed_config)}
    if training.distributed == "ddp":
        return {"ddp_find_unused_parameters": False}  # the frozen base has no gradients to wait for
    return {}


def gather_adapter(trainer, on_gpu: bool) -> dict[str, Any]:
    """The trained parameters as full tensors on rank 0, gathered from their shards: a collective, every rank calls
    it. FSDP2 gathers the adapter alone (not the frozen base); ZeRO-3 its 16-bit consolidated weights."""
    if trainer.is_deepspeed_enabled:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # on CPU, cpu_offload would hand back the DTensor shards themselves (torch 2.13), not full tensors
    return get_model_state_dict(trainer.model_wrapped, options=StateDictOptions(
        full_state_dict=True, cpu_offload=on_gpu, ignore_frozen_params=True))


def shard_on_cpu(trainer) -> None:
    """Run the Trainer's FSDP2 path on CPU ranks (gloo). accelerate picks FSDP only on accelerators and silently
    falls back to DDP on CPU; so the state it built is switched to FSDP with the plugin the Trainer's arguments
    describe, exactly what it holds on a GPU. Only the CPU tests need this: on one host, CPU ranks share its RAM."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


class RanksSaved(TrainerCallback):
    """After each checkpoint: wait until every rank has written its part, then tell rank 0's `on_saved`."""

    def __init__(self, on_saved: Callable[[int, Path], None]):
        self.on_saved = on_saved

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if state.is_world_process_zero:
            self.on_saved(state.global_step, Path(args.output_dir) / f"checkpoint-{state.global_step}")


def training_precision(training: TrainingConfig, base_config: dict, train_set: list[dict], quantized: str | None,
                       on_gpu: bool) -> PrecisionChoice:
    """The fine-tune's compute dtype: bf16 on a GPTQ base (its trainable kernel computes in bf16 or fp16, not fp32),
    else `training.precision`, `auto` measured on this device at the stage's own shape: a micro-batch of the rows'
    mean length through the base's widest projection (hidden -> intermediate)."""
    if quantized:
        return PrecisionChoice("bf16", f"the {quantized} base's trainable kernel computes in bf16",
                               device_name(on_gpu))
    batch = training.per_device_train_batch_size if isinstance(training.per_device_train_batch_size, int) else 1
    mean_length = sum(len(ex["input_ids"]) for ex in train_set) / max(len(train_set), 1)
    return choose_precision(training.precision, widest_projection(round(batch * mean_length), base_config),
                            cuda=on_gpu)


def count_nf4_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.quant_type == "nf4" for m in model.modules())


def keep_training_layout(model) -> None:
    """Keep a quantized base's weights in the layout its training path reads. Both 4-bit kernels used here switch a
    layer to a CPU inference layout at its first eval-mode forward (the trainer's eval loss before training) and
    never switch back; training then runs through an inference kernel:
    - bitsandbytes 0.50.2 (nf4, QLoRA) on a CPU with AVX512-BF16: the step fails ("a view of a leaf Variable that
      requires grad is being used in an in-place operation");
    - gptqmodel 7.6.0's TorchAtenLinear (a GPTQ base): no gradient flows back through the layer to its input, so
      prompt tuning learns nothing (gradient norm 0.0) and LoRA's gradients stop at the first quantized layer.
    Eval then runs in the training layout, a little slower."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):  # bitsandbytes Linear4bit
            module.support_avx512bf16_for_cpu = False
        if hasattr(module, "linear_mode") and module.linear_mode is None:  # gptqmodel TorchAtenLinear
            module.linear_mode = "train"


def name_base(model, name: str) -> None:
    """Make the adapter name its base `name` in adapter_config.json and its model card (peft takes the base's local
    folder otherwise). Done after training: peft looks the base up by this name when it saves checkpoints."""
    base = model.get_base_model()
    base.name_or_path = base.config._name_or_path = model.peft_config["default"].base_model_name_or_path = name


class TokenCounter:
    """A data collator that counts the real (unpadded) tokens it batches: the honest throughput numerator.

    With `selective_head`, each batch also tells the model to run its output head only at the positions that predict
    a labelled token in some row (`logits_to_keep`), with the matching targets as `shift_labels` for its loss: the
    prompt tokens' logits (most of a chat row, times a vocabulary of 50-150k) are never built. The loss is the same
    cross-entropy over the same tokens, normalised the same way.

    With `shared_prefix`, a batch whose rows all start with the same tokens (a chat template's system prompt, a fixed
    instruction) becomes one row where that computes less: that prefix once, then each row's remaining tokens, with
    no padding, a mask that lets each row see the prefix and itself (causally) and nothing else, and positions that
    continue after the prefix in every row. The model computes the same logits for every row's tokens as from the
    rows themselves, from fewer tokens.
    """

    def __init__(self, collate, selective_head: bool = False, shared_prefix: PrefixSharing | None = None):
        self.collate, self.tokens, self.selective_head, self.shared_prefix = collate, 0, selective_head, shared_prefix
        self.tokens_not_computed = 0  # tokens not computed: the prefix's repeats and the padding a batch would have had

    def __call__(self, features: list[dict]) -> dict:
        self.tokens += sum(len(f["input_ids"]) for f in features)
        prefix = shared_prefix_length(features) if self.shared_prefix else 0
        if prefix and self.shared_prefix.pays(features, prefix):
            batch = prefix_packed(features, prefix, self.shared_prefix.attention)
            self.tokens_not_computed += len(features) * max(len(f["input_ids"]) for f in features) - batch["labels"].numel()
        else:
            batch = self.collate(features)
        if self.selective_head:
            labels = batch["labels"]
            predicts = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()  # position p predicts p + 1
            batch["logits_to_keep"], batch["shift_labels"] = predicts, labels[:, predicts + 1].contiguous()
        return batch


def prefix_sharing(training: TrainingConfig, model) -> PrefixSharing | None:
    """How batches share their prefix for this model, or None where they are not shared: `training.shared_prefix`
    off, packing (its own padding-free layout), prompt tuning (its virtual tokens go before the prefix), or attention
    without a custom mask (flash-attention kernels)."""
    attention = getattr(model.config, "_attn_implementation", None)
    if not training.shared_prefix or training.packing or training.method != "lora" or attention not in ("sdpa", "eager"):
        return None
    return PrefixSharing.for_model(attention, model.config)


def fused_kernels_available(setting: str, on_gpu: bool) -> bool:
    """Whether to use Liger kernels: "on" insists (preflight's check, again here for callers without the flow),
    "auto" uses them where they can run."""
    import importlib.util

    from pipeline.preflight import check_fused_kernels

    problems = check_fused_kernels(setting)
    if problems:
        raise StageCheckError(problems[0])
    return setting != "off" and on_gpu and importlib.util.find_spec("liger_kernel") is not None


def finetune(run: RunContext, data: StageArtifact) -> StageArtifact:
    """Fine-tune into `<store>/<run>/finetune/`, or reuse a stage built from the same base files, data, config and
    code. Checkpoints live in `<store>/<run>/.work/` until the adapter is published."""
    model, store = run.cfg.model, run.store
    base_dir = resolve_model_dir(model.name_or_path, model.revision)
    training = run.cfg.training
    if training.per_device_train_batch_size == "auto":  # called without preflight, which resolves it
        plan = plan_run(run.cfg, json.loads((base_dir / "config.json").read_text()), visible_device())
        training = resolve_batch(run.cfg, plan).training
    if training.distributed != "none":  # called without preflight, which resolves `nproc: auto`
        training = training.model_copy(update={"nproc": resolve_nproc(training, visible_gpus())})
    determinants = {
        **({"engine": engine_arguments(training)} if training.distributed != "none" else {}),
        "base": {"name_or_path": model.name_or_path,
                 "files": {k: v["sha256"] for k, v in describe_files(base_dir).items()}},
        "max_length": run.cfg.data.max_length,
        "lora": run.cfg.lora.model_dump(),
        "training": training.model_dump(),
        "code": code_version(__name__),
    }
    work = store.path(run.name, ".work", f"finetune-{key_of('finetune', determinants, {'data': data})[:16]}")
    local_checkpoints = cache_root() / "scratch" / f"checkpoints-{os.getpid()}-{time.time_ns()}"

    def build(out_dir: Path) -> dict[str, Any]:
        if training.distributed != "none":
            return train_ranks(run, base_dir, local_copy(store, data), training, out_dir, local_checkpoints, work)
        return train_lora(base_dir, read_data(run, data), run.cfg.data.max_length, run.cfg.lora, training,
                          out_dir, local_checkpoints, CheckpointSync(store, work),
                          trust_remote_code=model.trust_remote_code, base_name=model.name_or_path,
                          report_to=run.cfg.tracking.report_to, run_name=run.name)

    try:
        artifact = run_stage(run, "finetune", determinants, build, inputs={"data": data})
    finally:
        shutil.rmtree(local_checkpoints, ignore_errors=True)
    if retrying("checking checkpoints", lambda: store.fs.exists(work)):
        retrying("removing spent checkpoints", lambda: store.fs.rm(work, recursive=True))  # the adapter is published
    return artifact


def train_ranks(run: RunContext, base_dir: Path, data_dir: Path, training: TrainingConfig, out_dir: Path,
                checkpoint_dir: Path, work: str) -> dict[str, Any]:
    """`train_lora` as a torchrun process group (`training.distributed`): the store's newest checkpoint restored for
    every rank to resume from, each checkpoint the ranks write published here, the adapter written by rank 0."""
    store = run.store
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    restore_latest(store, work, checkpoint_dir)
    spec = checkpoint_dir / "spec.json"
    metrics_file = checkpoint_dir / "metrics.json"
    spec.write_text(json.dumps({
        "base_dir": str(Path(base_dir).resolve()), "data_dir": str(Path(data_dir).resolve()),
        "max_length": run.cfg.data.max_length, "lora": run.cfg.lora.model_dump(), "training": training.model_dump(),
        "out_dir": str(Path(out_dir).resolve()), "checkpoint_dir": str(checkpoint_dir.resolve()),
        "metrics": str(metrics_file.resolve()),
        "trust_remote_code": run.cfg.model.trust_remote_code, "base_name": run.cfg.model.name_or_path,
        "report_to": run.cfg.tracking.report_to, "run_name": run.name}))
    launch_ranks(spec, training.nproc,
                 lambda saved: publish_checkpoint(store, work, Path(saved["folder"]), saved["step"]))
    return json.loads(metrics_file.read_text())
