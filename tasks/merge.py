"""Stage 2: merge the LoRA adapter into full-precision weights (never into 4-bit), checked against the adapter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.base_model import resolve_model_dir
from pipeline.config import MergeConfig
from pipeline.data import tokenize_example
from pipeline.errors import StageCheckError
from pipeline.keys import code_version
from pipeline.run import RunContext
from pipeline.stage import StageArtifact, local_copy, run_stage
from pipeline.store import check_room
from tasks.data import read_data

logger = logging.getLogger(__name__)


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, merge: MergeConfig,
                  check_inputs: list[list[int]], trust_remote_code: bool = False) -> dict[str, Any]:
    """Merge `adapter_dir` into `base_dir`'s weights and save a standalone model to `out_dir`.

    Before saving, merged and adapter logits on `check_inputs` must agree within `merge.logits_atol`.
    The tokenizer (with its chat template) and generation_config (eos ids) travel with the weights, and tied
    embeddings stay tied.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dtype = _merge_dtype(merge.dtype, base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()

    batch = _pad(check_inputs, pad_id=0)
    with torch.no_grad():
        adapter_logits = model(**batch).logits
        merged = model.merge_and_unload()
        merged_logits = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    max_diff = (adapter_logits - merged_logits).abs()[mask].max().item()
    logger.info("merged vs adapter logits on %d samples: max |diff| %.3g (tolerance %.3g, %s)",
                len(check_inputs), max_diff, merge.logits_atol, dtype)
    if not max_diff <= merge.logits_atol:
        raise StageCheckError(f"merged model's logits differ from the adapter's by {max_diff:.3g} "
                              f"(> merge.logits_atol {merge.logits_atol}); merging in {dtype} lost precision. "
                              "Merge in float32 (--set merge.dtype=float32) or raise the tolerance if expected")

    tied = bool(getattr(merged.config, "tie_word_embeddings", False))
    if tied and merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight:
        raise StageCheckError("the base ties its input and output embeddings but the merged model does not; "
                              "do not put embed_tokens or lm_head in lora.target_modules for a tied model")
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    if (Path(base_dir) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base_dir).save_pretrained(out_dir)
    return {"logits_max_abs_diff": max_diff, "check_samples": len(check_inputs), "dtype": str(dtype).removeprefix("torch."),
            "tied_embeddings": tied}


def merged_bytes(base_dir: Path, dtype) -> int:
    """What the merged weights take on disk: every tensor of the base in `dtype`, counted from the safetensors
    headers (no weights read), plus 1% for the files beside them."""
    from math import prod

    from safetensors import safe_open

    numel = 0
    for path in Path(base_dir).glob("*.safetensors"):
        with safe_open(path, "pt") as weights:
            numel += sum(prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    return int(numel * dtype.itemsize * 1.01)


def _merge_dtype(name: str, base_dir: Path):
    import torch
    from transformers import AutoConfig

    if name != "auto":
        return getattr(torch, name)
    if not torch.cuda.is_available():
        return torch.float32
    declared = getattr(AutoConfig.from_pretrained(base_dir), "dtype", None)
    return declared if isinstance(declared, torch.dtype) else torch.bfloat16


def _pad(sequences: list[list[int]], pad_id: int) -> dict:
    import torch

    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def merge(run: RunContext, data: StageArtifact, adapter: StageArtifact) -> StageArtifact:
    """Merge into `<store>/<run>/merge/`, or reuse a merge of the same adapter with the same config and code. The
    check compares merged and adapter logits on the first `merge.check_samples` eval rows."""
    from transformers import AutoTokenizer

    model, merge_cfg = run.cfg.model, run.cfg.merge

    def build(out_dir: Path) -> dict[str, Any]:
        base_dir = resolve_model_dir(model.name_or_path, model.revision)
        check_room("merge", out_dir, merged_bytes(base_dir, _merge_dtype(merge_cfg.dtype, base_dir)))
        adapter_dir = local_copy(run.store, adapter)
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        dataset = read_data(run, data)
        check_inputs = [tokenize_example(row, dataset.form, tokenizer, run.cfg.data.max_length)["input_ids"]
                        for row in dataset.eval[: merge_cfg.check_samples]]
        return merge_adapter(base_dir, adapter_dir, out_dir, merge_cfg, check_inputs, model.trust_remote_code)

    determinants = {"merge": merge_cfg.model_dump(), "max_length": run.cfg.data.max_length,
                    "code": code_version(__name__)}
    return run_stage(run, "merge", determinants, build, inputs={"adapter": adapter, "data": data})
