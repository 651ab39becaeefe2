"""Stage 3: quantize the merged model to a standard GPTQ v1 checkpoint, by GPTQ (gptqmodel's own API) or AutoRound
(`pipeline.autoround`), then check its layout, reload it with transformers and generate.

transformers' GPTQConfig path writes `gptq_v2`, and optimum's saver wrote v1 tensors under a v2 config; gptqmodel's
`load -> quantize -> save` writes the v1 layout (`checkpoint_format: gptq`) that vLLM, TGI and transformers load, and
so does AutoRound's `auto_gptq` export.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import QuantizationConfig
from pipeline.data import read_calibration, render_text
from pipeline.errors import StageCheckError
from pipeline.gptq_checkpoint import edit_quantization_config, store_float_tensors_in_bf16
from pipeline.keys import code_version, stage_key
from pipeline.precision import PrecisionChoice, choose_precision, widest_projection
from pipeline.run import RunContext
from pipeline.stage import StageArtifact, local_copy, run_stage
from tasks.data import read_data

logger = logging.getLogger(__name__)


def calibration_sample(rows: list[dict], n_samples: int, seed: int) -> list[dict]:
    """A seeded sample of `n_samples` rows, the same for the same rows and seed."""
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    return rows[:n_samples]


def calibration_ids(rows: list[dict], form: str, tokenizer, max_length: int) -> list[list[int]]:
    """Each row rendered as in training, tokenized, cut to `max_length` tokens."""
    return [tokenizer(render_text(row, form, tokenizer), add_special_tokens=False)["input_ids"][:max_length]
            for row in rows]


def rectangular_batches(calibration: list[list[int]], batch_size: int) -> list[list[int]]:
    """Longest first (gptqmodel's own order), each run of `batch_size` cut to its shortest member: batches without
    padding. gptqmodel 7.6.0's GPTAQ fails on padded batches of unequal samples ("The size of tensor a (575) must
    match the size of tensor b (83)"); sorted, a batch's members differ little, so few tokens are dropped."""
    ordered = sorted(calibration, key=len, reverse=True)
    out = []
    for start in range(0, len(ordered), batch_size):
        group = ordered[start:start + batch_size]
        out += [ids[:min(map(len, group))] for ids in group]
    return out


def quantize_model(merged_dir: Path, out_dir: Path, quant: QuantizationConfig, calibration: list[list[int]],
                   seed: int = 0) -> dict[str, Any]:
    """Quantize `merged_dir` on `calibration` (token ids) by `quant.method` into a GPTQ v1 checkpoint in `out_dir`,
    ship the merged model's generation config, check the layout, reload with transformers and generate."""
    from transformers import GenerationConfig

    precision = calibration_precision(quant, Path(merged_dir))
    if quant.method == "autoround":
        from pipeline.autoround import quantize_autoround

        info = quantize_autoround(merged_dir, out_dir, quant, calibration, seed, bf16=precision.bf16)
    else:
        info = quantize_gptq(merged_dir, out_dir, quant, calibration, bf16=precision.bf16)
    info |= {"precision": precision.precision, "precision_choice": precision.as_metrics()}
    # the quantizers' saved generation_config may turn sampling on; ship the merged model's, as trained.
    if (Path(merged_dir) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(merged_dir).save_pretrained(out_dir)
    layout = check_gptq_v1(Path(out_dir), quant)
    smoke = generate_smoke(Path(out_dir), quant.smoke_prompt)
    return {**layout, **smoke, **info}


def calibration_precision(quant: QuantizationConfig, merged_dir: Path) -> PrecisionChoice:
    """`quantization.precision`, `auto` measured on this device at the stage's shape: a calibration batch through the
    model's hidden -> intermediate projection. gptqmodel and AutoRound both default to bf16 on every CPU, which on a
    CPU without fast bf16 runs the calibration forwards several times slower than fp32."""
    tokens = quant.calibration.batch_size * quant.calibration.max_length
    return choose_precision(quant.precision, widest_projection(tokens, json.loads((merged_dir / "config.json").read_text())),
                            "quantization.precision")


def quantize_gptq(merged_dir: Path, out_dir: Path, quant: QuantizationConfig, calibration: list[list[int]],
                  bf16: bool = True) -> dict[str, Any]:
    """GPTQ-quantize `merged_dir` on `calibration` (token ids), computing in bf16 or fp32, and write a GPTQ v1
    checkpoint to `out_dir` (stored in bf16 either way, as gptqmodel stores a bf16 run); returns what the stage
    records about the calibration."""
    import torch

    # gptqmodel 7.6.0 sizes its CPU worker pools from the core count and, on <= 2 cores, fails with "Virtual pool
    # 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1" unless this is set.
    if (os.cpu_count() or 1) <= 2:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(
        bits=quant.bits, group_size=quant.group_size, desc_act=quant.desc_act, sym=quant.sym,
        damp_percent=quant.damp_percent, true_sequential=quant.true_sequential,
        act_group_aware=quant.act_group_aware and not quant.desc_act and quant.group_size != -1,
        mse=quant.mse, gptaq={"alpha": quant.gptaq_alpha} if quant.gptaq_alpha is not None else None,
    )
    logger.info("GPTQ int%d g%d on %d calibration samples (%s)", quant.bits, quant.group_size, len(calibration),
                ", ".join(f"{k}={getattr(config, k)}" for k in ("desc_act", "act_group_aware", "sym", "damp_percent", "mse", "gptaq")))
    tokens = sum(map(len, calibration))
    if quant.gptaq_alpha is not None and len(set(map(len, calibration))) > 1:
        calibration = rectangular_batches(calibration, quant.calibration.batch_size)
        logger.info("GPTAQ needs unpadded batches: each batch of %d cut to its shortest sample, %d of %d tokens kept",
                    quant.calibration.batch_size, sum(map(len, calibration)), tokens)
    model = GPTQModel.load(str(merged_dir), config, dtype=torch.bfloat16 if bf16 else torch.float32)
    with _gptq_logs_into(Path(out_dir) / "gptq_logs"):
        model.quantize(calibration, batch_size=quant.calibration.batch_size, calibration_sort="desc")
    model.save(str(out_dir))
    del model
    if not bf16:  # stored as a bf16 calibration stores it (what vLLM and the model card expect)
        store_float_tensors_in_bf16(Path(out_dir))
    drop_machine_paths(Path(out_dir))
    return {"algorithm": "gptq", "calibration_samples": len(calibration),
            "calibration_tokens": sum(map(len, calibration)), "calibration_tokens_given": tokens}


def drop_machine_paths(out_dir: Path) -> None:
    """gptqmodel records its offload folder (`/tmp/gptqmodel_...`, this machine's) in the quantize config's `meta`;
    a shipped checkpoint carries no path of the machine that built it."""
    edit_quantization_config(out_dir, lambda config: config.get("meta", {}).pop("offload_to_disk_path", None)
                             is not None)


def check_gptq_v1(out_dir: Path, quant: QuantizationConfig) -> dict[str, Any]:
    """Refuse anything but a standard GPTQ v1 config with the requested bits and group size."""
    found = json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})
    expected = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": quant.bits, "group_size": quant.group_size}
    wrong = {k: found.get(k) for k, v in expected.items() if found.get(k) != v}
    if wrong:
        raise StageCheckError(f"saved checkpoint's quantization_config differs from GPTQ v1 {expected}: {wrong}")
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": quant.bits, "group_size": quant.group_size,
            "weights_bytes": size}


