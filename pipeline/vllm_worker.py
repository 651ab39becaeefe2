"""Run inside vLLM's own virtual environment: load a model folder in vLLM, answer prompts greedily, write JSON.

    <vllm venv>/bin/python pipeline/vllm_worker.py REQUEST.json RESULT.json

Started by the serve stage (tasks/serve_check.py); never imported by the pipeline at run time. It uses only the
standard library and vLLM (which brings its own transformers), so it imports nothing else of this project.

The request: {"model": dir, "form": "chat" | "text", "prompts": [...], "max_new_tokens": N, "max_model_len": N,
"dtype": "auto", "seed": 0, "engine_args": {...}, "warmup": false,
"repeats": 1, "lora": {"path": adapter dir, "max_lora_rank": N} (optional)}. The result: vLLM's version, whether the model
loaded (else vLLM's error), the quantization it chose, load and generation seconds (the median of `repeats`
passes), generated tokens, peak resident memory, and the answers (special tokens dropped, whitespace trimmed, as
the evaluate stage decodes). The kernels vLLM picks are read from its log by the stage. Exit 0 whenever a result
was written, a model vLLM refused included; any other exit is a crash.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def write_result(path: Path, result: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(path)


def main(request_path: str, result_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    result_file = Path(result_path)
    # In-process engine: one process to watch (and to kill on a timeout), and the kernel log lines reach this one.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams

    result: dict = {"vllm_version": vllm.__version__, "loaded": False}
    start = time.perf_counter()
    lora = request.get("lora")  # {"path": adapter dir, "max_lora_rank": N}: answer through a LoRA adapter
    engine_args = dict(request.get("engine_args", {}))
    if lora:
        engine_args.update(enable_lora=True, max_lora_rank=lora["max_lora_rank"], max_loras=1)
    try:
        llm = LLM(model=request["model"], tokenizer=request["model"], dtype=request.get("dtype", "auto"),
                  max_model_len=request["max_model_len"], seed=request.get("seed", 0), enforce_eager=True,
                  **engine_args)
    except Exception as exc:  # the model is refused (shapes, format, kernel): a finding, not a crash
        result.update(error=one_line(exc), traceback=traceback.format_exc()[-4000:],
                      load_seconds=round(time.perf_counter() - start, 2))
        write_result(result_file, result)
        return 0
    result.update(loaded=True, load_seconds=round(time.perf_counter() - start, 2),
                  quantization=llm.llm_engine.model_config.quantization)

    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], seed=request.get("seed", 0))
    if request["form"] == "chat":
        prompts = request["prompts"]
        generate = llm.chat
    else:  # token ids, as the evaluate stage tokenizes a plain prompt: no special tokens added
        tokenizer = llm.get_tokenizer()
        prompts = [{"prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)} for p in request["prompts"]]
        generate = llm.generate
    adapter = {}
    if lora:
        from vllm.lora.request import LoRARequest

        adapter = {"lora_request": LoRARequest("adapter", 1, lora["path"])}
    if request.get("warmup"):
        generate(prompts, params, use_tqdm=False, **adapter)
    timings = []
    for _ in range(request.get("repeats", 1)):  # benchmarks/serving.py times several passes; the check, one
        start = time.perf_counter()
        outputs = generate(prompts, params, use_tqdm=False, **adapter)
        timings.append(time.perf_counter() - start)
    seconds = sorted(timings)[len(timings) // 2]
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result.update(generate_seconds=round(seconds, 2), generated_tokens=tokens,
                  tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else None,
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  answers=[o.outputs[0].text.strip() for o in outputs])
    write_result(result_file, result)
    return 0


if __name__ == "__main__":  # the guard vLLM needs: it may spawn processes that re-import this file
    sys.exit(main(*sys.argv[1:3]))
