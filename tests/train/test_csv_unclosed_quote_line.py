"""A CSV file with a quote never closed is refused naming the line that opens it: pandas' own "EOF inside string
starting at row N" counts records from the header's 0, so its N was a line short, or more past multi-line fields."""

from pathlib import Path

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import _csv_file_problem, build_data

BUILD = dict(vocab_size=300, seed=0, micro_batch=1, global_batch=1, rank=0, local_rank=0, world_size=1,
             tokenizer_dir=None, barrier=lambda: None)


@pytest.mark.parametrize("content, line", [
    ('id,text\n1,"abc\n', 2),
    ('id,text\n1,a\n\n2,b\n3,"abc\nmore\nlines\n', 5),  # (a blank line before it)
    ('id,text\n1,"a\nb"\n3,"abc\n', 4),  # (a quoted field of two lines before it)
])
def test_the_line_that_opens_the_quote_is_named(tmp_path: Path, content, line):
    path = tmp_path / "a.csv"
    path.write_text(content)
    assert _csv_file_problem(path) == (f"not CSV: line {line} opens a quoted field that is never closed (close it, "
                                       f"or double a quote meant inside a quoted field)")


def test_a_hub_repository_separator_is_read(tmp_path: Path):
    path = tmp_path / "a.csv"
    path.write_text('id;text\n1;"a;b"\n3;"abc\n')
    assert _csv_file_problem(path, {"sep": ";"}).startswith("not CSV: line 3 opens a quoted field")


def test_a_local_set_is_refused_naming_the_file_and_line(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("id,text\n" + "".join(f"{i},document {i} of a few words\n" for i in range(20)))
    (data / "b.csv").write_text('id,text\n1,fine\n2,"never closed\n3,more\n')
    config = DataConfig(dataset=str(data), seq_len=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"b\.csv', not CSV: line 3 opens a quoted field that is never closed"):
        build_data(config, **BUILD)


def test_other_parse_errors_keep_pandas_line(tmp_path: Path):
    path = tmp_path / "a.csv"
    path.write_text("id,text\n1,a\n2,b,c\n")
    assert _csv_file_problem(path) == "not CSV: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3"


def test_a_quote_left_open_early_in_a_large_file_is_found(tmp_path: Path):
    # the open field holds the rest of the file, past the csv module's 128 KiB field limit
    import csv

    path = tmp_path / "a.csv"
    path.write_text('id,text\n1,"left open\n' + "".join(f"{i},document {i} of a few words\n" for i in range(20_000)))
    before = csv.field_size_limit()
    assert _csv_file_problem(path).startswith("not CSV: line 2 opens a quoted field that is never closed")
    assert csv.field_size_limit() == before  # (the process-wide limit, raised for the scan, is restored)
