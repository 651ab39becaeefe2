from pathlib import Path

import pytest

from pipeline.config import CONF_DIR, PipelineConfig, apply_override, load_config
from pipeline.errors import ConfigError

CONFIGS = sorted(CONF_DIR.glob("*.yaml"))


def test_conf_holds_the_three_documented_configs():
    assert {p.stem for p in CONFIGS} >= {"default", "smoke", "qwen2-1.5b-instruct"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_yaml_in_conf_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.quantization.bits in (4, 8)
    assert cfg.run_name


def test_real_job_is_qwen2_bf16_group_128():
    cfg = load_config("qwen2-1.5b-instruct")
    assert cfg.model.name_or_path == "Qwen/Qwen2-1.5B-Instruct"
    assert cfg.training.precision == "bf16"
    assert cfg.quantization.group_size == 128


def test_set_overrides_nested_values_with_yaml_types():
    cfg = load_config("smoke", ["quantization.group_size=64", "lora.target_modules=[q_proj, v_proj]",
                                "training.qlora=false", "quantization.calibration.n_samples=7"],
                      run_name="nightly-1", store="/tmp/somewhere")
    assert cfg.quantization.group_size == 64
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.quantization.calibration.n_samples == 7
    assert cfg.run_name == "nightly-1"
    assert cfg.store.uri == "/tmp/somewhere"


def test_model_is_set_by_dotted_override():
    assert load_config("smoke", ["model.name_or_path=/models/base"]).model.name_or_path == "/models/base"


@pytest.mark.parametrize("override, fragment", [
    ("quantization.bits=3", "quantization.bits"),
    ("training.warmup_ratio=0.1", "training.warmup_ratio: Extra inputs are not permitted"),
    ("quantization.group_size=0", "group_size must be -1 or a positive integer"),
    ("run_name=has space", "run_name"),
])
def test_invalid_values_name_the_field_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [override])
    assert fragment in str(err.value)


def test_autoround_is_refused_for_a_layout_its_gptq_export_does_not_write():
    """AutoRound's GPTQ export is symmetric without activation order: asking for another layout is refused, naming
    both fixes, not silently quantized to something else."""
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["quantization.method=autoround", "quantization.sym=false"])
    assert "method autoround exports symmetric GPTQ without activation order" in str(err.value)
    assert "got sym=False, desc_act=False" in str(err.value) and "or use method gptq" in str(err.value)
    cfg = load_config("smoke", ["quantization.method=autoround", "quantization.autoround.iters=0"])
    assert cfg.quantization.autoround.iters == 0 and cfg.quantization.autoround.lr is None


def test_malformed_set_is_refused_with_an_example():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_override({}, "no-equals-sign")


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("does-not-exist")
