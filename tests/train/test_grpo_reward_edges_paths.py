"""GRPO and reward-model paths a TRL user takes (bug hunt): an xPos ``grpo.reward_model`` scores a prompt and
completion longer than one packed xPos frame, as ``retnet-eval`` does, instead of stopping the run; the start-up line
of ``grpo.scale_rewards`` "none" says the advantages are not scaled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retnet.train.config import GrpoConfig
from retnet.train.rewards import RewardSources

from .test_grpo import prompts_data, tokenizer_of, toy  # noqa: F401 - toy: the fixture


def test_an_xpos_reward_model_scores_a_sequence_past_a_packed_frame_alone(toy, tmp_path):  # noqa: F811
    """A completion whose prompt + completion + EOS is past the reward model's packed xPos frame (48 positions at
    xpos_scale_base 1) is scored alone, unpacked, in the model's own frames, the short one beside it packed: the
    packed forward refused it (XPosFrameError), a GRPO run stopping at its first such completion."""
    from retnet.model import RetNetConfig, RetNetForSequenceClassification
    from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span

    tokenizer = tokenizer_of(toy)
    config = RetNetConfig.from_pretrained(toy / "base")
    config.num_labels, config.use_xpos, config.xpos_scale_base = 1, True, 1.0
    torch.manual_seed(1)
    rm = RetNetForSequenceClassification(config).eval()
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    frame = xpos_span(config, XPOS_PACKED_MAX_GROWTH)
    data = prompts_data(toy)
    sources = RewardSources(GrpoConfig(reward_model=str(tmp_path / "rm")), tokenizer, data.encoder,
                            torch.device("cpu"), torch.autocast("cpu", enabled=False))
    eos = tokenizer.eos_token_id
    completions = [np.array([*tokenizer.encode(text), eos]) for text in ("aab", " aaa bbb" * 30)]
    prompt = data.train.tokens[0].tolist()
    sequences = [[*prompt, *c.tolist()] for c in completions]  # (the completions' texts re-encode to their ids)
    assert len(sequences[0]) <= frame < len(sequences[1])
    got = sources(data.train, np.array([0, 0]), completions)[:, 0]
    with torch.no_grad():
        short = rm(input_ids=torch.tensor([sequences[0]]), cu_seqlens=torch.tensor([0, len(sequences[0])]),
                   use_cache=False).logits[0, 0]
        row = torch.tensor([sequences[1]])
        long = rm(input_ids=row, attention_mask=torch.ones_like(row), use_cache=False).logits[0, 0]
    torch.testing.assert_close(got, torch.stack([short, long]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("scale", "said"), [("none", "advantages not scaled (grpo.scale_rewards 'none')"),
                                             ("group", "advantages scaled by the group std")])
def test_the_start_up_line_says_how_the_advantages_are_scaled(toy, caplog, scale, said):  # noqa: F811
    """scale_rewards "none" divides by no std: the start-up line said "scaled by the none std"."""
    from types import SimpleNamespace

    from retnet.model import RetNetForCausalLM
    from retnet.train.config import build_config

    from .test_trl_compat_grpo import grpo_section

    data = prompts_data(toy)
    cfg = build_config(grpo_section(reward_funcs=["toy_rewards:a_share"], scale_rewards=scale)).grpo
    trainer = SimpleNamespace(cfg=SimpleNamespace(grpo=cfg, train=SimpleNamespace(steps=1)),
                              device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False),
                              raw_model=RetNetForCausalLM.from_pretrained(toy / "base"), peft_model=None, fsdp=False,
                              tp_mesh=None, cp_size=1)
    with caplog.at_level("INFO", logger="retnet.train.grpo"):
        data.start(trainer)
    assert f"; {said}; loss dapo" in caplog.text and "none std" not in caplog.text


def test_exact_match_refuses_a_solution_that_is_no_text_naming_the_column():
    """A list of accepted answers (or a message dict) in the ``solution`` column was compared as its str(): no
    completion ever matched, every reward 0.0 and no warning (0.0 is a score, not None)."""
    from retnet.train.config import ConfigError
    from retnet.train.rewards import exact_match

    assert exact_match(["42", " 3.5 ", "True", "x"], solution=[42, 3.5, True, None]) == [1.0, 1.0, 1.0, None]
    for answer in (["42", "forty-two"], {"content": "42"}):
        with pytest.raises(ConfigError, match=rf"exact_match: the 'solution' column holds {type(answer).__name__} "):
            exact_match(["42"], solution=[answer])
