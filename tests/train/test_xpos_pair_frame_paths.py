"""xPos in a post-training objective: preference pairs (DPO and its variants, reward models), KTO's rows and GRPO's
completions are always packed, a prompt and its completion a cu_seqlens segment, so one longer than a packed xPos
frame stops the run (XPosFrameError); the start warns of it, as it does for packed documents."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from retnet.model import RetNetConfig
from retnet.train.config import JobConfig
from retnet.train.trainer import Trainer

from .test_preference import dpo_args, toy  # noqa: F401 - toy: the fixture


@pytest.fixture(scope="module")
def xpos_base(toy):  # noqa: F811
    """The toy's micro base with xPos at xpos_scale_base 0.5 (a packed frame of 16 positions, where the toy's
    prompts alone are longer), and its pairs as KTO's unpaired rows."""
    from transformers import AutoTokenizer

    from retnet.model import RetNetForCausalLM

    path = toy / "xpos_base"
    AutoTokenizer.from_pretrained(toy / "base").save_pretrained(path)
    config = RetNetConfig.from_pretrained(toy / "base")
    config.use_xpos, config.xpos_scale_base = True, 0.5
    torch.manual_seed(0)
    RetNetForCausalLM(config).save_pretrained(path)
    rows = [json.loads(line) for line in (toy / "pairs.jsonl").read_text().splitlines()]
    with open(toy / "rows.jsonl", "w") as out:
        for i, row in enumerate(rows):
            side = ("rejected", "chosen")[i % 2]
            out.write(json.dumps({"prompt": row["prompt"], "completion": row[side], "label": bool(i % 2)}) + "\n")
    return path


@pytest.mark.parametrize("objective", ["dpo", "reward", "kto"])
def test_a_sequence_past_a_packed_xpos_frame_is_warned_of_at_the_start(toy, xpos_base, run_here, tmp_path,  # noqa: F811
                                                                       objective):
    # the run stopped at its first forward (the reference pass, a reward model's step 1) without a word before
    settings = {"reward": {"reward__enabled": "true"},
                "kto": {"data__format": "unpaired", "data__dataset": toy / "rows.jsonl"}}.get(objective, {})
    done = run_here(dpo_args(toy, tmp_path / "run", model__init_from=xpos_base, train__steps=1,
                             optim__warmup_steps=0, train__eval_interval=0, checkpoint__interval=0, **settings))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "retnet-train: error: use_xpos: a packed or padded sequence reaches position" in done.stderr
    warnings = [line for line in done.stderr.splitlines() if "packed xPos frame" in line]
    assert len(warnings) == 1, done.stderr[-3000:]
    assert "a packed sequence may hold 32 tokens (data.seq_len 32)" in warnings[0]
    assert "16 positions at xpos_scale_base 0.5" in warnings[0] and "data.seq_len of at most 16" in warnings[0]


def test_pairs_within_a_frame_train_unwarned(toy, xpos_base, run_here, tmp_path):  # noqa: F811
    # data.seq_len 16 (prompts cut to their last 8 tokens): every sequence fits the frame
    done = run_here(dpo_args(toy, tmp_path / "run", model__init_from=xpos_base, train__steps=1,
                             optim__warmup_steps=0, train__eval_interval=0, checkpoint__interval=0,
                             data__seq_len=16, data__max_prompt_length=8))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "packed xPos frame" not in done.stderr


def _warnings(caplog, rows, cp_size: int = 1, **sections) -> list[str]:
    """The start's frame warnings for an xPos model (a packed frame of 16 positions) and ``rows`` (the trainer's data)."""
    cfg = JobConfig()
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    config = RetNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, chunk_size=16,
                          use_xpos=True, xpos_scale_base=0.5)
    trainer = SimpleNamespace(cfg=cfg, model_config=config, teacher=None, data=rows, cp_size=cp_size)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retnet.train"):
        Trainer._warn_of_xpos_frames(trainer)
    return [r.getMessage() for r in caplog.records if "packed xPos frame" in r.getMessage()]


def test_grpo_and_context_parallel_pieces(caplog):
    # GRPO: the longest prompt and the sampled tokens
    grpo = SimpleNamespace(grpo=True, longest_prompt=12, sequence_length=lambda cfg: 12 + cfg.max_completion_length)
    warned = _warnings(caplog, grpo, grpo={"max_completion_length": 8}, data={"format": "prompts"})
    assert len(warned) == 1 and "may hold 20 tokens (the longest prompt, 12 tokens, and 8 sampled ones)" in warned[0]
    assert not _warnings(caplog, grpo, grpo={"max_completion_length": 4}, data={"format": "prompts"})
    # pairs under context parallelism: a rank's piece of a row of 2 × micro_batch sequences
    pairs = SimpleNamespace(preference=True, seq_len=32)
    train = {"micro_batch_size": 1}
    warned = _warnings(caplog, pairs, cp_size=2, train=train, data={"format": "preference"})
    assert len(warned) == 1 and "may hold 32 tokens (data.seq_len 32)" in warned[0]
    warned = _warnings(caplog, pairs, cp_size=3, train=train, data={"format": "preference"})
    assert len(warned) == 1 and "may hold 22 tokens (data.seq_len 32, cut to a context-parallel" in warned[0]
    assert not _warnings(caplog, pairs, cp_size=4, train=train, data={"format": "preference"})
    # KTO without the KL term packs the completions alone
    kto = SimpleNamespace(preference=True, kto=True, seq_len=32)
    assert _warnings(caplog, kto, cp_size=3, train=train, data={"format": "unpaired"})
    assert not _warnings(caplog, kto, cp_size=3, train=train, data={"format": "unpaired"},
                         kto={"loss_type": "apo_zero_unpaired"})
