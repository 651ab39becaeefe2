"""The compute dtype is chosen by timing this machine, not by reading a CPU flag; a forced bf16 where the device has
none is refused before anything loads; a probe that cannot run leaves fp32 and says so once."""

import json
import logging

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import PreflightError
from pipeline.memory import Device
from pipeline.precision import NOISE, choose_precision
from pipeline.preflight import preflight

SHAPE = (64, 96, 192)  # small: the probe's rounds are a few milliseconds here


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_auto_takes_what_the_probe_measured_and_caches_it_per_machine_and_shape(cache):
    first = choose_precision("auto", SHAPE, cuda=False)
    assert first.fp32_ms > 0 and first.bf16_ms > 0 and not first.cached
    faster = first.bf16_ms < (1 - NOISE) * first.fp32_ms
    assert first.precision == ("bf16" if faster else "fp32")
    assert f"{first.bf16_ms / first.fp32_ms:.2f}x" in first.reason
    [cached_file] = (cache / "precision").glob("*.json")
    recorded = json.loads(cached_file.read_text())
    assert recorded["identity"]["torch"] == torch.__version__ and recorded["identity"]["shape"] == list(SHAPE)
    again = choose_precision("auto", SHAPE, cuda=False)
    assert again.cached and (again.precision, again.fp32_ms, again.bf16_ms) == (first.precision, first.fp32_ms,
                                                                              first.bf16_ms)
    other = choose_precision("auto", (32, 96, 192), cuda=False)  # another shape is measured on its own
    assert not other.cached and len(list((cache / "precision").glob("*.json"))) == 2


def test_a_forced_setting_is_taken_without_a_probe(cache):
    for setting in ("fp32", "bf16"):
        choice = choose_precision(setting, SHAPE, "quantization.precision", cuda=False)
        assert choice.precision == setting and choice.fp32_ms is None
        assert choice.reason == f"quantization.precision={setting}"
    assert not (cache / "precision").exists()


def test_a_probe_that_cannot_run_leaves_fp32_with_one_warning(cache, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no bf16 kernel for this backend")

    monkeypatch.setattr(torch, "autocast", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.precision"):
        choice = choose_precision("auto", SHAPE, cuda=False)
    assert choice.precision == "fp32" and "no bf16 kernel for this backend" in choice.reason
    assert [r.levelno for r in caplog.records if r.name == "pipeline.precision"] == [logging.WARNING]
    assert "computing in fp32" in caplog.text
    assert not list((cache / "precision").glob("*.json"))  # a failed probe is not remembered as a verdict


def test_preflight_refuses_bf16_on_a_gpu_without_it_naming_the_setting_and_the_fix(tmp_path):
    t4 = Device("cuda", 15 * 2 ** 30, 24 * 2 ** 30, "Tesla T4", 1, bf16=False)
    cfg = load_config("smoke", ["training.precision=bf16", "quantization.precision=bf16"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError) as refused:
        preflight(cfg, t4)
    text = str(refused.value)
    for setting in ("training.precision", "quantization.precision"):
        assert f"{setting} is 'bf16' but this GPU (Tesla T4) has no bf16 arithmetic" in text
        assert f"Set {setting}=auto" in text
    assert not (tmp_path / "s").exists()
    # the same run on a GPU with bf16 is not refused for it
    a100 = Device("cuda", 70 * 2 ** 30, 24 * 2 ** 30, "NVIDIA A100", 1, bf16=True)
    assert preflight(cfg, a100).cfg.training.precision == "bf16"
