"""The memory plan: shown (--plan, --plan --json, --plan-for cuda), recorded, enforced by preflight, used to pick an
`auto` micro-batch, and validated against measured peaks (CPU here; the GPU machine's figures for CUDA)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT, run_cli

from pipeline.config import load_config
from pipeline.errors import PreflightError
from pipeline.memory import GIB, Device, fit_problems, model_shape, plan_finetune, plan_run, planned_cuda, train_setup
from pipeline.preflight import preflight

sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_plan  # noqa: E402  (the benchmark's configs and measurement: one harness for both)


def test_plan_json_has_every_stage_and_writes_nothing(tmp_path):
    result = run_cli("--config", "smoke", "--store", str(tmp_path / "s"), "--set", "serving.check=auto", "--plan", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["device"]["kind"] in ("cpu", "cuda")
    assert set(plan["stages"]) == {"finetune", "merge", "quantize", "serve", "evaluate"}
    finetune = plan["stages"]["finetune"]
    assert finetune["device_peak_bytes"] == sum(finetune["parts"].values())
    assert {"weights", "adapter", "gradients", "optimizer", "activations", "logits"} <= set(finetune["parts"])
    assert not (tmp_path / "s").exists()


def test_plan_for_cuda_plans_bf16_with_fused_kernels_from_a_cpu(tmp_path):
    result = run_cli("--config", "smoke", "--store", str(tmp_path / "s"), "--plan-for", "cuda")
    assert result.returncode == 0, result.stderr
    assert "cuda (planned)" in result.stdout and "bf16, fused kernels on" in result.stdout
    assert "finetune" in result.stdout and "quantize" in result.stdout


def test_plan_for_cuda_matches_the_gpu_machines_measured_peaks():
    """Qwen2-1.5B shape, LoRA r16 on all 7 projections, seq 1024, micro-batch 8, bf16: measured on an H200 at 40.6 GiB
    (plain Trainer) and 22.0 GiB (Liger kernels), torch.cuda.max_memory_allocated; the target is within 15%."""
    rows = memory_plan.gpu_rows()
    for row in rows:
        assert 0.85 <= row["ratio"] <= 1.15, row
    assert rows[0]["planned_gib"] - rows[1]["planned_gib"] > 15, "fused kernels must drop the logits"


def test_the_plan_grows_with_what_costs_memory():
    shape = model_shape(memory_plan.QWEN2_15B)
    cfg = load_config("smoke", ["data.max_length=1024", "lora.r=16"])
    cuda = planned_cuda()

    def peak(**changes) -> int:
        from dataclasses import replace

        return plan_finetune(shape, replace(train_setup(cfg, cuda, False, 8), **changes), cuda).device_peak_bytes

    assert peak(batch=16) > peak(batch=8) > peak(batch=4)
    assert peak(seq=2048) > peak()
    assert peak(checkpointing=True) < peak() / 2
    assert peak(qlora=True) < peak() - GIB  # 1.3 B bf16 linear weights -> nf4 (the embeddings go to fp32)
    assert peak(fused=False) > peak(fused=True)


def test_a_fine_tune_that_cannot_fit_is_refused_with_what_would_fit(tmp_path):
    result = run_cli("--config", "smoke", "--store", str(tmp_path / "s"), "--set", "data.max_length=65536",
                     "--set", "training.per_device_train_batch_size=512")
    assert result.returncode == 2, result.stderr
    assert "the fine-tune will not fit" in result.stderr
    for setting in ("training.gradient_checkpointing=true", "training.per_device_train_batch_size=",
                    "data.max_length="):
        assert setting in result.stderr, setting
    assert "saves" in result.stderr and "(fits)" in result.stderr
    assert not (tmp_path / "s").exists(), "nothing written"


def test_a_gpu_too_small_hears_of_qlora_and_fused_kernels():
    """Qwen2-1.5B shape, seq 1024, micro-batch 8 on a 32 GiB GPU without liger-kernel installed."""
    cfg = load_config("smoke", ["data.max_length=1024", "training.per_device_train_batch_size=8", "lora.r=16",
                                "training.precision=bf16"])
    gpu = Device("cuda", 32 * GIB, 64 * GIB, "a 32 GiB GPU", fused_kernels=False)
    plan = plan_run(cfg, memory_plan.QWEN2_15B, gpu)
    [problem] = fit_problems(cfg, memory_plan.QWEN2_15B, gpu, plan)
    suggestions = dict(line.split(": saves ") for line in problem.split("Settings that would save memory: ")[1]
                       .split(". Rows much shorter")[0].split("; "))
    assert any(s.startswith("--set training.qlora=true") for s in suggestions)
    assert any(s.startswith("--set training.fused_kernels=auto") for s in suggestions)
    fused = next(v for s, v in suggestions.items() if s.startswith("--set training.fused_kernels"))
    assert fused.endswith("(fits)"), "Liger's fused loss drops 14 GiB of logits: 22 GiB measured on the GPU machine"


def test_auto_micro_batch_is_the_largest_that_fits(tmp_path):
    cfg = load_config("smoke", ["training.per_device_train_batch_size=auto", "data.max_length=512"],
                      store=str(tmp_path / "s"))
    small = Device("cpu", 2 * GIB, 2 * GIB, "a 2 GiB CPU", bf16=True)
    checked = preflight(cfg, device=small)
    batch = checked.cfg.training.per_device_train_batch_size
    assert isinstance(batch, int) and batch >= 1
    from pipeline.base_model import read_model_config

    model_config = read_model_config("builtin:tiny-qwen2")
    limit = 0.9 * small.memory_bytes
    assert checked.plan.stages["finetune"].device_peak_bytes <= limit
    doubled = load_config("smoke", [f"training.per_device_train_batch_size={2 * batch}", "data.max_length=512"])
    assert plan_run(doubled, model_config, small).stages["finetune"].device_peak_bytes > limit


def test_preflight_refuses_on_a_device_too_small(tmp_path):
    cfg = load_config("smoke", store=str(tmp_path / "s"))
    with pytest.raises(PreflightError, match="will not fit"):
        preflight(cfg, device=Device("cpu", 256 * 1024 ** 2, 256 * 1024 ** 2, "a 256 MiB CPU"))


@pytest.mark.slow
def test_run_json_records_the_plan_beside_the_measured_peak(tmp_path):
    store = tmp_path / "s"
    result = run_cli("--config", "smoke", "--store", str(store), "--set", "serving.check=false",
                     "--set", "evaluate.max_samples=8", "--set", "training.max_steps=4")
    assert result.returncode == 0, result.stderr
    summary = json.loads((store / "smoke" / "run.json").read_text())
    planned = summary["memory_plan"]["stages"]["finetune"]["host_peak_bytes"]
    measured = summary["stages"]["finetune"]["metrics"]["host_peak_bytes"]
    # The plan's runtime part is a bare stage process's (750 MiB); the flow's process also holds Prefect's engine,
    # a few hundred MiB more, which is most of the tiny model's peak: 0.70 on a fresh clone, 0.8+ in a warm checkout.
    # The ±20% validation is the stage run in its own process (below); here, that the figures are recorded and sane.
    assert 0.6 <= planned / measured <= 1.2, (planned, measured)


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("base, seq, batch", [("builtin:tiny-qwen2", 128, 8), ("builtin:tiny-qwen2", 512, 8),
                                              (memory_plan.SMOLLM2, 256, 8), (memory_plan.SMOLLM2, 512, 4)])
def test_plan_is_within_20_percent_of_the_measured_cpu_peak(base, seq, batch):
    """The fine-tune runs in a fresh process on full-length rows; its resident high-water mark while training is
    compared with the plan (SmolLM2-135M comes from PyPI, as `make run` fetches it)."""
    row = memory_plan.measure_in_fresh_process(base, seq, batch, [])
    assert 0.8 <= row["ratio"] <= 1.2, row


@pytest.mark.slow
@pytest.mark.network
def test_quantize_plan_is_within_20_percent_of_the_measured_cpu_peak():
    """gptqmodel quantizing SmolLM2-135M with `make run`'s calibration settings, in a fresh process."""
    row = memory_plan._fresh(["measure-quantize", *memory_plan.QUANTIZE_CONFIGS[0]])
    assert 0.8 <= row["ratio"] <= 1.2, row
