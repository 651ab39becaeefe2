"""Stage (the adapter route): measure an already-quantized base alone and with the adapter trained on it, on the
same held-out rows, and score vLLM's answers from the serve check; write metrics, report, plot.

This route has no full-precision model and no re-quantization (`model.quantized_base: adapter`): what ships is the
adapter, applied at load time to the quantized base. So the table has two rows, `base` (the quantized base as it
was downloaded) and `adapted` (base + adapter, as transformers + peft load the release), and the gate asks the
adapter to improve on the base (pipeline/gate.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.base_model import resolve_model_dir
from pipeline.config import EvaluateConfig
from pipeline.keys import code_version
from pipeline.report import write_evaluation
from pipeline.run import RunContext
from pipeline.stage import StageArtifact, local_copy, run_stage
from tasks.data import read_data
from tasks.evaluate import evaluation_metrics, folder_bytes, score_model
from tasks.serve_check import RESULT as SERVING_RESULT

logger = logging.getLogger(__name__)


def score_base_and_adapter(base_dir: Path, adapter_dir: Path, rows: list[dict], form: str, cfg: EvaluateConfig,
                           max_length: int) -> dict[str, dict[str, Any]]:
    """The quantized base alone, then with the adapter, on the same rows: loaded once, in bf16 (the GPTQ torch
    kernel's dtype), the adapter applied by peft as a user of the release would."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    scores = {"base": score_model(model, tokenizer, rows, form, cfg, max_length)}
    adapted = PeftModel.from_pretrained(model, adapter_dir)
    scores["adapted"] = score_model(adapted, tokenizer, rows, form, cfg, max_length)
    for name, score in scores.items():
        logger.info("%s: perplexity %.3f%s (%.0f s)", name, score["perplexity"],
                    f", exact match {score['exact_match']:.1f}%" if "exact_match" in score else "", score["seconds"])
    return scores


def evaluate_adapter(run: RunContext, data: StageArtifact, served: StageArtifact) -> StageArtifact:
    """Evaluate into `<store>/<run>/evaluate/`, or reuse an evaluation of the same adapter and base with the same
    config. The adapter comes from the serve check's lineage."""
    cfg, model = run.cfg.evaluate, run.cfg.model
    adapter = served.inputs["adapter"]
    determinants = {"evaluate": cfg.model_dump(), "max_length": run.cfg.data.max_length,
                    "code": code_version(__name__)}

    def build(out_dir: Path) -> dict[str, Any]:
        dataset = read_data(run, data)
        rows = dataset.eval[: cfg.max_samples]
        base_dir = resolve_model_dir(model.name_or_path, model.revision)
        adapter_dir = local_copy(run.store, adapter)
        scores = score_base_and_adapter(base_dir, adapter_dir, rows, dataset.form, cfg, run.cfg.data.max_length)
        sizes = {"base": folder_bytes(base_dir), "adapted": folder_bytes(base_dir) + folder_bytes(adapter_dir)}
        quantization = adapter.metrics.get("base_quantization")
        notes = [f"The base is already quantized ({quantization}) and was used as it is: the adapter "
                 f"({adapter.metrics.get('method')}) was trained on it and ships beside it, unmerged; nothing was "
                 "merged or re-quantized."]
        serving = json.loads((local_copy(run.store, served) / SERVING_RESULT).read_text())
        metrics = evaluation_metrics(scores, rows, dataset.form, sizes, notes, cfg, serving, shipped="adapted")
        training_log = json.loads((adapter_dir / "training_log.json").read_text())
        write_evaluation(out_dir, metrics | {"route": "adapter"}, training_log)
        return metrics | {"route": "adapter"}

    return run_stage(run, "evaluate", determinants, build, inputs={"data": data, "adapter": adapter, "served": served})
