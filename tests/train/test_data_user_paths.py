"""User paths through the data pipeline, checkpoints and retnet-eval that went wrong: each test is one bug's case,
run in-process on a few small documents."""

import json
import os

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import LOCAL_BLOCKS, build_data

KWARGS = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
              tokenizer_dir=None, barrier=lambda: None)


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def _documents(count, start=0):
    return [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 6 for i in range(start, start + count)]


def test_a_resume_refuses_local_files_that_changed_since_its_checkpoint(tokenizer_dir, tmp_path):
    """A checkpoint's data position counts blocks of its token cache, keyed by the files' sizes and mtimes. A
    document added to the corpus made a new cache (a new validation split too) and the resume went on in those
    other blocks silently; the same documents rewritten (new mtimes) must still resume."""
    docs = _write_jsonl(tmp_path / "docs.jsonl", _documents(20))
    config = DataConfig(dataset=str(docs), tokenizer=str(tokenizer_dir), seq_len=32, val_fraction=0.1,
                        cache_dir=str(tmp_path / "cache"))
    saved = build_data(config, **KWARGS).hub_fingerprint  # what the trainer's checkpoint keeps
    assert saved.startswith(LOCAL_BLOCKS)

    _write_jsonl(docs, _documents(20))
    os.utime(docs, ns=(1, 1))  # a copy elsewhere: same documents, another mtime, so another cache
    resumed = build_data(config, **KWARGS, hub_fingerprint=saved)
    assert resumed.hub_fingerprint == saved
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 2

    _write_jsonl(docs, _documents(21))
    with pytest.raises(ConfigError, match=r"data\.dataset '.*docs\.jsonl' now gives other token blocks .*"
                                          r"\(now 19 training and 2 validation documents\)"):
        build_data(config, **KWARGS, hub_fingerprint=saved)


@pytest.mark.parametrize("field", ["text", "messages", "prompt"])
def test_json_rows_that_are_not_utf8_are_refused_naming_the_row(field, tokenizer_dir, tmp_path):
    """A JSONL file saved as Latin-1 (a spreadsheet's export): pyarrow reads its strings unchecked, and the first
    access failed with a bare UnicodeDecodeError naming neither the file nor the row (a traceback from
    retnet-train, not exit status 2), for text, chat and GRPO's prompt rows alike."""
    from retnet.train.data import local_files
    from retnet.train.prompts import load_prompt_rows

    docs = _documents(6)
    value = lambda text: text if field != "messages" else [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": text}]
    lines = [json.dumps({field: value(text)}, ensure_ascii=False) for text in docs]
    lines[4] = lines[4].replace("function_4", "caf\u00e9_4")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    fmt = {"text": "text", "messages": "chat", "prompt": "prompts"}[field]
    config = DataConfig(dataset=str(path), tokenizer=str(tokenizer_dir), seq_len=32, cache_dir=str(tmp_path / "c"),
                        format=fmt)
    key = {"text": "data.text_field", "messages": "data.messages_field", "prompt": "data.format 'prompts' column"}
    with pytest.raises(ConfigError, match=rf"{key[field]} '{field}' of '.*latin1\.jsonl', row 4: not UTF-8 text"):
        if field == "prompt":
            load_prompt_rows(config, local_files(str(path)), tmp_path / "c")
        else:
            build_data(config, **KWARGS)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_byte_order_mark_is_not_part_of_a_text_files_document(streaming, tokenizer_dir, tmp_path):
    """Windows editors save UTF-8 with a byte order mark; JSON and CSV rows drop it, but a .txt file's document
    began with U+FEFF, which every document then trained on (and retnet-eval scored)."""
    folder = tmp_path / "notes"
    folder.mkdir()
    for i, text in enumerate(_documents(4)):
        (folder / f"{i}.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    config = DataConfig(dataset=str(folder), tokenizer=str(tokenizer_dir), seq_len=32, val_fraction=0.25,
                        streaming=streaming, val_documents=1, cache_dir=str(tmp_path / "cache"))
    data = build_data(config, **KWARGS)
    blocks = data.micro_batches(4) if streaming else [data.train]
    text = "".join(data.tokenizer.decode(list(map(int, block.flatten()))) for block in [*blocks, data.val])
    assert "def function_" in text and "\ufeff" not in text


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_later_file_of_numbers_is_refused_naming_it(kind, streaming, tokenizer_dir, tmp_path):
    """One file's text column holds numbers: in the only file it is refused by name, but in a later file datasets
    cast it to the first file's strings ("5", "true") and those trained as documents, silently."""
    import pandas as pd

    folder = tmp_path / "shards"
    folder.mkdir()
    frames = [pd.DataFrame({"text": _documents(8)}), pd.DataFrame({"text": [5, 6, 7]})]
    for i, frame in enumerate(frames):
        path = folder / f"part-{i}.{kind}"
        frame.to_parquet(path) if kind == "parquet" else frame.to_json(path, orient="records", lines=True)
    config = DataConfig(dataset=str(folder), tokenizer=str(tokenizer_dir), seq_len=32, streaming=streaming,
                        val_documents=1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=rf"data\.text_field 'text' of '.*part-1\.{kind}' holds int"):
        build_data(config, **KWARGS)


def test_a_dataset_smaller_than_one_block_names_the_dataset_and_the_block_size(tokenizer_dir, tmp_path):
    """The refusal named neither the data nor the value of data.seq_len to lower, nor how many documents the split
    held: "the training split is shorter than one block of data.seq_len tokens"."""
    docs = _write_jsonl(tmp_path / "notes.jsonl", ["a short note", "another one", "and a third"])
    config = DataConfig(dataset=str(docs), tokenizer=str(tokenizer_dir), seq_len=64, val_fraction=0.4,
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data\.dataset '.*notes\.jsonl': the training split \(2 documents, \d+ "
                                          r"tokens\) is shorter than one block of data\.seq_len \(64\) tokens"):
        build_data(config, **KWARGS)


def test_preference_rows_that_are_not_utf8_are_refused_naming_the_row(tmp_path):
    """The same Latin-1 file as preference pairs (DPO, reward models, retnet-eval of a reward model)."""
    from retnet.train.data import local_files
    from retnet.train.preference import load_pairs

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    rows[2]["chosen"] = "caf\u00e9"
    path = tmp_path / "pairs.jsonl"
    path.write_bytes("\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode("latin-1") + b"\n")
    config = DataConfig(dataset=str(path), format="preference", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"column 'chosen' of '.*pairs\.jsonl', row 2: not UTF-8 text"):
        load_pairs(config, local_files(str(path)), tmp_path / "c")
