"""DoRA (``lora.use_dora``) under tensor parallelism in the trainer: ``retnet-train --lora.use_dora=true
--train.tensor_parallel=2`` logs one process's losses and gradient norms, its checkpoint resumes on 2 ranks to one
process's losses and its export is one process's. (The split model's DoRA cases, each output row's norm whole on a
column-parallel rank and summed over the ranks on a row-parallel one: tests/model/test_tensor_parallel.py, in that
file's launch.)

The ``retnet-train`` runs go to the 2-rank launch kept up for the test session (``run_train_many``'s ``RunsPool``),
each when the session runs its test."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.launch import selected_tests

from .conftest import micro_args, run_train_many

TRAINING_TEST = "test_dora_training_on_split_layers_logs_one_process_resumes_and_exports"


def training_args(micro, base: Path, out: Path, **overrides) -> list[str]:
    """DoRA rank 4 on every projection of ``base``, 4 steps (``micro``: conftest's fixture's function)."""
    from .test_init_from import fine_tune_args

    return fine_tune_args(micro(out, train__steps=4, optim__schedule="constant", checkpoint__interval=2,
                                checkpoint__export=True, **overrides), base, lora__rank=4, lora__alpha=8,
                          lora__use_dora="true", optim__lr=2e-2, optim__weight_decay=0.0)


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory, corpus, tokenizer_dir, cache_dir) -> SimpleNamespace:
    """The module's 2-rank runs, when the session runs the training test: its split run (``split``, to
    ``root / "split"``) and the resume of its step-2 checkpoint (``again``, to ``root / "resumed"``), each a finished
    run as ``run_train_many`` returns it."""
    root = tmp_path_factory.mktemp("tp-dora")
    finished = []
    if TRAINING_TEST in selected_tests(request):
        def args(out: Path, **overrides) -> list[str]:
            return training_args(lambda output_dir, **more: micro_args(corpus, tokenizer_dir, cache_dir, output_dir,
                                                                       **more),
                                 request.getfixturevalue("base"), out, **overrides)

        finished = run_train_many([
            args(root / "split", train__tensor_parallel=2, train__sequence_parallel=True, train__vocab_parallel=True),
            # on 2 ranks again, without the sequence and vocabulary splits (the row-parallel magnitudes then scale a
            # replicated output): the full checkpoint's column-parallel magnitudes and their AdamW moments cut by rows
            args(root / "resumed", train__tensor_parallel=2,
                 train__resume=root / "split" / "checkpoints" / "step_00000002")], 2, root)
    return SimpleNamespace(root=root, **dict(zip(("split", "again"), finished)))


def test_the_config_takes_dora_with_tensor_parallelism():
    from retnet.train.config import load_config

    job = load_config("tiny", ["--train.tensor_parallel=2", "--train.sequence_parallel=true", "--lora.rank=4",
                               "--lora.use_dora=true"])
    assert job.lora.use_dora and job.train.tensor_parallel == 2


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir) -> Path:
    """A seeded micro model over the test tokenizer: the ``model.init_from`` the adapters train on."""
    from retnet.train.data import load_tokenizer

    from .conftest import save_micro_base

    path = tmp_path_factory.mktemp("tp-dora-base") / "base"
    save_micro_base(path, load_tokenizer(tokenizer_dir))
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_dora_training_on_split_layers_logs_one_process_resumes_and_exports(micro, base, tmp_path, two_ranks, run_here,
                                                                            read_metrics):
    """DoRA rank 4 on every projection of ``base``, 4 steps: 2 torchrun ranks splitting every layer (the sequence
    and the vocabulary too) log one process's losses and gradient norms; their step-2 checkpoint (the adapters and
    magnitudes gathered whole) resumes on 2 ranks to one process's last losses, and their export (the merged model
    and export/adapter) is one process's."""
    from safetensors.torch import load_file

    from retnet.model import RetNetForCausalLM
    from retnet.train.checkpoint import load_checkpoint

    single, split, resumed = tmp_path / "single", two_ranks.root / "split", two_ranks.root / "resumed"
    alone = run_here(training_args(micro, base, single))
    assert alone.returncode == 0, alone.stderr[-3000:]
    # two_ranks's runs: training_args(split, train__tensor_parallel=2, train__sequence_parallel=True,
    # train__vocab_parallel=True), then the resume of its step-2 checkpoint (training_args(resumed,
    # train__tensor_parallel=2, train__resume=...)) checked below
    two, again = two_ranks.split, two_ranks.again
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    assert "DoRA rank 4 on q_proj" in two.stderr
    expected = [r["loss"] for r in read_metrics(single)]
    assert len(expected) == 4
    assert [r["loss"] for r in read_metrics(split)] == pytest.approx(expected, rel=1e-5)
    assert [r["grad_norm"] for r in read_metrics(split)] == pytest.approx(
        [r["grad_norm"] for r in read_metrics(single)], rel=1e-5)  # measured 6e-8, the losses 8e-8

    saved, reference = (load_checkpoint(out / "checkpoints" / "step_00000002")["model"] for out in (split, single))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    assert sum(".lora_magnitude_vector." in key for key in saved) == 2 * 7
    # the resume on 2 ranks (the second run)
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-2000:]
    assert "at step 2" in again.stderr
    assert [r["loss"] for r in read_metrics(resumed)] == pytest.approx(expected[-2:], rel=1e-5)

    adapters = [load_file(out / "export" / "adapter" / "adapter_model.safetensors") for out in (split, single)]
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[1].items():  # measured 1.5e-4 of the largest (o_proj's A): AdamW's normalized
        # steps amplify the split's summation order in near-zero gradients, as in a plain LoRA run
        torch.testing.assert_close(adapters[0][key], value, rtol=0, atol=1e-3 * value.abs().max().item(), msg=key)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = [RetNetForCausalLM.from_pretrained(out / "export").eval() for out in (split, single)]
    with torch.no_grad():
        torch.testing.assert_close(merged[0](tokens).logits, merged[1](tokens).logits, rtol=0, atol=1e-4)  # 4e-6
