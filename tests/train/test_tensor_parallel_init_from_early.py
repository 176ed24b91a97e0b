"""Under ``train.tensor_parallel``, a ``model.init_from`` model the ranks cannot split (its config.json's heads, FFN
width or dropout) is refused before the data is built, whose reading and tokenizing can take hours; a DPO run, whose
objective turns the dropout off, is not. Rank 0 of a fake two-rank group in this process (its collectives do
nothing), with the data's build replaced."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.train import __main__ as train_main
from retnet.train import trainer as trainer_module
from retnet.train.__main__ import EXIT_CONFIG, main

from .conftest import micro_args

# micro_args' settings a model.init_from run cannot take (the architecture and tokenizer are the model's)
NOT_WITH_INIT_FROM = ("--model.hidden_size", "--model.num_hidden_layers", "--model.num_attention_heads",
                      "--model.chunk_size", "--data.tokenizer")


class RunEnded(Exception):
    """``main``'s end of a distributed run (it would end the process), with its exit status."""


class DataBuilt(Exception):
    """The run got as far as building its data."""


def _end_run(status: int):
    raise RunEnded(status)


def _build_data(*args, **kwargs):
    raise DataBuilt


@pytest.fixture
def rank_zero_of_two(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trainer_module, "build_data", _build_data)
    monkeypatch.setattr(train_main, "_exit_without_teardown", _end_run)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        if dist.is_initialized():  # (main destroys it on an unexpected error)
            dist.destroy_process_group()


def _base(path, tokenizer_dir, **settings):
    config = RetNetConfig(**{"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 64, "pad_token_id": 0, "eos_token_id": 1, **settings})
    RetNetForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((tokenizer_dir / name).read_bytes())
    return path


@pytest.mark.parametrize("settings, message", [
    (dict(dropout=0.1), "model.dropout (of model.init_from"),
    (dict(num_attention_heads=3, hidden_size=48), "model.num_attention_heads (of model.init_from"),
], ids=["dropout", "heads"])
def test_a_pretrained_model_the_ranks_cannot_split_is_refused_before_the_data(
        settings, message, corpus, tokenizer_dir, cache_dir, tmp_path, capsys, rank_zero_of_two):
    base = _base(tmp_path / "base", tokenizer_dir, **settings)
    args = [arg for arg in micro_args(corpus, tokenizer_dir, cache_dir, tmp_path / "run", train__tensor_parallel=2,
                                      model__init_from=base) if not arg.startswith(NOT_WITH_INIT_FROM)]
    with pytest.raises(RunEnded) as ended:
        main(args)
    assert ended.value.args == (EXIT_CONFIG,)
    assert message in capsys.readouterr().err


def test_dpo_turns_the_dropout_off_and_is_not_refused(tokenizer_dir, cache_dir, tmp_path, rank_zero_of_two):
    base = _base(tmp_path / "base", tokenizer_dir, dropout=0.1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is", "chosen": f" {2 * i}.",
                                         "rejected": f" {i}."}) + "\n" for i in range(8)))
    args = [arg for arg in micro_args(pairs, tokenizer_dir, cache_dir, tmp_path / "run", train__tensor_parallel=2,
                                      model__init_from=base, data__format="preference")
            if not arg.startswith(NOT_WITH_INIT_FROM)]
    with pytest.raises(DataBuilt):
        main(args)
