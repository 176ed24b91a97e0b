"""Post-training paths a TRL user takes (bug hunt): GRPO's reward model scores the whole prompt, as TRL's does."""

from __future__ import annotations

import numpy as np
import torch

from retnet.train.config import GrpoConfig
from retnet.train.rewards import RewardSources

from .test_grpo import tokenizer_of, toy  # noqa: F401 - toy: the fixture


def _prompts(toy, max_prompt_length: int):  # noqa: F811
    from retnet.train.config import DataConfig
    from retnet.train.data import build_data

    cfg = DataConfig(dataset=str(toy / "conv.jsonl"), format="prompts", val_fraction=0.1,
                     cache_dir=str(toy / "cache"), max_prompt_length=max_prompt_length)
    return build_data(cfg, vocab_size=300, seed=0, micro_batch=8, global_batch=16, rank=0, local_rank=0,
                      world_size=1, tokenizer_dir=toy / "base", barrier=lambda: None)


def test_the_reward_model_scores_the_whole_prompt_under_max_prompt_length(toy, tmp_path):  # noqa: F811
    """data.max_prompt_length cuts the prompts the policy samples from (TRL's keep_end), not what grpo.reward_model
    judges: TRL scores the untruncated prompt + completion (and the reward trainer trained on whole prompts). The
    cut one lost the prompt's beginning (here the template's user turn opening) and scored otherwise."""
    from retnet.model import RetNetConfig, RetNetForSequenceClassification

    tokenizer = tokenizer_of(toy)
    config = RetNetConfig.from_pretrained(toy / "base")
    config.num_labels = 1
    torch.manual_seed(1)
    RetNetForSequenceClassification(config).eval().save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    whole, cut = _prompts(toy, 0), _prompts(toy, 3)
    rows = np.array([0, 1])
    assert len(cut.train.tokens[0]) == 3 < len(whole.train.tokens[0])  # the policy's prompt is cut
    completions = [np.array([*tokenizer.encode(t), tokenizer.eos_token_id]) for t in ("aab", "b a")]
    scores = []
    for data in (whole, cut):
        sources = RewardSources(GrpoConfig(reward_model=str(tmp_path / "rm")), tokenizer, data.encoder,
                                torch.device("cpu"), torch.autocast("cpu", enabled=False))
        scores.append(sources(data.train, rows, completions)[:, 0])
    assert torch.equal(scores[0], scores[1])


def test_a_lora_adapter_of_a_hub_base_names_the_hub_id(toy, tmp_path, hub_cache, monkeypatch):  # noqa: F811
    """model.init_from = a hub id: export/adapter's adapter_config.json names the base as peft names one loaded by
    its id (``org/name``, with the snapshot's commit as ``revision``), not the HF cache's snapshot directory of this
    machine (which AutoPeftModelForCausalLM elsewhere, or the adapter pushed to the hub, cannot find)."""
    import json

    from retnet.train.__main__ import main

    from .test_grpo import grpo_args

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hub_cache("acme/retnet-tiny", toy / "base")
    out = tmp_path / "run"
    args = grpo_args(toy, out, model__init_from="acme/retnet-tiny", train__steps=1, train__eval_interval=0,
                     grpo__beta=0.0, checkpoint__interval=0, checkpoint__export=True)
    assert main([*args, "--lora.rank=2", "--lora.target_modules=q_proj,v_proj"]) == 0
    config = json.loads((out / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/retnet-tiny" and config["revision"] == snapshot.name
    # the local directory as before
    from retnet.train.lora import adapter_base

    assert adapter_base(toy / "base") == (str((toy / "base").resolve()), None)
