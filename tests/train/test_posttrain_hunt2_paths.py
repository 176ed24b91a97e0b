"""Post-training paths found by a second hunt (a user coming from TRL): the GRPO reward model's loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retnet.train.config import ConfigError, DataConfig, GrpoConfig


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> tuple[Path, object]:
    """(a directory, its tokenizer): a micro RetNetForCausalLM saved with a small BPE, as an SFT export is."""
    from retnet.tokenization import train_byte_level_bpe

    from .conftest import save_micro_base

    root = tmp_path_factory.mktemp("posttrain-hunt2")
    tokenizer = train_byte_level_bpe([f"Is the sky {w}? Maybe, yes." for w in ("blue", "red", "big")] * 4,
                                     vocab_size=280)
    save_micro_base(root / "lm", tokenizer)
    return root, tokenizer


def reward_sources(path: Path, tokenizer):
    from retnet.train.prompts import PromptEncoder
    from retnet.train.rewards import RewardSources

    encoder = PromptEncoder(tokenizer, DataConfig(dataset="x", format="prompts"))
    return RewardSources(GrpoConfig(reward_model=str(path)), tokenizer, encoder, torch.device("cpu"),
                         torch.autocast("cpu", enabled=False))


def test_a_reward_model_without_its_trained_weights_is_refused(micro, tmp_path):
    """grpo.reward_model: from_pretrained draws what a checkpoint lacks at random and only reports it, so a causal
    LM's export (no score head; its config saying one label, as a run from a reward model's export writes it) or a
    reward model missing a layer scored every completion with noise, and GRPO trained on it without a word."""
    import shutil

    from safetensors.torch import load_file, save_file

    from retnet.model import RetNetConfig, RetNetForSequenceClassification

    root, tokenizer = micro
    lm = tmp_path / "lm"
    shutil.copytree(root / "lm", lm)
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, "num_labels": 1, "id2label": {"0": "LABEL_0"},
                                                "label2id": {"LABEL_0": 0}}))
    with pytest.raises(ConfigError, match=r"grpo.reward_model .*holds no trained score head.*score\.weight"):
        reward_sources(lm, tokenizer)

    config = RetNetConfig.from_pretrained(root / "lm")
    config.num_labels = 1
    rm = tmp_path / "rm"
    RetNetForSequenceClassification(config).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    assert reward_sources(rm, tokenizer).model is not None  # a whole reward model loads
    weights = load_file(rm / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, rm / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"grpo.reward_model .*lacks weights.*layers\.1\.mlp\.down_proj"):
        reward_sources(rm, tokenizer)


@pytest.mark.parametrize("weights", [(2.0, 1.0), (1.0, 2.0)])
def test_unequal_kto_weights_on_equal_counts_are_warned_of(weights, caplog):
    """The KTO paper's eq. 8 bounds the weighted ratio (desirable_weight · n_d / (undesirable_weight · n_u) in
    [1, 4/3]) whatever the counts (TRL checks it only when the counts differ); equal counts returned before the
    weights were looked at, so kto.desirable_weight=2 on a balanced set (a ratio of 2) was never warned of."""
    from types import SimpleNamespace

    import numpy as np

    from retnet.train.config import KtoConfig
    from retnet.train.kto import KtoData

    labels = np.array([True, False] * 6)
    cfg = KtoConfig(desirable_weight=weights[0], undesirable_weight=weights[1])
    with caplog.at_level("WARNING", logger="retnet.train.kto"):
        KtoData._warn_of_weights(SimpleNamespace(row_labels={"train": labels}, cfg=cfg))
    # TRL's ranges: 6·w_u / 6 · [1, 1.33] and 6·w_d / 6 / [1.33, 1]
    assert "6 desirable and 6 undesirable training rows" in caplog.text and "unbalance them" in caplog.text
    assert f"kto.desirable_weight in [{weights[1]}, {round(weights[1] * 1.33, 2)}]" in caplog.text, caplog.text
