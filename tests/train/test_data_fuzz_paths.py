"""Malformed training files found by fuzzing the data pipeline's inputs: each is refused naming the file (and its
line or row), or read as written, never shifted or dropped unseen."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from retnet.train.chat import check_conversations
from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import _hub_options, load_conversations, load_documents, local_files


def _documents(spec: Path, cache: Path) -> list[str]:
    return load_documents(DataConfig(dataset=str(spec)), local_files(str(spec)), cache)


def _jsonl(path: Path, *rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------------------------------------
# CSV: a first row with a field more than the header
# ------------------------------------------------------------------------------------------------------------
def test_csv_whose_first_row_has_an_extra_field_is_refused_naming_the_file(tmp_path):
    # pandas took "a" for an index and read every column one to the left: the documents were "1" and "" (dropped)
    path = tmp_path / "rows.csv"
    path.write_text("text,id\na,1,extra\nb,2\n")
    with pytest.raises(ConfigError, match=r"rows\.csv', line 2 \(its first row\) holds more fields than its "
                                          r"header's 2"):
        _documents(path, tmp_path / "cache")


def test_csv_rows_are_read_by_column_name_not_shifted(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("text,id\nfirst,1\nsecond,\n")
    (tmp_path / "data" / "b.csv").write_text("text,id\nthird,3\n")
    assert _documents(tmp_path / "data", tmp_path / "cache") == ["first", "second", "third"]


def test_csv_row_that_cannot_be_parsed_is_refused_naming_the_later_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("text,id\nfirst,1\n")
    (data / "b.csv").write_text("text,id\nsecond,2\nthird,3,4\n")
    with pytest.raises(ConfigError, match=r"b\.csv', not CSV: .*Expected 2 fields in line 3, saw 3"):
        _documents(data, tmp_path / "cache")


def test_hub_csv_text_column_is_not_shifted_by_an_extra_first_field(tmp_path):
    import pandas as pd

    options = _hub_options(DataConfig(dataset="org/set"), SimpleNamespace(name="csv"))
    path = tmp_path / "hub.csv"
    path.write_text("text,id\na,1,extra\nb\n")
    assert pd.read_csv(path, **options)["text"].tolist() == ["a", "b"]


# ------------------------------------------------------------------------------------------------------------
# JSON Lines that are no JSON: the file and its line named
# ------------------------------------------------------------------------------------------------------------
def test_jsonl_line_that_is_no_json_is_refused_naming_the_later_file_and_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "a.jsonl", {"text": "one"}, {"text": "two"})
    (data / "b.jsonl").write_text('{"text": "three"}\n\n{"text": "four"} trailing\n')
    with pytest.raises(ConfigError, match=r"b\.jsonl', line 3, column 18: not JSON \(Extra data\)"):
        _documents(data, tmp_path / "cache")


def test_a_json_array_too_large_to_parse_again_is_not_blamed_for_a_later_files_line(tmp_path, monkeypatch):
    import retnet.train.data as data_module

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.json").write_text(json.dumps([{"text": f"row {i}"} for i in range(50)], indent=1))
    (data / "b.jsonl").write_text('{"text": "three"}\n{"text": "four"} trailing\n')
    monkeypatch.setattr(data_module, "_NULL_SCAN_BYTES", 64)  # a.json stands for an array past 64 MiB
    assert data_module._json_file_problem(data / "a.json") is None
    assert "line 2, column 18" in data_module._json_file_problem(data / "b.jsonl")
    with pytest.raises(ConfigError, match=r"b\.jsonl', line 2, column 18"):
        raise data_module._malformed_file(str(data))


def test_jsonl_line_that_is_no_object_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n["two"]\n')
    with pytest.raises(ConfigError, match=r"rows\.jsonl', line 2: holds list \['two'\], not a JSON object"):
        _documents(path, tmp_path / "cache")


def test_jsonl_of_another_encoding_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"text": "one"}\n{"text": "two"}\n'.encode("utf-16"))
    with pytest.raises(ConfigError, match=r"rows\.jsonl', line 1: not UTF-8 text"):
        _documents(path, tmp_path / "cache")


def test_well_formed_jsonl_variants_still_read(tmp_path):
    # a byte order mark, CRLF line ends, blank lines and no newline at the end are all JSON Lines
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n{"text": "two"}')
    assert _documents(path, tmp_path / "cache") == ["one", "two"]


def test_directory_holding_compressed_data_files_is_refused_not_read_in_part(tmp_path):
    # the .jsonl.gz file was skipped as a file of no known kind: its rows lost while the others trained
    import gzip

    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "a.jsonl", {"text": "one"}, {"text": "two"})
    (data / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "three"}\n'))
    with pytest.raises(ConfigError, match=r"holds compressed data files \(1, e\.g\. '.*b\.jsonl\.gz'\)"):
        local_files(str(data))
    (data / "b.jsonl.gz").unlink()
    (data / "notes.tar.gz").write_bytes(b"")  # an archive of no data kind stays skipped
    assert local_files(str(data)) == [data / "a.jsonl"]


# ------------------------------------------------------------------------------------------------------------
# Chat: a set with both a messages and ShareGPT's conversations column
# ------------------------------------------------------------------------------------------------------------
USER, ANSWER = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
SHAREGPT = [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]


def test_chat_row_whose_conversation_is_only_in_sharegpt_column_is_refused(tmp_path):
    # the messages column is read, and row 1's empty messages dropped it unseen
    path = _jsonl(tmp_path / "chats.jsonl", {"messages": [USER, ANSWER]}, {"conversations": SHAREGPT})
    cfg = DataConfig(dataset=str(path), format="chat")
    with pytest.raises(ConfigError, match=r"'messages' of '.*chats\.jsonl', row 1: empty, while its 'conversations' "
                                          r"holds a conversation"):
        load_conversations(cfg, local_files(str(path)), tmp_path / "cache")


def test_a_streamed_chat_row_whose_conversation_is_only_in_sharegpt_column_is_refused():
    from retnet.train.streaming import STREAM_ROW, stream_conversation

    with pytest.raises(ConfigError, match=r"row 5: empty, while its 'conversations' holds a conversation"):
        stream_conversation("ds", "messages", {"messages": None, "conversations": SHAREGPT, STREAM_ROW: 5})
    assert stream_conversation("ds", "messages", {"messages": [USER, ANSWER], "conversations": None,
                                                  STREAM_ROW: 6}) == [USER, ANSWER]


def test_chat_sets_of_one_layout_still_read(tmp_path):
    sharegpt = _jsonl(tmp_path / "sharegpt.jsonl", {"conversations": SHAREGPT}, {"conversations": SHAREGPT})
    cfg = DataConfig(dataset=str(sharegpt), format="chat")
    rows = load_conversations(cfg, local_files(str(sharegpt)), tmp_path / "cache")
    assert [row for row, _ in rows] == [0, 1]
    assert rows[0][1] == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    # an empty row in both columns is an empty conversation, dropped as before; a row with both keeps its messages
    kept = check_conversations("d", "messages", [None, [USER, ANSWER]], columns={"conversations": [None, SHAREGPT]})
    assert kept == [[USER, ANSWER]]
    # a named messages field is not the default one: a 'conversations' column beside it is no conversation
    assert check_conversations("d", "chat", [None], columns={"conversations": [SHAREGPT]}) == []
