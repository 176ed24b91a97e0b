"""retnet-convert-fla given a hub id: the fla checkpoint is read from its snapshot in the HF cache (offline, as a
download leaves it), converted as its directory is; a cached snapshot without weights is refused, exit 2."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from retnet.model.convert_fla import main

from .fla_checkpoints import _synthetic_fla_checkpoint


def test_a_hub_id_converts_as_its_directory(tmp_path, hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (a folder of the id's name where the test runs would be read as that folder)
    source = tmp_path / "fla"
    save_file(_synthetic_fla_checkpoint(source), source / "model.safetensors")
    hub_cache("fla-hub/retnet-tiny", source)

    main(["fla-hub/retnet-tiny", str(tmp_path / "by-id")])
    main([str(source), str(tmp_path / "by-dir")])
    by_id, by_dir = load_file(tmp_path / "by-id" / "model.safetensors"), load_file(tmp_path / "by-dir" / "model.safetensors")
    assert by_id.keys() == by_dir.keys() and all(torch.equal(by_id[k], by_dir[k]) for k in by_id)
    assert (tmp_path / "by-id" / "config.json").read_text() == (tmp_path / "by-dir" / "config.json").read_text()


def test_a_cached_snapshot_without_weights_is_refused(tmp_path, hub_cache, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "fla"
    _synthetic_fla_checkpoint(source)  # config.json alone, as a tokenizer download leaves a snapshot
    hub_cache("fla-hub/config-only", source)
    with pytest.raises(SystemExit) as exit_:
        main(["fla-hub/config-only", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'fla-hub/config-only': the hub's snapshot of it" in err and "holds no weights" in err
    assert not (tmp_path / "out").exists()
