"""The data cache's leftovers: a cache directory that lacks files (a copy cut short, files removed by hand) is written
again, not read and failed on at every start; every writer's abandoned temp directory is removed, KTO's too."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from retnet.train.config import DataConfig
from retnet.train.data import build_data

DOCS = [f"document {i}: " + "def f(x):\n    return x + 1\n" * 3 for i in range(24)]
BUILD = dict(vocab_size=300, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
             tokenizer_dir=None, barrier=lambda: None)


def config(tmp_path) -> DataConfig:
    path = tmp_path / "docs.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCS))
    return DataConfig(dataset=str(path), seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))


def test_a_cache_directory_missing_files_is_written_again(tmp_path):
    first = build_data(config(tmp_path), **BUILD)
    cache = tmp_path / "cache"
    (tokens,), (tokenizer,) = cache.glob("tokens-*"), cache.glob("tokenizer-*")
    (tokens / "meta.json").unlink()  # what marks a complete token cache
    (tokenizer / "tokenizer.json").unlink()
    again = build_data(config(tmp_path), **BUILD)  # was a FileNotFoundError naming meta.json, at every start
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))
    assert (tokens / "meta.json").is_file() and (tokenizer / "tokenizer.json").is_file()
    assert not list(cache.glob(".tmp-*"))  # the incomplete ones are gone, not kept aside


def test_every_writers_abandoned_temp_directory_is_removed(tmp_path):
    cache = tmp_path / "cache"
    old = time.time() - 25 * 3600
    abandoned = [cache / f".tmp-{name}-0123-7-deadbeef" for name in ("unpaired", "tokenizer-mixture", "tokens")]
    live = cache / ".tmp-unpaired-0123-8-cafef00d"  # another node's writer, still at work
    for directory in (*abandoned, live):
        directory.mkdir(parents=True)
        (directory / "train.bin").write_bytes(b"\0" * 8)
    for directory in abandoned:
        for path in (directory / "train.bin", directory):
            os.utime(path, (old, old))
    build_data(config(tmp_path), **BUILD)
    assert [directory.exists() for directory in abandoned] == [False] * 3  # KTO's unpaired- one was kept for ever
    assert (live / "train.bin").exists()


def test_another_programs_temp_directory_in_a_shared_cache_folder_is_kept(tmp_path):
    cache = tmp_path / "cache"
    theirs = cache / ".tmp-build"  # not named as a cache writer's: .tmp-<cache>-<pid>-<8 hex>
    theirs.mkdir(parents=True)
    old = time.time() - 25 * 3600
    os.utime(theirs, (old, old))
    build_data(config(tmp_path), **BUILD)
    assert theirs.is_dir()


def test_a_complete_cache_another_writer_swapped_in_meanwhile_is_left_aside_not_deleted(tmp_path, monkeypatch):
    from retnet.train import data

    first = build_data(config(tmp_path), **BUILD)
    cache = tmp_path / "cache"
    (tokens,) = cache.glob("tokens-*")
    (tokens / "meta.json").unlink()
    swap = data._exchange

    def swap_after_another_writer(a, b):
        (b / "meta.json").write_text("{}")  # another node renamed its complete cache in after the check
        return swap(a, b)

    monkeypatch.setattr(data, "_exchange", swap_after_another_writer)
    again = build_data(config(tmp_path), **BUILD)
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))
    if swap(tmp_path, tmp_path):  # (an OS with an atomic swap; elsewhere the two renames run)
        (kept,) = cache.glob(".tmp-tokens-*-replaced")  # its ranks may be reading it: the 24-hour sweep takes it
        assert (kept / "meta.json").is_file()


def test_an_incomplete_cache_removed_meanwhile_is_no_error(tmp_path, monkeypatch):
    import shutil

    from retnet.train import data

    first = build_data(config(tmp_path), **BUILD)
    (tokens,) = (tmp_path / "cache").glob("tokens-*")
    (tokens / "meta.json").unlink()
    swap = data._exchange

    def swap_after_removal(a, b):
        shutil.rmtree(b)  # removed by hand, or moved aside by another writer, after the check
        return swap(a, b)

    monkeypatch.setattr(data, "_exchange", swap_after_removal)
    again = build_data(config(tmp_path), **BUILD)  # was the swap's FileNotFoundError, a traceback
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))
    assert (tokens / "meta.json").is_file()
