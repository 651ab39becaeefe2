"""The stage functions run without Prefect on the tiny model: real data stage, training, merge, GPTQ and reload."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.config import load_config
from pipeline.data import load_dataset, read_dataset
from pipeline.run import open_run
from pipeline.shared_prefix import MIN_SHARED_PREFIX
from pipeline.store import read_manifest, sha256_file
from tasks.data import prepare_data
from tasks.finetune import finetune, train_lora
from tasks.merge import merge
from tasks.quantize import quantize


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return load_config("smoke", store=str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def run(cfg):
    return open_run(cfg)


@pytest.fixture(scope="module")
def store(run):
    return run.store


@pytest.fixture(scope="module")
def dataset(cfg):
    return read_dataset(cfg.data)


@pytest.fixture(scope="module")
def data(run, dataset):
    return prepare_data(run, dataset)


@pytest.fixture(scope="module")
def adapter(run, data):
    return finetune(run, data)


@pytest.fixture(scope="module")
def merged(run, data, adapter):
    return merge(run, data, adapter)


@pytest.fixture(scope="module")
def quantized(run, data, merged):
    return quantize(run, data, merged)


def test_data_stage_publishes_the_rows_as_read_keyed_by_content(run, dataset, data, write_jsonl):
    folder = Path(data.uri)
    assert folder == Path(run.store.root) / "smoke" / "data" and not data.reused
    assert load_dataset(folder) == dataset and len(dataset.train) == 216 and len(dataset.eval) == 24
    info = json.loads((folder / "dataset.json").read_text())
    assert info == {"form": "chat", "train_rows": 216, "eval_rows": 24, "content_key": dataset.key}
    first = json.loads((folder / "train.jsonl").read_text().splitlines()[0])
    assert first == dataset.train[0] and first["messages"][-1]["role"] == "assistant"
    # The same rows under another file name: the same key, so the stage (and all that follows) is reused.
    copy = write_jsonl("renamed.jsonl", [json.loads(line) for line in Path("data/smoke_chat.jsonl").read_text().splitlines()])
    renamed = open_run(run.cfg.model_copy(update={"data": run.cfg.data.model_copy(update={"path": str(copy)})}))
    again = prepare_data(renamed, read_dataset(renamed.cfg.data))
    assert again.reused and again.key == data.key and again.uri == data.uri


def test_finetune_lowers_eval_loss(adapter):
    m = adapter.metrics
    assert m["steps"] == 30 and not adapter.reused
    assert m["eval_loss_after"] < 0.9 * m["eval_loss_before"], m
    assert (Path(adapter.uri) / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((Path(adapter.uri) / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["base_model_name_or_path"] == "builtin:tiny-qwen2"


def test_no_artifact_carries_a_path_of_the_machine_that_built_it(isolated_cache, data, adapter, merged, quantized):
    for stage in (data, adapter, merged, quantized):
        for path in Path(stage.uri).rglob("*"):
            if path.is_file() and path.suffix in (".json", ".md", ".jinja", ".txt"):
                text = path.read_text()
                assert str(isolated_cache) not in text and "/tmp/gptqmodel" not in text, path


def test_manifest_lists_files_with_checksums_config_and_versions(store, adapter, merged):
    manifest = read_manifest(store, merged.store_path)
    assert manifest["stage"] == "merge" and manifest["key"] == merged.key
    for rel, info in manifest["files"].items():
        assert sha256_file(Path(merged.uri) / rel) == info["sha256"]
        assert (Path(merged.uri) / rel).stat().st_size == info["size"]
    assert manifest["inputs"]["adapter"]["key"] == adapter.key
    assert manifest["inputs"]["adapter"]["files"]["adapter_model.safetensors"]["size"] > 0
    assert manifest["versions"]["transformers"] == "5.24.0" and manifest["versions"]["peft"] == "0.21.2"
    assert manifest["config"]["merge"]["dtype"] == "float32"
    assert not list(Path(merged.uri).parent.glob(".merge.partial-*"))


def test_merged_logits_equal_adapter_logits_and_files_travel(merged, tiny_base):
    assert merged.metrics["logits_max_abs_diff"] < 1e-4
    assert merged.metrics["check_samples"] == 4
    generation = json.loads((Path(merged.uri) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((tiny_base / "generation_config.json").read_text())["eos_token_id"]
    assert "<|im_start|>" in (Path(merged.uri) / "chat_template.jinja").read_text()
    with safe_open(Path(merged.uri) / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys, "tied embeddings must not be saved as a separate lm_head"
    assert not any("lora_" in k for k in keys)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(Path(merged.uri))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_merged_weights_differ_from_base(merged, tiny_base):
    with safe_open(Path(merged.uri) / "model.safetensors", "pt") as m, safe_open(tiny_base / "model.safetensors", "pt") as b:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert (m.get_tensor(name) - b.get_tensor(name)).abs().max() > 1e-4


def test_gptq_checkpoint_is_standard_v1_int4(quantized, cfg):
    qc = json.loads((Path(quantized.uri) / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["bits"] == 4 and qc["group_size"] == 128 and qc["sym"] is True and qc["desc_act"] is False
    bits, group = 4, 128
    with safe_open(Path(quantized.uri) / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
        zeros = f.get_tensor("model.layers.0.mlp.down_proj.qzeros")
    for prefix, (out_f, in_f) in {"model.layers.0.self_attn.q_proj": (128, 128),
                                  "model.layers.1.self_attn.k_proj": (64, 128),
                                  "model.layers.1.mlp.down_proj": (128, 256)}.items():
        assert shapes[f"{prefix}.qweight"] == [in_f * bits // 32, out_f] and dtypes[f"{prefix}.qweight"] == "I32"
        assert shapes[f"{prefix}.qzeros"] == [in_f // group, out_f * bits // 32]
        assert shapes[f"{prefix}.scales"] == [in_f // group, out_f] and dtypes[f"{prefix}.scales"] == "F16"
        assert shapes[f"{prefix}.g_idx"] == [in_f]
        assert f"{prefix}.weight" not in keys
    # v1 stores symmetric zero points as 8 minus one (0x77777777 per int32); v2 would store 0x88888888.
    assert (zeros == 0x77777777).all()
    assert not any(k.startswith("lm_head") for k in keys)
    assert (Path(quantized.uri) / "gptq_logs").is_dir() and not Path("logs").exists()
    for name in ("config.json", "quantize_config.json"):  # no path of the machine that built it
        config = (Path(quantized.uri) / name).read_text()
        assert "offload_to_disk_path" not in config and "gptqmodel_" not in config and '"/tmp' not in config


def test_gptq_reloads_with_transformers_generates_and_tracks_the_merged_model(quantized, merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert quantized.metrics["smoke_new_tokens"] >= 1
    tokenizer = AutoTokenizer.from_pretrained(Path(quantized.uri))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Spell 'river' backwards."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        q = AutoModelForCausalLM.from_pretrained(Path(quantized.uri)).eval()(**ids).logits.float()
        m = AutoModelForCausalLM.from_pretrained(Path(merged.uri)).eval()(**ids).logits.float()
    assert torch.isfinite(q).all()
    correlation = torch.corrcoef(torch.stack([q.flatten(), m.flatten()]))[0, 1].item()
    assert correlation > 0.9, f"int4 logits barely track the merged model's (correlation {correlation:.3f})"


def test_rerun_reuses_and_corruption_is_rebuilt(run, dataset, store, data, adapter, merged, quantized):
    data_again = prepare_data(run, dataset)
    again = finetune(run, data_again)
    assert data_again.reused and again.reused and again.key == adapter.key and again.metrics == adapter.metrics
    other_run = open_run(run.cfg.model_copy(update={"run_name": "another-run"}))
    other = finetune(other_run, prepare_data(other_run, dataset))
    assert other.reused and other.uri == adapter.uri, "a second run reuses the first run's stage"
    weights = Path(merged.uri) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    rebuilt = merge(run, data_again, again)  # its inputs were reused: only the damage makes it rebuild
    assert not rebuilt.reused and rebuilt.key == merged.key
    assert sha256_file(weights) == read_manifest(store, merged.store_path)["files"]["model.safetensors"]["sha256"]
    assert merge(run, data_again, again).reused


def test_forcing_a_stage_rebuilds_it_and_what_follows(run, dataset, merged, quantized):
    killed = [Path(merged.uri).with_name(".merge.partial-0dead0"), Path(merged.uri).with_name(".merge.old-0dead0")]
    for leftover in killed:  # what a run killed mid-publish leaves beside the stage
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    forced = open_run(run.cfg, force=["merge"])
    data = prepare_data(forced, dataset)
    adapter = finetune(forced, data)
    merged = merge(forced, data, adapter)
    assert (data.reused, adapter.reused, merged.reused) == (True, True, False)
    assert not any(leftover.exists() for leftover in killed), "a completed stage clears what killed runs left"
    requantized = quantize(forced, data, merged)
    assert not requantized.reused and requantized.key == quantized.key, "same inputs, same key, built again"


def test_training_resumes_from_its_last_checkpoint(cfg, dataset, tiny_base, tmp_path):
    short = cfg.training.model_copy(update={"max_steps": 10, "save_steps": 5})
    first = train_lora(tiny_base, dataset, cfg.data.max_length, cfg.lora, short, tmp_path / "a", tmp_path / "ckpt")
    assert first["resumed_from"] is None and (tmp_path / "ckpt" / "checkpoint-10").is_dir()
    longer = short.model_copy(update={"max_steps": 20})
    second = train_lora(tiny_base, dataset, cfg.data.max_length, cfg.lora, longer, tmp_path / "b", tmp_path / "ckpt")
    assert second["resumed_from"] == "checkpoint-10" and second["steps"] == 20


def test_bf16_on_cpu_is_mixed_precision_with_fp32_weights(cfg, dataset, tiny_base, tmp_path):
    """bf16 on a CPU trains with bf16 arithmetic over fp32 weights: it learns, it says bf16, the adapter it ships is
    fp32, and its losses are near, not equal to, an fp32 run's (so the arithmetic really changed)."""
    from safetensors.torch import load_file

    steps = cfg.training.model_copy(update={"max_steps": 4, "logging_steps": 1})
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        metrics = train_lora(tiny_base, dataset, cfg.data.max_length, cfg.lora,
                             steps.model_copy(update={"precision": precision}), out, tmp_path / f"ckpt-{precision}")
        assert metrics["precision"] == precision and metrics["eval_loss_after"] < metrics["eval_loss_before"]
        assert metrics["precision_choice"]["reason"] == f"training.precision={precision}"
        assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
        losses[precision] = [e["loss"] for e in json.loads((out / "training_log.json").read_text())]
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def train_four_fp32_steps(cfg, dataset, tiny_base, folder: Path, **settings) -> tuple[dict, list[float], dict]:
    """Four logged fp32 steps of 4 rows without dropout, padded batches unless `settings` say otherwise: the
    metrics, the per-step losses and the adapter's tensors."""
    from safetensors.torch import load_file

    no_dropout = cfg.lora.model_copy(update={"lora_dropout": 0.0})
    steps = cfg.training.model_copy(update={"max_steps": 4, "logging_steps": 1, "per_device_train_batch_size": 4,
                                            "precision": "fp32", "shared_prefix": False, **settings})
    metrics = train_lora(tiny_base, dataset, cfg.data.max_length, no_dropout, steps, folder, folder.with_name(
        folder.name + "-checkpoints"))
    losses = [e["loss"] for e in json.loads((folder / "training_log.json").read_text())]
    return metrics, losses, load_file(folder / "adapter_model.safetensors")


