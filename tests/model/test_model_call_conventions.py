"""What generic callers pass a transformers model: ``attn_implementation`` (lm-eval, TRL, ...), which RetNet
takes and ignores (it has no attention), and a config whose ``return_dict`` is False, which our own callers
(generate's paths) override by asking for the outputs by name."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from tests.model.conftest import make_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("attn") / "model"
    make_model().save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["sdpa", "flash_attention_2", "flex_attention", "eager", "paged|eager"])
def test_attn_implementation_is_accepted_and_runs_retention(saved, name, caplog):
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = AutoModelForCausalLM.from_pretrained(saved).eval()
    # The note is transformers' warning_once, once a process: a test before this one in the worker that asked for
    # the same name (test_set_attn_implementation_and_a_misspelt_name's "sdpa") would have had it already
    hf_logging.warning_once.cache_clear()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            model = AutoModelForCausalLM.from_pretrained(saved, attn_implementation=name).eval()
    finally:
        hf_logging.disable_propagation()
    # Nothing attention-specific switches on in transformers (generate's flash-attention paths): "eager"
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    noted = [r.getMessage() for r in caplog.records if "attn_implementation" in r.getMessage()]
    if name == "eager":
        assert not noted
    else:
        assert noted and "retention" in noted[0] and name in noted[0]


def test_set_attn_implementation_and_a_misspelt_name(tiny_model):
    tiny_model.set_attn_implementation("sdpa")
    assert tiny_model.config._attn_implementation == "eager"
    assert tiny_model.get_correct_attn_implementation("flash_attention_2") == "eager"
    with pytest.raises(ValueError, match=r"attn_implementation.*'spda'"):
        tiny_model.set_attn_implementation("spda")


def test_generate_paths_ask_for_outputs_by_name_whatever_the_config_says():
    model = make_model(return_dict=False)
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 5, 6, 7]])
    assert isinstance(model(ids), tuple)  # a user's call without return_dict follows the config
    assert model(ids, return_dict=True).logits.shape == (2, 5, 101)
    want = make_model().generate(ids, max_new_tokens=3, do_sample=False)
    for kwargs in ({}, {"prefill_chunk_size": 2}, {"num_beams": 2}):
        torch.testing.assert_close(model.generate(ids, max_new_tokens=3, do_sample=False, **kwargs)
                                   [:, :want.shape[1]].shape, want.shape)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=3, do_sample=False), want)


def test_a_hub_repository_with_safetensors_is_not_also_fetched_as_pickles(tmp_path, monkeypatch):
    """gpt2-style repositories carry model.safetensors and pytorch_model.bin: only what loads is fetched (the .bin
    alone when there are no safetensors)."""
    import fnmatch
    import shutil

    import huggingface_hub

    from retnet.model.hub import resolve_pretrained

    repos = {"org/both": ["config.json", "model.safetensors", "pytorch_model.bin", "original/consolidated.safetensors"],
             "org/old": ["config.json", "pytorch_model.bin"]}

    def fake_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, ignore_patterns=()):
        snapshot = tmp_path / repo_id.replace("/", "--")
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir()
        for name in repos[repo_id]:  # fnmatch's "*" crosses "/", as huggingface_hub's patterns do
            if (any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns)
                    and not any(fnmatch.fnmatch(name, pattern) for pattern in ignore_patterns)):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_text("x")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert sorted(p.name for p in resolve_pretrained("org/both").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in resolve_pretrained("org/old").iterdir()) == ["config.json", "pytorch_model.bin"]
