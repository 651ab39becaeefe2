"""Trackers beside the store (`tracking.report_to`): TensorBoard's event files in the fine-tune stage, read back with
TensorBoard's own reader; Weights & Biases in offline mode, writing its run files and nothing to the network."""

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import read_dataset
from pipeline.errors import PreflightError
from pipeline.preflight import preflight
from pipeline.run import open_run
from tasks.data import prepare_data
from tasks.finetune import finetune

STEPS = 6


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The smoke fine-tune, logging every step, reporting to TensorBoard and to W&B offline."""
    wandb_dir = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")  # W&B's own switch: run files written locally, nothing sent
        env.setenv("WANDB_DIR", str(wandb_dir))
        env.setenv("WANDB_PROJECT", "ftq-tests")
        cfg = load_config("smoke", [f"training.max_steps={STEPS}", "training.logging_steps=1",
                                    "tracking.report_to=[tensorboard, wandb]"],
                          run_name="tracked-run-7", store=str(tmp_path_factory.mktemp("store")))
        run = open_run(cfg)
        adapter = finetune(run, prepare_data(run, read_dataset(cfg.data)))
    return {"run": run, "adapter": Path(adapter.uri), "wandb_dir": wandb_dir}


def test_tensorboard_events_in_the_stage_hold_every_logged_step(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = json.loads((tracked["adapter"] / "training_log.json").read_text())
    [events] = (tracked["adapter"] / "tensorboard").glob("events.out.tfevents.*")
    reader = EventAccumulator(str(events.parent))
    reader.Reload()
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch"} <= set(reader.Tags()["scalars"])
    loss = reader.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1)) == [e["step"] for e in history]
    assert [round(e.value, 5) for e in loss] == [round(e["loss"], 5) for e in history]
    rates = [e.value for e in reader.Scalars("train/learning_rate")]
    assert rates == pytest.approx([e["learning_rate"] for e in history], rel=1e-6)


def test_the_event_files_are_published_with_the_stage(tracked):
    manifest = json.loads((tracked["adapter"] / "manifest.json").read_text())
    published = [name for name in manifest["files"] if name.startswith("tensorboard/events.out.tfevents.")]
    assert len(published) == 1


def test_wandb_offline_writes_its_run_with_the_steps_and_sends_nothing(tracked):
    [run_dir] = (tracked["wandb_dir"] / "wandb").glob("offline-run-*")
    [records] = run_dir.glob("run-*.wandb")
    data = records.read_bytes()
    for key in (b"train/loss", b"train/learning_rate", b"train/grad_norm"):
        assert key in data
    assert b"tracked-run-7" in data  # the W&B run is named for the pipeline run
    assert not list((tracked["wandb_dir"] / "wandb").glob("run-*"))  # no online run folder


def test_a_tracker_that_is_not_installed_is_refused_before_anything_runs(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config("smoke", ["tracking.report_to=[wandb]"], store=str(tmp_path / "store"))
    with pytest.raises(PreflightError, match=r"tracking.report_to includes 'wandb' but the 'wandb' package is not "
                                             r"installed: pip install '.\[tracking\]'"):
        preflight(cfg)
    assert not (tmp_path / "store").exists()
