"""quantization.method=autoround: AutoRound's tuned rounding and clipping, written as the same GPTQ v1 checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.autoround import packed_windows
from pipeline.config import load_config
from tests.conftest import run_cli


def test_calibration_rows_are_packed_end_to_end_into_full_windows():
    """AutoRound skips any sample shorter than its window: short chat rows are packed, the short tail dropped."""
    assert packed_windows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert packed_windows([[1, 2, 3]], 4) == []


def test_the_stage_key_holds_only_the_settings_the_method_reads():
    """Tuning one method's settings does not requantize a run that uses the other."""
    from tasks.quantize import settings_in_effect

    def key(*overrides: str) -> dict:
        return settings_in_effect(load_config("smoke", list(overrides)).quantization)

    assert key("quantization.method=gptq", "quantization.autoround.iters=7") == key("quantization.method=gptq")
    assert key("quantization.method=autoround", "quantization.mse=0", "quantization.calibration.batch_size=2") \
        == key("quantization.method=autoround")
    assert key("quantization.method=autoround", "quantization.autoround.iters=7") != key("quantization.method=autoround")
    assert key("quantization.method=gptq", "quantization.mse=0") != key("quantization.method=gptq")


def test_a_window_longer_than_the_whole_calibration_is_refused_before_any_work(tmp_path):
    result = run_cli("--config", "smoke", "--store", str(tmp_path / "store"), "--set", "quantization.method=autoround",
                     "--set", "quantization.autoround.seqlen=8192")
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("quantization.autoround.seqlen is 8192 tokens but the calibration holds at most 4096 (32 rows of at "
            "most 128 tokens): not one AutoRound window; lower autoround.seqlen") in result.stderr
    assert not (tmp_path / "store").exists()


def dequantized(folder: Path, prefix: str, group_size: int) -> torch.Tensor:
    """A GPTQ v1 symmetric int4 Linear's weight, [out, in], from its packed tensors."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        qweight, scales = f.get_tensor(f"{prefix}.qweight"), f.get_tensor(f"{prefix}.scales").float()
        zeros = f.get_tensor(f"{prefix}.qzeros")
    assert (zeros == 0x77777777).all(), "v1 symmetric: zero point 8 stored minus one"
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    ints = ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & 0xF).reshape(-1, qweight.shape[1])  # [in, out]
    return ((ints.float() - 8) * scales.repeat_interleave(group_size, dim=0)).T


@pytest.mark.slow
def test_autoround_tunes_past_round_to_nearest_and_writes_gptq_v1(tiny_base, tmp_path):
    """On its own calibration windows AutoRound's int4 model tracks the full-precision one better than
    round-to-nearest with the same bits and groups (what its tuning optimises), in the same GPTQ v1 layout the GPTQ
    path writes, reloadable by transformers, with no path of this machine in it."""
    from transformers import AutoModelForCausalLM

    from tasks.evaluate import rtn_quantize_, rtn_weight
    from tasks.quantize import quantize_model

    cfg = load_config("smoke", ["quantization.method=autoround", "quantization.autoround.iters=30",
                                "quantization.autoround.batch_size=4"])
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randint(3, 250, (int(n),), generator=generator).tolist()
                   for n in torch.randint(40, 128, (32,), generator=generator)]
    out = tmp_path / "autoround"
    info = quantize_model(tiny_base, out, cfg.quantization, calibration, seed=0)
    assert info["algorithm"] == "autoround" and info["checkpoint_format"] == "gptq"
    assert info["calibration_window_tokens"] == 128
    assert info["calibration_windows"] == sum(map(len, calibration)) // 128
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"]) == ("gptq", "gptq", 4, 128)
    assert qc["sym"] is True and qc["desc_act"] is False and qc["provider"] == "auto-round"
    assert "/tmp" not in (out / "config.json").read_text()

    full = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    rtn = rtn_quantize_(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), 4, 128).eval()
    tuned = AutoModelForCausalLM.from_pretrained(out).eval()
    windows = torch.tensor(packed_windows(calibration, 128))
    with torch.no_grad():
        reference = full(windows).logits
        rtn_error = (rtn(windows).logits - reference).pow(2).mean().item()
        tuned_error = (tuned(windows).logits.float() - reference).pow(2).mean().item()
    assert tuned_error < 0.9 * rtn_error, (tuned_error, rtn_error)
    # the tuning moved weights off the round-to-nearest grid point, and the packed ints say so
    prefix = "model.layers.0.mlp.down_proj"
    weight = full.get_submodule(prefix).weight
    moved = (dequantized(out, prefix, 128) - rtn_weight(weight, 4, 128, True)).abs() > 1e-6
    assert 0.001 < moved.float().mean().item() < 0.9
