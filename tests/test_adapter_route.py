"""The route for a user whose only model is already quantized (`model.quantized_base: adapter`): an adapter (LoRA
through gptqmodel's trainable kernel, or prompt tuning) trained on a GPTQ base, evaluated against that base, and
released unmerged with the base's identity. The GPTQ base is the tiny model quantized by this pipeline."""

import json

import pytest
import torch

from pipeline.store import sha256_file
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # each test runs the pipeline's command line


def run_adapter_route(tiny_gptq, store, *overrides: str):
    result = run_cli("--config", "smoke", "--store", str(store), "--set", f"model.name_or_path={tiny_gptq}",
                     "--set", "model.quantized_base=adapter", *[a for o in overrides for a in ("--set", o)])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((store / "smoke" / "run.json").read_text()), result.stderr


def test_the_refusal_names_the_adapter_route(tiny_gptq, tmp_path):
    result = run_cli("--config", "smoke", "--store", str(tmp_path), "--set", f"model.name_or_path={tiny_gptq}")
    assert result.returncode == 2
    assert "--set model.quantized_base=adapter" in result.stderr and not tmp_path.joinpath("smoke").exists()


def test_lora_on_a_tiny_gptq_ships_unmerged_with_the_base_identity(tiny_gptq, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, log = run_adapter_route(tiny_gptq, tmp_path)
    assert run["status"] == "completed"
    assert list(run["stages"]) == ["data", "finetune", "serve", "evaluate", "release"]
    assert set(run["skipped"]) == {"merge", "quantize"} and "cannot be merged" in run["skipped"]["merge"]
    finetune = run["stages"]["finetune"]["metrics"]
    assert (finetune["method"], finetune["base_quantization"]) == ("lora", "gptq 4-bit")
    assert finetune["eval_loss_after"] < finetune["eval_loss_before"]
    models = run["stages"]["evaluate"]["metrics"]["models"]
    assert set(models) == {"base", "adapted"} and models["adapted"]["perplexity"] < models["base"]["perplexity"]

    release = tmp_path / "smoke" / "release"
    assert (release / "adapter_model.safetensors").is_file() and not (release / "model.safetensors").exists()
    base = json.loads((release / "BASE.json").read_text())
    assert base["quantization"] == "gptq 4-bit"
    assert base["files"]["model.safetensors"] == sha256_file(tiny_gptq / "model.safetensors")
    card = (release / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "--lora-modules adapter=." in card
    assert json.loads((tmp_path / "latest.json").read_text())["uri"] == str(release)

    # what a user does with the release: the base as it is, plus the adapter, changes the model's answers
    model = AutoModelForCausalLM.from_pretrained(tiny_gptq, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        alone = model(ids).logits
        adapted = PeftModel.from_pretrained(model, release)(ids).logits
    assert not torch.allclose(alone, adapted)


def test_prompt_tuning_on_a_tiny_gptq_learns_and_is_not_served_by_vllm(tiny_gptq, tmp_path):
    run, _ = run_adapter_route(tiny_gptq, tmp_path, "training.method=prompt_tuning", "training.num_virtual_tokens=8",
                               "training.learning_rate=0.03", "serving.check=true")
    finetune = run["stages"]["finetune"]["metrics"]
    assert finetune["method"] == "prompt_tuning" and finetune["eval_loss_after"] < finetune["eval_loss_before"]
    grads = [e["grad_norm"] for e in json.loads((tmp_path / "smoke" / "finetune" / "training_log.json").read_text())]
    assert min(grads) > 0  # the virtual tokens get a gradient through the GPTQ layers
    serve = run["stages"]["serve"]["metrics"]
    assert serve["checked"] is False and "vLLM serves LoRA adapters, not prompt_tuning" in serve["reason"]
    models = run["stages"]["evaluate"]["metrics"]["models"]
    assert models["adapted"]["perplexity"] < models["base"]["perplexity"]
    assert models["adapted"]["generated_rows"] == 24  # what peft's generate() writes, every row (tasks/evaluate.py)
    assert "not LoRA" not in (tmp_path / "smoke" / "release" / "README.md").read_text()
    assert "vLLM serves LoRA adapters, not prompt-tuning ones" in (tmp_path / "smoke" / "release" / "README.md").read_text()
