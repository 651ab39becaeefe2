"""The quantization config a GPTQ checkpoint carries, in each of its copies.

A saved checkpoint holds it twice: in config.json (`quantization_config`, what transformers and vLLM read) and in
the quantizer's own file (gptqmodel's `quantize_config.json`, AutoRound's `quantization_config.json`). An edit the
stage makes to one is made to every copy present.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

COPIES = (("quantize_config.json", None), ("quantization_config.json", None), ("config.json", "quantization_config"))


def edit_quantization_config(out_dir: Path, edit: Callable[[dict[str, Any]], bool]) -> None:
    """Apply `edit` to every copy of the checkpoint's quantization config; a copy is rewritten when `edit` returns
    True (it changed something)."""
    for name, section in COPIES:
        path = out_dir / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        quantize_config = config.get(section, {}) if section else config
        if edit(quantize_config):
            path.write_text(json.dumps(config, indent=2) + "\n")


def store_float_tensors_in_bf16(out_dir: Path) -> int:
    """Rewrite a checkpoint's fp32 tensors (embeddings, norms; an fp32 calibration leaves them so) in bf16, as a bf16
    calibration stores them, and say so in config.json: the same files to ship and serve whichever dtype computed
    the quantization. Integer tensors (packed weights, zeros, group indices) and fp16 scales are kept. Returns how
    many tensors were cast."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    cast = 0
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            metadata = weights.metadata()
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 - not a dict
        wide = [name for name, tensor in tensors.items() if tensor.dtype == torch.float32]
        if wide:
            tensors |= {name: tensors[name].to(torch.bfloat16) for name in wide}
            save_file(tensors, path, metadata=metadata)
            cast += len(wide)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config = {**config, "dtype": "bfloat16"} | ({"torch_dtype": "bfloat16"} if "torch_dtype" in config else {})
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return cast
