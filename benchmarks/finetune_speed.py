"""The pipeline's fine-tune against what a user writes by hand, side by side in one run: plain transformers `Trainer`
+ peft LoRA (padded batches) and `tasks.finetune.train_lora`, on the same model, rows, order, LoRA settings, steps and
batch, each in the precision the pipeline's probe measures fastest on this machine.

    .venv/bin/python benchmarks/finetune_speed.py --config default --steps 80 --repeats 3

Each run is its own process (a clean allocator and resident-memory mark), the arms alternating. Reported: real
(non-padding) tokens per second, peak RSS while training, and the loss curves compared step by step. The same
functions run the GPU shape in `benchmarks/gpu.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("finetune_speed")
ARMS = ("baseline", "pipeline")


def baseline_finetune(base_dir: Path, data, lora, training, bf16: bool | None = None) -> dict:
    """Plain transformers Trainer + peft LoRA as a user writes it: padded batches, same rows, same settings; bf16
    mixed precision where `bf16` says (default: on a GPU)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from pipeline.data import read_dataset, tokenize_example
    from pipeline.memory import peak_rss_bytes, reset_peak_rss
    from tasks.finetune import TokenCounter

    torch.manual_seed(training.seed)
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu if bf16 is None else bf16
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    dataset = read_dataset(data)
    train_set = [tokenize_example(r, dataset.form, tokenizer, data.max_length) for r in dataset.train]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16 if on_gpu else torch.float32)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    collator = TokenCounter(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=training.max_steps, learning_rate=training.learning_rate,
                                 per_device_train_batch_size=training.per_device_train_batch_size,
                                 warmup_steps=training.warmup_steps, lr_scheduler_type=training.lr_scheduler_type,
                                 weight_decay=training.weight_decay, logging_steps=1, save_strategy="no", bf16=bf16,
                                 seed=training.seed, data_seed=training.seed, report_to=[], disable_tqdm=True,
                                 use_cpu=not on_gpu, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        result = trainer.train()
    seconds = result.metrics["train_runtime"]
    return {"train_seconds": seconds, "train_tokens": collator.tokens, "tokens_per_second": collator.tokens / seconds,
            "precision": "bf16" if bf16 else "fp32", "steps": trainer.state.global_step,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
            "host_peak_bytes": peak_rss_bytes(),
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}


def project_finetune(base_dir: Path, data, lora, training, out_dir: Path) -> dict:
    """This project's fine-tune function (tasks.finetune.train_lora), no store, no Prefect."""
    from pipeline.data import read_dataset
    from tasks.finetune import train_lora

    metrics = train_lora(base_dir, read_dataset(data), data.max_length, lora, training, out_dir,
                         out_dir.with_name(out_dir.name + "-checkpoints"))
    losses = [e["loss"] for e in json.loads((out_dir / "training_log.json").read_text())]
    return {**metrics, "losses": losses}


def loss_gap(baseline: list[float], ours: list[float]) -> float:
    """The largest relative difference between two loss curves, step by step."""
    return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(baseline, ours, strict=True))


def one_arm(arm: str, config: str, steps: int, overrides: list[str]) -> dict:
    """One run of `arm` on `config`'s model, rows and settings (`steps` steps, a loss logged each step)."""
    from pipeline.base_model import resolve_model_dir
    from pipeline.config import load_config
    from tasks.finetune import training_precision

    cfg = load_config(config, [*overrides, f"training.max_steps={steps}", "training.logging_steps=1",
                               f"training.save_steps={10 ** 6}"])
    base_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)
    if arm == "baseline":
        from transformers import AutoTokenizer

        from pipeline.data import read_dataset, tokenize_example

        # the precision the pipeline's probe picks here: the baseline gets this machine's best arithmetic too
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        dataset = read_dataset(cfg.data)
        rows = [tokenize_example(r, dataset.form, tokenizer, cfg.data.max_length) for r in dataset.train]
        import torch

        on_gpu = torch.cuda.is_available()
        choice = training_precision(cfg.training, json.loads((base_dir / "config.json").read_text()), rows, None,
                                    on_gpu)
        return baseline_finetune(base_dir, cfg.data, cfg.lora, cfg.training, bf16=choice.bf16)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = project_finetune(base_dir, cfg.data, cfg.lora, cfg.training, Path(tmp) / "adapter")
    return {k: metrics[k] for k in ("train_seconds", "train_tokens", "tokens_per_second", "precision", "steps",
                                    "peak_memory_bytes", "host_peak_bytes", "losses")
            } | {"precision_choice": metrics["precision_choice"], "levers": metrics.get("levers")}


def cpu_description() -> dict:
    from pipeline.precision import cpu_identity

    flags = ""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
        flags = " ".join(f for f in line.split(":", 1)[1].split() if f in wanted)
    except (OSError, StopIteration):
        pass
    return {"model": cpu_identity()["model"], "cores": os.cpu_count(), "flags": flags, "machine": platform.machine()}


def summarize(runs: dict[str, list[dict]]) -> dict:
    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    summary = {arm: {"tokens_per_second": spread([r["tokens_per_second"] for r in rs]),
                     "host_peak_bytes": spread([r["host_peak_bytes"] for r in rs]),
                     "train_seconds": spread([r["train_seconds"] for r in rs]),
                     "precision": rs[0]["precision"]} for arm, rs in runs.items()}
    base, ours = summary["baseline"], summary["pipeline"]
    summary["speedup"] = ours["tokens_per_second"]["median"] / base["tokens_per_second"]["median"]
    summary["loss_gap_max"] = max(loss_gap(b["losses"], p["losses"])
                                  for b, p in zip(runs["baseline"], runs["pipeline"], strict=False))
    return summary


def table(report: dict) -> str:
    s = report["summary"]
    lines = ["| arm | precision | real tokens/s, median (range) | train s, median | peak RSS, median |",
             "| --- | --- | --- | --- | --- |"]
    for arm in ARMS:
        a = s[arm]
        t = a["tokens_per_second"]
        lines.append(f"| {arm} | {a['precision']} | {t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | "
                     f"{a['train_seconds']['median']:.1f} | {a['host_peak_bytes']['median'] / 2 ** 30:.2f} GiB |")
    lines.append(f"\nspeed-up {s['speedup']:.2f}x; largest step-by-step loss difference {100 * s['loss_gap_max']:.3f}%")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, both arms")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("finetune_speed").setLevel(logging.INFO)
    if args.arm:
        result = one_arm(args.arm, args.config, args.steps, args.overrides)
        args.out.write_text(json.dumps(result))
        return 0
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
                out = Path(tmp) / f"{arm}-{repeat}.json"
                started = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--arm", arm, "--config", args.config, "--steps",
                                str(args.steps), "--out", str(out), *(f"--set={o}" for o in args.overrides)],
                               check=True)
                runs[arm].append(json.loads(out.read_text()))
                logger.info("%s run %d: %.0f real tokens/s (%.0f s in all)", arm, repeat + 1,
                            runs[arm][-1]["tokens_per_second"], time.perf_counter() - started)
    import torch

    report = {"cpu": cpu_description(), "torch": torch.__version__, "config": args.config, "steps": args.steps,
              "repeats": args.repeats, "overrides": args.overrides, "runs": runs, "summary": summarize(runs)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["cpu"]))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
