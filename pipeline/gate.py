"""The quality gate: the quantized model must keep the fine-tune's gain and serve in vLLM as well as it answers in
transformers, or the run fails and nothing is released."""

from __future__ import annotations

from typing import Any

from pipeline.config import GateConfig


class QualityGateError(RuntimeError):
    """The quantized model missed a threshold; each figure and its threshold are in the message."""


def check_gate(metrics: dict[str, Any], gate: GateConfig) -> list[str]:
    """Every threshold the GPTQ model misses (metrics.json's `models` and `serving`), as `figure (threshold)`
    sentences; empty when it passes."""
    models = metrics["models"]
    if "adapted" in models:
        return adapter_gate(metrics, gate)
    failures = serving_failures(metrics.get("serving") or {}, models["gptq"], gate)
    merged, gptq, base = models["merged"], models["gptq"], models.get("base", {})
    if gate.max_ppl_increase is not None:
        increase = gptq["perplexity"] / merged["perplexity"] - 1
        if increase > gate.max_ppl_increase:
            failures.append(f"GPTQ perplexity {gptq['perplexity']:.3f} is {increase:+.1%} over the merged model's "
                            f"{merged['perplexity']:.3f} (gate.max_ppl_increase allows {gate.max_ppl_increase:+.1%})")
    has_em = all(m.get("exact_match") is not None for m in (base, merged, gptq))
    if gate.min_gain_kept is not None and has_em:
        gain = merged["exact_match"] - base["exact_match"]
        if gain <= 0:
            failures.append(f"the fine-tune did not raise exact match (base {base['exact_match']:.1f}%, merged "
                            f"{merged['exact_match']:.1f}%), so there is no gain for GPTQ to keep "
                            f"(gate.min_gain_kept {gate.min_gain_kept:.0%})")
        else:
            kept = (gptq["exact_match"] - base["exact_match"]) / gain
            if kept < gate.min_gain_kept:
                failures.append(f"GPTQ keeps {kept:.0%} of the fine-tune's exact-match gain (base "
                                f"{base['exact_match']:.1f}%, merged {merged['exact_match']:.1f}%, GPTQ "
                                f"{gptq['exact_match']:.1f}%; gate.min_gain_kept {gate.min_gain_kept:.0%})")
    return failures + below_floor("GPTQ exact match", gptq, gate)


def adapter_gate(metrics: dict[str, Any], gate: GateConfig) -> list[str]:
    """An adapter on a quantized base (nothing merged, nothing re-quantized) must improve on the base it ships
    with: lower perplexity, no lower exact match; the exact-match floor and the serving check apply as usual."""
    base, adapted = metrics["models"]["base"], metrics["models"]["adapted"]
    failures = serving_failures(metrics.get("serving") or {}, adapted, gate, served="the base with its adapter",
                                compared="adapted model")
    if adapted["perplexity"] >= base["perplexity"]:
        failures.append(f"the adapter did not lower perplexity on the held-out rows (quantized base "
                        f"{base['perplexity']:.3f}, with the adapter {adapted['perplexity']:.3f})")
    if base.get("exact_match") is not None and adapted.get("exact_match") is not None \
            and adapted["exact_match"] < base["exact_match"]:
        failures.append(f"the adapter lowered exact match (quantized base {base['exact_match']:.1f}%, with the "
                        f"adapter {adapted['exact_match']:.1f}%)")
    return failures + below_floor("exact match with the adapter", adapted, gate)


def below_floor(what: str, scores: dict[str, Any], gate: GateConfig) -> list[str]:
    """The shipped model's exact match under `gate.min_exact_match`, as a failure sentence; none without a floor."""
    if gate.min_exact_match is None or scores.get("exact_match") is None \
            or scores["exact_match"] >= gate.min_exact_match:
        return []
    return [f"{what} {scores['exact_match']:.1f}% is below gate.min_exact_match {gate.min_exact_match:.1f}%"]


def serving_failures(serving: dict[str, Any], gptq: dict[str, Any], gate: GateConfig,
                     served: str = "the quantized model", compared: str = "GPTQ") -> list[str]:
    """A model vLLM could not load always fails; one it answers worse than transformers by more than
    `gate.max_serving_gap` points fails too. A check that was off or skipped fails nothing (the report says so)."""
    if not serving.get("checked"):
        return []
    if not serving["loaded"]:
        return [f"vLLM {serving['vllm_version']} could not load {served}: {serving['error']} (the "
                f"serve stage's vllm.log has vLLM's full output)"]
    if gate.max_serving_gap is None or serving.get("exact_match") is None or gptq.get("exact_match") is None:
        return []
    gap = gptq["exact_match"] - serving["exact_match"]
    if gap > gate.max_serving_gap:
        return [f"vLLM's exact match {serving['exact_match']:.1f}% is {gap:.1f} points below transformers' {compared} "
                f"{gptq['exact_match']:.1f}% on the same prompts ({serving['agreement']:.1f}% of answers identical; "
                f"gate.max_serving_gap allows {gate.max_serving_gap:.1f})"]
    return []


def gate_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """The figures the gate judged, by name (for the registry's version tags): the shipped model's exact match and
    perplexity, its perplexity increase over the merged model, and vLLM's exact-match gap, where measured."""
    models = metrics["models"]
    shipped = models.get("gptq") or models["adapted"]
    figures = {"exact_match": shipped.get("exact_match"), "perplexity": shipped.get("perplexity")}
    if "merged" in models and shipped.get("perplexity") is not None:
        figures["ppl_increase"] = shipped["perplexity"] / models["merged"]["perplexity"] - 1
    serving = metrics.get("serving") or {}
    if serving.get("exact_match") is not None and shipped.get("exact_match") is not None:
        figures["serving_gap"] = shipped["exact_match"] - serving["exact_match"]
    return {name: float(value) for name, value in figures.items() if value is not None}
