"""The memory plan: what each stage will hold on its device and in host RAM, from the config and the base's config
(its shapes built on the meta device: no weights), before anything is downloaded or loaded.

The fine-tune is counted tensor by tensor, the way autograd keeps them (docs/memory.md derives each term):
- the frozen base's weights in their dtype (nf4 for QLoRA, int4 for a GPTQ base), the adapter's fp32 parameters,
  their gradients and AdamW's two states;
- per token and decoder layer, what the backward pass needs (Korthikanti et al. 2022, for this architecture): each
  RMSNorm's fp32 input, each LoRA input's copy in the compute dtype (and dropout's mask), attention's q, k, v and
  output (sdpa's flash/efficient kernels keep no seq x seq matrix), the MLP's gate, SiLU and up outputs; with
  gradient checkpointing, only each layer's input plus one layer recomputed;
- the output head's logits and cross-entropy at the backward pass's start (bf16 logits, their fp32 copy, the
  log-softmax and its gradient: 12 bytes per logit), or Liger's fused loss, which never builds them;
- on a CPU with bf16 autocast, the bf16 copy of every frozen weight that autocast makes and the backward keeps;
- what the runtime itself takes (CUDA context; Python, torch and the data on the host) and, on CPU, what glibc's
  allocator keeps back between steps (measured: benchmarks/RESULTS.md, "Memory plan").

A plan is a planning figure: the peak of a micro-batch of full-length rows (`data.max_length` tokens each), the
worst the config allows. Validated against measured peaks on CPU and against the GPU machine's figures.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config import PipelineConfig
from pipeline.distributed import sharding_of

logger = logging.getLogger(__name__)

GIB = 1024 ** 3
MIB = 1024 ** 2
# Measured here (benchmarks/RESULTS.md, "Memory plan", re-fitted 2026-11-30): a process that has imported torch,
# transformers, peft and the pipeline, read its data and tokenized it, in a freshly installed environment (its
# shared libraries count more there than after days in the page cache; transformers imports scipy where installed).
HOST_RUNTIME = 750 * MIB
# Not measured (no GPU session has yet): a CUDA process's host side and its context on the device, estimates.
HOST_RUNTIME_CUDA = 2 * GIB
CUDA_CONTEXT = 600 * MIB
# glibc keeps freed heap memory for reuse; a CPU training step's tensors then land partly in fresh pages: the
# high-water mark of a training run is this share above the live tensors (fitted on the measured CPU runs).
CPU_ALLOCATOR_SLACK = 0.25
LOGIT_BYTES = 12          # per logit at the backward's start: fp32 log-softmax kept, its gradient, the fp32 input grad
FIT_MARGIN = 0.10         # a plan must leave this share of the device free to count as fitting
# Linear layers that read the same tensor (their LoRA inputs are one tensor when nothing casts or drops them)
SHARED_INPUT = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp"}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, an 8-bit absmax per 64 weights, an fp32 per 256 absmaxes


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only transformer, read from its config and its meta-device modules."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int                 # every parameter (tied embeddings counted once)
    layer_linear_params: int    # the decoder layers' Linear weights (what GPTQ quantizes, QLoRA holds in nf4)
    head_params: int            # the output head's weight (the embedding's, when tied)
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # leaf name -> (in, out), one layer's
    dtype_bytes: int = 4

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim


def meta_model(model_config: dict, trust_remote_code: bool = False):
    """The base's modules built from its config.json on the meta device (no weights); built once per config, for
    preflight's shape checks and the memory plan alike."""
    return _meta_model(json.dumps(model_config, sort_keys=True, default=str), trust_remote_code)


@functools.lru_cache(maxsize=4)
def _meta_model(config_json: str, trust_remote_code: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = json.loads(config_json)
    config_dict.pop("quantization_config", None)  # the full-precision shapes, also of a GPTQ base
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=8)
def _shape_from_json(config_json: str, trust_remote_code: bool) -> ModelShape:
    import torch

    model = _meta_model(config_json, trust_remote_code)
    config = model.config
    head = model.get_output_embeddings()
    layers = config.num_hidden_layers
    linears: dict[str, tuple[int, int]] = {}
    layer_linear = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            layer_linear += module.weight.numel()
            linears.setdefault(name.rsplit(".", 1)[-1], (module.in_features, module.out_features))
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    dtype = getattr(config, "dtype", None)
    return ModelShape(
        layers=layers, hidden=hidden, intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab=config.vocab_size, params=sum(p.numel() for p in model.parameters()),
        layer_linear_params=layer_linear, head_params=head.weight.numel(), linears=linears,
        dtype_bytes=torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4)


