"""The compute dtype each stage uses, chosen by measuring this device rather than by reading a CPU flag.

A CPU flag is not a speed: AVX512-BF16 sits on CPUs whose bf16 matmuls run at twice fp32's rate and on CPUs where
they run at half of it, a hypervisor can hide AMX, and a CPU with neither still computes bf16 (emulated, several
times slower). So `auto` times the stage's own matmul shape in fp32 and under bf16 autocast (the path the stages
take) for well under a second, takes bf16 only where it is clearly faster (by more than `NOISE`; within noise the
more accurate fp32 wins), and caches the verdict per machine: keyed by what decides it (CPU model and flags, torch
version, threads, device, shape). A GPU is not timed: bf16 where CUDA supports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.cache import cache_root

logger = logging.getLogger(__name__)

Precision = Literal["bf16", "fp32"]
NOISE = 0.10  # bf16 must take under 90% of fp32's time: repeated probes on one idle machine moved by a few %
PROBE_BUDGET_S = 0.5  # rounds stop once both dtypes have had this long (after MIN_ROUNDS)
MIN_ROUNDS, MAX_ROUNDS = 3, 9
REFERENCE_SHAPE = (640, 576, 1536)  # the default job's fine-tune: 8 rows of ~80 tokens through 576 -> 1536
MAX_PROBE_TOKENS = 512  # past a few hundred rows a matmul's speed per dtype no longer changes; the probe stays short


@dataclass(frozen=True)
class PrecisionChoice:
    """A stage's compute dtype and how it was chosen. `fp32_ms` and `bf16_ms` are the probe's median times of one
    matmul of `shape` (tokens x in_features @ in_features x out_features), absent where nothing was timed."""

    precision: Precision
    reason: str
    device: str
    shape: tuple[int, int, int] | None = None
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    cached: bool = False

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def as_metrics(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def choose_precision(setting: str, shape: tuple[int, int, int], setting_name: str = "training.precision",
                     cuda: bool | None = None) -> PrecisionChoice:
    """The compute dtype for `setting` (`auto`, `fp32` or `bf16`) on this machine's device for a stage whose typical
    matmul is `shape`. A forced setting is taken as it is (preflight refuses bf16 where the device has none)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    device = device_name(cuda)
    if setting in ("bf16", "fp32"):
        return PrecisionChoice(setting, f"{setting_name}={setting}", device)  # type: ignore[arg-type]
    if cuda:
        supported = torch.cuda.is_bf16_supported()
        return PrecisionChoice("bf16" if supported else "fp32",
                               "CUDA supports bf16" if supported else "this GPU has no bf16 arithmetic", device)
    return probe_cpu(shape)


def widest_projection(tokens: int, config: dict) -> tuple[int, int, int]:
    """A stage's typical matmul for the probe: `tokens` rows through a decoder layer's hidden -> intermediate
    projection, from the model's config.json."""
    hidden = config.get("hidden_size") or config.get("n_embd") or 1024
    return max(1, tokens), hidden, config.get("intermediate_size") or 4 * hidden


