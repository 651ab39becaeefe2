"""Running a causal LM's output head only where it is needed.

With a vocabulary of 50-150k tokens, the head's logits for every prompt token are most of a chat row's output work
and memory, and a loss or a perplexity on the answer tokens throws them away. transformers' own models take
`logits_to_keep` (positions) and compute their loss from `shift_labels`; the fine-tune's collator and the evaluate
stage's perplexity pass use both where the model does.
"""

from __future__ import annotations


def selective_head(model) -> bool:
    """Whether the model's output head can run at chosen positions only: transformers' own models take
    `logits_to_keep` (and compute their loss from `shift_labels`); a repository's remote code may not."""
    import inspect

    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False  # prompt tuning puts learned tokens before the input: every position moves
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__module__.startswith("transformers.") and \
        "logits_to_keep" in inspect.signature(base.forward).parameters
