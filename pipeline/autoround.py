"""AutoRound (Intel's auto-round) through its own API: each decoder block's rounding and clipping tuned by signed
gradient descent against the block's full-precision output, exported as a standard GPTQ v1 checkpoint
(`format="auto_gptq"`: symmetric, no activation order, the layout vLLM's Marlin kernels and transformers load).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import QuantizationConfig
from pipeline.errors import BadInputError
from pipeline.gptq_checkpoint import edit_quantization_config

logger = logging.getLogger(__name__)


def packed_windows(calibration: list[list[int]], length: int) -> list[list[int]]:
    """The calibration rows end to end, cut into windows of `length` tokens; the tail shorter than a window is
    dropped. AutoRound tunes on batches of equal-length samples and silently skips a sample shorter than its
    `seqlen`, so short chat rows given as they are would mostly not be used."""
    tokens = [token for ids in calibration for token in ids]
    return [tokens[start:start + length] for start in range(0, len(tokens) - length + 1, length)]


def quantize_autoround(merged_dir: Path, out_dir: Path, quant: QuantizationConfig, calibration: list[list[int]],
                       seed: int, bf16: bool = True) -> dict[str, Any]:
    """AutoRound-quantize `merged_dir` on `calibration` (token ids, packed into windows), tuning in bf16 mixed
    precision or in fp32 (`amp` off), and write a GPTQ v1 checkpoint to `out_dir`. Returns what the stage records
    about the calibration."""
    settings = quant.autoround
    length = settings.seqlen or quant.calibration.max_length
    windows = packed_windows(calibration, length)[:settings.nsamples]
    given = sum(map(len, calibration))
    if not windows:
        raise BadInputError(
            f"the {len(calibration)} calibration rows hold {given} tokens, fewer than one AutoRound window of "
            f"{length}: lower quantization.autoround.seqlen or raise quantization.calibration.n_samples")
    import torch
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = min(settings.batch_size, len(windows))
    logger.info("AutoRound int%d g%d: %d windows of %d tokens (%d of the %d calibration tokens), %d steps per block, "
                "batch %d, lr %s", quant.bits, quant.group_size, len(windows), length, len(windows) * length, given,
                settings.iters, batch, settings.lr or "auto (1/iters)")
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    algorithm = SignRoundConfig(bits=quant.bits, group_size=quant.group_size, sym=True, iters=settings.iters,
                                lr=settings.lr, enable_minmax_tuning=settings.minmax_tuning)
    with _autoround_logs_through_ours():
        compressor = AutoRound(model, tokenizer, alg_configs=algorithm, dataset=[torch.tensor([w]) for w in windows],
                               nsamples=len(windows), seqlen=length, batch_size=batch, seed=seed, amp=bf16,
                               device_map=0 if torch.cuda.is_available() else "cpu")
        compressor.quantize()
        compressor.save_quantized(str(out_dir), format="auto_gptq", inplace=True)
    del compressor, model
    name_checkpoint_format(Path(out_dir))
    return {"algorithm": "autoround", "calibration_windows": len(windows), "calibration_window_tokens": length,
            "calibration_tokens": len(windows) * length, "calibration_tokens_given": given}


def name_checkpoint_format(out_dir: Path) -> None:
    """AutoRound's GPTQ export leaves `checkpoint_format` out (its readers default to v1, `gptq`): write it, so the
    checkpoint says what it is and the stage's layout check reads the same field for every method."""
    def name_it(config: dict) -> bool:
        if "checkpoint_format" in config:
            return False
        config["checkpoint_format"] = "gptq"
        return True

    edit_quantization_config(out_dir, name_it)


@contextmanager
def _autoround_logs_through_ours() -> Iterator[None]:
    """auto-round's logger prints to stderr through its own colored handler and does not propagate: while it runs,
    its records go through the pipeline's handlers instead (the console, Prefect's run log)."""
    ar_logger = logging.getLogger("autoround")
    handlers, propagate = ar_logger.handlers[:], ar_logger.propagate
    for handler in handlers:
        ar_logger.removeHandler(handler)
    ar_logger.propagate = True
    try:
        yield
    finally:
        ar_logger.propagate = propagate
        for handler in handlers:
            ar_logger.addHandler(handler)
