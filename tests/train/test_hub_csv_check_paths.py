"""The check of a hub dataset's CSV files (a row with an unquoted comma, which pandas cuts silently when reading the
text column alone) keeps its passes in ``data.cache_dir``: a restart on the same files parses none of them again, a
file changed since (or read with other settings) is parsed again. A streamed set's files in the HF hub cache are
checked too; the others are named in a warning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from retnet.train.config import ConfigError, DataConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub CSV repository of data/a.csv (in the HF hub cache) and data/b.csv (not downloaded), offline: the
    builder resolves its files as datasets does; the loads read the cached file."""
    import datasets
    import huggingface_hub.constants

    from retnet.train import data as data_module

    root = tmp_path / "hub"
    snapshot = root / "datasets--someone--csvset" / "snapshots" / COMMIT / "data"
    snapshot.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    real_load = datasets.load_dataset
    files = ["a.csv"]

    class Builder:
        name = "csv"
        config = type("Config", (), {"version": "0.0.0"})()

        def __init__(self):
            self.config.data_files = {"train": [f"hf://datasets/someone/csvset@{COMMIT}/data/{name}"
                                                for name in files]}

        def as_streaming_dataset(self, split):
            return real_load("csv", data_files=str(snapshot / "a.csv"), split=split, streaming=True)

        config_id, hash = "someone--csvset", "h"

    def load_dataset(path, name=None, split=None, streaming=False, cache_dir=None, **options):
        sep = getattr(Builder.config, "pd_read_csv_kwargs", {}).get("sep", ",")
        return real_load("csv", data_files=str(snapshot / "a.csv"), split=split, cache_dir=cache_dir, sep=sep,
                         **options)

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: Builder())
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    parsed = []
    problem = data_module._csv_file_problem
    monkeypatch.setattr(data_module, "_csv_file_problem", lambda path, *a: parsed.append(Path(path).name)
                        or problem(path, *a))
    return {"file": snapshot / "a.csv", "parsed": parsed, "files": files, "builder": Builder}


def _load(tmp_path: Path):
    from retnet.train.data import load_hub

    cfg = DataConfig(dataset="someone/csvset", cache_dir=str(tmp_path / "cache"))
    return load_hub(cfg, tmp_path / "cache", 0, lambda: None)[0]


def test_a_restart_does_not_parse_the_checked_files_again(hub, tmp_path):
    hub["file"].write_text("text,id\na,1\nb,2\n")
    assert _load(tmp_path)["text"] == ["a", "b"]
    assert hub["parsed"] == ["a.csv"]
    assert _load(tmp_path)["text"] == ["a", "b"]  # a restart on the same file
    assert hub["parsed"] == ["a.csv"]
    assert len(list((tmp_path / "cache" / "hub-csv-checked").iterdir())) == 1

    # changed in place: a row with an unquoted comma, the same size and another mtime, is parsed again and refused
    stat = hub["file"].stat()
    hub["file"].write_text("text,id\na,1\nb,,\n")
    assert hub["file"].stat().st_size == stat.st_size
    os.utime(hub["file"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ConfigError, match=r"'data/a\.csv' .*Expected 2 fields in line 3, saw 3"):
        _load(tmp_path)
    with pytest.raises(ConfigError, match=r"'data/a\.csv'"):  # a refusal is not recorded as a pass
        _load(tmp_path)
    assert hub["parsed"] == ["a.csv"] * 3

    # a file that passed, read with the repository's other settings (a tab separator), is checked again
    hub["file"].write_text("text\nhello\n")
    assert _load(tmp_path)["text"] == ["hello"]
    hub["builder"].config.pd_read_csv_kwargs = {"sep": "\t"}
    try:
        assert _load(tmp_path)["text"] == ["hello"]
        assert hub["parsed"] == ["a.csv"] * 5
    finally:
        del hub["builder"].config.pd_read_csv_kwargs


def test_a_streamed_hub_csv_set_checks_its_cached_files_and_names_the_others(hub, tmp_path, caplog):
    """Streamed, a hub CSV set's rows with an unquoted comma were cut without a word: the files in the HF hub cache
    are checked as a non-streamed set's are, and those not on disk are named in a warning."""
    from retnet.train.data import _hub_stream

    cfg = DataConfig(dataset="someone/csvset", streaming=True, cache_dir=str(tmp_path / "cache"))
    hub["file"].write_text("text,id\na,1\nb, with a comma,2\n")
    with pytest.raises(ConfigError, match=r"'data/a\.csv' .*Expected 2 fields in line 3, saw 3"):
        _hub_stream(cfg, tmp_path / "cache")
    _hub_stream(cfg, tmp_path / "cache", check_files=False)  # (the ranks other than local rank 0)
    assert hub["parsed"] == ["a.csv"]

    hub["file"].write_text("text,id\na,1\nb,2\n")
    hub["files"].append("b.csv")
    with caplog.at_level("WARNING", logger="retnet.train.data"):
        stream, _ = _hub_stream(cfg, tmp_path / "cache")
    assert [row["text"] for row in stream] == ["a", "b"]
    warned = [r.getMessage() for r in caplog.records if "streamed hub dataset" in r.getMessage()]
    assert len(warned) == 1 and "1 CSV file(s)" in warned[0] and "('data/b.csv')" in warned[0], warned
    assert "hf download someone/csvset --repo-type dataset" in warned[0]
    _load(tmp_path)  # the pass of the stream's check holds for a non-streamed start too
    assert hub["parsed"] == ["a.csv", "a.csv"]


@pytest.mark.parametrize("content", [b'text,id\n"an open quote,1\nb,2\n', b"text,id\n\xff\xfe not utf-8,1\n"],
                         ids=["open-quote", "not-utf-8"])
def test_a_file_the_load_cannot_parse_is_named(hub, tmp_path, content):
    # datasets' own failure said only "An error occurred while generating the dataset", no file
    hub["file"].write_bytes(content)
    with pytest.raises(ConfigError, match=r"its CSV file 'data/a\.csv' .*(not CSV|not UTF-8)") as refused:
        _load(tmp_path)
    assert "a field too many" not in str(refused.value)  # (that advice is for another problem)
