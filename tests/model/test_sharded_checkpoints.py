"""Sharded safetensors checkpoints: shards of unequal sizes by hub id, an index that disagrees with its shards,
and retnet-convert-fla writing over an earlier conversion saved the other way (whole or sharded)."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.convert_fla import convert_fla_checkpoint, main
from retnet.model.hub import HubError, resolve_pretrained

from .fla_checkpoints import _synthetic_fla_checkpoint

INDEX = "model.safetensors.index.json"


def _tiny_retnet() -> RetNetForCausalLM:
    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=64))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_a_hub_snapshot_of_shards_of_unequal_sizes_loads_whole(tmp_path, hub_cache):
    model = _tiny_retnet()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    sizes = {path.stat().st_size for path in (tmp_path / "sharded").glob("model-*-of-*.safetensors")}
    assert len(sizes) > 2  # (the embeddings' shard, the layers', the last one's rest)
    snapshot = hub_cache("acme/sharded", tmp_path / "sharded")
    assert resolve_pretrained("acme/sharded") == snapshot
    assert _same_weights(RetNetForCausalLM.from_pretrained(resolve_pretrained("acme/sharded")), model)


def test_a_hub_snapshot_missing_a_shard_its_index_names_is_refused_naming_it(tmp_path, hub_cache):
    # (offline, a download cut short is all the cache holds: transformers' FileNotFoundError named a blob path)
    _tiny_retnet().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    last = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))[-1]
    last.unlink()
    hub_cache("acme/partial", tmp_path / "sharded")
    with pytest.raises(HubError, match=rf"'acme/partial': the hub's snapshot .* lacks 1 shard\(s\) its weights' "
                                       rf"index names \({last.name}\): a download cut short"):
        resolve_pretrained("acme/partial")


def _sharded_fla(directory: Path, groups: list[list[str]] | None = None) -> tuple[dict, dict[str, list[str]]]:
    """A synthetic fla checkpoint in shards of unequal sizes (the embeddings alone, then the rest), indexed."""
    weights = _synthetic_fla_checkpoint(directory)
    names = sorted(weights)
    groups = groups or [["model.embeddings.weight"], [n for n in names if n != "model.embeddings.weight"]]
    shards = {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": group for i, group in enumerate(groups)}
    for shard, shard_names in shards.items():
        save_file({name: weights[name] for name in shard_names}, directory / shard)
    index = {"metadata": {}, "weight_map": {name: shard for shard, ns in shards.items() for name in ns}}
    (directory / INDEX).write_text(json.dumps(index))
    return weights, shards


def test_convert_fla_by_hub_id_of_shards_of_unequal_sizes_equals_the_whole_checkpoints(tmp_path, hub_cache):
    weights, shards = _sharded_fla(tmp_path / "fla-sharded")
    assert len({(tmp_path / "fla-sharded" / shard).stat().st_size for shard in shards}) == 2
    hub_cache("fla-hub/sharded", tmp_path / "fla-sharded")
    (tmp_path / "fla-whole").mkdir()
    (tmp_path / "fla-whole" / "config.json").write_text((tmp_path / "fla-sharded" / "config.json").read_text())
    save_file(weights, tmp_path / "fla-whole" / "model.safetensors")
    convert_fla_checkpoint("fla-hub/sharded", tmp_path / "from-shards")
    convert_fla_checkpoint(tmp_path / "fla-whole", tmp_path / "from-whole")
    assert _same_weights(RetNetForCausalLM.from_pretrained(tmp_path / "from-shards"),
                         RetNetForCausalLM.from_pretrained(tmp_path / "from-whole"))


def _move_first_tensor(shards, index):
    # listed under the second shard, held by the first
    name = shards["model-00002-of-00002.safetensors"][0]
    index["weight_map"][name] = "model-00001-of-00002.safetensors"
    return rf"its shard 'model-00001-of-00002.safetensors' disagree: .* lists under it but it does not hold: {name}"


def _hold_twice(shards, index):
    name = shards["model-00002-of-00002.safetensors"][0]
    shards["model-00001-of-00002.safetensors"].append(name)  # (the copy the last shard read won)
    return rf"its shard 'model-00001-of-00002.safetensors' disagree: .* does not list under it but it holds: {name}"


def _extra_shard(shards, index):
    shards["model-00003-of-00003.safetensors"] = ["model.norm.weight"]  # (a leftover of another save)
    return r"does not name the shard file\(s\) model-00003-of-00003.safetensors beside it"


def _missing_shard(shards, index):
    del shards["model-00002-of-00002.safetensors"]
    return r"names the shard 'model-00002-of-00002.safetensors', which is not in"


def _not_a_name(shards, index):
    index["weight_map"]["model.norm.weight"] = 2
    return r"weight_map\['model.norm.weight'\] is 2, not a shard file's name"


@pytest.mark.parametrize("break_it", [_move_first_tensor, _hold_twice, _extra_shard, _missing_shard, _not_a_name])
def test_convert_fla_refuses_an_index_that_disagrees_with_its_shards(tmp_path, capsys, break_it):
    # Each was converted from whatever the shards held (or a FileNotFoundError, a TypeError traceback)
    source = tmp_path / "fla"
    weights = _synthetic_fla_checkpoint(source)
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    index = {"metadata": {}, "weight_map": {name: shard for shard, ns in shards.items() for name in ns}}
    expected = break_it(shards, index)
    for shard, shard_names in shards.items():
        save_file({name: weights[name] for name in shard_names}, source / shard)
    (source / INDEX).write_text(json.dumps(index))
    with pytest.raises(SystemExit) as exited:
        main([str(source), str(tmp_path / "out")])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"retnet-convert-fla: error: '{source / INDEX}'") and error.count("\n") == 1, error
    assert re.search(expected, error), error
    assert not (tmp_path / "out").exists()  # (refused before anything was written)


@pytest.fixture
def shard_size(monkeypatch):
    """``shard_size(size)``: the conversion's save_pretrained shards at ``size`` (None: transformers' 50 GB) as one
    of a model above the shard size would be."""
    save = RetNetForCausalLM.save_pretrained

    def set_size(size):
        def sharded_save(self, directory, **kwargs):
            return save(self, directory, **({"max_shard_size": size} if size else {}), **kwargs)

        monkeypatch.setattr(RetNetForCausalLM, "save_pretrained", sharded_save)

    return set_size


def _weight_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("model"))


def test_converting_whole_over_a_sharded_conversion_leaves_no_index(tmp_path, shard_size):
    # (a stale index beside model.safetensors: loaders that read the index first, vLLM's, find none of its shards)
    weights = _synthetic_fla_checkpoint(tmp_path / "fla")
    save_file(weights, tmp_path / "fla" / "model.safetensors")
    shard_size("100KB")
    convert_fla_checkpoint(tmp_path / "fla", tmp_path / "out")
    assert INDEX in _weight_files(tmp_path / "out")
    shard_size(None)
    convert_fla_checkpoint(tmp_path / "fla", tmp_path / "out")
    assert _weight_files(tmp_path / "out") == ["model.safetensors"]


def test_converting_sharded_over_a_whole_conversion_loads_the_new_model(tmp_path, shard_size):
    # The earlier model.safetensors stayed beside the new shards, and transformers reads it before the index: the
    # earlier model was loaded.
    for name in ("old", "new"):  # (random weights of each its own)
        save_file(_synthetic_fla_checkpoint(tmp_path / name), tmp_path / name / "model.safetensors")
    convert_fla_checkpoint(tmp_path / "old", tmp_path / "out")
    shard_size("100KB")
    convert_fla_checkpoint(tmp_path / "new", tmp_path / "out")
    files = _weight_files(tmp_path / "out")
    assert "model.safetensors" not in files and INDEX in files and len(files) > 2
    shard_size(None)
    convert_fla_checkpoint(tmp_path / "new", tmp_path / "expected")
    assert _same_weights(RetNetForCausalLM.from_pretrained(tmp_path / "out"),
                         RetNetForCausalLM.from_pretrained(tmp_path / "expected"))