def probe_cpu(shape: tuple[int, int, int]) -> PrecisionChoice:
    """Time `shape` (its tokens capped at MAX_PROBE_TOKENS) on this CPU in fp32 and under bf16 autocast, or read the
    verdict a probe cached for this machine. A probe that cannot run leaves fp32, with one warning."""
    import torch

    device = device_name(False)
    shape = (min(shape[0], MAX_PROBE_TOKENS), shape[1], shape[2])  # what is timed, and so what the verdict is for
    identity = {"cpu": cpu_identity(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "shape": list(shape), "noise": NOISE}
    path = cache_root() / "precision" / (hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
                                         .hexdigest()[:16] + ".json")
    try:
        recorded = {k: v for k, v in json.loads(path.read_text()).items() if k != "identity"}
        return PrecisionChoice(**{**recorded, "shape": tuple(shape), "cached": True})
    except (OSError, ValueError, TypeError):
        pass
    try:
        fp32_ms, bf16_ms = time_matmuls(shape)
    except Exception as exc:  # a broken bf16 backend must not stop the run: fp32 always works
        logger.warning("precision probe could not run on %s (%s: %s): computing in fp32", device,
                       type(exc).__name__, exc)
        return PrecisionChoice("fp32", f"probe failed ({type(exc).__name__}: {exc})", device, tuple(shape))
    faster = bf16_ms < (1 - NOISE) * fp32_ms
    ratio = bf16_ms / fp32_ms
    reason = (f"bf16 measured faster ({ratio:.2f}x fp32's time)" if faster else
              f"bf16 measured {'slower' if ratio > 1 else 'within noise'} ({ratio:.2f}x fp32's time)")
    choice = PrecisionChoice("bf16" if faster else "fp32", reason, device, tuple(shape), fp32_ms, bf16_ms)
    logger.info("precision probe on %s, %dx%d @ %dx%d: fp32 %.2f ms, bf16 %.2f ms: %s", device, shape[0], shape[1],
                shape[1], shape[2], fp32_ms, bf16_ms, reason)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = {k: v for k, v in asdict(choice).items() if k not in ("shape", "cached")}
        path.write_text(json.dumps({**fields, "identity": identity}))
    except OSError as exc:  # a read-only cache costs a probe per stage, nothing more
        logger.debug("precision probe not cached (%s)", exc)
    return choice


def time_matmuls(shape: tuple[int, int, int]) -> tuple[float, float]:
    """Median milliseconds of `x @ w.T` for x (tokens, in) and w (out, in) in fp32, and under bf16 autocast over the
    same fp32 tensors (the cast included, as autocast does it in a stage), rounds alternating between the two.
    Tokens are capped at MAX_PROBE_TOKENS: a stage's batch of thousands would cost seconds to say the same."""
    import torch

    tokens, in_features, out_features = min(shape[0], MAX_PROBE_TOKENS), shape[1], shape[2]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=generator)
    w = torch.randn(out_features, in_features, generator=generator)

    def fp32() -> None:
        torch.nn.functional.linear(x, w)

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(x, w)

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.no_grad():
        fp32(), bf16()  # warm-up: first calls pick kernels and allocate
        start = time.perf_counter()
        for round_ in range(MAX_ROUNDS):
            for name, run in (("fp32", fp32), ("bf16", bf16)):
                began = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - began)
            if round_ + 1 >= MIN_ROUNDS and time.perf_counter() - start > PROBE_BUDGET_S:
                break
    return statistics.median(times["fp32"]) * 1e3, statistics.median(times["bf16"]) * 1e3


def cpu_identity() -> dict[str, str]:
    """What decides a CPU's speed per dtype, as far as the OS tells: the model name and the flags (Linux), else
    platform's description."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = hashlib.sha256(value.strip().encode()).hexdigest()[:16]
    except OSError:
        pass
    return {"model": model, "flags": flags, "machine": platform.machine()}


def device_name(cuda: bool) -> str:
    import torch

    if cuda:
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {cpu_identity()['model']} ({torch.get_num_threads()} threads)"


def bf16_refusal(setting_name: str, device_kind: str, bf16_supported: bool, device: str) -> str | None:
    """Why `<setting_name>=bf16` cannot run on `device`, or None: a GPU without bf16 arithmetic (before Ampere: T4,
    V100). Every CPU computes bf16 (emulated where it has no bf16 instructions), so a CPU is never refused; where
    bf16 is slower there, `auto` measures it and takes fp32."""
    if device_kind == "cuda" and not bf16_supported:
        return (f"{setting_name} is 'bf16' but this GPU ({device}) has no bf16 arithmetic (CUDA's bf16 needs compute "
                f"capability 8.0, Ampere or newer). Set {setting_name}=auto (fp32 on this GPU) or "
                f"{setting_name}=fp32")
    return None
