"""The other CPU levers of the fine-tune, each measured alone against plain transformers Trainer + peft LoRA on the
default job (same model, rows, steps, batch), in one run, arms alternating, each run its own process:

    .venv/bin/python benchmarks/finetune_levers.py --steps 20 --repeats 2

Levers: torch.compile of the model (inductor's CPU backend; its compile time is inside the train time, as it would
be in an 80-step job), one dataloader worker, length-grouped batches (fewer padding tokens, another row order), and
the pipeline's own shared prefix and selective output head (`tasks.finetune.TokenCounter`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LEVERS = {
    "plain": {},
    "torch.compile": {"trainer": {"torch_compile": True}},
    "dataloader worker": {"trainer": {"dataloader_num_workers": 1}},
    "length-grouped batches": {"trainer": {"train_sampling_strategy": "group_by_length"}},
    "selective head": {"collator": {"selective_head": True}},
    "shared prefix + selective head": {"collator": {"selective_head": True, "shared_prefix": "sdpa"}},  # see one_run
}


def one_run(lever: str, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from pipeline.base_model import resolve_model_dir
    from pipeline.config import load_config
    from pipeline.data import read_dataset, tokenize_example
    from pipeline.shared_prefix import PrefixSharing
    from tasks.finetune import TokenCounter

    cfg = load_config("default")
    training, lora = cfg.training, cfg.lora
    base_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)
    torch.manual_seed(training.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_set = [tokenize_example(r, "chat", tokenizer, cfg.data.max_length) for r in read_dataset(cfg.data).train]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    options = dict(LEVERS[lever].get("collator", {}))
    if "shared_prefix" in options:
        options["shared_prefix"] = PrefixSharing.for_model(options["shared_prefix"], model.config)
    collator = TokenCounter(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), **options)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, learning_rate=training.learning_rate,
                                 per_device_train_batch_size=training.per_device_train_batch_size,
                                 warmup_steps=training.warmup_steps, lr_scheduler_type=training.lr_scheduler_type,
                                 logging_steps=1, save_strategy="no", seed=training.seed, data_seed=training.seed,
                                 report_to=[], disable_tqdm=True, use_cpu=True, remove_unused_columns=False,
                                 **LEVERS[lever].get("trainer", {}))
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator)
        result = trainer.train()
    seconds = result.metrics["train_runtime"]
    return {"lever": lever, "train_seconds": seconds, "tokens_per_second": collator.tokens / seconds,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        args.out.write_text(json.dumps(one_run(args.one, args.steps)))
        return 0
    levers = args.levers.split(",")
    runs: dict[str, list[dict]] = {lever: [] for lever in levers}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for lever in levers if repeat % 2 == 0 else levers[::-1]:
                out = Path(tmp) / "run.json"
                subprocess.run([sys.executable, __file__, "--one", lever, "--steps", str(args.steps),
                                "--out", str(out)], check=True, stderr=subprocess.DEVNULL)
                runs[lever].append(json.loads(out.read_text()))
                print(f"{lever}: {runs[lever][-1]['train_seconds']:.1f} s", flush=True)
    plain = statistics.median(r["tokens_per_second"] for r in runs["plain"]) if "plain" in runs else None
    print("| lever | real tokens/s, median (range) | vs plain | largest loss difference vs plain |")
    print("| --- | --- | --- | --- |")
    for lever, rs in runs.items():
        speeds = [r["tokens_per_second"] for r in rs]
        gap = max(abs(a - b) / a for a, b in zip(runs["plain"][0]["losses"], rs[0]["losses"], strict=True)) if plain else 0
        print(f"| {lever} | {statistics.median(speeds):.0f} ({min(speeds):.0f}-{max(speeds):.0f}) | "
              f"{statistics.median(speeds) / plain:.2f}x | {100 * gap:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
