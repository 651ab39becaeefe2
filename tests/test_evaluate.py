"""Evaluation code on the tiny model, checked against hand computations; the quality gate's verdicts."""

import math

import pytest
import torch

from pipeline.config import DataConfig, EvaluateConfig, GateConfig
from pipeline.data import read_dataset, split_prompt, tokenize_example
from pipeline.gate import check_gate
from tasks.evaluate import greedy_answers, perplexity, rtn_quantize_, rtn_weight, score_model


def test_rtn_of_a_group_equals_the_hand_computation():
    # 4-bit symmetric, one group of 4: scale = max|w| / 7.5 = 0.2, zero point 8, q = clamp(round(w/scale) + 8, 0, 15)
    # w/scale = [1.25, -5, 7.5, 0.5] -> round (half to even) [1, -5, 8, 0] -> q [9, 3, 15 (clamped 16), 8]
    weight = torch.tensor([[0.25, -1.0, 1.5, 0.1]])
    assert torch.allclose(rtn_weight(weight, bits=4, group_size=4), torch.tensor([[0.2, -1.0, 1.4, 0.0]]))


def test_rtn_groups_are_independent_and_asymmetric_uses_min_max():
    weight = torch.tensor([[0.0, 1.5, 3.0, 0.7, 10.0, 20.0, 30.0, 15.0]])
    # levels 0..3 over [min(w, 0), max(w, 0)]: group 1 scale 1, group 2 scale 10, zero point 0 for both;
    # round half to even: 1.5 -> 2, 0.7 -> 1; 1.5 (15 / 10) -> 2
    out = rtn_weight(weight, bits=2, group_size=4, sym=False)
    assert torch.allclose(out, torch.tensor([[0.0, 2.0, 3.0, 1.0, 10.0, 20.0, 30.0, 20.0]]))


@pytest.fixture(scope="module")
def tiny(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def smoke_eval():
    dataset = read_dataset(DataConfig(path="data/smoke_chat.jsonl"))
    return dataset.eval[:6], dataset.form


def test_perplexity_is_exp_of_mean_nll_on_completion_tokens(tiny, smoke_eval):
    model, tokenizer = tiny
    rows, form = smoke_eval
    examples = [tokenize_example(r, form, tokenizer, 128) for r in rows]
    nll, count = 0.0, 0
    for e in examples:  # one at a time, by hand
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([e["input_ids"]])).logits[0].float(), dim=-1)
        for pos in range(1, len(e["labels"])):
            if e["labels"][pos] != -100:
                nll -= logp[pos - 1, e["labels"][pos]].item()
                count += 1
    assert perplexity(model, examples, batch_size=4) == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_exact_match_of_a_model_on_its_own_outputs_is_100(tiny, smoke_eval):
    model, tokenizer = tiny
    rows, form = smoke_eval
    prompts = [split_prompt(r, form)[0] for r in rows]
    own = greedy_answers(model, tokenizer, prompts, form, max_new_tokens=6, batch_size=4)
    relabelled = [{"messages": p + [{"role": "assistant", "content": a}]} for p, a in zip(prompts, own, strict=True)]
    result = score_model(model, tokenizer, relabelled, form, EvaluateConfig(max_new_tokens=6, batch_size=3), 128)
    assert result["exact_match"] == 100.0
    references = [split_prompt(r, form)[1] for r in rows]
    assert score_model(model, tokenizer, rows, form, EvaluateConfig(max_new_tokens=6), 128)["exact_match"] == \
        100.0 * sum(a == r for a, r in zip(own, references, strict=True)) / len(rows)


def test_answers_the_reference_pass_verifies_are_the_greedy_answers(tiny, smoke_eval):
    """Rows whose reference is the model's own greedy output are verified by the perplexity pass and not generated;
    the others are generated; either way the answers are those of greedy generation, row for row."""
    from tasks.evaluate import prompt_ids, stop_tokens

    model, tokenizer = tiny
    rows, form = smoke_eval
    prompts = [split_prompt(r, form)[0] for r in rows]
    greedy = greedy_answers(model, tokenizer, prompts, form, max_new_tokens=6, batch_size=4)
    own = []  # the model's greedy output as text, up to its stop token, not stripped
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(prompt, form, tokenizer)])
        new = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
        own.append(tokenizer.decode(new[:next((i for i, t in enumerate(new) if t in stop_tokens(model)), len(new))]))
    # half the rows carry the model's own output as their reference, half the data's (which it does not write)
    mixed = [{"messages": p + [{"role": "assistant", "content": o if i % 2 else r["messages"][-1]["content"]}]}
             for i, (p, o, r) in enumerate(zip(prompts, own, rows, strict=True))]
    scored = score_model(model, tokenizer, mixed, form, EvaluateConfig(max_new_tokens=6, batch_size=4), 128)
    assert scored["answers"] == greedy
    assert scored["generated_rows"] == len(rows) // 2  # the model's own outputs were verified, not generated
    assert score_model(model, tokenizer, rows, form, EvaluateConfig(max_new_tokens=6), 128)["answers"] == greedy


