"""Silence the dependency messages that say nothing to a user of this pipeline, one named filter each, so a run's
first lines are its own. Everything else a dependency says, and all of the pipeline's own warnings, still shows."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class DependencyNoise(logging.Filter):
    """Drops records of one logger whose message starts with `prefix`; `why` says why that is safe."""

    logger: str
    prefix: str
    why: str

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


NOISE = (
    DependencyNoise("torchao", "Failed to load ",
                    "torchao (imported by transformers' quantizer registry) tries its prebuilt CUDA/Hopper kernels at "
                    "import and warns where they cannot load; the pipeline calls none of torchao's kernels"),
    DependencyNoise("torchao.kernel.intmm", "Warning: Detected no triton",
                    "torchao's int8 matmul kernels need Triton (a GPU compiler); the pipeline does not use them"),
    DependencyNoise("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
                    "bitsandbytes (imported by transformers and peft whenever it is installed) looks for an optional "
                    "fused CPU kernel on the Hugging Face hub (the `kernels` package) and falls back to its own"),
    DependencyNoise("DeepSpeed", "Setting accelerator to CPU",
                    "accelerate imports DeepSpeed whenever it is installed (the `distributed` extra), and DeepSpeed "
                    "then announces on stdout which accelerator it found; the pipeline chose its devices already"),
    DependencyNoise("DeepSpeed", "Setting ds_accelerator to",
                    "the same announcement on a machine with a GPU"),
    DependencyNoise("torch.utils._pytree", "<enum ",
                    "torchao registers its Enum config types with torch's pytree at import, which torch 2.13 accepts "
                    "but calls deprecated; a message for torchao's authors, not for users"),
)
# transformers' Trainer and peft read `model.is_gradient_checkpointing`, which transformers 5 renamed; the old name
# still works and the warning is for their code, not ours (we pass the new `activation_checkpointing`).
FUTURE_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)
# gptqmodel warns at import that the Python GIL is enabled (it recommends free-threaded Python 3.13t for MoE models
# on several GPUs); this project pins Python 3.11, so the advice cannot be taken. Its own switch turns it off.
ENVIRONMENT = {"GPTQMODEL_DISABLE_GIL_WARNING": "1"}


def quiet_dependencies() -> None:
    """Install the filters above (idempotent); call before torch, transformers or torchao are imported."""
    for noise in NOISE:
        logger = logging.getLogger(noise.logger)
        if noise not in logger.filters:
            logger.addFilter(noise)
    for message in FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
