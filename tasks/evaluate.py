"""Stage: measure base, merged, RTN int4 and GPTQ int4 on the same held-out rows, and score vLLM's answers from the
serve check against the references and against transformers' GPTQ answers; write metrics, report, plot.

Perplexity is taken on the completion tokens only (what the model was tuned to write); exact match compares a
greedy answer with the reference. RTN (round-to-nearest, same bits and group size) shows what GPTQ bought.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.base_model import resolve_model_dir
from pipeline.config import EvaluateConfig, QuantizationConfig
from pipeline.data import IGNORE_INDEX, split_prompt, tokenize_example
from pipeline.gguf_base import is_gguf
from pipeline.keys import code_version
from pipeline.output_head import selective_head
from pipeline.precision import PrecisionChoice, choose_precision, widest_projection
from pipeline.report import write_evaluation
from pipeline.run import RunContext
from pipeline.shared_prefix import shared_prefix_length
from pipeline.stage import StageArtifact, local_copy, run_stage
from pipeline.store import describe_files
from tasks.data import read_data
from tasks.serve_check import RESULT as SERVING_RESULT

logger = logging.getLogger(__name__)


def perplexity(model, examples: list[dict[str, list[int]]], batch_size: int) -> float:
    """exp(mean negative log-likelihood) over every labelled token of `examples`."""
    return teacher_forced(model, examples, batch_size)[0]


def teacher_forced(model, examples: list[dict[str, list[int]]],
                   batch_size: int) -> tuple[float, list[dict[int, int]]]:
    """One forward pass over each example with its reference: the perplexity on the labelled tokens, and for each
    example the model's most likely next token at every position that predicts a labelled one ({position: token}).

    The output head runs only at those positions (the model's own head, through `logits_to_keep`): with a 49k
    vocabulary, logits for the prompt tokens cost a fifth of the pass and are thrown away.
    """
    import torch

    selective = selective_head(model)
    virtual = virtual_tokens(model)
    total, count = 0.0, 0
    predicted: list[dict[int, int]] = [{} for _ in examples]
    order = by_length([len(e["input_ids"]) for e in examples])  # batches of like lengths: less padding
    for start in range(0, len(examples), batch_size):
        indices = order[start:start + batch_size]
        batch = [examples[i] for i in indices]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        predicts = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()  # position p predicts p + 1
        prefix = shared_prefix_length(batch) if selective and not virtual else 0
        with torch.no_grad():
            if prefix:  # the rows' common prefix (a chat template's system prompt) once, its keys and values shared
                logits = after_shared_prefix(model, ids, mask, prefix, predicts).float()
            elif selective:
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=predicts).logits.float()
            else:  # a prompt-tuned model's logits start with its virtual tokens'
                logits = model(input_ids=ids, attention_mask=mask).logits[:, virtual:][:, predicts].float()
        targets = labels[:, predicts + 1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        total += nll.item()
        count += int((targets != IGNORE_INDEX).sum())
        best = logits.argmax(dim=-1).tolist()
        positions = predicts.tolist()
        for i, row, e in zip(indices, best, batch, strict=True):
            predicted[i] = {p: row[k] for k, p in enumerate(positions) if p + 1 < len(e["input_ids"])}
    return math.exp(total / count), predicted


def after_shared_prefix(model, ids, mask, prefix: int, predicts):
    """The logits at `predicts` of right-padded rows `ids` that share their first `prefix` tokens: the prefix runs
    once, its cache is repeated for every row, and the rows' own tokens run on top of it (the same logits as the full
    rows': causal attention never lets the prefix see what follows)."""
    import torch

    rows = ids.shape[0]
    cache = model(input_ids=ids[:1, :prefix], use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(rows)
    width = ids.shape[1] - prefix
    positions = torch.arange(prefix, prefix + width).expand(rows, width)
    return model(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True, logits_to_keep=predicts - prefix).logits


def virtual_tokens(model) -> int:
    """How many learned tokens a prompt-tuned (peft prompt learning) model puts before its input; 0 for others."""
    config = getattr(model, "active_peft_config", None)
    return config.num_virtual_tokens if getattr(config, "is_prompt_learning", False) else 0


def by_length(lengths: list[int]) -> list[int]:
    """Indices in order of length (stable), so that each batch pads to a similar width."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def verified_greedy(example: dict[str, list[int]], prompt_ids: list[int], predicted: dict[int, int],
                    stops: set[int], max_new_tokens: int) -> list[int] | None:
    """The greedy answer's tokens (its stop token included), when the teacher-forced pass shows that greedy decoding
    from `prompt_ids` writes the reference itself; else None, and the answer has to be generated.

    While greedy output equals the reference, the model's next choice is the argmax at the reference's next
    position, which the perplexity pass already computed: the reference is a draft that one forward pass verified
    (speculative decoding's check). So greedy decoding writes the reference when every argmax matches it, up to a
    stop token or `max_new_tokens`.
    """
    start = len(prompt_ids)
    if example["input_ids"][:start] != prompt_ids:
        return None
    out: list[int] = []
    for position in range(start, len(example["input_ids"])):
        token = example["input_ids"][position]
        if predicted.get(position - 1) != token:
            return None
        out.append(token)
        if token in stops or len(out) == max_new_tokens:
            return out
    return None  # the example ends (cut at max_length) before the answer does


def greedy_answers(model, tokenizer, prompts: list[Any], form: str, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations (special tokens stripped, whitespace trimmed), batched with left padding, prompts of
    like lengths together."""
    import torch

    texts = [prompt_text(p, form, tokenizer) for p in prompts]
    order = by_length([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = [""] * len(texts)
    try:
        for start in range(0, len(texts), batch_size):
            indices = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in indices], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     temperature=None, top_p=None, top_k=None)
            decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, answer in zip(indices, decoded, strict=True):
                answers[i] = answer.strip()
    finally:
        tokenizer.padding_side = side
    return answers


def rtn_weight(weight, bits: int, group_size: int, sym: bool = True):
    """Round-to-nearest quantize-dequantize of a [out, in] weight in groups of `group_size` input columns."""
    import torch

    out_f, in_f = weight.shape
    groups = weight.float().reshape(out_f, -1, in_f if group_size == -1 else group_size)
    levels = 2 ** bits - 1
    if sym:
        scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / (levels / 2)
        zero = torch.full_like(scale, (levels + 1) / 2)
    else:  # the range always holds 0, as in GPTQ's quantizer
        low = groups.amin(dim=-1, keepdim=True).clamp(max=0)
        high = groups.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = ((high - low) / levels).clamp(min=1e-8)
        zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, levels)
    return ((q - zero) * scale).reshape(out_f, in_f).to(weight.dtype)


def rtn_quantize_(model, bits: int, group_size: int, sym: bool = True):
    """Replace every Linear weight but the output head by its RTN int version (in place); returns the model."""
    import torch

    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                module.weight.copy_(rtn_weight(module.weight, bits, group_size, sym))
    return model


def score_model(model, tokenizer, rows: list[dict], form: str, cfg: EvaluateConfig, max_length: int) -> dict[str, Any]:
    """Perplexity on the references, then, where rows have references, the greedy answers and their exact match.

    Answers the teacher-forced pass already proves (`verified_greedy`) are not generated again; the others are
    generated greedily, batched. Both give the greedy answer, so the figures are those of generating every row, up
    to the float-level differences any change of batch composition makes (a near-tie can fall either way).
    """
    start = time.perf_counter()
    model.eval()
    examples = [tokenize_example(r, form, tokenizer, max_length) for r in rows]
    ppl, predicted = teacher_forced(model, examples, cfg.batch_size)
    result: dict[str, Any] = {"perplexity": ppl}
    prompts, references = zip(*(split_prompt(r, form) for r in rows), strict=True)
    if all(ref is not None for ref in references):
        stops = stop_tokens(model)
        answers: list[str | None] = []
        # peft's generate() on a prompt-tuned model does not always write what its forward pass predicts (peft
        # 0.21.2, transformers 5.24; docs/routes.md): for one, every answer is what generate() writes
        verify = not virtual_tokens(model)
        for example, prompt, guess in zip(examples, prompts, predicted, strict=True):
            tokens = verify and verified_greedy(example, prompt_ids(prompt, form, tokenizer), guess, stops,
                                                cfg.max_new_tokens)
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip() if tokens else None)
        todo = [i for i, a in enumerate(answers) if a is None]
        generated = greedy_answers(model, tokenizer, [prompts[i] for i in todo], form, cfg.max_new_tokens,
                                   cfg.batch_size)
        for i, answer in zip(todo, generated, strict=True):
            answers[i] = answer
        result["generated_rows"] = len(todo)
        result["exact_match"] = 100.0 * sum(a == ref.strip() for a, ref in zip(answers, references, strict=True)) / len(rows)
        result["answers"] = answers
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def prompt_text(prompt: Any, form: str, tokenizer) -> str:
    """What greedy generation continues: a chat prompt through the model's template, a plain prompt as it is."""
    if form == "chat":
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def prompt_ids(prompt: Any, form: str, tokenizer) -> list[int]:
    """The token ids greedy_answers feeds the model for a prompt."""
    return tokenizer(prompt_text(prompt, form, tokenizer), add_special_tokens=False)["input_ids"]


def stop_tokens(model) -> set[int]:
    """The tokens that end a greedy answer in `model.generate`: its generation config's end-of-sequence ids."""
    eos = model.generation_config.eos_token_id
    return set() if eos is None else set(eos) if isinstance(eos, list) else {eos}


def score_models(sources: dict[str, Path], tokenizer_dir: Path, rows: list[dict], form: str, cfg: EvaluateConfig,
                 quant: QuantizationConfig, max_length: int) -> dict[str, dict[str, Any]]:
    """Score each named model folder on the same rows, loading one at a time (fp32 on CPU unless quantized); the
    name `rtn` scores its folder round-to-nearest quantized with the run's bits and group size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    scores = {}
    for name, folder in sources.items():
        precision = scoring_precision(cfg, folder, max_length)
        # full-precision models stay fp32 under bf16 autocast; the GPTQ model's kernel computes in the dtype it is
        # loaded in (its checkpoint's bf16, or fp32)
        kwargs = {"dtype": torch.float32} if name != "gptq" or not precision.bf16 else {}
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        if name == "rtn":
            rtn_quantize_(model, quant.bits, quant.group_size, quant.sym)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.bf16 and name != "gptq"):
            scores[name] = score_model(model, tokenizer, rows, form, cfg, max_length)
        scores[name] |= {"precision": precision.precision, "precision_reason": precision.reason}
        logger.info("%s: perplexity %.3f%s (%.0f s)", name, scores[name]["perplexity"],
                    f", exact match {scores[name]['exact_match']:.1f}%" if "exact_match" in scores[name] else "",
                    scores[name]["seconds"])
        del model
    return scores


def scoring_precision(cfg: EvaluateConfig, folder: Path, max_length: int) -> PrecisionChoice:
    """`evaluate.precision` for the model in `folder`, `auto` measured on this CPU (the stage scores on the CPU) at
    the stage's shape: a batch of rows through the model's hidden -> intermediate projection."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return choose_precision(cfg.precision, widest_projection(cfg.batch_size * max_length, config),
                            "evaluate.precision", cuda=False)


