"""A first file whose column is null in every row, ahead of files with values in it: datasets types the column
null from it and failed on the later files with "Couldn't cast array of type string to null" (JSON Lines) or
"Couldn't write column ...: its type in this file is null" (a JSON array), naming no file. The error now names the
file, the column and that its rows are null, for chat, preference and prompt rows, streamed or not, and for a JSON
array of text rows (leading JSON Lines files of null text are skipped: test_train_known_paths; so are leading JSON
Lines and Parquet files of null conversations, whose rows would be dropped: test_train_failure_paths)."""

import json

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import build_data, load_conversations, local_files
from retnet.train.preference import load_pairs
from retnet.train.prompts import load_prompt_rows

KWARGS = dict(vocab_size=512, seed=0, micro_batch=1, global_batch=1, rank=0, local_rank=0, world_size=1,
              tokenizer_dir=None, barrier=lambda: None)


def _chat(i):
    return [{"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]


# format, the column left null in the first file, row i with values
CASES = {
    "messages": ("chat", "messages", lambda i: {"messages": _chat(i)}),
    "sharegpt": ("chat", "conversations", lambda i: {"conversations": [
        {"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}),
    "completion": ("chat", "completion", lambda i: {"prompt": f"q{i}", "completion": f"a{i}"}),
    "chosen": ("preference", "chosen", lambda i: {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}),
    "preference prompt": ("preference", "prompt",
                          lambda i: {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}),
    "prompts": ("prompts", "prompt", lambda i: {"prompt": f"q{i}", "answer": str(i)}),
    "text": ("text", "text", lambda i: {"text": f"def f_{i}(x):\n    return x * {i}\n" * 4}),
}


def _write(folder, layout, column, row, rows=8):
    """a.EXT with ``column`` null in its 2 rows, then b.EXT with values; EXT jsonl or json (an array)."""
    folder.mkdir()
    suffix = "jsonl" if layout == "jsonl" else "json"
    for name, values in (("a", [{**row(i), column: None} for i in range(2)]), ("b", [row(i) for i in range(rows)])):
        (folder / f"{name}.{suffix}").write_text("".join(json.dumps(v) + "\n" for v in values) if layout == "jsonl" else json.dumps(values))
    return folder / f"a.{suffix}"


def _named(first, column):
    return rf"{column!r} is null in every row of '.*{first.name}', and '.*b\.json.?' after it holds values"


# A leading JSON Lines file of null conversations is skipped (test_train_failure_paths); a JSON array is named
@pytest.mark.parametrize(("case", "layout"), [(c, layout) for c in CASES if c != "text" for layout in ("jsonl", "array")
                                              if not (layout == "jsonl" and c in ("messages", "sharegpt"))])
def test_a_first_file_of_null_rows_is_named(case, layout, tmp_path):
    fmt, column, row = CASES[case]
    first = _write(tmp_path / "data", layout, column, row)
    config = DataConfig(dataset=str(tmp_path / "data"), format=fmt, cache_dir=str(tmp_path / "cache"))
    load = {"chat": load_conversations, "preference": load_pairs, "prompts": load_prompt_rows}[fmt]
    with pytest.raises(ConfigError, match=_named(first, column) + rf".*fill in its {column!r}"):
        load(config, local_files(config.dataset), tmp_path / "cache")


def test_a_first_json_array_of_null_text_is_named(tokenizer_dir, tmp_path):
    """Leading JSON Lines files of null text are skipped; a JSON array's rows are known only by parsing the whole
    file, so it is named instead."""
    _, column, row = CASES["text"]
    first = _write(tmp_path / "data", "array", column, row, rows=12)
    config = DataConfig(dataset=str(tmp_path / "data"), tokenizer=str(tokenizer_dir), seq_len=32, val_fraction=0.1,
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=_named(first, column) + ".*its rows hold no documents"):
        build_data(config, **dict(KWARGS, micro_batch=2, global_batch=4))


def test_a_first_file_of_a_null_other_column_is_named(tmp_path):
    """Any column: a chat set's ``id`` null in the whole first file failed as its messages would."""
    first = _write(tmp_path / "data", "jsonl", "id", lambda i: {"messages": _chat(i), "id": f"row-{i}"})
    config = DataConfig(dataset=str(tmp_path / "data"), format="chat", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=_named(first, "id")):
        load_conversations(config, local_files(config.dataset), tmp_path / "cache")


def _chat_files(folder, files):
    folder.mkdir()
    for name, rows in files.items():
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(dataset=str(folder), format="chat", cache_dir=str(folder.parent / "cache"))
    return lambda: load_conversations(config, local_files(config.dataset), folder.parent / "cache")


def test_a_nested_field_null_throughout_the_first_file_names_the_file_that_fails(tmp_path):
    """A message key null in every row of the first file fails on the next file with values in it, with the same
    "Couldn't cast ... to null": that file and the nested field are named, not a later file's other null column
    (a review found c.jsonl's 'meta' blamed for b.jsonl's names)."""
    named = [{"role": "user", "content": "q", "name": None}, {"role": "assistant", "content": "a", "name": None}]
    load = _chat_files(tmp_path / "data", {
        "a.jsonl": [{"messages": named, "meta": None}] * 3,
        "b.jsonl": [{"messages": [{**m, "name": "bob"} for m in named], "meta": None}] * 3,
        "c.jsonl": [{"messages": _chat(i), "meta": "x"} for i in range(3)]})
    with pytest.raises(ConfigError, match=r"'messages\[\]\.name' is null in every row of '.*a\.jsonl', and '.*b\.jsonl'"):
        load()


def test_other_columns_in_a_later_file_are_not_blamed_on_a_null_column(tmp_path):
    # b.jsonl's extra column is what fails ("column names don't match"); the schema datasets prints holds a null
    load = _chat_files(tmp_path / "data", {
        "a.jsonl": [{"messages": _chat(i), "meta": None} for i in range(3)],
        "b.jsonl": [{"messages": _chat(i), "meta": None, "extra": 1} for i in range(3)],
        "c.jsonl": [{"messages": _chat(i), "meta": "x"} for i in range(3)]})
    with pytest.raises(ConfigError, match="column names don't match") as refused:
        load()
    assert "is null in every row" not in str(refused.value)