def test_padding_free_packing_trains_exactly_like_padded_batches(cfg, dataset, tiny_base, tmp_path):
    """Packed rows restart their position ids, so attention never crosses examples: per-step losses are the padded
    run's (fp32), on the same real tokens; a leaking mask would move them (measured 0.68 in logits)."""
    padded, padded_losses, _ = train_four_fp32_steps(cfg, dataset, tiny_base, tmp_path / "padded")
    packed, packed_losses, _ = train_four_fp32_steps(cfg, dataset, tiny_base, tmp_path / "packed", packing=True)
    assert packed["packing"] and not padded["shared_prefix"] and packed["train_tokens"] == padded["train_tokens"] > 0
    assert len(packed_losses) == 4 and packed_losses == pytest.approx(padded_losses, rel=1e-5)
    assert packed["eval_loss_after"] == pytest.approx(padded["eval_loss_after"], rel=1e-5)


def test_a_shared_prefix_is_computed_once_per_batch_with_the_same_losses_and_adapter(cfg, dataset, tiny_base, tmp_path):
    """The chat template's system prompt that every row starts with runs once per micro-batch: per-step losses, eval
    loss and the trained adapter are those of full rows (fp32), and the metrics count the tokens not recomputed."""
    full, full_losses, full_adapter = train_four_fp32_steps(cfg, dataset, tiny_base, tmp_path / "full")
    shared, shared_losses, shared_adapter = train_four_fp32_steps(cfg, dataset, tiny_base, tmp_path / "shared",
                                                                  shared_prefix=True)
    assert not full["shared_prefix"] and full["tokens_not_computed"] == 0
    # 4 steps of 4 rows: each batch's common prefix (at least the system prompt) not recomputed for 3 of its 4 rows
    assert shared["shared_prefix"] and shared["tokens_not_computed"] >= 4 * 3 * MIN_SHARED_PREFIX
    assert shared["train_tokens"] == full["train_tokens"]
    assert len(shared_losses) == 4 and shared_losses == pytest.approx(full_losses, rel=1e-5)
    assert shared["eval_loss_after"] == pytest.approx(full["eval_loss_after"], rel=1e-5)
    assert shared_adapter.keys() == full_adapter.keys()
    for name, tensor in full_adapter.items():
        torch.testing.assert_close(shared_adapter[name], tensor, rtol=1e-4, atol=1e-5)


