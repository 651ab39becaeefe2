"""Multi-process fine-tune (training.distributed): DDP and FSDP2 as 2 CPU ranks (gloo) against one process with the
same global batch, a killed rank and the rerun that resumes, DeepSpeed's configs through DeepSpeed's own parser, and
the bad input preflight refuses before any weights load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import TrainingConfig, load_config
from pipeline.distributed import check_distributed, read_engine_config, validate_deepspeed_config
from tests.conftest import ROOT, run_cli

FP32 = ["training.precision=fp32"]  # the same arithmetic on every CPU (bf16 autocast where the CPU has it)


def train_stage(store: Path, *overrides: str):
    """The fine-tune stage as the flow runs it (preflight, data, finetune), without Prefect."""
    from pipeline.preflight import preflight
    from pipeline.run import open_run
    from tasks.data import prepare_data
    from tasks.finetune import finetune

    checked = preflight(load_config("smoke", [*FP32, *overrides], store=str(store)))
    run = open_run(checked.cfg)
    return finetune(run, prepare_data(run, checked.dataset))


def steps(artifact) -> list[tuple[float, float]]:
    history = json.loads((Path(artifact.uri) / "training_log.json").read_text())
    return [(row["loss"], row["grad_norm"]) for row in history]


def adapter(artifact) -> dict[str, torch.Tensor]:
    return load_file(Path(artifact.uri) / "adapter_model.safetensors")


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_ranks_train_the_adapter_one_process_trains(tmp_path):
    """2 ranks x micro-batch 4 against 1 process x 8: the same 8 rows per step, the loss normalised over the global
    batch's tokens (transformers' average_tokens_across_devices), so the same training up to fp32 summation order
    (measured: adapters within 5.3e-7, values up to 0.1). The gradient norm before clipping is compared step by step:
    with clipping at 1.0 and AdamW's scale invariance, summed instead of averaged gradients (PyTorch's gloo issue
    #162338) would leave the adapter almost unchanged but double the norm; no gradient sync at all (accelerate
    skipping the DDP wrap) changes both."""
    common = ["training.max_steps=6", "training.save_steps=3", "training.logging_steps=1"]
    single = train_stage(tmp_path / "one", *common, "training.per_device_train_batch_size=8")
    ddp = train_stage(tmp_path / "ddp", *common, "training.per_device_train_batch_size=4",
                      "training.distributed=ddp", "training.nproc=2")
    fsdp = train_stage(tmp_path / "fsdp", *common, "training.per_device_train_batch_size=4",
                       "training.distributed=fsdp", "training.nproc=2")
    assert single.metrics["ranks"] == 1 and ddp.metrics["ranks"] == fsdp.metrics["ranks"] == 2
    reference = adapter(single)
    for run in (ddp, fsdp):
        assert len(steps(run)) == 6
        for (loss, norm), (loss_1, norm_1) in zip(steps(run), steps(single), strict=True):
            assert loss == pytest.approx(loss_1, rel=1e-5), (run.metrics["distributed"], steps(run), steps(single))
            assert norm == pytest.approx(norm_1, rel=1e-4), (run.metrics["distributed"], steps(run), steps(single))
        trained = adapter(run)
        assert trained.keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=0, msg=name)
        assert run.metrics["eval_loss_after"] < run.metrics["eval_loss_before"] - 0.3
        # measured after training with the adapter off, the loss before training is the one process's, measured
        # first, up to the eval batches' composition (the Trainer averages batch means; measured: 0.3% apart)
        assert run.metrics["eval_loss_before"] == pytest.approx(single.metrics["eval_loss_before"], rel=0.01)
        peaks = run.metrics["rank_host_peak_bytes"]  # every rank's, summed: what the host held
        assert len(peaks) == 2 and run.metrics["host_peak_bytes"] == sum(peaks) and min(peaks) > 300 * 2 ** 20
    # each checkpoint the ranks wrote was published by the stage, then removed once the adapter was
    assert not list((tmp_path / "ddp").glob("smoke/.work/finetune-*"))


@pytest.mark.slow
def test_fsdp2_with_qlora_stores_nf4_as_the_compute_dtype_and_trains_like_one_process(tmp_path):
    """FSDP + QLoRA: a shard holds one dtype, so the nf4 weights are stored as the compute dtype
    (bnb_4bit_quant_storage); the training is then one process's, step by step."""
    common = ["training.max_steps=4", "training.save_steps=2", "training.logging_steps=1", "training.qlora=true"]
    single = train_stage(tmp_path / "one", *common, "training.per_device_train_batch_size=8")
    fsdp = train_stage(tmp_path / "fsdp", *common, "training.per_device_train_batch_size=4",
                       "training.distributed=fsdp", "training.nproc=2")
    assert fsdp.metrics["qlora"] and fsdp.metrics["nf4_layers"] == single.metrics["nf4_layers"] > 0
    for (loss, norm), (loss_1, norm_1) in zip(steps(fsdp), steps(single), strict=True):
        assert loss == pytest.approx(loss_1, rel=1e-5) and norm == pytest.approx(norm_1, rel=1e-4)


