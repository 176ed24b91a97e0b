"""A model named by a hub id: fetched through huggingface_hub's snapshot_download (here from an HF cache laid
out as a download leaves it, offline), or refused saying what was looked for and why it is not there."""

import pytest
import torch

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.hub import HubError, is_hub_id, resolve_pretrained


@pytest.mark.parametrize("source, expected", [
    ("org/name", True), ("name", True), ("Org-1/retnet_1.3B-v2", True),
    ("/abs/path", False), ("./relative", False), ("a/b/c", False), ("~/model", False), ("org/", False),
    ("-org/name", False), ("org/na--me", False), ("org/..", False), ("org/name.", False), ("", False),
    ("org/name\n", False),  # (a regex $ matches before a final newline; the hub refuses it)
])
def test_what_counts_as_a_hub_id(source, expected):
    assert is_hub_id(source) is expected


def test_a_directory_is_itself_and_a_hub_id_is_its_cached_snapshot(tmp_path, hub_cache):
    model = RetNetForCausalLM(RetNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(tmp_path / "local")
    assert resolve_pretrained(tmp_path / "local") == tmp_path / "local"
    main = hub_cache("acme/retnet-tiny", tmp_path / "local")
    torch.nn.init.zeros_(model.lm_head.weight)
    model.save_pretrained(tmp_path / "v2")
    pinned = hub_cache("acme/retnet-tiny", tmp_path / "v2", revision="v2")

    assert resolve_pretrained("acme/retnet-tiny") == main
    assert resolve_pretrained("acme/retnet-tiny", revision="v2") == pinned
    loaded = RetNetForCausalLM.from_pretrained(resolve_pretrained("acme/retnet-tiny", revision="v2"))
    assert torch.count_nonzero(loaded.lm_head.weight) == 0  # the revision's weights, not main's


def test_neither_a_directory_nor_a_cached_repository_says_both(tmp_path, hub_cache):
    with pytest.raises(HubError, match=r"'acme/missing': no such directory, and the hub could not provide it "
                                       r"\(\w+"):
        resolve_pretrained("acme/missing")
    with pytest.raises(HubError, match="no such directory \\(nor a hub id"):
        resolve_pretrained(tmp_path / "nowhere")
