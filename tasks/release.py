"""Stage 5, only for a run that passed the gate: the shippable folder (GPTQ model + model card + metrics), and the
store's `latest.json` moved to it. A failed or regressed run never touches either."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import task

from pipeline.config import DataConfig, ModelConfig, QuantizationConfig, StoreConfig
from pipeline.stage import StageArtifact, local_copy, run_stage
from pipeline.store import open_store, write_json

LATEST = "latest.json"


def model_card(model: ModelConfig, data: DataConfig, quant: QuantizationConfig, metrics: dict[str, Any]) -> str:
    """A Hugging Face model card: YAML metadata, then what was done and what it measured."""
    from tasks.evaluate import metrics_table

    front = {
        "base_model": model.name_or_path,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["gptq", f"int{quant.bits}", "lora", "finetune-then-quantize"],
        "datasets": [data.path],
        "quantization": {"method": "gptq", "bits": quant.bits, "group_size": quant.group_size, "sym": quant.sym,
                         "desc_act": quant.desc_act, "act_group_aware": quant.act_group_aware,
                         "checkpoint_format": "gptq", "quantizer": "gptqmodel"},
        "model-index": [{"name": "gptq", "results": [{"task": {"type": "text-generation"}, "metrics": [
            {"type": "perplexity", "value": round(metrics["models"]["gptq"]["perplexity"], 4)}] + (
            [{"type": "exact_match", "value": round(metrics["models"]["gptq"]["exact_match"], 2)}]
            if metrics["models"]["gptq"].get("exact_match") is not None else [])}]}],
    }
    import yaml

    notes = "".join(f"\n> {n}\n" for n in metrics["notes"])
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# {model.name_or_path}, LoRA fine-tuned and GPTQ int{quant.bits}\n\n"
            f"LoRA fine-tuned on `{data.path}` in full precision, merged, then quantized with GPTQ (gptqmodel, "
            f"int{quant.bits}, group size {quant.group_size}, {'symmetric' if quant.sym else 'asymmetric'}) on "
            f"calibration rows from the training data. Standard GPTQ v1 checkpoint: loads with transformers "
            f"(with optimum and gptqmodel installed), vLLM and TGI.\n\n"
            f"## Evaluation on {metrics['eval_rows']} held-out rows\n\n{metrics_table(metrics['models'])}\n{notes}")


def release_stage(model: ModelConfig, data: DataConfig, quant: QuantizationConfig, quantized: StageArtifact,
                  evaluation: StageArtifact, store_cfg: StoreConfig, run_name: str) -> StageArtifact:
    store = open_store(store_cfg.uri, store_cfg.credentials_block)

    def build(out_dir: Path) -> dict[str, Any]:
        shutil.copytree(local_copy(store, quantized), out_dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("manifest.json", "gptq_logs"))
        report = local_copy(store, evaluation)
        metrics = json.loads((report / "metrics.json").read_text())
        for name in ("metrics.json", "report.md", "training_loss.png"):
            shutil.copy2(report / name, out_dir / name)
        (out_dir / "README.md").write_text(model_card(model, data, quant, metrics))
        return {"models": metrics["models"]}

    artifact = run_stage(store, run_name, "release", {"card": {"base_model": model.name_or_path, "data": data.path}},
                         build, inputs={"quantized": quantized, "evaluation": evaluation})
    write_json(store, store.path(LATEST), {"run_name": run_name, "uri": artifact.uri, "key": artifact.key,
                                           "released_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return artifact


@task(name="release")
def release(model: ModelConfig, data: DataConfig, quant: QuantizationConfig, quantized: StageArtifact,
            evaluation: StageArtifact, store: StoreConfig, run_name: str) -> StageArtifact:
    return release_stage(model, data, quant, quantized, evaluation, store, run_name)