def model_shape(model_config: dict, trust_remote_code: bool = False) -> ModelShape:
    """The base's shape from its config.json, its modules built on the meta device (milliseconds, no weights)."""
    return _shape_from_json(json.dumps(model_config, sort_keys=True, default=str), trust_remote_code)


@dataclass(frozen=True)
class Device:
    """Where the stages run: `cuda` (memory of one GPU, `count` of them) or `cpu` (host RAM)."""

    kind: Literal["cpu", "cuda"]
    memory_bytes: int | None       # free on the device (RAM available, on a CPU); None: planned, not present
    host_memory_bytes: int | None  # host RAM available
    name: str
    count: int = 1
    bf16: bool = True
    fused_kernels: bool = False  # Liger kernels can run there (CUDA and liger-kernel)

    def describe(self) -> str:
        size = f", {self.memory_bytes / GIB:.1f} GiB free" if self.memory_bytes else ""
        return f"{self.name}{size}"


def visible_device() -> Device:
    """This machine as it is now: its first GPU's free memory when CUDA is visible, else its CPU's available RAM."""
    import importlib.util

    import psutil
    import torch

    host = psutil.virtual_memory().available
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return Device("cuda", free, host, torch.cuda.get_device_name(0), torch.cuda.device_count(),
                      torch.cuda.is_bf16_supported(), importlib.util.find_spec("liger_kernel") is not None)
    from pipeline.precision import REFERENCE_SHAPE, choose_precision

    bf16 = choose_precision("auto", REFERENCE_SHAPE, cuda=False).bf16  # measured: what `auto` will take here
    return Device("cpu", host, host, f"cpu ({psutil.cpu_count()} cores)", 1, bf16, False)


def planned_cuda() -> Device:
    """A CUDA GPU planned from a machine without one: bf16, Liger kernels as the `gpu` extra installs them."""
    return Device("cuda", None, None, "cuda (planned)", 1, True, True)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class StagePlan:
    """One stage's predicted peaks and what makes them up (bytes)."""

    device_peak_bytes: int
    host_peak_bytes: int
    parts: dict[str, int]        # on the device (on a CPU run: host RAM)
    host_parts: dict[str, int]   # in host RAM beside a GPU run (on a CPU run: the same as parts)
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"device_peak_bytes": self.device_peak_bytes, "host_peak_bytes": self.host_peak_bytes,
                "parts": self.parts, "host_parts": self.host_parts, **({"notes": self.notes} if self.notes else {})}


@dataclass(frozen=True)
class MemoryPlan:
    device: Device
    stages: dict[str, StagePlan]

    def as_dict(self) -> dict[str, Any]:
        return {"device": {"kind": self.device.kind, "name": self.device.name, "count": self.device.count,
                           "memory_bytes": self.device.memory_bytes, "host_memory_bytes": self.device.host_memory_bytes},
                "stages": {name: plan.as_dict() for name, plan in self.stages.items()}}


@dataclass(frozen=True)
class TrainSetup:
    """The fine-tune settings the plan depends on, resolved for one device."""

    batch: int
    seq: int
    bf16: bool
    fused: bool
    checkpointing: bool
    qlora: bool
    quantized_base: bool
    lora_targets: tuple[str, ...]
    lora_r: int
    lora_dropout: float
    prompt_tuning_tokens: int = 0
    ranks: int = 1                    # training processes (one per GPU)
    sharding: str = "none"            # none (each rank holds everything), optimizer (ZeRO-2), params (FSDP, ZeRO-3)
    offload: bool = False             # sharded parameters and optimizer states held in host RAM


