"""Fault suite: real kills (SIGKILL at a chosen stage), a store server stopped mid-run, concurrent writers and bad
input. Each asserts what was kept, what was redone, and that no stage without a manifest is ever read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_cli
from tests.s3server import BUCKET

pytestmark = pytest.mark.slow
LONGER = ["--set", "training.max_steps=80", "--set", "training.save_steps=10", "--set", "training.logging_steps=10"]


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.finetune_then_quantize", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the run's whole process group as soon as `ready()` is true."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def visible_stages(run_dir: Path) -> set[str]:
    return {p.parent.name for p in run_dir.glob("*/manifest.json")}


def test_killed_finetune_resumes_from_its_last_checkpoint_and_reaches_the_same_adapter(tmp_path):
    reference = run_cli("--config", "smoke", "--store", str(tmp_path / "reference"), *LONGER)
    assert reference.returncode == 0, reference.stderr[-3000:]

    store = tmp_path / "store"
    proc = start_cli("--config", "smoke", "--store", str(store), *LONGER)
    checkpoints = lambda: sorted(store.glob("smoke/.work/finetune-*/checkpoint-*/manifest.json"))  # noqa: E731
    kill_when(proc, lambda: any(int(p.parent.name.split("-")[1]) >= 20 for p in checkpoints()))
    assert proc.returncode == -signal.SIGKILL
    assert visible_stages(store / "smoke") == {"data"}, "nothing but the data is published by a run killed in fine-tune"
    killed_at = max(int(p.parent.name.split("-")[1]) for p in checkpoints())

    rerun = run_cli("--config", "smoke", "--store", str(store), *LONGER)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = json.loads((store / "smoke" / "run.json").read_text())["metrics"]["finetune"]
    resumed = int(metrics["resumed_from"].split("-")[1])
    assert 20 <= resumed <= killed_at and metrics["steps"] == 80
    ours = load_file(store / "smoke" / "finetune" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "reference" / "smoke" / "finetune" / "adapter_model.safetensors")
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst < 1e-4, f"resumed adapter differs from the uninterrupted one by {worst}"
    assert not list((store / "smoke").glob(".work/*/checkpoint-*")), "spent checkpoints are cleaned up"


def test_killed_in_quantize_rerun_skips_finetune_and_merge(tmp_path):
    proc = start_cli("--config", "smoke", "--store", str(tmp_path))
    kill_when(proc, lambda: (tmp_path / "smoke" / "merge" / "manifest.json").is_file())
    assert visible_stages(tmp_path / "smoke") <= {"data", "finetune", "merge"}
    assert "quantize" not in visible_stages(tmp_path / "smoke")

    rerun = run_cli("--config", "smoke", "--store", str(tmp_path))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run = json.loads((tmp_path / "smoke" / "run.json").read_text())
    assert [run["stages"][s]["reused"] for s in ("data", "finetune", "merge", "quantize")] == [True, True, True, False]
    from pipeline.store import verify_local

    quantized = tmp_path / "smoke" / "quantize"
    assert verify_local(quantized, json.loads((quantized / "manifest.json").read_text())) is None


def test_store_server_stopped_mid_run_fails_cleanly_then_resumes(s3, tmp_path):
    prefix = f"{BUCKET}/outage-{int(time.time())}"
    env = {**s3.env(), "FTQ_CACHE_DIR": str(tmp_path / "cache")}
    fs = s3.filesystem()
    proc = start_cli("--config", "smoke", "--store", f"s3://{prefix}", env=env)
    try:
        deadline = time.monotonic() + 300
        while not fs.exists(f"{prefix}/smoke/finetune/manifest.json"):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s3.stop()  # the store goes away while merge and quantize still have to be published
        out, err = proc.communicate(timeout=300)
    finally:
        if s3.proc is None:
            s3.start()
    assert proc.returncode == 1, err[-3000:]
    assert "failed after 3 attempts" in err and "Traceback" not in err.split("error: ")[-1]
    fs = s3.filesystem()
    stages = {p.split("/")[-2] for p in fs.glob(f"{prefix}/smoke/*/manifest.json")}
    assert stages == {"data", "finetune"}, f"only complete stages are visible, got {stages}"

    rerun = run_cli("--config", "smoke", "--store", f"s3://{prefix}", env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run = json.loads(fs.cat_file(f"{prefix}/smoke/run.json"))
    assert run["status"] == "completed" and run["stages"]["finetune"]["reused"] is True


def test_two_runs_writing_one_store_at_once_both_complete_intact(tmp_path):
    procs = [start_cli("--config", "smoke", "--store", str(tmp_path), "--run-name", name) for name in ("a", "b")]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    from pipeline.store import verify_local

    for name in ("a", "b"):
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["status"] == "completed"
        for stage in run["stages"].values():
            folder = Path(stage["uri"])
            assert verify_local(folder, json.loads((folder / "manifest.json").read_text())) is None
    assert not list(tmp_path.glob("*/.*.partial-*")) and not list(tmp_path.glob("*/.*.old-*"))


# --- bad input: exit code 2, the reason with the value seen and the fix, nothing written --------------------------

def tiny_copy(tiny_base: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_base, folder)
    return folder


def without_chat_template(tiny_base, tmp_path):
    folder = tiny_copy(tiny_base, tmp_path, "no-template")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return [f"model.name_or_path={folder}"]


def pickle_only(tiny_base, tmp_path):
    folder = tiny_copy(tiny_base, tmp_path, "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return [f"model.name_or_path={folder}"]


def remote_code(tiny_base, tmp_path):
    folder = tiny_copy(tiny_base, tmp_path, "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return [f"model.name_or_path={folder}"]


def malformed_jsonl(tiny_base, tmp_path):
    lines = (ROOT / "data" / "smoke_chat.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    return [f"data.path={tmp_path / 'broken.jsonl'}"]


def empty_dataset(tiny_base, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    return [f"data.path={tmp_path / 'empty.jsonl'}"]


def missing_fields(tiny_base, tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n' * 10)
    return [f"data.path={tmp_path / 'qa.jsonl'}"]


BAD_INPUTS = {
    "malformed JSONL": (malformed_jsonl, [], "broken.jsonl:3: not valid JSON"),
    "empty dataset": (empty_dataset, [], "is empty (0 bytes)"),
    "missing fields": (missing_fields, [], "cannot tell the data's form from its columns ['answer', 'question']"),
    "chat data, no chat template": (without_chat_template, [], "has no chat template to render it"),
    "pickle-only weights": (pickle_only, [], "has weights only as pickle (pytorch_model.bin)"),
    "needs trust_remote_code": (remote_code, [], "set model.trust_remote_code=true"),
    "run name ../x": (None, ["--run-name", "../x"], "must be one folder name inside the store"),
    "absolute run name": (None, ["--run-name", "/etc/x"], "must be one folder name inside the store"),
    "calibration smaller than asked": (None, ["--set", "quantization.calibration.n_samples=5000"],
                                       "has only 216 rows; lower n_samples to at most 216"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_the_fix_and_writes_nothing(case, tiny_base, tmp_path):
    make, extra, expected = BAD_INPUTS[case]
    overrides = make(tiny_base, tmp_path) if make else []
    store = tmp_path / "store"
    args = ["--config", "smoke", "--store", str(store), *extra]
    for override in overrides:
        args += ["--set", override]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not store.exists()


def test_pickle_weights_pass_preflight_when_allowed(tiny_base, tmp_path):
    from pipeline.config import load_config
    from pipeline.preflight import preflight

    overrides = pickle_only(tiny_base, tmp_path) + ["model.allow_pickle=true"]
    preflight(load_config("smoke", overrides, store=str(tmp_path / "s")))