def worker_ranks(parent: int) -> dict[int, psutil.Process]:
    """The torchrun workers under a CLI process: {rank: process}."""
    found = {}
    for child in psutil.Process(parent).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if "tasks.finetune_worker" in command and "torch.distributed.run" not in command:
                found[int(child.environ()["RANK"])] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            continue
    return found


@pytest.mark.slow
def test_a_killed_rank_fails_the_stage_and_the_rerun_resumes_from_the_stores_checkpoint(tmp_path):
    settings = ["--set", "training.distributed=ddp", "--set", "training.nproc=2", "--set", "training.max_steps=300",
                "--set", "training.save_steps=20", "--set", "training.logging_steps=20",
                "--set", "training.precision=fp32"]
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "flows.finetune_then_quantize", "--config", "smoke", "--store",
                             str(store), *settings], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    published = lambda: sorted(store.glob("smoke/.work/finetune-*/checkpoint-*/manifest.json"))  # noqa: E731
    deadline = time.monotonic() + 300
    while not any(int(p.parent.name.split("-")[1]) >= 40 for p in published()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint-40 within 5 minutes"
        time.sleep(0.05)
    ranks = worker_ranks(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    ranks[1].send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    assert "the run failed in finetune" in stderr and "rank 1 of 2 exited with -9 (killed by SIGKILL)" in stderr, \
        stderr[-3000:]
    assert not training_processes(proc.pid), "no rank outlives the failed stage"
    assert {p.parent.name for p in (store / "smoke").glob("*/manifest.json")} == {"data"}, "only the data is published"
    killed_at = max(int(p.parent.name.split("-")[1]) for p in published())
    assert 40 <= killed_at < 300

    rerun = run_cli("--config", "smoke", "--store", str(store), *settings)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    logs = rerun.stdout + rerun.stderr
    assert f"restored {store / 'smoke' / '.work'}" in logs and f"checkpoint-{killed_at}" in logs, logs[-3000:]
    assert "resuming from" in logs, logs[-3000:]
    manifest = json.loads((store / "smoke" / "finetune" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 300 and manifest["metrics"]["ranks"] == 2

    # the resumed adapter is the one an uninterrupted 2-rank run trains
    straight = train_stage(tmp_path / "straight", "training.distributed=ddp", "training.nproc=2",
                           "training.max_steps=300", "training.save_steps=20", "training.logging_steps=20")
    resumed = load_file(store / "smoke" / "finetune" / "adapter_model.safetensors")
    for name, tensor in adapter(straight).items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_ranks_stop_when_the_stage_process_is_killed_alone(tmp_path):
    """The OOM killer takes the flow's process, not its group: the ranks notice within seconds and stop. The ranks
    log nothing and save nothing after the kill (a write to the dead stage's pipe would stop rank 0 by itself)."""
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "flows.finetune_then_quantize", "--config", "smoke", "--store",
                             str(store), "--set", "training.distributed=ddp", "--set", "training.nproc=2",
                             "--set", "training.max_steps=5000", "--set", "training.save_steps=5000",
                             "--set", "training.logging_steps=5000"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while sorted(worker_ranks(proc.pid)) != [0, 1]:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(15)  # into training: 5000 steps take minutes
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while survivors := training_processes(proc.pid):
        assert time.monotonic() < deadline, f"ranks still running 30 s after the stage process died: {survivors}"
        time.sleep(0.2)
    for leftover in psutil.process_iter():  # Prefect's temporary server outlives a CLI killed alone; not ours
        if _session(leftover.pid) == proc.pid:
            leftover.kill()


def training_processes(session: int) -> list[int]:
    """torchrun and its ranks still alive in a run's session."""
    alive = []
    for process in psutil.process_iter():
        try:
            if _session(process.pid) == session and "tasks.finetune_worker" in " ".join(process.cmdline()):
                alive.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def training(**fields) -> TrainingConfig:
    return TrainingConfig.model_validate(fields)


@pytest.mark.parametrize(("fields", "gpus", "expected"), [
    ({"distributed": "ddp"}, 0, "no GPU is visible: set training.distributed=none, or training.nproc=2"),
    ({"distributed": "ddp"}, 1, "only one rank would run (nproc 1, 1 GPU(s) visible)"),
    ({"distributed": "fsdp", "nproc": 8}, 4, "training.nproc is 8 but only 4 GPU(s) are visible"),
    ({"distributed": "ddp", "nproc": 64}, 0, "training.nproc is 64 CPU ranks but this machine has 2 cores"),
    ({"nproc": 4}, 4, "training.distributed is none (one process)"),
    ({"distributed": "ddp", "nproc": 2, "deepspeed_config": "zero3"}, 2,
     "training.deepspeed_config is set ('zero3') but training.distributed is 'ddp'"),
    ({"distributed": "deepspeed", "nproc": 2}, 0, "DeepSpeed trains on CUDA GPUs only"),
    ({"distributed": "fsdp", "nproc": 2, "fsdp_config": "nope"}, 2, "is neither a file nor a name in conf/fsdp/"),
])
def test_preflight_refuses_distributed_settings_that_cannot_run(fields, gpus, expected):
    problems = check_distributed(training(**fields), gpus=gpus, cpus=2)
    assert any(expected in p for p in problems), problems


def test_preflight_resolves_auto_ranks_into_the_config_the_run_records(tmp_path):
    """`nproc: auto` becomes the rank count once, in preflight, for the stage key, the launch and run.json."""
    from pipeline.memory import Device
    from pipeline.preflight import preflight

    cfg = load_config("smoke", ["training.distributed=ddp"], store=str(tmp_path / "store"))
    four = Device("cuda", 80 * 2 ** 30, 64 * 2 ** 30, "four planned GPUs", 4, True, False)
    assert cfg.training.nproc == "auto" and preflight(cfg, device=four).cfg.training.nproc == 4


def test_a_gptq_base_trains_with_ddp_only():
    problems = check_distributed(training(distributed="fsdp", nproc=2), gpus=2, cpus=2, quantized_base=True)
    assert any("packed int4 weights cannot be sharded; use training.distributed=ddp" in p for p in problems)
    assert check_distributed(training(distributed="ddp", nproc=2), gpus=2, cpus=2, quantized_base=True) == []


def test_bad_distributed_input_exits_2_before_any_weights_load(tmp_path):
    store = tmp_path / "store"
    result = run_cli("--config", "smoke", "--store", str(store), "--set", "training.distributed=deepspeed",
                     "--set", "training.nproc=512", "--set", "training.fsdp_config=full_shard")
    assert result.returncode == 2, result.stderr[-2000:]
    for expected in ("training.fsdp_config is set ('full_shard') but training.distributed is 'deepspeed'",
                     "DeepSpeed trains on CUDA GPUs only", "training.nproc is 512 CPU ranks"):
        assert expected in result.stderr, result.stderr[-2000:]
    assert not store.exists() or not any(store.rglob("manifest.json")), "nothing is written"


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_shipped_deepspeed_configs_pass_deepspeeds_own_parser(name):
    settings = training(per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-4,
                        precision="bf16")
    filled = validate_deepspeed_config(read_engine_config("deepspeed", name), settings, hidden_size=3584)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    stage = filled["zero_optimization"]["stage"]
    assert stage == (2 if name == "zero2" else 3)
    if stage == 3:
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # the adapter's save
        assert filled["zero_optimization"]["reduce_bucket_size"] == 3584 * 3584
    if name == "zero3_offload":
        assert filled["optimizer"]["params"]["lr"] == 2e-4


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda c: c["zero_optimization"].update(stage=7), "refused by DeepSpeed's parser: ValidationError"),
    (lambda c: c["zero_optimization"].update(stage3_prefetch_bucket=5), "Extra inputs are not permitted"),
    (lambda c: c.update(train_micro_batch_size_per_gpu=16), "ds train_micro_batch_size_per_gpu=16 vs hf "
                                                            "per_device_train_batch_size=4"),
    (lambda c: c["zero_optimization"].update(stage=2, offload_param={"device": "cpu"}), "only stage 3 partitions"),
    (lambda c: c["zero_optimization"].update(stage="auto"), "leaves ['zero_optimization.stage'"),
])
def test_deepspeeds_parser_refuses_a_broken_config(edit, expected):
    config = read_engine_config("deepspeed", "zero3")
    edit(config)
    with pytest.raises(ValueError) as refused:
        validate_deepspeed_config(config, training(per_device_train_batch_size=4), hidden_size=1536)
    assert expected in str(refused.value)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DeepSpeed ZeRO trains on CUDA: needs 2 or more GPUs "
                                                          "(oneCCL/IPEX do not match this torch)")
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_on_two_gpus_trains_the_adapter_one_process_trains(tmp_path, config):
    common = ["training.max_steps=6", "training.logging_steps=1"]
    single = train_stage(tmp_path / "one", *common, "training.per_device_train_batch_size=8")
    zero = train_stage(tmp_path / config, *common, "training.per_device_train_batch_size=4",
                       "training.distributed=deepspeed", "training.nproc=2", f"training.deepspeed_config={config}")
    for (loss, norm), (loss_1, norm_1) in zip(steps(zero), steps(single), strict=True):
        assert loss == pytest.approx(loss_1, rel=1e-3) and norm == pytest.approx(norm_1, rel=1e-2)


QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, vocab_size=152064, dtype="bfloat16")


def test_the_memory_plan_shards_what_each_engine_shards():
    """The 7B example on 8 GPUs: FSDP2 and ZeRO-3 hold 1/8 of the weights, adapter, gradients and optimizer per GPU
    plus the layers gathered whole; ZeRO-2 shards gradients and optimizer states only; offload moves the weights and
    optimizer states to the host; DDP plans one process's footprint on each GPU."""
    from pipeline.memory import GIB, Device, model_shape, plan_finetune, train_setup

    gpus = Device("cuda", 80 * GIB, 1024 * GIB, "8 x 80 GiB", 8, True, True)

    def plan(*overrides):
        cfg = load_config("qwen2.5-7b-instruct-multi-gpu", list(overrides))
        return plan_finetune(model_shape(QWEN25_7B), train_setup(cfg, gpus, False), gpus)

    ddp, fsdp = plan("training.distributed=ddp"), plan()
    zero2 = plan("training.distributed=deepspeed", "training.deepspeed_config=zero2")
    offload = plan("training.distributed=deepspeed", "training.deepspeed_config=zero3_offload")
    assert ddp.notes["ranks"] == fsdp.notes["ranks"] == 8  # nproc auto: the device's 8 GPUs
    assert 14 * GIB < ddp.parts["weights"] < 15 * GIB  # 7.6B bf16 parameters on every GPU
    assert fsdp.parts["weights"] == ddp.parts["weights"] // 8
    assert fsdp.parts["optimizer"] == ddp.parts["optimizer"] // 8 and "gathered_layers" in fsdp.parts
    assert zero2.parts["weights"] == ddp.parts["weights"] and zero2.parts["optimizer"] == ddp.parts["optimizer"] // 8
    assert "weights" not in offload.parts and offload.host_parts["offloaded_weights"] >= 14 * GIB
    assert offload.device_peak_bytes < fsdp.device_peak_bytes < zero2.device_peak_bytes < ddp.device_peak_bytes
    assert fsdp.device_peak_bytes < 10 * GIB < 20 * GIB < ddp.device_peak_bytes  # the example's header says ~9, ~21