def train_setup(cfg: PipelineConfig, device: Device, quantized_base: bool, batch: int | None = None) -> TrainSetup:
    training = cfg.training
    fused = device.kind == "cuda" and training.fused_kernels != "off" and device.fused_kernels
    bf16 = quantized_base or (training.precision == "bf16" or (training.precision == "auto" and device.bf16))
    prompt_tuning = training.method == "prompt_tuning"
    sharding, offload = sharding_of(training)
    return TrainSetup(
        batch=batch or (training.per_device_train_batch_size if training.per_device_train_batch_size != "auto" else 1),
        seq=cfg.data.max_length + (training.num_virtual_tokens if prompt_tuning else 0),
        bf16=bf16, fused=fused, checkpointing=training.gradient_checkpointing, qlora=training.qlora,
        quantized_base=quantized_base, lora_targets=() if prompt_tuning else tuple(cfg.lora.target_modules),
        lora_r=cfg.lora.r, lora_dropout=cfg.lora.lora_dropout,
        prompt_tuning_tokens=training.num_virtual_tokens if prompt_tuning else 0,
        ranks=1 if training.distributed == "none" else (
            training.nproc if isinstance(training.nproc, int) else device.count),
        sharding=sharding, offload=offload)


def activation_bytes_per_token_layer(shape: ModelShape, setup: TrainSetup, device: str) -> int:
    """What autograd keeps per token in one decoder layer for the backward pass (docs/memory.md)."""
    compute = 2 if setup.bf16 else 4
    h, i = shape.hidden, shape.intermediate
    norms = 2 * (2 * h if setup.fused else 4 * h)   # RMSNorm's fp32 input (Liger's: the input and one rstd)
    attention = 4 * shape.attention_width * compute  # q, k, v (GQA heads repeated) and the output
    mlp = (2 if setup.fused else 3) * i * compute   # gate, SiLU(gate), up (Liger's SwiGLU recomputes SiLU)
    widths = {name: shape.linears[name][0] for name in setup.lora_targets if name in shape.linears}
    if setup.lora_dropout > 0:
        # each LoRA input: dropout's mask (bool on CUDA, the fp32 input's dtype on CPU) and the dropped copy
        mask = 1 if device == "cuda" else 4
        lora = sum(n * (mask + compute) for n in widths.values())
    elif compute == 2:
        lora = sum(n * compute for n in widths.values())  # autocast's bf16 copy of each LoRA input
    else:  # fp32 without dropout: LoRA keeps the input tensor itself, one per group of layers reading it
        inputs = {SHARED_INPUT.get(name, name): n for name, n in widths.items()}
        lora = 4 * sum(inputs.values())
    return norms + attention + mlp + lora


def lora_params(shape: ModelShape, setup: TrainSetup) -> int:
    if setup.prompt_tuning_tokens:
        return setup.prompt_tuning_tokens * shape.hidden
    return shape.layers * sum(setup.lora_r * sum(shape.linears[name]) for name in setup.lora_targets
                              if name in shape.linears)


