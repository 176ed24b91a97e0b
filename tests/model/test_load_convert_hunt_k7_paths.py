"""Loading and converting checkpoints: what a user hands from_pretrained or retnet-convert-fla that is not ours."""

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import retnet  # noqa: F401

# torchscale's RetNet as syncdoth/RetNet's transformers port saves it (its configs/retnet-base/config.json):
# model_type "retnet" as ours, sizes under torchscale's names, remote code in auto_map.
TORCHSCALE_RETNET = {
    "model_type": "retnet", "architectures": ["RetNetForCausalLM"], "vocab_size": 50257, "decoder_embed_dim": 512,
    "decoder_value_embed_dim": 864, "decoder_ffn_embed_dim": 864, "decoder_layers": 6, "decoder_retention_heads": 2,
    "activation_fn": "swish", "subln": True, "use_glu": True, "layernorm_eps": 1e-6, "recurrent_chunk_size": 512,
    "auto_map": {"AutoConfig": "configuration_retnet.RetNetConfig",
                 "AutoModelForCausalLM": "modeling_retnet.RetNetForCausalLM"},
}


@pytest.mark.parametrize("load", [AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained])
def test_another_implementations_retnet_config_is_refused_by_its_fields(tmp_path, load):
    # With trust_remote_code off it was taken for ours, every size the default's: a random 24-layer, 2048-wide model.
    (tmp_path / "config.json").write_text(json.dumps(TORCHSCALE_RETNET))
    with pytest.raises(ValueError, match=r"no fields decoder_embed_dim, .*decoder_retention_heads.*torchscale"):
        load(tmp_path)


@pytest.mark.parametrize("config, named", [
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2}, r"model_type 'llama', not a RetNet"),
    (TORCHSCALE_RETNET, r"decoder_embed_dim, .* are torchscale's RetNet config"),
    ([{"model_type": "retnet"}], r"not a JSON object \(list\)"),
    ({"model": {"preset": "tiny"}, "train": {"steps": 2}}, r"names no model_type"),  # a run's configuration
])
def test_convert_fla_names_what_a_config_is_instead_of_an_fla_retnets(tmp_path, capsys, config, named):
    # Each was told "a retnet-stack checkpoint needs no conversion".
    from retnet.model.convert_fla import main

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_:
        main([str(source), str(tmp_path / "out")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "config.json is not a flash-linear-attention RetNet config: " in error
    assert re.search(named, error) and "needs no conversion" not in error
    assert not (tmp_path / "out").exists()


def test_a_cached_snapshot_without_weights_is_refused_as_such(tmp_path, hub_cache):
    # What data.tokenizer's download leaves of a model's repository (config.json and the tokenizer's files); offline
    # the model's loaders then said "no file named model.safetensors" in a cache folder, or "holds no tokenizer".
    from retnet.model.hub import TOKENIZER_FILES, HubError, resolve_pretrained

    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    (tokenizer_only / "config.json").write_text(json.dumps({"model_type": "retnet"}))
    (tokenizer_only / "tokenizer.json").write_text("{}")
    snapshot = hub_cache("acme/retnet-tiny", tokenizer_only)
    assert resolve_pretrained("acme/retnet-tiny", allow_patterns=TOKENIZER_FILES) == snapshot
    with pytest.raises(HubError, match=r"'acme/retnet-tiny': the hub's snapshot of it \(.*\) holds no weights .*"
                                       r"offline .*data.tokenizer"):
        resolve_pretrained("acme/retnet-tiny")


def test_convert_fla_reads_model_safetensors_before_a_stale_index(tmp_path):
    # save_pretrained into a directory saved sharded before removes the old shards and leaves their index: transformers
    # (and fla) load model.safetensors there; the conversion read the index and was refused for shards not there.
    from safetensors.torch import save_file

    from retnet.model import RetNetForCausalLM
    from retnet.model.convert_fla import convert_fla_checkpoint

    from .fla_checkpoints import _synthetic_fla_checkpoint

    weights = _synthetic_fla_checkpoint(tmp_path / "fla")
    save_file(weights, str(tmp_path / "fla" / "model.safetensors"))
    stale = {"metadata": {}, "weight_map": {name: "model-00001-of-00002.safetensors" for name in weights}}
    (tmp_path / "fla" / "model.safetensors.index.json").write_text(json.dumps(stale))
    convert_fla_checkpoint(tmp_path / "fla", tmp_path / "out")
    model = RetNetForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model.model.embed_tokens.weight, weights["model.embeddings.weight"])


def test_a_hub_download_fetches_the_named_chat_templates_and_nothing_else_below_the_top(tmp_path, monkeypatch):
    # A tokenizer with several chat templates saves the named ones in additional_chat_templates/ (transformers'
    # save_pretrained, our export's too); "*/*" kept them out of the download, so a model served by hub id rendered
    # a request with tools with its default template, where its directory gave the tool_use one.
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from retnet.model.hub import TOKENIZER_FILES, resolve_pretrained

    repository = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                  "additional_chat_templates/tool_use.jinja", "original/consolidated.safetensors",
                  "checkpoint-100/model.safetensors", "checkpoint-100/tokenizer.json", "onnx/model.onnx",
                  "pytorch_model.bin", "README.md", "tokenizer/README.md", "tokenizer_2/model.onnx", "vocab.d/x"]
    fetched = {}

    def snapshot_download(repo_id, allow_patterns, ignore_patterns, **kwargs):
        fetched[tuple(allow_patterns)] = sorted(filter_repo_objects(repository, allow_patterns=allow_patterns,
                                                                    ignore_patterns=ignore_patterns))
        (tmp_path / "snapshot").mkdir(exist_ok=True)
        (tmp_path / "snapshot" / "model.safetensors").touch()
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    resolve_pretrained("acme/chat")
    resolve_pretrained("acme/chat", allow_patterns=TOKENIZER_FILES)
    model, tokenizer = fetched.values()
    assert model == ["additional_chat_templates/tool_use.jinja", "chat_template.jinja", "config.json",
                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert tokenizer == ["additional_chat_templates/tool_use.jinja", "chat_template.jinja", "config.json",
                         "tokenizer.json", "tokenizer_config.json"]
