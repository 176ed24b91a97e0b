"""Directories renamed into place (the export, output_dir/tokenizer, the data caches) are on disk before
their rename is: after a machine crash a resume must not find them present but with empty files."""

import os
from pathlib import Path

import pytest

from retnet.train.checkpoint import replace_directory
from retnet.train.data import _atomic_dir


@pytest.fixture
def synced(monkeypatch):
    """The paths fsynced so far, in order (resolved from the descriptor, before any rename)."""
    paths = []
    real = os.fsync

    def record(fd):
        paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return paths


def _write(tmp: Path) -> None:
    tmp.mkdir(exist_ok=True)
    (tmp / "tokenizer.json").write_text("{}")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "model.safetensors").write_bytes(b"\0" * 64)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads descriptors' paths from /proc")
@pytest.mark.parametrize("how", ["replace_directory", "data cache"])
def test_every_file_is_synced_before_the_rename(how, tmp_path, synced):
    final = tmp_path / "tokenizer"
    if how == "replace_directory":
        final.mkdir()
        (final / "old.json").write_text("{}")
        replace_directory(final, _write)
    else:
        _atomic_dir(final, _write)
    written = {"tokenizer.json", "model.safetensors", "sub"}
    assert written <= {p.name for p in synced if p.parent.name.startswith(".tmp-") or p.parent.name == "sub"}
    assert any(p.name.startswith(".tmp-tokenizer") for p in synced)  # the directory itself
    assert sorted(p.name for p in final.rglob("*")) == ["model.safetensors", "sub", "tokenizer.json"]
