"""Perplexity on fixed token windows, and the windows themselves: shared by every row of benchmarks/quant_quality.py.

Depends on torch only (and a tokenizer object), so llm-compressor's own virtual environment (benchmarks/llmc_gptq.py)
scores its model with exactly this code on exactly the same token ids.
"""

from __future__ import annotations

import math
import random


def token_windows(tokenizer, texts: list[str], length: int) -> list[list[int]]:
    """Every non-overlapping `length`-token window of each text (no special tokens; a text's tail is dropped)."""
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows += [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    return windows


def spread(windows: list[list[int]], n: int) -> list[list[int]]:
    """`n` windows evenly spaced over the list (every text contributes), in order; all of them if fewer."""
    if n >= len(windows):
        return windows
    return [windows[i * len(windows) // n] for i in range(n)]


def sample(windows: list[list[int]], n: int, seed: int) -> list[list[int]]:
    """A seeded random sample of `n` windows (calibration)."""
    return random.Random(seed).sample(windows, min(n, len(windows)))


def window_perplexity(model, windows: list[list[int]], batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of every window."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[start:start + batch_size], device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += nll.item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)