def score_base(run: RunContext, data: StageArtifact, base_dir: Path) -> dict[str, Any]:
    """The base model's scores, a stage of their own (`<run>/baseline/`): they depend only on the base's files, the
    eval rows and the scoring settings, so a run that changes the fine-tune, quantization or serving reuses them."""
    cfg = run.cfg.evaluate
    model = run.cfg.model
    determinants = {"base": {"name_or_path": model.name_or_path, "revision": model.revision,
                             "files": {k: v["sha256"] for k, v in describe_files(base_dir).items()}},
                    "evaluate": cfg.model_dump(include={"max_samples", "max_new_tokens", "batch_size", "precision"}),
                    "max_length": run.cfg.data.max_length, "code": code_version(__name__)}

    def build(out_dir: Path) -> dict[str, Any]:
        dataset = read_data(run, data)
        scores = score_models({"base": base_dir}, base_dir, dataset.eval[: cfg.max_samples], dataset.form, cfg,
                              run.cfg.quantization, run.cfg.data.max_length)["base"]
        (out_dir / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        return scores

    forced = run if "evaluate" not in run.force else replace(run, force=run.force | {"baseline"})
    artifact = run_stage(forced, "baseline", determinants, build, inputs={"data": data})
    return artifact.metrics | {"reused": artifact.reused}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def serving_metrics(served: dict[str, Any], gptq_answers: list[str] | None,
                    references: list[str | None]) -> dict[str, Any]:
    """vLLM's figures: exact match on the references, agreement (share of answers identical to transformers' answers
    for the model it served: the GPTQ model, or the quantized base with its adapter), speed, and what it loaded; or
    why it was not checked, or what vLLM said when it refused the model."""
    if not served.get("checked"):
        return {"checked": False, "reason": served.get("reason")}
    if not served["loaded"]:
        return {"checked": True, "loaded": False, "vllm_version": served["vllm_version"], "error": served["error"]}
    answers = served["answers"]
    metrics = {k: served.get(k) for k in ("checked", "loaded", "vllm_version", "quantization", "kernels",
                                          "load_seconds", "generate_seconds", "generated_tokens", "tokens_per_second")}
    if all(r is not None for r in references):
        metrics["exact_match"] = 100.0 * sum(a == r.strip() for a, r in zip(answers, references, strict=True)) / len(answers)
    if gptq_answers is not None:
        metrics["agreement"] = 100.0 * sum(a == b for a, b in zip(answers, gptq_answers, strict=True)) / len(answers)
    return metrics


def evaluation_metrics(scores: dict, rows: list[dict], form: str, sizes: dict[str, int], notes: list[str],
                       cfg: EvaluateConfig, served: dict[str, Any], shipped: str = "gptq") -> dict[str, Any]:
    """metrics.json's content: each model's figures and size, vLLM's (compared with transformers' answers for the
    `shipped` model), notes, and the first `samples_shown` answers."""
    models = {name: {k: v for k, v in s.items() if k != "answers"} | {"size_bytes": sizes.get(name)}
              for name, s in scores.items()}
    references = [split_prompt(row, form)[1] for row in rows]
    serving = serving_metrics(served, scores.get(shipped, {}).get("answers"), references)
    answers = {name: s["answers"] for name, s in scores.items() if "answers" in s}
    if served.get("answers"):
        answers["vllm"] = served["answers"]
    samples = []
    for i, row in enumerate(rows[: cfg.samples_shown]):
        prompt, reference = split_prompt(row, form)
        shown = prompt[-1]["content"] if form == "chat" else prompt
        samples.append({"prompt": shown, "reference": reference, **{name: a[i] for name, a in answers.items()}})
    return {"models": models, "serving": serving, "eval_rows": len(rows), "notes": notes, "samples": samples}


def evaluate(run: RunContext, data: StageArtifact, served: StageArtifact) -> StageArtifact:
    """Evaluate into `<store>/<run>/evaluate/`, or reuse an evaluation of the same models with the same config.

    The quantized model, the merged model and the adapter's training log come from the serve check's lineage.
    """
    cfg, quant = run.cfg.evaluate, run.cfg.quantization
    quantized = served.inputs["quantized"]
    merged = quantized.inputs["merged"]
    adapter = merged.inputs["adapter"]
    determinants = {"evaluate": cfg.model_dump(), "rtn": {"bits": quant.bits, "group_size": quant.group_size,
                    "sym": quant.sym}, "max_length": run.cfg.data.max_length, "code": code_version(__name__)}

    def build(out_dir: Path) -> dict[str, Any]:
        dataset = read_data(run, data)
        rows = dataset.eval[: cfg.max_samples]
        model = run.cfg.model
        dirs = {"base": resolve_model_dir(model.name_or_path, model.revision),
                "merged": local_copy(run.store, merged), "gptq": local_copy(run.store, quantized)}
        scores = {"base": score_base(run, data, dirs["base"])}
        scores |= score_models({"merged": dirs["merged"]} | ({"rtn": dirs["merged"]} if cfg.rtn_baseline else {})
                               | {"gptq": dirs["gptq"]}, dirs["merged"], rows, dataset.form, cfg, quant,
                               run.cfg.data.max_length)
        sizes = {name: folder_bytes(folder) for name, folder in dirs.items()}
        notes = []
        if is_gguf(model.name_or_path):
            source = json.loads((dirs["base"] / "DEQUANTIZED_FROM.json").read_text())
            notes.append(f"The base was dequantized from a GGUF ({source['gguf']}, {source['quantization']}): its "
                         f"quality, and so every model's here, is bounded by that quantization.")
        serving = json.loads((local_copy(run.store, served) / SERVING_RESULT).read_text())
        metrics = evaluation_metrics(scores, rows, dataset.form, sizes, notes, cfg, serving)
        training_log = json.loads((local_copy(run.store, adapter) / "training_log.json").read_text())
        write_evaluation(out_dir, metrics, training_log)
        return metrics

    return run_stage(run, "evaluate", determinants, build,
                     inputs={"data": data, "adapter": adapter, "merged": merged, "quantized": quantized,
                             "served": served})