def plan_finetune(shape: ModelShape, setup: TrainSetup, device: Device) -> StagePlan:
    on_cuda = device.kind == "cuda"
    compute = 2 if setup.bf16 else 4
    # the frozen base: bf16 on a GPU in bf16 (fp32 on CPU, where autocast does the bf16 arithmetic)
    base_bytes = compute if on_cuda else 4
    rest = shape.params - shape.layer_linear_params
    if setup.qlora:  # prepare_model_for_kbit_training casts what is not nf4 to fp32
        weights = shape.layer_linear_params * NF4_BYTES + rest * 4
    elif setup.quantized_base:  # GPTQ int4: 4 bits plus a scale and zero per group of 128
        weights = shape.layer_linear_params * (0.5 + 4 / 128) + rest * 2
    else:
        weights = shape.params * base_bytes
    adapter = lora_params(shape, setup)
    tokens = setup.batch * setup.seq
    per_layer = activation_bytes_per_token_layer(shape, setup, device.kind)
    if setup.checkpointing:  # each layer's input kept; one layer recomputed during the backward
        activations = tokens * (shape.layers * shape.hidden * (compute if on_cuda else 4) + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    ranks = setup.ranks
    shard = {"none": (1, 1), "optimizer": (1, ranks), "params": (ranks, ranks)}[setup.sharding]
    parts: dict[str, int] = {
        "weights": int(weights) // shard[0],
        "adapter": adapter * 4 // shard[0],        # fp32 (peft upcasts the adapter)
        "gradients": adapter * 4 // shard[1],
        "optimizer": adapter * 8 // shard[1],      # AdamW's two moments
        "activations": int(activations),
        # at the backward's start the loss's tensors sit beside every layer's; then a layer's gradients pass
        "logits": tokens * shape.hidden * 4 if setup.fused else tokens * shape.vocab * LOGIT_BYTES,
        "backward": tokens * per_layer,
    }
    if setup.sharding == "params":  # a layer gathered whole for its forward and backward, the next one prefetched
        parts["gathered_layers"] = int(weights / max(shape.layers, 1) * 2)
    if not on_cuda and setup.bf16 and not setup.qlora:
        parts["autocast_weight_copies"] = (shape.layer_linear_params + shape.head_params) * 2
    offloaded = {}
    if setup.offload and setup.sharding != "none":  # every rank's shards in host RAM: the whole model's
        offloaded = {"offloaded_weights": parts.pop("weights") * ranks if setup.sharding == "params" else 0,
                     "offloaded_optimizer": parts.pop("optimizer") * ranks}
    if on_cuda:
        parts["cuda_context"] = CUDA_CONTEXT
        host_parts = {"runtime": HOST_RUNTIME_CUDA * ranks, "weights_at_load": shape.params * shape.dtype_bytes * ranks,
                      **offloaded}
        device_peak = sum(parts.values())
    else:
        dynamic = parts["activations"] + parts["logits"] + parts["backward"]
        parts["allocator"] = int(dynamic * CPU_ALLOCATOR_SLACK)
        parts["runtime"] = HOST_RUNTIME
        # CPU ranks are processes of one host: the host holds every rank's share
        host_parts = {name: size * ranks for name, size in parts.items()} | offloaded
        parts = host_parts
        device_peak = sum(parts.values())
    notes = {"ranks": ranks, "sharding": setup.sharding, "offload": setup.offload, "micro_batch": setup.batch,
             "tokens_per_micro_batch": tokens, "precision": "bf16" if setup.bf16 else "fp32",
             "fused_kernels": setup.fused, "gradient_checkpointing": setup.checkpointing,
             "activation_bytes_per_token_layer": per_layer}
    return StagePlan(device_peak, sum(host_parts.values()), parts, host_parts, notes)


def plan_merge(shape: ModelShape, cfg: PipelineConfig, device: Device) -> StagePlan:
    """The merge runs on the host: the base in the merge dtype, the adapter merged in place, a few check forwards."""
    dtype = merge_dtype_bytes(cfg, device)
    checks = cfg.merge.check_samples * cfg.data.max_length * shape.vocab * 4 * 2  # adapter's and merged logits
    parts = {"weights": shape.params * dtype, "check_logits": checks, "runtime": HOST_RUNTIME}
    return _host_stage(parts, device)


def merge_dtype_bytes(cfg: PipelineConfig, device: Device) -> int:
    """Bytes per weight of the merged model: merge.dtype, or for auto fp32 on a CPU and the base's bf16 on a GPU."""
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.merge.dtype, 4 if device.kind == "cpu" else 2)


def plan_quantize(shape: ModelShape, cfg: PipelineConfig, device: Device) -> StagePlan:
    """The quantize stage by its method: GPTQ (gptqmodel) or AutoRound."""
    if cfg.quantization.method == "autoround":
        return plan_autoround(shape, cfg, device)
    return plan_gptq(shape, cfg, device)


