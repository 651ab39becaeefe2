"""The whole pipeline under Prefect, and the CLI as users run it."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
FAST = ["training.max_steps=4", "merge.check_samples=1", "quantization.calibration.n_samples=8"]


@pytest.fixture
def counted(monkeypatch):
    """Count how often preflight runs and how often the training data's source is read, wherever it happens."""
    import flows.cli
    import flows.finetune_then_quantize
    import pipeline.data

    counts = {"preflight": 0, "source reads": 0}
    real_preflight, real_read_source = flows.cli.preflight, pipeline.data.read_source

    def preflight(cfg):
        counts["preflight"] += 1
        return real_preflight(cfg)

    def read_source(source, *args, **kwargs):
        counts["source reads"] += source.endswith("smoke_chat.jsonl")
        return real_read_source(source, *args, **kwargs)

    for module in (flows.cli, flows.finetune_then_quantize):
        monkeypatch.setattr(module, "preflight", preflight)
    monkeypatch.setattr(pipeline.data, "read_source", read_source)
    return counts


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_end_to_end_then_reuses_every_stage(prefect_harness, tmp_path, counted):
    from flows.finetune_then_quantize import finetune_then_quantize

    path = Path(finetune_then_quantize("smoke", store=str(tmp_path), run_name="e2e"))
    assert counted == {"preflight": 1, "source reads": 1}, "the flow (as the UI runs it) checks and reads once"
    assert path == tmp_path / "e2e" / "run.json"
    run = json.loads(path.read_text())
    assert run["status"] == "completed" and run["failed_stage"] is None and run["error"] is None
    assert list(run["stages"]) == ["data", "finetune", "merge", "quantize", "serve", "evaluate", "release"]
    for name, stage in run["stages"].items():
        assert stage["reused"] is False and stage["seconds"] > 0
        assert Path(stage["uri"]) == tmp_path / "e2e" / name and (Path(stage["uri"]) / "manifest.json").is_file()
    assert run["metrics"]["finetune"]["eval_loss_after"] < run["metrics"]["finetune"]["eval_loss_before"]
    assert run["metrics"]["quantize"]["checkpoint_format"] == "gptq"
    # smoke.yaml turns the vLLM check off (tests/test_serving.py runs it): the report says so, the gate passes
    metrics = json.loads((tmp_path / "e2e" / "release" / "metrics.json").read_text())
    assert metrics["serving"] == {"checked": False, "reason": "serving.check is off: vLLM did not load this model"}
    assert "**Not checked in vLLM**: serving.check is off" in (tmp_path / "e2e" / "release" / "README.md").read_text()
    assert metrics["models"]["base"]["reused"] is False  # the base's scores: a stage of their own

    again = json.loads(Path(finetune_then_quantize("smoke", store=str(tmp_path), run_name="e2e")).read_text())
    assert again["status"] == "completed"
    assert all(stage["reused"] for stage in again["stages"].values())
    assert {n: s["key"] for n, s in again["stages"].items()} == {n: s["key"] for n, s in run["stages"].items()}

    forced = json.loads(Path(finetune_then_quantize("smoke", store=str(tmp_path), run_name="e2e",
                                                    force=["quantize"])).read_text())
    assert [forced["stages"][s]["reused"] for s in ("data", "finetune", "merge", "quantize", "serve", "evaluate")] \
        == [True, True, True, False, False, False]
    rescored = json.loads((tmp_path / "e2e" / "evaluate" / "metrics.json").read_text())["models"]["base"]
    assert rescored["reused"] is True and rescored["perplexity"] == metrics["models"]["base"]["perplexity"]


def test_cli_checks_and_reads_the_data_once_per_run(prefect_harness, tmp_path, counted, capsys):
    from flows.cli import main

    overrides = [arg for override in FAST for arg in ("--set", override)]
    assert main(["--config", "smoke", "--store", str(tmp_path), *overrides]) == 0
    assert counted == {"preflight": 1, "source reads": 1}
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run summary: {tmp_path / 'smoke' / 'run.json'}"
    run = json.loads((tmp_path / "smoke" / "run.json").read_text())
    assert run["status"] == "completed" and run["config"]["training"]["max_steps"] == 4