def test_a_shared_prefix_is_used_only_where_the_packed_row_computes_less():
    """Short chat rows: the tokens saved win. Long rows with a short common prefix: one packed row's mask grows with
    the square of all their tokens, and the rows stay padded."""
    from pipeline.shared_prefix import PrefixSharing

    smollm = PrefixSharing("sdpa", 4 * 576 / (2 * (4 * 576 ** 2 + 3 * 576 * 1536)))
    assert smollm == PrefixSharing.for_model("sdpa", type("Config", (), {"hidden_size": 576, "intermediate_size": 1536}))

    def rows(prefix: int, rest: int, n: int = 8) -> list[dict]:
        return [{"input_ids": [1] * prefix + [2 + i] * rest, "labels": [-100] * (prefix + rest)} for i in range(n)]

    assert smollm.pays(rows(24, 50), 24)  # the default job's shape: 8 rows of ~75 tokens, 24 shared
    assert not smollm.pays(rows(30, 2000), 30)  # 8 rows of 2k tokens sharing 30


def test_the_shared_prefix_ends_before_any_labelled_prediction():
    from pipeline.shared_prefix import shared_prefix_length

    rows = [{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "labels": [-100] * 6 + [7, 8]},
            {"input_ids": [1, 2, 3, 4, 5, 6, 9], "labels": [-100] * 5 + [6, 9]}]
    assert shared_prefix_length(rows) == 4  # the second row's label at 5 is predicted from position 4
    rows[1]["labels"] = [-100] * 6 + [9]
    assert shared_prefix_length(rows) == 5  # ids differ at 6; position 5 predicts the first label
    assert shared_prefix_length(rows[:1]) == 0  # one row shares with nobody
    rows[1]["input_ids"][2] = 0
    assert shared_prefix_length(rows) == 0  # two common tokens are under MIN_SHARED_PREFIX