def test_batched_answers_come_back_row_for_row(tiny_base, smoke_eval):
    """Prompts are batched in order of length; each answer must still land on its own row. The tiny model answers
    every prompt with blank lines, so its weights are redrawn larger here: its answers then differ by prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.evaluate import prompt_ids

    rows, form = smoke_eval
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    prompts = [split_prompt(r, form)[0] for r in rows]
    lengths = [len(prompt_ids(p, form, tokenizer)) for p in prompts]
    assert lengths != sorted(lengths)  # batching by length reorders these rows
    one_by_one = [greedy_answers(model, tokenizer, [p], form, max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert len(set(one_by_one)) >= 4
    assert greedy_answers(model, tokenizer, prompts, form, max_new_tokens=6, batch_size=4) == one_by_one


def test_rtn_model_changes_every_linear_but_the_head(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    before = {n: p.clone() for n, p in model.named_parameters()}
    rtn_quantize_(model, bits=4, group_size=128)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.layers.1.self_attn.q_proj.weight" in changed
    assert "model.embed_tokens.weight" not in changed and "model.norm.weight" not in changed


MODELS = {"base": {"perplexity": 10.0, "exact_match": 10.0}, "merged": {"perplexity": 5.0, "exact_match": 90.0},
          "gptq": {"perplexity": 5.5, "exact_match": 86.0}}


def test_gate_passes_a_model_that_kept_its_gain():
    assert check_gate({"models": MODELS}, GateConfig(max_ppl_increase=0.25, min_gain_kept=0.9)) == []


def test_gate_names_each_figure_and_threshold_it_misses():
    failures = check_gate({"models": MODELS}, GateConfig(max_ppl_increase=0.05, min_gain_kept=0.99, min_exact_match=95))
    assert len(failures) == 3
    assert "GPTQ perplexity 5.500 is +10.0% over the merged model's 5.000 (gate.max_ppl_increase allows +5.0%)" \
        in failures[0]
    assert "GPTQ keeps 95% of the fine-tune's exact-match gain" in failures[1] and "min_gain_kept 99%" in failures[1]
    assert "GPTQ exact match 86.0% is below gate.min_exact_match 95.0%" in failures[2]


def test_gate_fails_when_the_fine_tune_gained_nothing():
    flat = {**MODELS, "merged": {"perplexity": 5.0, "exact_match": 10.0}}
    [failure] = check_gate({"models": flat}, GateConfig(max_ppl_increase=None, min_gain_kept=0.9))
    assert "did not raise exact match" in failure


@pytest.mark.slow
def test_quality_benchmark_script_runs_on_the_smoke_job(tmp_path):
    """benchmarks/quality.py, the same code path as on the default job, on the tiny one (so it cannot rot)."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "quality.json"
    result = subprocess.run([sys.executable, "benchmarks/quality.py", "--config", "smoke", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| gptq |" in result.stdout and "| rtn |" in result.stdout
    summary = json.loads(out.read_text())
    assert set(summary["models"]) == {"base", "merged", "rtn", "gptq"}
    assert summary["median_wall_seconds"] > 0 and "quantize" in summary["stage_seconds"]


def test_the_gate_refuses_a_model_vllm_serves_worse_or_cannot_load_and_says_what_vllm_said():
    gate = GateConfig(max_ppl_increase=0.25, max_serving_gap=2.0)
    served = {"checked": True, "loaded": True, "vllm_version": "0.32.0", "exact_match": 86.0, "agreement": 93.5}
    assert check_gate({"models": MODELS, "serving": served | {"exact_match": 85.0}}, gate) == []  # GPTQ 86: 1 point
    [gap] = check_gate({"models": MODELS, "serving": served | {"exact_match": 83.5}}, gate)
    assert gap == ("vLLM's exact match 83.5% is 2.5 points below transformers' GPTQ 86.0% on the same prompts "
                   "(93.5% of answers identical; gate.max_serving_gap allows 2.0)")
    refused = {"checked": True, "loaded": False, "vllm_version": "0.32.0", "error": "ValueError: no kernel for uint8b128"}
    [failure] = check_gate({"models": MODELS, "serving": refused}, gate)
    assert failure.startswith("vLLM 0.32.0 could not load the quantized model: ValueError: no kernel for uint8b128")
    off = {"checked": False, "reason": "serving.check is off: vLLM did not load this model"}
    assert check_gate({"models": MODELS, "serving": off}, gate) == []
    assert check_gate({"models": MODELS, "serving": served | {"exact_match": 0.0}},
                      GateConfig(max_ppl_increase=0.25, max_serving_gap=None)) == []


def test_scoring_runs_the_rows_shared_prefix_once_with_the_full_rows_logits(tiny, smoke_eval):
    """The chat template's system prompt every eval row starts with runs once per batch, its cache repeated: the
    logits where the loss is taken are those of the full, right-padded rows."""
    from pipeline.shared_prefix import shared_prefix_length
    from tasks.evaluate import after_shared_prefix

    model, tokenizer = tiny
    rows, form = smoke_eval
    examples = [tokenize_example(r, form, tokenizer, 128) for r in rows]
    prefix = shared_prefix_length(examples)
    assert prefix >= 4  # the template's system prompt
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    predicts = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[:, predicts]
        shared = after_shared_prefix(model, ids, mask, prefix, predicts)
    assert shared.shape == full.shape
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-5)
