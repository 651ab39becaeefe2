"""Preflight refuses bad input before any weights load: all problems at once, exit code 2, nothing written."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from pipeline.base_model import unquantized_name
from pipeline.config import load_config
from pipeline.errors import PreflightError
from pipeline.preflight import preflight, quantized_layer_shapes
from tests.conftest import run_cli

GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
               "checkpoint_format": "gptq"}


@pytest.fixture
def gptq_base(tmp_path, tiny_base) -> Path:
    """A model folder shaped like Qwen2-1.5B-Instruct-GPTQ-Int4: its config.json carries a GPTQ quantization_config."""
    folder = tmp_path / "Qwen2-1.5B-Instruct-GPTQ-Int4"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = GPTQ_CONFIG
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name, expected", [
    ("Qwen/Qwen2-1.5B-Instruct-GPTQ-Int4", "Qwen/Qwen2-1.5B-Instruct"),
    ("TheBloke/Llama-2-7B-Chat-AWQ", "TheBloke/Llama-2-7B-Chat"),
    ("unsloth/llama-3-8b-bnb-4bit", "unsloth/llama-3-8b"),
    ("Qwen/Qwen2-1.5B-Instruct", None),
])
def test_unquantized_name(name, expected):
    assert unquantized_name(name) == expected


def test_cli_refuses_gptq_base_fast_with_exit_2_and_no_store(gptq_base, tmp_path):
    store = tmp_path / "store"
    start = time.monotonic()
    result = run_cli("--config", "conf/smoke.yaml", "--set", f"model.name_or_path={gptq_base}", "--store", str(store))
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert elapsed < 30
    message = result.stderr
    assert "already quantized" in message and "gptq 4-bit" in message
    assert "BitsAndBytesConfig" in message
    assert f"model.name_or_path={gptq_base.parent / 'Qwen2-1.5B-Instruct'}" in message
    assert not store.exists()
    assert "Traceback" not in message
    assert message.startswith("error: preflight found 1 problem(s)"), "no dependency noise before the refusal"


def quantized_check(name: str, quant: dict, *overrides: str) -> list[str]:
    from pipeline.preflight import check_quantized_base

    cfg = load_config("smoke", [f"model.name_or_path={name}", *overrides])
    return check_quantized_base(cfg, {"quantization_config": quant})


def test_hub_style_name_gets_the_hub_alternative_and_the_adapter_option():
    [problem] = quantized_check("Qwen/Qwen2-1.5B-Instruct-GPTQ-Int4", GPTQ_CONFIG)
    assert "--set model.name_or_path=Qwen/Qwen2-1.5B-Instruct" in problem
    assert "--set model.quantized_base=adapter" in problem


@pytest.mark.parametrize("method", ["awq", "bitsandbytes", "compressed-tensors", "fp8"])
def test_any_quantization_method_is_refused(method):
    [problem] = quantized_check("org/m", {"quant_method": method})
    assert f"quantization_config: {method}" in problem


def test_adapter_on_a_quantized_base_takes_gptq_only_and_no_qlora():
    assert quantized_check("org/m-GPTQ", GPTQ_CONFIG, "model.quantized_base=adapter") == []
    assert quantized_check("org/m-GPTQ", GPTQ_CONFIG, "model.quantized_base=adapter",
                           "training.method=prompt_tuning") == []
    [awq] = quantized_check("org/m-AWQ", {"quant_method": "awq", "bits": 4}, "model.quantized_base=adapter")
    assert "gptqmodel's trainable GPTQ kernel" in awq and "is awq 4-bit" in awq
    [qlora] = quantized_check("org/m-GPTQ", GPTQ_CONFIG, "model.quantized_base=adapter", "training.qlora=true")
    assert "set training.qlora=false" in qlora


def test_prompt_tuning_needs_the_quantized_base_route(tmp_path):
    cfg = load_config("smoke", ["training.method=prompt_tuning"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError, match="prompt tuning leaves the weights alone"):
        preflight(cfg)


def test_bad_group_size_names_layer_shape_and_valid_sizes(tmp_path):
    cfg = load_config("smoke", ["quantization.group_size=96"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    [problem] = err.value.problems
    assert "group_size=96" in problem
    assert "model.layers.0.self_attn.q_proj (Linear 128 -> 128)" in problem
    assert "[-1, 16, 32, 64, 128]" in problem


def test_layer_shapes_come_from_config_without_weights(tiny_base):
    config = json.loads((tiny_base / "config.json").read_text())
    shapes = quantized_layer_shapes(config)
    assert shapes["model.layers.1.mlp.down_proj"] == (128, 256)
    assert shapes["model.layers.0.self_attn.k_proj"] == (64, 128)
    assert "lm_head" not in shapes and len(shapes) == 14


def test_all_problems_are_reported_together(gptq_base, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = load_config("smoke", [f"model.name_or_path={gptq_base}", f"data.path={empty}"],
                      store=str(blocker / "store"))
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    text = str(err.value)
    assert len(err.value.problems) == 3, text
    assert "already quantized" in text and "is empty (0 bytes)" in text and "is a file, not a directory" in text


def test_cli_empty_data_exits_2(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_cli("--config", "smoke", "--set", f"data.path={empty}", "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    assert f"dataset file {str(empty)!r} is empty" in result.stderr
    assert not (tmp_path / "store").exists()


def test_data_missing_fields_names_columns(tmp_path, write_jsonl):
    path = write_jsonl("bad.jsonl", [{"question": "a", "answer": "b"}] * 5)
    cfg = load_config("smoke", [f"data.path={path}"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError, match=r"cannot tell the data's form from its columns \['answer', 'question'\]"):
        preflight(cfg)


def test_missing_data_file(tmp_path):
    cfg = load_config("smoke", [f"data.path={tmp_path / 'nope.jsonl'}"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError, match="does not exist"):
        preflight(cfg)


def test_requested_format_must_match_fields(tmp_path, write_jsonl):
    path = write_jsonl("text.jsonl", [{"text": "hello world"}] * 5)
    cfg = load_config("smoke", [f"data.path={path}", "data.format=prompt_completion"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError, match=r"lacks field\(s\) \['prompt', 'completion'\]"):
        preflight(cfg)


def test_chat_rows_without_assistant_are_refused(tmp_path, write_jsonl):
    path = write_jsonl("chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 5)
    cfg = load_config("smoke", [f"data.path={path}"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError, match="5 of 5 rows .* no assistant message"):
        preflight(cfg)


def test_qlora_passes_where_bitsandbytes_runs_nf4(tmp_path):
    """bitsandbytes 0.50.2 runs nf4 on CPU: QLoRA is no longer refused for want of CUDA."""
    cfg = load_config("smoke", ["training.qlora=true"], store=str(tmp_path / "s"))
    assert preflight(cfg).dataset.train


def test_qlora_without_bitsandbytes_is_refused_with_the_install_command(tmp_path, monkeypatch):
    for name in ("bitsandbytes", "bitsandbytes.functional"):
        monkeypatch.setitem(sys.modules, name, None)  # what Python does when the package is not installed
    cfg = load_config("smoke", ["training.qlora=true"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError, match=r"bitsandbytes cannot be imported .*pip install '\.\[qlora\]'"):
        preflight(cfg)


def test_unknown_lora_target_is_refused(tmp_path):
    cfg = load_config("smoke", ["lora.target_modules=[q_proj, qkv_proj]"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError, match=r"lora.target_modules \['qkv_proj'\] match no layer"):
        preflight(cfg)


def test_good_config_passes_and_hands_on_the_dataset_it_read(tmp_path):
    dataset = preflight(load_config("smoke", store=str(tmp_path / "s"))).dataset
    assert not (tmp_path / "s").exists()
    assert dataset.form == "chat" and (len(dataset.train), len(dataset.eval)) == (216, 24)


def test_gguf_base_is_refused_unless_dequantizing_is_allowed(tmp_path):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = load_config("smoke", [f"model.name_or_path={gguf}"], store=str(tmp_path / "s"))
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    [problem] = err.value.problems
    assert "is a GGUF file: already quantized" in problem and "model.dequantize_gguf=true" in problem
