"""Stage: the quantized model served by vLLM, as users will serve it, answering the evaluate stage's prompts.

vLLM runs in its own environment (pipeline/vllm_env.py) as a separate process (pipeline/vllm_worker.py): it loads
the GPTQ folder, answers the held-out prompts through the model's own chat template with greedy decoding, and
reports its version, the quantization and kernels it chose, load time and tokens/s. The answers go to
`serving.json`; the evaluate stage scores them against the references and against transformers' GPTQ answers,
and the gate refuses a release vLLM cannot load or answers worse.

    python -m tasks.serve_check FOLDER [--config default]    # check any GPTQ folder by hand; prints the result

A model vLLM refuses is a finding (recorded, then the gate fails); an environment that cannot be built, or a vLLM
that crashes or hangs, fails the stage, or is skipped and said so when `serving.on_error: skip`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import vllm_worker
from pipeline.base_model import resolve_model_dir
from pipeline.cache import cache_root
from pipeline.config import PipelineConfig, ServingConfig
from pipeline.data import split_prompt
from pipeline.errors import BadInputError
from pipeline.keys import code_version
from pipeline.report import vllm_lora_rank
from pipeline.run import RunContext
from pipeline.stage import StageArtifact, local_copy, run_stage
from pipeline.store import describe_files
from pipeline.vllm_env import (
    VllmUnavailable,
    build_in_background,
    cannot_check_here,
    interpreter_env,
    requirement_for,
    vllm_python,
    will_check,
)
from tasks.data import read_data

logger = logging.getLogger(__name__)
RESULT = "serving.json"
LOG = "vllm.log"
KERNEL_LINE = re.compile(r"Using (\w+) for (\w+LinearMethod)")


class VllmCrashed(RuntimeError):
    """vLLM died or hung during the check (not a model it refused); the message carries the end of its log."""


def check_model_folder(folder: Path) -> None:
    """Refuse, before vLLM starts, a folder that is not a quantized model checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder; give the release folder (the one with config.json and "
                            f"model.safetensors), e.g. artifacts/default/release")
    config = folder / "config.json"
    if not config.is_file() or not any(folder.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise BadInputError(f"{folder} is not a model folder (it holds {found}; a model has config.json and "
                            f"*.safetensors); give the run's release/ or quantize/ folder")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{config} is not valid JSON ({exc}); the folder is not a model") from exc


def worker_request(model_dir: Path, rows: list[dict], form: str, cfg: PipelineConfig, cuda: bool,
                   lora: Path | None = None) -> dict[str, Any]:
    """What the worker is asked: the evaluate stage's prompts and generation length, greedy; with `lora`, every
    answer goes through that adapter (vLLM's LoRA support, on the base as it is)."""
    prompts = [split_prompt(r, form)[0] for r in rows]
    engine = {"gpu_memory_utilization": cfg.serving.gpu_memory_utilization} if cuda else {}
    request = {"model": str(model_dir), "form": "chat" if form == "chat" else "text", "prompts": prompts,
               "max_new_tokens": cfg.evaluate.max_new_tokens,
               "max_model_len": cfg.data.max_length + cfg.evaluate.max_new_tokens, "seed": cfg.data.seed,
               "engine_args": engine}
    if lora is not None:
        request["lora"] = {"path": str(lora), "max_lora_rank": vllm_lora_rank(cfg.lora.r)}
    return request


def run_worker(python: Path, request: dict[str, Any], out_dir: Path, serving: ServingConfig,
               timeout_s: float) -> dict[str, Any]:
    """Run the worker in vLLM's environment; its log goes to `out_dir/vllm.log`; return its result."""
    request_file, result_file, log_file = out_dir / "request.json", out_dir / RESULT, out_dir / LOG
    request_file.write_text(json.dumps(request))
    env = interpreter_env(VLLM_CPU_KVCACHE_SPACE=str(serving.kv_cache_gib), TOKENIZERS_PARALLELISM="false",
                          HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    start = time.perf_counter()
    with open(log_file, "w") as log:
        process = subprocess.Popen([str(python), vllm_worker.__file__, str(request_file), str(result_file)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out_dir,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise VllmCrashed(f"vLLM did not finish the check within serving.timeout_s ({serving.timeout_s} s, "
                              f"environment build included) and was stopped; {tail(log_file)}") from None
    request_file.unlink()
    if code != 0 or not result_file.is_file():
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise VllmCrashed(f"vLLM {how} during the check, after {time.perf_counter() - start:.0f} s; {tail(log_file)}")
    result = json.loads(result_file.read_text())
    log_text = log_file.read_text(errors="replace")
    result["kernels"] = {method: kernel for kernel, method in KERNEL_LINE.findall(log_text)}
    return result


def tail(log_file: Path, lines: int = 8) -> str:
    """The end of vLLM's log for an error message, and where its whole log is kept: a failed stage's folder is
    removed, so the log is copied to the machine cache's `logs/` first."""
    if not log_file.is_file() or not (text := log_file.read_text(errors="replace").strip().splitlines()):
        return "it wrote no log"
    kept = cache_root() / "logs" / f"vllm-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(log_file, kept)
    return f"its log ({kept}) ends: " + " | ".join(line.strip()[:300] for line in text[-lines:])


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The stage's metrics: the result without the answers."""
    return {k: v for k, v in result.items() if k not in ("answers", "traceback")}


def prepare(run: RunContext) -> None:
    """At the start of a run: if the check will need vLLM's environment (a LoRA adapter or a merged model: vLLM does
    not serve prompt tuning) and this machine has none yet, start building it now, beside the fine-tune, rather
    than when the serve stage begins."""
    if will_check(run.cfg.serving) and not run.cfg.serving.python and run.cfg.training.method == "lora":
        build_in_background(requirement_for(run.cfg.serving), run.cfg.serving.pip_args, run.cfg.serving.timeout_s)


def serve_check(run: RunContext, data: StageArtifact, quantized: StageArtifact) -> StageArtifact:
    """Check the quantized model in vLLM into `<store>/<run>/serve/` (serving.json, vllm.log), or reuse a check of
    the same model with the same vLLM and prompts. A check skipped because vLLM was unavailable is retried."""

    def check(requirement: str, cuda: bool, out_dir: Path) -> dict[str, Any]:
        return check_in_vllm(run, data, local_copy(run.store, quantized), quantized.uri, requirement, cuda, out_dir)

    return checked_stage(run, {}, {"data": data, "quantized": quantized}, check)


def serve_adapter_check(run: RunContext, data: StageArtifact, adapter: StageArtifact) -> StageArtifact:
    """The adapter route's check: vLLM loads the quantized base as it is and answers through the adapter, as a
    LoRA module; a prompt-tuning adapter, which vLLM does not serve, is recorded as not checked, with why."""
    model = run.cfg.model
    base_dir = resolve_model_dir(model.name_or_path, model.revision)
    base = {"name_or_path": model.name_or_path, "files": {k: v["sha256"] for k, v in describe_files(base_dir).items()}}

    def check(requirement: str, cuda: bool, out_dir: Path) -> dict[str, Any]:
        if adapter.metrics.get("method") != "lora":
            return {"checked": False, "reason": f"vLLM serves LoRA adapters, not {adapter.metrics.get('method')} "
                                                "ones: the release is served with transformers + peft"}
        return check_in_vllm(run, data, base_dir, f"{model.name_or_path} with the adapter {adapter.uri}",
                             requirement, cuda, out_dir, lora=local_copy(run.store, adapter))

    return checked_stage(run, {"base": base}, {"data": data, "adapter": adapter}, check)


def checked_stage(run: RunContext, determinants: dict[str, Any], inputs: dict[str, StageArtifact],
                  check: Callable[[str, bool, Path], dict[str, Any]]) -> StageArtifact:
    """The serve stage around one `check(requirement, cuda, out_dir) -> result`: off when serving.check is off,
    skipped (and retried next run) after an error when serving.on_error is skip, reused like any stage."""
    import torch

    cfg, cuda = run.cfg.serving, torch.cuda.is_available()
    requirement = requirement_for(cfg)
    determinants = determinants | {
        "serving": cfg.model_dump(exclude={"timeout_s", "on_error"}) | {"vllm": requirement},
        "prompts": {"max_samples": run.cfg.evaluate.max_samples, "max_new_tokens": run.cfg.evaluate.max_new_tokens,
                    "max_length": run.cfg.data.max_length}, "code": code_version(__name__)}

    def build(out_dir: Path) -> dict[str, Any]:
        if not cfg.check:
            result = {"checked": False, "reason": "serving.check is off: vLLM did not load this model"}
        else:
            try:
                result = check(requirement, cuda, out_dir)
                result = result if "checked" in result else {"checked": True} | result
            except (VllmUnavailable, VllmCrashed) as exc:
                if cfg.on_error == "fail":
                    raise
                logger.warning("serve: skipping the vLLM check (serving.on_error: skip): %s", exc)
                result = {"checked": False, "reason": f"skipped after an error: {exc}", "retry": True}
        (out_dir / RESULT).write_text(json.dumps(result, indent=1) + "\n")
        return summarize(result)

    artifact = run_stage(run, "serve", determinants, build, inputs=inputs)
    if artifact.reused and artifact.metrics.get("retry"):
        logger.info("serve: the stored check was skipped after an error; checking again")
        artifact = run_stage(replace(run, force=run.force | {"serve"}), "serve", determinants, build, inputs=inputs)
    return artifact


def check_in_vllm(run: RunContext, data: StageArtifact, model_dir: Path, label: str, requirement: str, cuda: bool,
                  out_dir: Path, lora: Path | None = None) -> dict[str, Any]:
    cfg = run.cfg.serving
    if cfg.check == "auto" and (why := cannot_check_here(cfg)):
        logger.warning("serve: not checked in vLLM on this machine (serving.check: auto): %s", why)
        # retried by the next run, which may be on a machine that can serve it
        return {"checked": False, "reason": f"not checked on this machine: {why}", "retry": True}
    started = time.perf_counter()
    check_model_folder(model_dir)
    dataset = read_data(run, data)
    rows = dataset.eval[: run.cfg.evaluate.max_samples]
    python = Path(cfg.python) if cfg.python else vllm_python(requirement, cfg.pip_args, cfg.timeout_s)
    logger.info("serve: loading %s in vLLM (%s) and answering %d eval prompts", label, cfg.python or requirement,
                len(rows))
    remaining = cfg.timeout_s - (time.perf_counter() - started)
    result = run_worker(python, worker_request(model_dir, rows, dataset.form, run.cfg, cuda, lora), out_dir, cfg,
                        max(remaining, 1))
    if result["loaded"]:
        logger.info("serve: vLLM %s loaded it in %.0f s (%s, %s); %d answers at %.0f tokens/s",
                    result["vllm_version"], result["load_seconds"], result["quantization"],
                    ", ".join(sorted(set(result["kernels"].values()))) or "no kernel named", len(result["answers"]),
                    result["tokens_per_second"] or 0)
    else:
        logger.error("serve: vLLM %s could not load the model: %s", result["vllm_version"], result["error"])
    return result


def main(argv: list[str] | None = None) -> int:
    """Check one model folder in vLLM by hand, with a config's prompts settings and builtin chat prompts."""
    import argparse

    from pipeline.config import load_config

    parser = argparse.ArgumentParser(prog="python -m tasks.serve_check", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="a GPTQ model folder, e.g. artifacts/default/release")
    parser.add_argument("--config", default="default", help="config whose serving section to use")
    parser.add_argument("--prompt", action="append", default=[], help="a user message to answer (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config)
        check_model_folder(args.folder)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import tempfile

    import torch

    cuda = torch.cuda.is_available()
    requirement = requirement_for(cfg.serving)
    rows = [{"messages": [{"role": "user", "content": p}]} for p in args.prompt or ["Hello"]]
    with tempfile.TemporaryDirectory() as scratch:
        try:
            python = Path(cfg.serving.python) if cfg.serving.python else vllm_python(requirement, cfg.serving.pip_args)
            result = run_worker(python, worker_request(args.folder.resolve(), rows, "chat", cfg, cuda), Path(scratch),
                                cfg.serving, cfg.serving.timeout_s)
        except (VllmUnavailable, VllmCrashed) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(summarize(result) | {"answers": result.get("answers")}, indent=1))
    return 0 if result["loaded"] else 1


if __name__ == "__main__":
    sys.exit(main())
