"""xPos in a distillation teacher: it runs the student's packed rows, so a document longer than one of its packed
frames stops the run too, and the start warns of it naming the teacher."""

from __future__ import annotations

from pathlib import Path

import torch


def _teacher(path: Path, tokenizer_dir: Path, xpos_scale_base: float) -> Path:
    """An untrained micro causal LM with xPos (its outputs do not matter here, only its frames)."""
    from transformers import AutoTokenizer

    from retnet.model import RetNetConfig, RetNetForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          chunk_size=16, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          use_xpos=True, xpos_scale_base=xpos_scale_base)
    torch.manual_seed(0)
    RetNetForCausalLM(config).save_pretrained(path)
    return path


def test_a_teacher_with_xpos_is_warned_of_by_name(micro, run_here, tmp_path, tokenizer_dir):
    # xpos_scale_base 0.5: a packed frame of 16 positions, where the micro rows pack 32-token documents' parts;
    # the student has no xPos, and nothing was warned before the teacher's forward stopped the run
    teacher = _teacher(tmp_path / "teacher", tokenizer_dir, 0.5)
    done = run_here([*micro(tmp_path / "run", train__steps=1, optim__warmup_steps=0), f"--distill.teacher={teacher}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "retnet-train: error: use_xpos: a packed or padded sequence reaches position" in done.stderr
    warnings = [line for line in done.stderr.splitlines() if "packed xPos frame" in line]
    assert len(warnings) == 1, done.stderr[-2000:]
    assert "distill.teacher use_xpos" in warnings[0] and "packed xPos frame of the teacher" in warnings[0]
    assert "16 positions at xpos_scale_base 0.5" in warnings[0]