@pytest.mark.parametrize("packing", [False, True])
def test_the_output_head_runs_only_where_the_loss_is_taken_with_the_same_loss_and_gradients(dataset, tiny_base,
                                                                                          packing):
    """The fine-tune's collator keeps only the positions that predict a labelled token: the same loss and LoRA
    gradients as full logits, from a fraction of them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from pipeline.data import tokenize_example
    from tasks.finetune import TokenCounter

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    examples = [tokenize_example(r, dataset.form, tokenizer, 128) for r in dataset.train[:8]]
    results = []
    for selective in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                               LoraConfig(r=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
        collate = DataCollatorWithFlattening(separator_id=-100) if packing \
            else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        batch = TokenCounter(collate, selective_head=selective)([dict(e) for e in examples])
        out = model(**batch, num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())
        out.loss.backward()
        results.append((out.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]),
                        out.logits.shape[1]))
    (full_loss, full_grad, full_positions), (loss, grad, positions) = results
    assert loss == pytest.approx(full_loss, rel=1e-6)
    assert torch.allclose(grad, full_grad, rtol=1e-5, atol=1e-7) and grad.abs().sum() > 0
    assert positions < full_positions / 3


def test_rectangular_batches_put_longest_first_and_cut_each_batch_to_its_shortest():
    from tasks.quantize import rectangular_batches

    calibration = [[1] * 5, [2] * 9, [3] * 7, [4] * 2, [5] * 8]
    # longest first: 9, 8 | 7, 5 | 2 -> cut to 8 | 5 | 2; token values keep their sample
    assert rectangular_batches(calibration, 2) == [[2] * 8, [5] * 8, [3] * 5, [1] * 5, [4] * 2]
    assert rectangular_batches(calibration, 1) == sorted(calibration, key=len, reverse=True)


def test_a_reused_quantize_decides_without_reading_the_data(run, dataset, quantized, monkeypatch):
    """Calibrating on the training rows, the data stage's key decides reuse: no dataset is loaded to hash them."""
    import tasks.quantize

    data = prepare_data(run, dataset)
    merged = merge(run, data, finetune(run, data))
    monkeypatch.setattr(tasks.quantize, "read_data", lambda *args: pytest.fail("quantize read the dataset"))
    again = quantize(run, data, merged)
    assert again.reused and again.key == quantized.key