def test_cpu_ranks_plan_the_host_for_all_of_them():
    from pipeline.memory import GIB, Device, model_shape, plan_finetune, train_setup

    host = Device("cpu", 16 * GIB, 16 * GIB, "cpu", 1, False, False)
    shape = model_shape(QWEN25_7B)
    one = plan_finetune(shape, train_setup(load_config("smoke"), host, False), host)
    two = plan_finetune(shape, train_setup(load_config("smoke", ["training.distributed=ddp", "training.nproc=2"]),
                                           host, False), host)
    assert two.device_peak_bytes == two.host_peak_bytes == pytest.approx(2 * one.device_peak_bytes, rel=1e-6)


def test_a_fine_tune_too_big_for_one_of_several_gpus_hears_of_fsdp():
    from pipeline.memory import GIB, Device, MemoryPlan, fit_problems, plan_run

    cfg = load_config("qwen2.5-7b-instruct-multi-gpu", ["training.distributed=none", "training.nproc=auto",
                                                        "training.fsdp_config=null"])
    gpus = Device("cuda", 16 * GIB, 256 * GIB, "4 x 16 GiB", 4, True, True)
    plan = plan_run(cfg, QWEN25_7B, gpus)
    assert isinstance(plan, MemoryPlan)
    problems = fit_problems(cfg, QWEN25_7B, gpus, plan)
    assert len(problems) == 1 and "--set training.distributed=fsdp --set training.nproc=4" in problems[0], problems
    fsdp = problems[0].split("--set training.distributed=fsdp")[1].split(";")[0]
    assert "(fits)" in fsdp, fsdp
