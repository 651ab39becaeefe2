"""Every route to a fine-tuned 4-bit model, side by side, in one run: the same task, data, eval rows and scoring.

    .venv/bin/python benchmarks/routes.py [--config default] [--store /tmp/routes] [--routes a,b,c,d] [--set k=v]...

(a) LoRA on the full-precision base -> merge -> GPTQ int4 (the default route)
(b) QLoRA: LoRA over an nf4 copy of the base (bitsandbytes) -> merge into full precision -> GPTQ int4
(c) LoRA on a GPTQ int4 base, shipped unmerged (model.quantized_base=adapter)
(d) prompt tuning on that GPTQ int4 base, shipped unmerged

The GPTQ int4 base of (c) and (d) is the config's own base quantized by this pipeline's quantize function, with the
same settings and calibration rows as route (a)'s quantize stage, so the routes start from the same model. Each
route is the pipeline's command line in its own process (`--run-name routes-<x>`, one store: the data stage and
the base's scores are shared); the serve check is off (each route's vLLM figures come from its own check: see
docs/serving.md). Per route: the shipped model's exact match and perplexity on the eval rows (GPTQ for a and b, base
+ adapter for c and d), the fine-tune's steps and seconds, the run's peak resident memory (the whole process, every
stage), and the release folder's weights (what a user downloads; c and d also need their base). Prints a markdown
table and writes benchmarks/routes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUTES = {
    "a": ("LoRA, full precision -> merge -> GPTQ", []),
    "b": ("QLoRA nf4 -> merge -> GPTQ", ["training.qlora=true"]),
    "c": ("LoRA on the GPTQ base, unmerged", ["model.quantized_base=adapter"]),
    "d": ("prompt tuning on the GPTQ base, unmerged", ["model.quantized_base=adapter", "training.method=prompt_tuning",
                                                        "training.learning_rate=0.03"]),
}


def gptq_base(config: str, overrides: list[str], folder: Path) -> Path:
    """The config's base quantized by the pipeline's quantize function, as route (a)'s quantize stage does it."""
    if (folder / "config.json").is_file():
        return folder
    import shutil

    from transformers import AutoTokenizer

    from pipeline.base_model import resolve_model_dir
    from pipeline.config import load_config
    from pipeline.data import read_dataset
    from tasks.quantize import calibration_ids, calibration_sample, quantize_model

    cfg = load_config(config, overrides)
    base = resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)
    tokenizer = AutoTokenizer.from_pretrained(base)
    dataset, calib = read_dataset(cfg.data), cfg.quantization.calibration
    sample = calibration_sample(dataset.train, calib.n_samples, cfg.data.seed)  # the training rows, as in (a)
    calibration = calibration_ids(sample, dataset.form, tokenizer, calib.max_length)
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    quantize_model(base, scratch, cfg.quantization, calibration, cfg.data.seed)
    for name in os.listdir(base):
        if name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy2(base / name, scratch / name)
    scratch.rename(folder)
    return folder


def run_route(config: str, store: Path, name: str, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "flows.finetune_then_quantize", "--config", config, "--store", str(store),
               "--run-name", f"routes-{name}", "--set", "serving.check=false"]
    for override in overrides:
        command += ["--set", override]
    log = store / f"routes-{name}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this run's own peak resident memory
    seconds, code = time.perf_counter() - start, os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"route {name} failed (exit {code}); its log: {log}")
    run = json.loads((store / f"routes-{name}" / "run.json").read_text())
    models = run["stages"]["evaluate"]["metrics"]["models"]
    shipped = "adapted" if "adapted" in models else "gptq"
    release = store / f"routes-{name}" / "release"
    finetune = run["stages"]["finetune"]["metrics"]
    return {"route": name, "status": run["status"], "error": run.get("error"), "wall_seconds": round(seconds, 1),
            "exact_match": models[shipped]["exact_match"], "perplexity": models[shipped]["perplexity"],
            "base_exact_match": models["base"]["exact_match"], "base_perplexity": models["base"]["perplexity"],
            "steps": finetune["steps"], "train_seconds": round(finetune["train_seconds"], 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024,
            "shipped_bytes": sum(p.stat().st_size for p in release.glob("*.safetensors")) if release.is_dir() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--store", type=Path, default=Path("/tmp/routes"))
    parser.add_argument("--routes", default="a,b,c,d")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.store.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.routes.split(","):
        label, route_overrides = ROUTES[name]
        overrides = list(args.overrides) + route_overrides
        if "model.quantized_base=adapter" in route_overrides:
            start = time.perf_counter()
            base = gptq_base(args.config, args.overrides, args.store / "gptq-base")
            print(f"GPTQ base ready in {time.perf_counter() - start:.0f} s: {base}", flush=True)
            overrides.append(f"model.name_or_path={base}")
        result = run_route(args.config, args.store, name, overrides) | {"label": label}
        print(json.dumps(result), flush=True)
        results.append(result)
    (ROOT / "benchmarks" / "routes.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| route | status | exact match | perplexity | steps | train s | run peak RSS | shipped weights |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB"
        size = f"{r['shipped_bytes'] / 2**20:.1f} MiB" if r["shipped_bytes"] else "–"
        print(f"| ({r['route']}) {r['label']} | {r['status']} | {r['exact_match']:.1f}% | {r['perplexity']:.3f} | "
              f"{r['steps']} | {r['train_seconds']} | {rss} | {size} |")


if __name__ == "__main__":
    main()