def test_cli_smoke_writes_gptq_checkpoint_and_ends_with_run_summary(tmp_path):
    result = run_cli("--config", "conf/smoke.yaml", "--store", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"run summary: {tmp_path / 'smoke' / 'run.json'}"
    run = json.loads((tmp_path / "smoke" / "run.json").read_text())
    assert run["status"] == "completed" and set(run["stages"]) >= {"finetune", "merge", "quantize", "evaluate"}
    qc = json.loads((tmp_path / "smoke" / "quantize" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"]) == ("gptq", "gptq", 4)
    assert "eval loss" in result.stderr and "steps/s, ETA" in result.stderr
    first = result.stderr.lstrip().splitlines()[0]
    assert "| pipeline.preflight - preflight passed" in first, f"a dependency spoke first: {first}"


def test_qlora_route_trains_over_nf4_then_merges_into_full_precision(tmp_path):
    """QLoRA end to end on CPU: the adapter trains over an nf4 copy of the base (bitsandbytes), the merge folds it
    into the full-precision base (never into 4-bit weights) and GPTQ quantizes that, as in the default route."""
    from safetensors import safe_open

    result = run_cli("--config", "smoke", "--store", str(tmp_path), "--set", "training.qlora=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QLoRA: 14 linear layers of the base held in nf4" in result.stderr  # 2 layers x 7 projections
    stages = json.loads((tmp_path / "smoke" / "run.json").read_text())["stages"]
    finetune = stages["finetune"]["metrics"]
    assert finetune["qlora"] and finetune["nf4_layers"] == 14
    assert finetune["eval_loss_after"] < finetune["eval_loss_before"]
    assert stages["merge"]["metrics"]["dtype"] == "float32" and stages["merge"]["metrics"]["logits_max_abs_diff"] < 1e-3
    with safe_open(tmp_path / "smoke" / "merge" / "model.safetensors", "pt") as merged:
        assert merged.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32
    qc = json.loads((tmp_path / "smoke" / "quantize" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"]) == ("gptq", 4)
    assert (tmp_path / "smoke" / "release" / "README.md").is_file()


def test_cli_failure_exits_1_keeps_finished_stages_and_records_the_error(tmp_path):
    result = run_cli("--config", "smoke", "--store", str(tmp_path), "--set", "merge.logits_atol=1e-30")
    assert result.returncode == 1
    assert "the run failed in merge: StageCheckError" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"run summary: {tmp_path / 'smoke' / 'run.json'}"
    run = json.loads((tmp_path / "smoke" / "run.json").read_text())
    assert run["status"] == "failed" and "merge.logits_atol" in run["error"] and run["failed_stage"] == "merge"
    assert list(run["stages"]) == ["data", "finetune"]
    assert (tmp_path / "smoke" / "finetune" / "manifest.json").is_file()
    assert not (tmp_path / "smoke" / "merge").exists()
    assert not list((tmp_path / "smoke").glob(".merge.partial-*"))


def test_report_metrics_model_card_and_latest_pointer(tmp_path):
    result = run_cli("--config", "smoke", "--store", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "smoke" / "run.json").read_text())
    metrics = json.loads(Path(run["metrics_uri"]).read_text())
    assert set(metrics["models"]) == {"base", "merged", "rtn", "gptq"}
    for scores in metrics["models"].values():
        assert scores["perplexity"] > 1 and 0 <= scores["exact_match"] <= 100
    assert metrics["models"]["merged"]["perplexity"] < metrics["models"]["base"]["perplexity"]
    evaluate = tmp_path / "smoke" / "evaluate"
    assert (evaluate / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| gptq |" in (evaluate / "report.md").read_text()
    release = tmp_path / "smoke" / "release"
    card = (release / "README.md").read_text()
    assert card.startswith("---\nbase_model: builtin:tiny-qwen2\n") and "checkpoint_format: gptq" in card
    assert json.loads((tmp_path / "latest.json").read_text())["uri"] == str(release)

    # Impossibly tight: the run fails, its model is not released, latest.json still names the good run.
    tight = run_cli("--config", "smoke", "--store", str(tmp_path), "--run-name", "tight",
                    "--set", "gate.min_exact_match=100", "--set", "gate.max_ppl_increase=0")
    assert tight.returncode == 1
    assert "failed the quality gate" in tight.stderr and "below gate.min_exact_match 100.0%" in tight.stderr
    failed = json.loads((tmp_path / "tight" / "run.json").read_text())
    assert failed["status"] == "failed" and "QualityGateError" in failed["error"] and failed["failed_stage"] == "gate"
    assert "release" not in failed["stages"] and not (tmp_path / "tight" / "release").exists()
    assert json.loads((tmp_path / "latest.json").read_text())["uri"] == str(release)
