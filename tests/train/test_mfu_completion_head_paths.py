"""The MFU of DPO, KTO and GRPO: their logits are computed at the completion tokens alone (``logits_to_keep``), so
the vocabulary projection's FLOPs (6·V·d a token) count there, not at the prompts' tokens (DPO's twice); GRPO's
reference forward (``grpo.beta`` > 0, once a generation) counts a third of the training FLOPs of its tokens, the
sampling nothing. Each expected figure is worked out from the step's pairs or completions and the model's shapes."""

from __future__ import annotations

import pytest

from retnet.train.config import load_config
from retnet.train.flops import StepFlops, flops_per_token

from .conftest import metrics
from .test_grpo import grpo_args
from .test_grpo import toy as grpo_toy  # noqa: F401 - the fixture
from .test_kto import kto_args
from .test_kto import toy as kto_toy  # noqa: F401 - the fixture
from .test_preference import dpo_args
from .test_preference import toy as dpo_toy  # noqa: F401 - the fixture

PEAK = 1e12  # logging.peak_flops: a CPU has no table entry
SHORT = {"train__steps": 1, "train__eval_interval": 0, "train__eval_blocks": 1, "checkpoint__interval": 0,
         "logging__peak_flops": PEAK}


def _run(args: list[str]):
    """The trainer of ``args`` (a ``--config tiny`` command line) after its run, and its train records."""
    from retnet.train.trainer import Trainer

    trainer = Trainer(load_config("tiny", args[2:]))
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer, metrics(trainer.output_dir)


def _logged(records: list[dict]) -> tuple[list[float], list[int]]:
    """Each one-step record's FLOPs per token as its MFU states them, and its step's tokens."""
    tokens = [r["tokens"] for r in records]
    return [r["mfu"] * PEAK / r["tokens_per_s"] for r in records], [b - a for a, b in zip([0, *tokens], tokens)]


def _head(trainer) -> float:
    config = trainer.model_config
    return 6.0 * config.vocab_size * config.hidden_size  # lm_head's [V, d] matmul, forward and backward


def _expected(trainer, tokens: int, head_tokens: int) -> float:
    """Per token: the whole model at every token, less the head at the ones whose logits are not computed."""
    whole = flops_per_token(trainer.model_config, trainer.data.seq_len)
    return (tokens * whole - (tokens - head_tokens) * _head(trainer)) / tokens


def test_dpo_counts_the_vocabulary_projection_at_the_completion_tokens(dpo_toy, tmp_path):  # noqa: F811
    trainer, records = _run(dpo_args(dpo_toy, tmp_path / "dpo", **SHORT))
    data, per_token = trainer.data, []
    for step, logged in enumerate(_logged(records)[1]):
        prompt, chosen, rejected = data.train.lengths[data.block_rows(4 * step, 4)].sum(axis=0)
        assert logged == 2 * prompt + chosen + rejected  # each pair's prompt twice, both completions
        per_token.append(_expected(trainer, logged, chosen + rejected))
    assert len(per_token) == 1 and _logged(records)[0] == pytest.approx(per_token, rel=1e-9)
    # the micro model's head is most of its FLOPs: counted at the prompts too, the MFU read a quarter high
    assert max(per_token) < 0.85 * flops_per_token(trainer.model_config, 32)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_counts_the_vocabulary_projection_at_the_completion_tokens(kto_toy, tmp_path, loss_type):  # noqa: F811
    """With the KL term each row is packed twice (its completion, another row's completion after its prompt),
    both scored; without it the completion alone."""
    trainer, records = _run(kto_args(kto_toy, tmp_path / loss_type, kto__loss_type=loss_type, **SHORT))
    data, per_token = trainer.data, []
    for step, logged in enumerate(_logged(records)[1]):
        prompt, completion, kl = data.train.lengths[data.block_rows(4 * step, 4)].sum(axis=0)
        if loss_type == "kto":
            assert logged == 2 * prompt + completion + kl
            per_token.append(_expected(trainer, logged, completion + kl))
        else:
            assert logged == prompt + completion
            per_token.append(_expected(trainer, logged, completion))
    assert _logged(records)[0] == pytest.approx(per_token, rel=1e-9)


def test_grpo_counts_the_head_at_the_completions_and_the_reference_forward_once_a_generation(grpo_toy,  # noqa: F811
                                                                                              tmp_path):
    """num_iterations 2: step 1 samples, scores the reference (beta 0.02) and trains; step 2 trains on the same
    completions, without a reference forward."""
    trainer, records = _run(grpo_args(grpo_toy, tmp_path / "grpo", grpo__num_iterations=2,
                                     **{**SHORT, "train__steps": 2}))
    logged, tokens = _logged(records)
    completions = records[0]["completions/mean_length"] * 16  # (the generation's step's record alone has it)
    assert tokens[0] == tokens[1] and 16 <= completions < tokens[0]  # one generation
    whole = flops_per_token(trainer.model_config, trainer.data.seq_len)
    training = _expected(trainer, tokens[0], completions)
    reference = (tokens[0] * whole / 3 - (tokens[0] - completions) * _head(trainer) / 3) / tokens[0]
    assert logged == pytest.approx([training + reference, training], rel=1e-9)


def test_step_flops_from_the_shapes():
    """flops_per_token less the head at the tokens whose logits are not computed; every token's without a count."""
    figures = StepFlops(per_token=100.0, head=60.0)
    assert figures(10) == 1000.0
    assert figures(10, 4) == 10 * 40.0 + 4 * 60.0
    assert figures(10, 10) == figures(10)