def generate_smoke(out_dir: Path, prompt: str, max_new_tokens: int = 8) -> dict[str, Any]:
    """Reload the checkpoint with transformers (not gptqmodel) and greedily generate a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if not torch.isfinite(logits).all():
        raise StageCheckError("the reloaded GPTQ checkpoint produced non-finite logits")
    new_tokens = out[0, ids["input_ids"].shape[1]:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    logger.info("reloaded with transformers; greedy continuation of %r: %r", prompt, text)
    return {"smoke_prompt": prompt, "smoke_generation": text, "smoke_new_tokens": int(new_tokens.numel())}


@contextmanager
def _gptq_logs_into(folder: Path) -> Iterator[None]:
    """gptqmodel writes per-module logs to ./logs; keep them with the checkpoint they describe instead."""
    from gptqmodel.looper import loop_processor

    previous = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = previous


GPTQ_ONLY = ("desc_act", "act_group_aware", "damp_percent", "true_sequential", "mse", "gptaq_alpha")


def settings_in_effect(quant: QuantizationConfig) -> dict[str, Any]:
    """The quantization settings the configured method reads: changing the other method's settings does not make a
    new quantization (the stage key is built from these)."""
    if quant.method == "gptq":
        return quant.model_dump(exclude={"autoround"})
    return quant.model_dump(exclude={**dict.fromkeys(GPTQ_ONLY, True), "calibration": {"batch_size"}})


def quantize(run: RunContext, data: StageArtifact, merged: StageArtifact) -> StageArtifact:
    """Quantize into `<store>/<run>/quantize/`, or reuse a quantization of the same merged model with the same
    config, calibration texts and code. Calibrating on the training rows needs no read to decide reuse: the data
    stage's key covers them; a calibration file is read (once) and its rows hashed."""
    from transformers import AutoTokenizer

    quant = run.cfg.quantization
    from_file = quant.calibration.source != "train"
    file_rows = read_calibration(quant.calibration.source, run.cfg.data) if from_file else None
    determinants = {"quantization": settings_in_effect(quant), "seed": run.cfg.data.seed, "code": code_version(__name__),
                    "calibration": stage_key("calibration", {"rows": file_rows[1]}) if from_file else "train"}

    def build(out_dir: Path) -> dict[str, Any]:
        if file_rows:
            form, rows = file_rows
        else:
            dataset = read_data(run, data)
            form, rows = dataset.form, dataset.train
        sample = calibration_sample(rows, quant.calibration.n_samples, run.cfg.data.seed)
        merged_dir = local_copy(run.store, merged)
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        ids = calibration_ids(sample, form, tokenizer, quant.calibration.max_length)
        return quantize_model(merged_dir, out_dir, quant, ids, run.cfg.data.seed)

    return run_stage(run, "quantize", determinants, build, inputs={"merged": merged, "data": data})
