"""Rendering: loss only on what the model should write, in each of the three data forms."""

from pipeline.config import DataConfig
from pipeline.data import IGNORE_INDEX, read_dataset, render_text, tokenize_example
from pipeline.tiny_model import build_byte_tokenizer

TOKENIZER = build_byte_tokenizer()


def learned_text(example) -> str:
    return TOKENIZER.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX])


def test_chat_loss_is_on_assistant_turns_and_their_end_token_only():
    row = {"messages": [{"role": "user", "content": "Spell 'cat' backwards."}, {"role": "assistant", "content": "tac"},
                        {"role": "user", "content": "And 'dog'?"}, {"role": "assistant", "content": "god"}]}
    example = tokenize_example(row, "chat", TOKENIZER, max_length=512)
    assert example["input_ids"] == TOKENIZER(render_text(row, "chat", TOKENIZER))["input_ids"]
    assert learned_text(example) == "tac<|im_end|>\ngod<|im_end|>\n"


def test_prompt_completion_loss_is_on_completion_and_eos():
    example = tokenize_example({"prompt": "2+2=", "completion": "4"}, "prompt_completion", TOKENIZER, 512)
    assert TOKENIZER.decode(example["input_ids"]) == "2+2=4<|im_end|>"
    assert learned_text(example) == "4<|im_end|>"


def test_text_learns_every_token_and_truncates():
    example = tokenize_example({"text": "abcdefghij"}, "text", TOKENIZER, max_length=4)
    assert example["labels"] == example["input_ids"] and TOKENIZER.decode(example["input_ids"]) == "abcd"


def test_splits_are_seeded_and_disjoint(write_jsonl):
    path = write_jsonl("t.jsonl", [{"text": f"row {i}"} for i in range(50)])
    cfg = DataConfig(path=str(path), eval_fraction=0.2, seed=3)
    a, b = read_dataset(cfg), read_dataset(cfg)
    assert a == b and a.form == "text"
    assert len(a.eval) == 10 and len(a.train) == 40
    assert not {r["text"] for r in a.eval} & {r["text"] for r in a.train}


def test_csv_and_parquet_load(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"prompt": [f"q{i}" for i in range(10)], "completion": [f"a{i}" for i in range(10)]})
    for name, write in (("d.csv", lambda p: frame.to_csv(p, index=False)), ("d.parquet", frame.to_parquet)):
        write(tmp_path / name)
        dataset = read_dataset(DataConfig(path=str(tmp_path / name)))
        assert dataset.form == "prompt_completion" and len(dataset.train) + len(dataset.eval) == 10
