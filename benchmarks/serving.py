"""Throughput side by side, on one machine in one run: vLLM int4 vs transformers int4 vs transformers full-precision.

    .venv/bin/python benchmarks/serving.py --run artifacts/default [--prompts 200] [--repeats 3] [--batch-size 16]

`--run` is a finished run's folder in a local store (make run's `artifacts/default`): its held-out prompts
(`data/eval.jsonl`), merged model (`merge/`) and GPTQ model (`quantize/`). Each engine answers the same prompts
greedily (chat template, the evaluate stage's `max_new_tokens`) in its own process, so each one's peak resident
memory is its own: transformers in batches of `--batch-size` (the evaluate stage's setting), vLLM (its own
environment, `pipeline/vllm_worker.py`) with continuous batching over all prompts. Tokens/s is generated tokens
(end-of-turn included) over the median of `--repeats` timed passes after one warm-up pass. Prints a table and
writes benchmarks/serving.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def transformers_child(model_dir: str, request_file: str, result_file: str) -> None:
    """In its own process: load one model with transformers, answer the prompts `repeats` times, write the result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    request = json.loads(Path(request_file).read_text())
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quantized = "quantization_config" in json.loads((Path(model_dir) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, **({} if quantized else {"dtype": torch.float32}))
    model.eval()
    load_seconds = time.perf_counter() - start
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in request["prompts"]]
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                else [model.generation_config.eos_token_id or tokenizer.eos_token_id])

    def answer_all() -> tuple[list[str], int]:
        answers, tokens, size = [], 0, request["batch_size"]
        for first in range(0, len(texts), size):
            enc = tokenizer(texts[first:first + size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=request["max_new_tokens"], do_sample=False,
                                     pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            new = out[:, enc["input_ids"].shape[1]:]
            for row in new.tolist():  # tokens up to and including the first end-of-turn, as vLLM counts them
                tokens += next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return answers, tokens

    answer_all()  # warm-up
    timings = []
    for _ in range(request["repeats"]):
        start = time.perf_counter()
        answers, tokens = answer_all()
        timings.append(time.perf_counter() - start)
    seconds = statistics.median(timings)
    Path(result_file).write_text(json.dumps({
        "load_seconds": round(load_seconds, 2), "generate_seconds": round(seconds, 2), "generated_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1), "answers": answers,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_transformers(model_dir: Path, request: dict, scratch: Path) -> dict:
    request_file, result_file = scratch / "request.json", scratch / "result.json"
    request_file.write_text(json.dumps(request))
    subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(request_file), str(result_file)],
                   check=True)
    return json.loads(result_file.read_text())


def run_vllm(model_dir: Path, request: dict, scratch: Path) -> dict:
    from pipeline.config import ServingConfig
    from pipeline.vllm_env import VLLM_CPU, vllm_python
    from tasks.serve_check import run_worker

    vllm_request = {"model": str(model_dir), "form": "chat", "prompts": request["prompts"],
                    "max_new_tokens": request["max_new_tokens"], "max_model_len": request["max_model_len"],
                    "warmup": True, "repeats": request["repeats"]}
    result = run_worker(vllm_python(VLLM_CPU), vllm_request, scratch, ServingConfig(), 3600)
    if not result["loaded"]:
        raise SystemExit(f"vLLM could not load {model_dir}: {result['error']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "artifacts" / "default", help="a finished run's folder")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts answered by each engine")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per engine (median)")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers' generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serving.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        transformers_child(*args.child)
        return 0

    rows = [json.loads(line) for line in (args.run / "data" / "eval.jsonl").read_text().splitlines()][: args.prompts]
    prompts = [r["messages"][:-1] for r in rows]
    references = [r["messages"][-1]["content"].strip() for r in rows]
    request = {"prompts": prompts, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
               "batch_size": args.batch_size, "max_model_len": 512}
    engines = {"vLLM int4 (GPTQ)": (run_vllm, args.run / "quantize"),
               "transformers int4 (GPTQ)": (run_transformers, args.run / "quantize"),
               "transformers fp32 (merged)": (run_transformers, args.run / "merge")}
    results = {}
    for name, (runner, model_dir) in engines.items():
        with tempfile.TemporaryDirectory() as scratch:
            print(f"{name}: {model_dir}", flush=True)
            results[name] = runner(model_dir, request, Path(scratch))
    reference_answers = results["transformers int4 (GPTQ)"]["answers"]
    table = ["| engine | load s | tokens/s | generated tokens | peak RSS | exact match | same answers as transformers int4 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    summary = {"run": str(args.run), "prompts": len(prompts), "repeats": args.repeats, "batch_size": args.batch_size,
               "engines": {}}
    for name, r in results.items():
        em = 100 * sum(a == ref for a, ref in zip(r["answers"], references, strict=True)) / len(references)
        same = 100 * sum(a == b for a, b in zip(r["answers"], reference_answers, strict=True)) / len(references)
        summary["engines"][name] = {k: v for k, v in r.items() if k != "answers"} | {"exact_match": em,
                                                                                      "same_answers": same}
        table.append(f"| {name} | {r['load_seconds']:.1f} | {r['tokens_per_second']:.1f} | {r['generated_tokens']} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {em:.1f}% | {same:.1f}% |")
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
