"""Local data files of odd content: a CSV file of a header alone (pandas' ``to_csv`` of an empty frame) read
first typed every column null, and the whole set was refused over the next file's text; a later JSON Lines file
of numbers that opens with a blank line trained them as the documents "5", "6" (its first line was judged)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import load_documents, local_files


def _documents(spec: Path, cache: Path) -> list[str]:
    return load_documents(DataConfig(dataset=str(spec)), local_files(str(spec)), cache)


def test_a_leading_csv_file_of_a_header_alone_is_skipped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("text,id\n")
    (data / "b.csv").write_text("text,id\nfirst,1\nsecond,2\n")
    (data / "c.csv").write_text("text,id\n")  # (a later one was read: its columns cast to the first file's)
    assert _documents(data, tmp_path / "cache") == ["first", "second"]
    (data / "b.csv").write_text("text,id\n\n\n")  # blank lines are no rows either
    with pytest.raises(ConfigError, match=r"its 3 CSV files hold no rows"):
        _documents(data, tmp_path / "cache")


def test_a_later_jsonl_file_of_numbers_after_a_blank_line_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "first doc"}\n')
    (data / "b.jsonl").write_text('\r\n\n{"text": 5}\n{"text": 6}\n')
    with pytest.raises(ConfigError, match=r"b\.jsonl' holds int values \(5\); expected text"):
        _documents(data, tmp_path / "cache")
    (data / "b.jsonl").write_text('\n{"text": "second doc"}\n')
    assert _documents(data, tmp_path / "cache") == ["first doc", "second doc"]
