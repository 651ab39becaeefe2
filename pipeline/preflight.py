"""Everything that can be checked before any weights are loaded, reported together; once per run.

Order: config-level facts first (free), then files (cheap), then the model's shapes on the meta device
(no weights). One PreflightError lists every problem, so a user fixes them in one round trip. The dataset read
to check it is returned: the data stage publishes it, so the source is read once per run.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from pipeline.base_model import (
    ModelSourceError,
    list_model_files,
    quantization_of,
    read_model_config,
    read_tokenizer_config,
    unquantized_name,
)
from pipeline.config import PipelineConfig
from pipeline.data import DataError, Dataset, read_calibration, read_dataset
from pipeline.distributed import check_distributed, resolve_ranks
from pipeline.errors import PreflightError
from pipeline.gguf_base import is_gguf
from pipeline.memory import (
    Device,
    MemoryPlan,
    fit_problems,
    meta_model,
    plan_run,
    render_plan,
    resolve_batch,
    visible_device,
)
from pipeline.mlflow_run import check_mlflow
from pipeline.precision import bf16_refusal
from pipeline.store import StoreError, check_store, open_store
from pipeline.tracking import missing_trackers
from pipeline.vllm_env import cannot_check_here

logger = logging.getLogger(__name__)
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Checked:
    """What preflight hands the run: the config (an `auto` micro-batch and `nproc` resolved), the dataset it read and
    validated, and the memory plan it checked (None where the base's shapes could not be planned)."""

    cfg: PipelineConfig
    dataset: Dataset
    plan: MemoryPlan | None


def preflight(cfg: PipelineConfig, device: Device | None = None) -> Checked:
    """Raise PreflightError with every problem found; return the checked run if it can start. The memory plan is
    for `device` (default: this machine as it is now)."""
    problems: list[str] = []
    problems += check_qlora(cfg.training.qlora)
    problems += check_fused_kernels(cfg.training.fused_kernels)
    problems += missing_trackers(cfg.tracking.report_to)
    problems += check_mlflow(cfg)
    try:
        problems += check_store(open_store(cfg.store.uri, cfg.store.credentials_block))
    except StoreError as exc:
        problems.append(str(exc))
    model_config = None
    gguf_refused = is_gguf(cfg.model.name_or_path) and not cfg.model.dequantize_gguf
    if gguf_refused:
        problems.append(refuse_gguf(cfg.model.name_or_path))
    else:
        try:
            model_config = read_model_config(cfg.model.name_or_path, cfg.model.revision)
        except ModelSourceError as exc:
            problems.append(str(exc))
    if model_config is not None:
        problems += check_quantized_base(cfg, model_config)
        problems += check_remote_code(cfg.model.name_or_path, model_config, cfg.model.trust_remote_code)
        if not is_gguf(cfg.model.name_or_path):
            problems += check_weights_format(cfg)
    device = device or visible_device()  # one look at the machine: the rank checks and the memory plan share it
    problems += check_precision(cfg, device)
    problems += check_serving(cfg)
    gpus = device.count if device.kind == "cuda" else 0
    problems += check_distributed(cfg.training, gpus, os.cpu_count() or 1,
                                  quantized_base=model_config is not None and "quantization_config" in model_config,
                                  hidden_size=(model_config or {}).get("hidden_size"))
    dataset, data_problems = check_data(cfg, check_template=model_config is not None)
    problems += data_problems
    if model_config is not None and "quantization_config" not in model_config:
        problems += check_layers(model_config, cfg)
    plan = None
    if model_config is not None and not problems:  # last: it builds on the shapes checked above
        plan, memory_problems = check_memory(cfg, model_config, device)
        problems += memory_problems
    if problems:
        raise PreflightError(problems)
    logger.info("preflight passed: base %s, data %s, store %s", cfg.model.name_or_path, cfg.data.path, cfg.store.uri)
    if plan is not None:
        logger.info("%s", render_plan(plan))
    return Checked(resolve_ranks(resolve_batch(cfg, plan) if plan else cfg, gpus), dataset, plan)


def check_memory(cfg: PipelineConfig, model_config: dict, device: Device) -> tuple[MemoryPlan | None, list[str]]:
    """The run's memory plan, and a fine-tune that will not fit the device refused with the settings that
    would make it fit. A base whose shapes cannot be planned runs unplanned, unless its micro-batch is `auto`."""
    try:
        plan = plan_run(cfg, model_config, device)
    except Exception as exc:  # noqa: BLE001 - an architecture the plan does not know must not block a run
        if cfg.training.per_device_train_batch_size == "auto":
            return None, [f"training.per_device_train_batch_size is auto, but no memory plan could be made for this "
                          f"base ({type(exc).__name__}: {exc}); set a number"]
        logger.warning("no memory plan for this base (%s: %s); the run goes on unplanned", type(exc).__name__, exc)
        return None, []
    return plan, fit_problems(cfg, model_config, device, plan)


def check_qlora(qlora: bool) -> list[str]:
    """QLoRA needs bitsandbytes and a device its nf4 kernels run on (CUDA, or a CPU with bitsandbytes >= 0.46): a
    64x64 round trip through nf4 on the device that will train, milliseconds, before any weights load."""
    if not qlora:
        return []
    import torch

    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except ImportError as exc:
        return [f"training.qlora is true but bitsandbytes cannot be imported ({exc}): pip install '.[qlora]' "
                "(bitsandbytes 0.50.2: nf4 on CUDA and on CPU), or set training.qlora=false to train LoRA on the "
                "full-precision base"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        weights = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)
        packed, state = quantize_4bit(weights, quant_type="nf4", compress_statistics=True)
        error = (dequantize_4bit(packed, state) - weights).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - whatever the backend raises is the answer
        return [f"training.qlora is true but bitsandbytes' nf4 kernels do not run on this {device}: "
                f"{type(exc).__name__}: {exc}. Set training.qlora=false to train LoRA on the full-precision base"]
    if not error < 0.2:  # nf4's levels are at most 0.28 of a block's absmax apart; a broken kernel is far off
        return [f"training.qlora is true but bitsandbytes' nf4 round trip on this {device} is off by {error:.3g} "
                "(a working kernel is within 0.2 on values in [-1, 1]). Set training.qlora=false"]
    return []


def check_precision(cfg: PipelineConfig, device: Device) -> list[str]:
    """A forced bf16 where the device that runs it has none (the fine-tune and quantize stages run on the GPU)."""
    settings = {"training.precision": cfg.training.precision, "quantization.precision": cfg.quantization.precision}
    refusals = (bf16_refusal(name, device.kind, device.bf16, device.name)
                for name, setting in settings.items() if setting == "bf16")
    return [refusal for refusal in refusals if refusal]


def check_serving(cfg: PipelineConfig) -> list[str]:
    """serving.check=true where vLLM cannot serve the int4 model on this machine: refused now, not after the
    fine-tune and quantize stages have run."""
    served = cfg.serving.check is True and cfg.training.method == "lora"  # vLLM does not serve prompt tuning
    why = cannot_check_here(cfg.serving) if served else None
    return [f"serving.check is true but {why}. Set serving.check=auto (checked wherever vLLM can serve int4, recorded "
            "as not checked elsewhere), or serving.python to an interpreter whose vLLM has the kernel, or run on a "
            "GPU or an AVX512 CPU"] if why else []


def check_fused_kernels(setting: str) -> list[str]:
    if setting != "on":
        return []
    from importlib.util import find_spec

    import torch

    if not torch.cuda.is_available() or find_spec("liger_kernel") is None:
        return [f"training.fused_kernels is 'on' but needs CUDA and liger-kernel (CUDA visible: "
                f"{torch.cuda.is_available()}, liger-kernel installed: {find_spec('liger_kernel') is not None}). "
                "Set training.fused_kernels=auto (used where available), or pip install '.[gpu]' on a GPU worker"]
    return []


def check_quantized_base(cfg: PipelineConfig, model_config: dict) -> list[str]:
    """A quantized base is refused (naming the full-precision one), unless `model.quantized_base: adapter` asks for
    an adapter trained on it, which works for GPTQ (gptqmodel's trainable kernel); prompt tuning needs that route,
    and QLoRA does not go with it."""
    name, found = cfg.model.name_or_path, quantization_of(model_config)
    adapter = cfg.model.quantized_base == "adapter" and found is not None
    problems = []
    if cfg.training.method == "prompt_tuning" and not adapter:
        problems.append("training.method is prompt_tuning, but prompt tuning leaves the weights alone, so there is "
                        "nothing to merge and quantize: use it on a quantized (GPTQ) base with "
                        "model.quantized_base=adapter, or set training.method=lora")
    if found is None:
        return problems
    if cfg.model.quantized_base == "refuse":
        alternative = unquantized_name(name)
        instead = (f"use the unquantized base, e.g. --set model.name_or_path={alternative}" if alternative
                   else "use the unquantized (bf16/fp16/fp32) release of this model as model.name_or_path")
        return problems + [
            f"base model {name!r} is already quantized (config.json quantization_config: {found}). It cannot be "
            "fine-tuned and then quantized again: QLoRA on it fails (the 'BitsAndBytesConfig' error), and a LoRA "
            "adapter cannot be merged into integer weights. Quantization is not reversible; the pipeline fine-tunes "
            f"the full-precision base, merges, then quantizes. Instead, {instead}; or, if no full-precision base "
            "exists, --set model.quantized_base=adapter to train an adapter on this one and ship it unmerged"]
    if not found.startswith("gptq"):
        problems.append(f"model.quantized_base=adapter trains through gptqmodel's trainable GPTQ kernel, but base "
                        f"{name!r} is {found}; give a GPTQ checkpoint, or the full-precision base with "
                        "model.quantized_base=refuse")
    if cfg.training.qlora:
        problems.append(f"training.qlora quantizes a full-precision base to nf4, but base {name!r} is already "
                        f"quantized ({found}); set training.qlora=false (the adapter trains on it as it is)")
    return problems


def refuse_gguf(name_or_path: str) -> str:
    return (f"base model {name_or_path!r} is a GGUF file: already quantized (llama.cpp format), so it cannot be "
            "fine-tuned and quantized again as is. Give the unquantized model, or set model.dequantize_gguf=true to "
            "dequantize it to full precision once (the base's quality then stays bounded by the GGUF's quantization)")


def check_remote_code(name_or_path: str, model_config: dict, trusted: bool) -> list[str]:
    if "auto_map" not in model_config or trusted:
        return []
    return [f"base model {name_or_path!r} needs its own Python code (config.json auto_map: "
            f"{sorted(model_config['auto_map'])}); read that code, then set model.trust_remote_code=true to run it"]


def check_weights_format(cfg: PipelineConfig) -> list[str]:
    try:
        files = list_model_files(cfg.model.name_or_path, cfg.model.revision)
    except ModelSourceError as exc:
        return [str(exc)]
    if any(f.endswith(".safetensors") for f in files):
        return []
    pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth")) and "training_args" not in f)
    if not pickles:
        return [f"base model {cfg.model.name_or_path!r} has no weights (.safetensors) among its files"]
    if cfg.model.allow_pickle:
        return []
    return [f"base model {cfg.model.name_or_path!r} has weights only as pickle ({', '.join(pickles[:3])}): loading "
            "pickle can run arbitrary code. Convert them to safetensors, or set model.allow_pickle=true if you trust "
            "the source"]


def check_data(cfg: PipelineConfig, check_template: bool = True) -> tuple[Dataset | None, list[str]]:
    """The dataset, read from its source and validated (None if it cannot be), and every problem found."""
    problems = []
    dataset = None
    try:
        dataset = read_dataset(cfg.data)
    except DataError as exc:
        problems.append(str(exc))
    if dataset is not None and dataset.form == "chat" and check_template:
        try:
            template = read_tokenizer_config(cfg.model.name_or_path, cfg.model.revision).get("chat_template")
        except (ModelSourceError, OSError, ValueError) as exc:
            template, problems = None, problems + [f"cannot read the base's tokenizer config: {exc}"]
        if not template:
            problems.append(f"data {cfg.data.path!r} is chat (`messages`) but the tokenizer of "
                            f"{cfg.model.name_or_path!r} has no chat template to render it; use the instruct "
                            "model's tokenizer, or give prompt/completion or text data")
    calibration = cfg.quantization.calibration
    if calibration.source == "train":
        available = len(dataset.train) if dataset is not None else None
    else:
        try:
            available = len(read_calibration(calibration.source, cfg.data)[1])
        except DataError as exc:
            available, problems = None, problems + [f"quantization.calibration.source: {exc}"]
    if available is not None and available < calibration.n_samples:
        problems.append(f"quantization.calibration.n_samples is {calibration.n_samples} but "
                        f"{'the training split' if calibration.source == 'train' else repr(calibration.source)} has "
                        f"only {available} rows; lower n_samples to at most {available} or add calibration data")
    window = cfg.quantization.autoround.seqlen
    if cfg.quantization.method == "autoround" and window and window > calibration.n_samples * calibration.max_length:
        problems.append(f"quantization.autoround.seqlen is {window} tokens but the calibration holds at most "
                        f"{calibration.n_samples * calibration.max_length} ({calibration.n_samples} rows of at most "
                        f"{calibration.max_length} tokens): not one AutoRound window; lower autoround.seqlen or raise "
                        "calibration.n_samples")
    return dataset, problems


def quantized_layer_shapes(model_config: dict, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of every Linear GPTQ will quantize (all but the output head)."""
    import torch

    model = meta_model(model_config, trust_remote_code)
    head = model.get_output_embeddings()
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def check_layers(model_config: dict, cfg: PipelineConfig) -> list[str]:
    """LoRA targets and GPTQ group size against the base's Linear layers, built on the meta device (no weights)."""
    try:
        shapes = quantized_layer_shapes(model_config, cfg.model.trust_remote_code)
    except Exception as exc:
        return [f"cannot build the base's layer shapes from its config.json ({type(exc).__name__}: {exc})"]
    return check_lora_targets(shapes, cfg.lora.target_modules) + check_group_size(shapes, cfg.quantization.group_size)


def check_lora_targets(shapes: dict[str, tuple[int, int]], targets: list[str]) -> list[str]:
    leaf_names = {name.rsplit(".", 1)[-1] for name in shapes}
    missing = [t for t in targets if t not in leaf_names]
    if not missing:
        return []
    return [f"lora.target_modules {missing} match no layer of the base; its Linear layers are {sorted(leaf_names)}"]


def check_group_size(shapes: dict[str, tuple[int, int]], group_size: int) -> list[str]:
    if group_size == -1:
        return []
    bad = {name: shape for name, shape in shapes.items() if shape[1] % group_size}
    if not bad:
        return []
    name, (out_features, in_features) = next(iter(bad.items()))
    common = math.gcd(*(in_f for _, in_f in shapes.values()))
    valid = [-1] + [g for g in GROUP_SIZES if common % g == 0]
    return [f"quantization.group_size={group_size} does not divide the in_features of {len(bad)} layer(s), e.g. "
            f"{name} (Linear {in_features} -> {out_features}). Valid group sizes for this model: {valid}"]