def plan_autoround(shape: ModelShape, cfg: PipelineConfig, device: Device) -> StagePlan:
    """AutoRound holds the model on the host and tunes one decoder block at a time on the device: every calibration
    window's input to the block (and the full-precision block's output it is tuned towards), the block's weights
    with a rounding offset and two clipping factors per weight group being tuned (fp32, with their gradients),
    and one batch's forward and backward through the block. It tunes in bf16 where the device takes it (CUDA, and
    CPUs: auto-round prefers bf16 there), casting an fp32 merged model once: both copies exist for that moment."""
    calibration, tuned = cfg.quantization.calibration, cfg.quantization.autoround
    seqlen = tuned.seqlen or calibration.max_length
    windows = max(1, calibration.n_samples * calibration.max_length // seqlen)  # rows are at most max_length
    windows = min(windows, tuned.nsamples or windows)
    dtype = 2 if device.kind == "cuda" else merge_dtype_bytes(cfg, device)
    layer_params = shape.layer_linear_params // max(shape.layers, 1)
    # the weights in fp32, their rounding offsets and the offsets' gradients, the quantize-dequantized copy
    tuning = layer_params * 4 * 4
    samples = windows * seqlen * shape.hidden * 2 * 2
    tokens = min(tuned.batch_size, windows) * seqlen
    backward = tokens * (3 * shape.intermediate + 6 * shape.hidden) * 4 * 2
    model_bytes = shape.params * dtype
    if device.kind == "cuda":
        parts = {"block_tuning": tuning, "calibration_activations": samples, "forward_backward": backward,
                 "embeddings": shape.head_params * 2, "cuda_context": CUDA_CONTEXT}
        host = {"runtime": HOST_RUNTIME_CUDA, "model": model_bytes}
        return StagePlan(sum(parts.values()), sum(host.values()), parts, host)
    parts = {"model": model_bytes, "bf16_cast": shape.params * 2 if dtype != 2 else 0, "block_tuning": tuning,
             "calibration_activations": samples, "forward_backward": backward, "runtime": HOST_RUNTIME}
    return _host_stage(parts, device)


def plan_gptq(shape: ModelShape, cfg: PipelineConfig, device: Device) -> StagePlan:
    """gptqmodel holds the model on the host and quantizes one decoder layer at a time on the device: that layer's
    weights (and their quantized copy), one Hessian per Linear (in_features squared, fp32), every calibration
    sample's input to the layer and its output (and GPTAQ's unquantized inputs), one batch's forward."""
    quant, calibration = cfg.quantization, cfg.quantization.calibration
    layer_weights = shape.layer_linear_params // max(shape.layers, 1) * 2
    gptaq = quant.gptaq_alpha is not None
    # a Hessian per Linear (GPTAQ: a second in x in matrix each), and for the largest Linear being solved its
    # inverse's Cholesky factor and fp32 working copies of the weight, its quantized values and their error
    hessians = sum(n_in * n_in * 4 for n_in, _ in shape.linears.values()) * (2 if gptaq else 1)
    n_in, n_out = max(shape.linears.values(), key=lambda io: io[0] * io[0] + 3 * io[0] * io[1])
    solve = n_in * n_in * 4 + 3 * n_in * n_out * 4
    streams = 3 if gptaq else 2
    # the merged model's dtype: bf16 on a GPU; on a CPU, merge.dtype (auto: fp32), and the activations with it
    dtype = 2 if device.kind == "cuda" else merge_dtype_bytes(cfg, device)
    samples = calibration.n_samples * calibration.max_length * shape.hidden * dtype * streams
    forward = calibration.batch_size * calibration.max_length * (3 * shape.intermediate + 4 * shape.hidden) * 4
    model_bytes = shape.params * dtype
    if device.kind == "cuda":
        parts = {"layer_weights": layer_weights * 2, "hessians": hessians, "solve": solve, "calibration_activations": samples,
                 "forward": forward, "embeddings": shape.head_params * 2, "cuda_context": CUDA_CONTEXT}
        host = {"runtime": HOST_RUNTIME_CUDA, "model": model_bytes}
        return StagePlan(sum(parts.values()), sum(host.values()), parts, host)
    parts = {"model": model_bytes, "layer_weights": layer_weights, "hessians": hessians, "solve": solve,
             "calibration_activations": samples, "forward": forward, "runtime": HOST_RUNTIME}
    return _host_stage(parts, device)


def plan_evaluate(shape: ModelShape, cfg: PipelineConfig, device: Device) -> StagePlan:
    """One model at a time; the largest is a full-precision one (the base or the merged model), scored in batches
    whose logits (at most every position of `evaluate.batch_size` full-length rows) are copied to fp32."""
    weights = shape.params * (2 if device.kind == "cuda" else 4)
    logits = cfg.evaluate.batch_size * cfg.data.max_length * shape.vocab * (2 + 4 if device.kind == "cuda" else 8)
    if device.kind == "cuda":
        parts = {"weights": weights, "logits": logits, "cuda_context": CUDA_CONTEXT}
        host = {"runtime": HOST_RUNTIME_CUDA, "weights_at_load": shape.params * shape.dtype_bytes}
        return StagePlan(sum(parts.values()), sum(host.values()), parts, host)
    return _host_stage({"weights": weights, "logits": logits, "runtime": HOST_RUNTIME}, device)


def plan_serve(shape: ModelShape, cfg: PipelineConfig, device: Device) -> StagePlan:
    """vLLM in its own process: on a GPU it reserves `gpu_memory_utilization` of the device; on a CPU the int4
    weights, `kv_cache_gib` of KV cache and its own runtime, beside this process's."""
    int4 = int(shape.layer_linear_params * (0.5 + 4 / cfg.quantization.group_size if cfg.quantization.group_size > 0
                                            else 0.5) + (shape.params - shape.layer_linear_params) * 2)
    if device.kind == "cuda":
        reserved = int(cfg.serving.gpu_memory_utilization * device.memory_bytes) if device.memory_bytes else int4
        parts = {"vllm_reserved": reserved}
        host = {"runtime": HOST_RUNTIME_CUDA, "vllm_runtime": HOST_RUNTIME_CUDA}
        return StagePlan(reserved, sum(host.values()), parts, host,
                         {} if device.memory_bytes else {"vllm_reserved": "gpu_memory_utilization of the GPU; "
                                                                           "planned here as the int4 weights only"})
    parts = {"weights_int4": int4, "kv_cache": cfg.serving.kv_cache_gib * GIB, "vllm_runtime": 2 * GIB,
             "runtime": HOST_RUNTIME}
    return StagePlan(sum(parts.values()), sum(parts.values()), parts, dict(parts))


def _host_stage(parts: dict[str, int], device: Device) -> StagePlan:
    """A stage that runs on the host whatever the device (on a GPU run, the device holds nothing of it)."""
    parts = {k: int(v) for k, v in parts.items()}
    total = sum(parts.values())
    if device.kind == "cuda":
        return StagePlan(0, total, {}, parts)
    return StagePlan(total, total, parts, dict(parts))


# ------------------------------------------------------------------------------------------------ the run


def plan_run(cfg: PipelineConfig, model_config: dict, device: Device) -> MemoryPlan:
    """Every stage the config's route runs, planned for `device`."""
    from pipeline.base_model import quantization_of

    quantized = quantization_of(model_config) is not None
    shape = model_shape(model_config, cfg.model.trust_remote_code)
    setup = train_setup(cfg, device, quantized, pick_batch(cfg, shape, device, quantized))
    stages = {"finetune": plan_finetune(shape, setup, device)}
    if not (quantized and cfg.model.quantized_base == "adapter"):
        stages["merge"] = plan_merge(shape, cfg, device)
        stages["quantize"] = plan_quantize(shape, cfg, device)
    if cfg.serving.check:
        stages["serve"] = plan_serve(shape, cfg, device)
    stages["evaluate"] = plan_evaluate(shape, cfg, device)
    return MemoryPlan(device, stages)


def budget(device: Device) -> int | None:
    """What a stage may plan to use: the device's free memory less a margin."""
    return None if device.memory_bytes is None else int(device.memory_bytes * (1 - FIT_MARGIN))


def pick_batch(cfg: PipelineConfig, shape: ModelShape, device: Device, quantized: bool) -> int:
    """The configured micro-batch, or for `auto` the largest power of two up to 256 that fits with the
    margin; 1 where nothing is known of the device's memory or even 1 does not fit (preflight then refuses)."""
    batch = cfg.training.per_device_train_batch_size
    if batch != "auto":
        return batch
    limit = budget(device)
    if limit is None:
        return 1
    fits = [b for b in (2 ** k for k in range(9))
            if plan_finetune(shape, train_setup(cfg, device, quantized, b), device).device_peak_bytes <= limit]
    return fits[-1] if fits else 1


def fit_problems(cfg: PipelineConfig, model_config: dict, device: Device, plan: MemoryPlan) -> list[str]:
    """A fine-tune that will not fit the device, with the settings that would make it fit and what each saves."""
    limit, finetune = budget(device), plan.stages["finetune"]
    if limit is None or finetune.device_peak_bytes <= limit:
        return []
    from pipeline.base_model import quantization_of

    quantized = quantization_of(model_config) is not None
    shape = model_shape(model_config, cfg.model.trust_remote_code)
    setup = train_setup(cfg, device, quantized, finetune.notes["micro_batch"])
    peak = finetune.device_peak_bytes
    options: list[tuple[str, int]] = []

    def option(setting: str, changed: TrainSetup) -> None:
        options.append((setting, plan_finetune(shape, changed, device).device_peak_bytes))

    from dataclasses import replace

    if not setup.checkpointing:
        option("--set training.gradient_checkpointing=true", replace(setup, checkpointing=True))
    if device.kind == "cuda" and not setup.fused:
        option("--set training.fused_kernels=auto with pip install '.[gpu]' (Liger kernels)", replace(setup, fused=True))
    if setup.batch > 1:
        smaller = max((b for b in range(1, setup.batch) if plan_finetune(
            shape, replace(setup, batch=b), device).device_peak_bytes <= limit), default=1)
        accumulation = cfg.training.gradient_accumulation_steps * math.ceil(setup.batch / smaller)
        option(f"--set training.per_device_train_batch_size={smaller} --set training.gradient_accumulation_steps="
               f"{accumulation} ({smaller * accumulation} examples per optimizer step, "
               f"{setup.batch * cfg.training.gradient_accumulation_steps} before)", replace(setup, batch=smaller))
    if not setup.qlora and not setup.quantized_base:
        option("--set training.qlora=true (pip install '.[qlora]'), the merge still using the full-precision base",
               replace(setup, qlora=True))
    if device.kind == "cuda" and device.count > 1 and setup.sharding != "params" and not setup.quantized_base:
        option(f"--set training.distributed=fsdp --set training.nproc={device.count} (FSDP2 over the "
               f"{device.count} visible GPUs: weights, gradients and optimizer states sharded, the global batch kept "
               f"by dividing gradient_accumulation_steps)",
               replace(setup, ranks=device.count, sharding="params", offload=False))
    shorter = max((n for n in (2 ** k for k in range(5, 16)) if n < setup.seq and plan_finetune(
        shape, replace(setup, seq=n), device).device_peak_bytes <= limit), default=None)
    if shorter:
        option(f"--set data.max_length={shorter} (longer rows are cut)", replace(setup, seq=shorter))
    if not any(p <= limit for _, p in options):
        combined = replace(setup, checkpointing=True, batch=1, qlora=not setup.quantized_base,
                           fused=setup.fused or device.kind == "cuda")
        option("all of: gradient checkpointing, micro-batch 1, QLoRA" + (", fused kernels" if device.kind == "cuda"
                                                                          else ""), combined)
    lines = [f"{setting}: saves {gib(peak - new)} -> {gib(new)} ({'fits' if new <= limit else 'not enough alone'})"
             for setting, new in sorted(options, key=lambda o: o[1]) if peak - new > 0.005 * peak]
    top = sorted(finetune.parts.items(), key=lambda kv: -kv[1])[:4]
    return [f"the fine-tune will not fit: the memory plan needs {gib(peak)} on {device.describe()}, and a run "
            f"may plan {gib(limit)} of it (a {FIT_MARGIN:.0%} margin); the most is "
            + ", ".join(f"{name} {gib(size)}" for name, size in top)
            + f" (micro-batch {setup.batch} of {setup.seq} tokens). Settings that would save memory: "
            + "; ".join(lines) + ". Rows much shorter than data.max_length also save with training.packing=true "
            "(the plan assumes full-length rows). The whole plan: the same command with --plan"]


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def render_plan(plan: MemoryPlan) -> str:
    """The plan as a table: one row per stage, its peaks, and its three largest parts."""
    rows = [f"memory plan for {plan.device.describe()}:",
            f"  {'stage':<9} {'device peak':>12} {'host peak':>12}  largest parts"]
    for name, stage in plan.stages.items():
        parts = stage.parts or stage.host_parts
        top = ", ".join(f"{k} {gib(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
        rows.append(f"  {name:<9} {gib(stage.device_peak_bytes):>12} {gib(stage.host_peak_bytes):>12}  {top}")
    finetune = plan.stages["finetune"].notes
    rows.append(f"  fine-tune: micro-batch {finetune['micro_batch']} x {finetune['tokens_per_micro_batch'] // finetune['micro_batch']}"
                f" tokens, {finetune['precision']}, fused kernels {'on' if finetune['fused_kernels'] else 'off'}, "
                f"gradient checkpointing {'on' if finetune['gradient_checkpointing'] else 'off'}")
    return "\n".join(rows)


def resolve_batch(cfg: PipelineConfig, plan: MemoryPlan) -> PipelineConfig:
    """The config with `training.per_device_train_batch_size: auto` replaced by the micro-batch the plan picked."""
    if cfg.training.per_device_train_batch_size != "auto":
        return cfg
    batch = plan.stages["finetune"].notes["micro_batch"]
    logger.info("training.per_device_train_batch_size auto: %d, the largest that the memory plan fits on %s",
                batch, plan.device.describe())
    training = cfg.training.model_copy(update={"per_device_train_batch_size": batch})
    return cfg.model_copy(update={"training": training})


def reset_peak_rss() -> None:
    """Start a new resident-memory high-water mark for this process (Linux: /proc/self/clear_refs); elsewhere a
    no-op, and the mark stays the process's since it started."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    """This process's resident-memory high-water mark since it started or since `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS
