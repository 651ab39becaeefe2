"""The machine-local cache (not the store): built-in and dequantized bases, downloads of remote stages, scratch."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$FTQ_CACHE_DIR, else ~/.cache/finetune-then-quantize."""
    return Path(os.environ.get("FTQ_CACHE_DIR", Path.home() / ".cache" / "finetune-then-quantize"))
