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
