"""llm-compressor's GPTQ W4A16 on the benchmark's model and calibration, scored on the benchmark's windows.

Runs inside llm-compressor's own virtual environment (it pins transformers <= 5.17, so it cannot share the
project's); benchmarks/quant_quality.py builds that environment and calls this script with a job file:

    <llmc venv>/bin/python benchmarks/llmc_gptq.py job.json result.json

job.json: model_dir, group_size, calibration (token id lists), windows (token id lists), score_original (bool),
second_windows (optional: a second text's windows, scored as `second_perplexity`).
The perplexity code is benchmarks/window_ppl.py, the same the other rows use.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from window_ppl import window_perplexity  # noqa: E402


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    result = quantize_and_score(job["model_dir"], job["group_size"], job["calibration"], job["windows"],
                                job.get("score_original", False), second_windows=job.get("second_windows"))
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")


def quantize_and_score(model_dir: str, group_size: int, calibration: list[list[int]], windows: list[list[int]],
                       score_original: bool = False, device: str = "cpu",
                       second_windows: list[list[int]] | None = None) -> dict:
    """llm-compressor GPTQ W4A16 (symmetric int4 groups, static act-order, its default damping) on `calibration`,
    then the quantized model's perplexity on `windows` (benchmarks/gpu.py calls this in-process where carried)."""
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    result = {"versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                           "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__}}
    if score_original:
        result["original_perplexity"] = window_perplexity(model, windows)
    dataset = Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * len(ids) for ids in calibration]})
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
               "actorder": "static"}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(calibration),
            max_seq_length=max(len(ids) for ids in calibration))
    result["quantize_seconds"] = time.perf_counter() - start
    if device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    result["settings"] = {**weights, "dampening_frac": recipe.dampening_frac, "block_size": recipe.block_size}
    result["perplexity"] = window_perplexity(model, windows)
    if second_windows:
        result["second_perplexity"] = window_perplexity(model, second_windows)
    result["max_levels_per_group"] = max_levels_per_group(model, group_size)
    return result


def max_levels_per_group(model, group_size: int) -> int:
    """Distinct weight values in any group of the first quantized layer: at most 16 if int4 was really applied."""
    import torch

    layer = next(m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    groups = layer.weight.detach().reshape(layer.weight.shape[0], -1, group_size)
    return max(len(torch.unique(groups[row, g])) for row in range(min(8, groups.shape[0]))
               for g in range(groups.shape[1]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
