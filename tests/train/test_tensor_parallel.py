"""Tensor parallelism in the trainer (``train.tensor_parallel``): what the config and the trainer refuse; torchrun
gloo ranks splitting every decoder layer in two log the losses, gradient norms and validation losses of one process,
and their checkpoints (full tensors) resume on two data-parallel groups of two ranks and in one process without
the split; the export is an ordinary unsharded model; a checkpoint's stream positions are keyed by the
data-parallel ranks. With ``train.parallelism=fsdp`` FSDP2 shards the split model over the data-parallel groups
(2-D parallelism): the losses are one process's again, its sharded checkpoints resume without either split, and a
one-process checkpoint resumes under both. DPO, a reward model and GRPO (its completions sampled alike on a group's
ranks) log one process's records too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from retnet.train.config import ConfigError, load_config
from retnet.train.trainer import Trainer
from tests.launch import selected_tests

from .conftest import micro_args, run_train_many
from .test_context_parallel import SPLIT_ROWS
from .test_grpo import CLIP, grpo_args, strip
from .test_grpo import toy as grpo_toy  # noqa: F401 - the fixture, as grpo_toy (test_preference's is toy)
from .test_preference import assert_records_match, dpo_args, toy  # noqa: F401 - toy: the fixture


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["--train.tensor_parallel=0"], r"train\.tensor_parallel must be >= 1.*got 0"),
    (["--lora.rank=4", "--lora.dropout=0.05"], r"lora\.dropout must be 0 with train\.tensor_parallel 2 .*got 0\.05"),
    (["--model.dropout=0.1"], r"model\.dropout must be 0 with train\.tensor_parallel 2 .*got 0\.1"),
    (["--model.hidden_size=96", "--model.num_attention_heads=3"],
     r"model\.num_attention_heads must be divisible by train\.tensor_parallel \(2\).*got 3"),
    (["--model.intermediate_size=130", "--train.tensor_parallel=4"],
     r"model\.intermediate_size must be divisible by train\.tensor_parallel \(4\).*got 130"),
    (["--train.tensor_parallel=1", "--train.vocab_parallel=true"],
     r"train\.vocab_parallel needs train\.tensor_parallel > 1 .*got True"),
    (["--train.tensor_parallel=1", "--train.sequence_parallel=true"],
     r"train\.sequence_parallel needs train\.tensor_parallel > 1 \(it splits each row's tokens.*got True"),
    (["--train.vocab_parallel=true", "--distill.teacher=org/teacher"],
     r"train\.vocab_parallel is not supported with distillation \(distill\.teacher 'org/teacher'\) yet.*got True"),
], ids=["zero", "lora-dropout", "dropout",
        "heads", "ffn", "vocab-without-tp", "sequence-without-tp", "vocab-distill"])
def test_settings_tensor_parallelism_cannot_train_are_refused(overrides, message):
    if not any(o.startswith("--train.tensor_parallel") for o in overrides):
        overrides = ["--train.tensor_parallel=2", *overrides]
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_muon_activation_checkpointing_fsdp_compile_lora_dpo_reward_models_and_grpo_are_taken(monkeypatch):
    load_config("tiny", ["--train.tensor_parallel=4", "--optim.name=muon", "--train.activation_checkpointing=true"])
    load_config("tiny", ["--train.tensor_parallel=2", "--train.parallelism=fsdp", "--train.compile=true",
                         "--lora.rank=4"])
    both = load_config("tiny", ["--train.tensor_parallel=2", "--train.context_parallel=2",
                                "--train.sequence_parallel=true", "--train.global_batch_size=8",
                                "--train.micro_batch_size=2"])
    assert both.train.grad_accum_steps(8) == 2  # 8 ranks: 2 groups of 2 pieces × 2
    with pytest.raises(ConfigError, match=r"train\.context_parallel × train\.tensor_parallel \(2 × 2 = 4\) must "
                                          r"divide the world size \(6\)"):
        both.train.grad_accum_steps(6)  # each divides 6, their product does not
    pairs = ["--train.tensor_parallel=2", "--data.format=preference", "--data.dataset=pairs.jsonl",
             "--model.init_from=base", "--train.vocab_parallel=true"]
    load_config("tiny", pairs)
    load_config("tiny", [*pairs, "--reward.enabled=true", "--train.sequence_parallel=true"])
    # GRPO: the completions split over the data-parallel ranks (world / tensor_parallel), not the world's ranks
    monkeypatch.setenv("WORLD_SIZE", "4")
    prompts = ["--train.tensor_parallel=2", "--data.format=prompts", "--data.dataset=prompts.jsonl",
               "--model.init_from=base", "--grpo.reward_funcs=retnet.train.rewards:exact_match",
               "--grpo.num_generations=8", "--train.micro_batch_size=8"]
    load_config("tiny", [*prompts, "--train.global_batch_size=16", "--train.vocab_parallel=true"])
    with pytest.raises(ConfigError, match=r"on each of the 2 data-parallel ranks \(world 4 / train\.tensor_parallel "
                                          r"2\).*multiple of 16; got 8"):
        load_config("tiny", [*prompts, "--train.global_batch_size=8"])


@pytest.mark.parametrize("overrides, message", [
    (dict(num_attention_heads=3, hidden_size=96), r"model\.num_attention_heads \(of model\.init_from 'base'\) "
                                                  r"must be divisible by train\.tensor_parallel \(2\).*got 3"),
    (dict(intermediate_size=129), r"model\.intermediate_size \(of model\.init_from 'base'\).*got 129"),
    (dict(dropout=0.1), r"model\.dropout \(of model\.init_from 'base'\) must be 0 with train\.tensor_parallel 2 "
                        r".*set model\.dropout=0; got 0\.1"),
], ids=["heads", "ffn", "dropout"])
def test_a_pretrained_model_the_ranks_cannot_split_is_refused(overrides, message):
    """A ``model.init_from`` model's architecture and dropout are its config.json's, which the trainer reads: checked
    there (by the method the trainer calls before loading its weights), naming the setting and the model."""
    from retnet.model import RetNetConfig

    config = RetNetConfig.from_preset("tiny", **{"hidden_size": 64, "num_attention_heads": 4, **overrides})
    with pytest.raises(ConfigError, match=message):
        Trainer._check_splits(SimpleNamespace(tp_size=2), config, "model.init_from 'base'")


def test_a_world_it_does_not_divide_is_refused(micro, tmp_path, capsys):
    """At start-up, before any data is read: naming both numbers. The global batch splits over the data-parallel
    groups (world size / tensor_parallel)."""
    config = load_config("tiny", ["--train.tensor_parallel=2", "--train.global_batch_size=8",
                                  "--train.micro_batch_size=2"])
    assert config.train.grad_accum_steps(2) == 4 and config.train.grad_accum_steps(4) == 2
    with pytest.raises(ConfigError, match=r"train\.tensor_parallel \(2\) must divide the world size \(3\)"):
        config.train.grad_accum_steps(3)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(8\).*world_size / train\.tensor_parallel = "
                                          r"2 × 16 / 2 = 16"):
        config.train.grad_accum_steps(16)
    assert main(micro(tmp_path / "run", train__tensor_parallel=2)) == EXIT_CONFIG
    assert "train.tensor_parallel (2) must divide the world size (1)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_a_streamed_checkpoint_resumes_on_the_same_data_parallel_size(micro, tmp_path, capsys, read_metrics):
    """A stream position is a data-parallel rank's: a checkpoint as though 2 ranks of one tensor-parallel group
    wrote it (one stream) resumes in one process, with a warning naming the split; one of 4 ranks in 2 groups (two
    streams) is refused, naming both data-parallel sizes."""
    out = tmp_path / "run"
    args = dict(data__streaming=True, data__val_documents=10)
    assert main(micro(out, **args, train__steps=2)) == 0
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    for world in (4, 2):
        trainer = dict(state["trainer"], world_size=world, tensor_parallel=2, ranks=state["trainer"]["ranks"] * world)
        save_checkpoint(tmp_path / f"moved{world}" / "checkpoints", state["step"], model=state["model"],
                        optimizer=state["optimizer"], trainer=trainer, keep_last=2)
    capsys.readouterr()
    assert main(micro(tmp_path / "moved4", **args, train__steps=4)) == EXIT_CONFIG
    assert ("written by 2 data-parallel ranks (4 ranks / train.tensor_parallel 2) on streamed data "
            "(data.streaming=true) and this run has 1 (1 / 1)") in capsys.readouterr().err
    assert main(micro(tmp_path / "moved2", **args, train__steps=4)) == 0
    assert ("written by 2 ranks (train.tensor_parallel 2), resuming with 1 (train.tensor_parallel 1)"
            in capsys.readouterr().err)
    assert [r["step"] for r in read_metrics(tmp_path / "moved2")] == [3, 4]


# ----------------------------------------------------------------------------------------------------------
# Ranks splitting every layer: the losses of one process
# ----------------------------------------------------------------------------------------------------------
def _losses(read_metrics, out, kind="train", key="loss"):
    return [r[key] for r in read_metrics(out, kind)]


# The torchrun runs of this module's tests, in one launch of 2 ranks and one of 4 (a rank's start, ~10 s of CPU
# importing torch and transformers, dwarfs a micro run): each test's runs join its launch when the session runs that
# test (so that one selected alone starts no other test's runs), their outputs under the launch's directory.
# The split of every layer and FSDP2 over it train the same model (the FFN 70 wide: see the FSDP2 test) on the same
# batches, so that one one-process run (``single``) is what both compare with; only the runs whose export a test
# reads export.
COMMON = dict(train__steps=4, train__eval_interval=2, optim__lr=1e-2, optim__schedule="constant",
              checkpoint__interval=2, model__intermediate_size=70, logging__peak_flops=1e12)
TP_COMMON = FSDP_COMMON = COMMON
FSDP_TP = dict(train__tensor_parallel=2, train__parallelism="fsdp", train__vocab_parallel=True,
               train__sequence_parallel=True)
CP_TP_ROWS = dict(SPLIT_ROWS, data__document_boundaries=True)
CP_TP_SPLITS = {"gradient-mean": ("ddp", {}),
                "fsdp-vocab-sequence": ("fsdp", dict(train__vocab_parallel=True, train__sequence_parallel=True))}
DPO_COMMON = dict(train__steps=3, train__eval_interval=0, lora__rank=4, lora__alpha=8)
GRPO_COMMON = dict(train__steps=3, train__eval_interval=3, checkpoint__interval=1, checkpoint__keep_last=3,
                   grpo__num_iterations=2, grpo__epsilon_high=0.28)


@pytest.fixture(scope="module")
def single(request, tmp_path_factory, corpus, tokenizer_dir, cache_dir):
    """The one-process run of ``COMMON`` (exported; its output directory) that the split of every layer and FSDP2
    over it compare with, and whose step-2 checkpoint ``fsdp_full`` resumes (they only read it)."""
    out = tmp_path_factory.mktemp("tp-single") / "single"
    assert main(micro_args(corpus, tokenizer_dir, cache_dir, out, **COMMON, checkpoint__export=True)) == 0
    return out


def _launch(runs: dict, nproc: int, root) -> SimpleNamespace:
    """``runs`` ({name: arguments}, in order) in one torchrun launch: each name's finished run (``run_many``'s)."""
    done = run_train_many(list(runs.values()), nproc, root / f"launch-{nproc}") if runs else []
    return SimpleNamespace(**dict(zip(runs, done)))


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory, corpus, tokenizer_dir, cache_dir) -> SimpleNamespace:
    """The module's 2-rank runs (``root`` their directory): the split of every layer (``tp``, its step-2 checkpoint
    resumed by ``four_ranks``'s ``tp_resumed``), DPO's split run and its resume under FSDP2 (``dpo``,
    ``dpo_resumed``), GRPO's split run (``grpo``)."""
    selected, root = selected_tests(request, parameters=True), tmp_path_factory.mktemp("tp-two")
    runs = {}
    if "test_ranks_splitting_every_layer_log_the_losses_of_one_process_and_resume" in selected:
        runs["tp"] = micro_args(corpus, tokenizer_dir, cache_dir, root / "split", **TP_COMMON,
                                train__tensor_parallel=2, checkpoint__export=True)
    if "test_dpo_on_ranks_splitting_every_layer_logs_the_records_of_one_process" in selected:
        toy = request.getfixturevalue("toy")
        runs["dpo"] = dpo_args(toy, root / "dpo-split", **DPO_COMMON, checkpoint__interval=2,
                               train__tensor_parallel=2, train__vocab_parallel=True, train__sequence_parallel=True)
        # The split run's checkpoint of LoRA adapters resumed under FSDP2 over the split
        runs["dpo_resumed"] = dpo_args(toy, root / "dpo-resumed", **DPO_COMMON, train__tensor_parallel=2,
                                       train__parallelism="fsdp",
                                       train__resume=root / "dpo-split" / "checkpoints" / "step_00000002")
    if "test_grpo_on_ranks_splitting_every_layer_logs_the_records_of_one_process_and_resumes" in selected:
        # grpo_toy puts toy_rewards.py on the runs' PYTHONPATH while it is up: requested before the launch
        runs["grpo"] = grpo_args(request.getfixturevalue("grpo_toy"), root / "grpo-split", **GRPO_COMMON,
                                 train__tensor_parallel=2, train__vocab_parallel=True)
    launch = _launch(runs, 2, root)
    launch.root = root
    return launch


@pytest.fixture(scope="module")
def four_ranks(request, tmp_path_factory, corpus, tokenizer_dir, cache_dir) -> SimpleNamespace:
    """The module's 4-rank runs (``root`` their directory): FSDP2 over the data-parallel groups of the split model
    (``fsdp`` first, whose stderr is checked for a warning torch gives once a process; ``fsdp_full`` resuming
    ``single``, the one-process run made before the launch; ``fsdp_own`` resuming ``fsdp``'s step 2),
    context-parallel pieces split by tensor parallelism (``cp_gradient_mean``, ``cp_fsdp_vocab_sequence``), and
    the resume of ``two_ranks``'s split run on two data-parallel groups (``tp_resumed``)."""
    selected, root = selected_tests(request, parameters=True), tmp_path_factory.mktemp("tp-four")

    def args(out, **overrides):
        return micro_args(corpus, tokenizer_dir, cache_dir, out, **overrides)

    runs = {}
    if "test_fsdp_over_the_data_parallel_groups_logs_the_losses_of_one_process_and_resumes" in selected:
        checkpoint = request.getfixturevalue("single") / "checkpoints" / "step_00000002"  # resumed by fsdp_full
        runs["fsdp"] = args(root / "fsdp-split", **FSDP_COMMON, **FSDP_TP, checkpoint__export=True)
        runs["fsdp_full"] = args(root / "fsdp-full", **FSDP_COMMON, **FSDP_TP, checkpoint__layout="full",
                                 train__resume=checkpoint)
        runs["fsdp_own"] = args(root / "fsdp-own", **FSDP_COMMON, **FSDP_TP,
                                train__resume=root / "fsdp-split" / "checkpoints" / "step_00000002")
    for name, (parallelism, splits) in CP_TP_SPLITS.items():
        if f"test_context_parallel_pieces_split_by_tensor_parallelism_log_the_losses_of_one_process[{name}]" in selected:
            runs["cp_" + name.replace("-", "_")] = args(
                root / f"cp-{name}", **CP_TP_ROWS, train__context_parallel=2, train__tensor_parallel=2,
                train__parallelism=parallelism, **splits)
    if "test_ranks_splitting_every_layer_log_the_losses_of_one_process_and_resume" in selected:
        # with the vocabulary (the full checkpoint's embedding cut into each rank's rows) and the sequence split too
        checkpoint = request.getfixturevalue("two_ranks").root / "split" / "checkpoints" / "step_00000002"
        runs["tp_resumed"] = args(root / "tp-resumed", **TP_COMMON, train__tensor_parallel=2,
                                  train__vocab_parallel=True, train__sequence_parallel=True, train__resume=checkpoint)
    launch = _launch(runs, 4, root)
    launch.root = root
    return launch


@pytest.mark.slow
def test_ranks_splitting_every_layer_log_the_losses_of_one_process_and_resume(micro, tmp_path, single, two_ranks,
                                                                              four_ranks, read_metrics, capsys,
                                                                              tokenizer_dir):
    """One process (micro 2 × accum 2) and 2 torchrun ranks splitting each layer's 2 heads and its FFN (one
    tensor-parallel group: micro 2 × accum 2 again) log the same training and validation losses and gradient norms
    on packed text; the MFU divides by both devices and the tokens count once. The checkpoint holds full tensors and
    records the split; the export loads with ``from_pretrained`` as the one-process run's does. From the step-2
    checkpoint, 4 ranks (two data-parallel groups of 2: micro 2 × accum 1 × 2 groups, the gradients averaged
    over the groups, the embedding and head split by vocabulary rows as well) resume to one process's last losses,
    and so does one process without tensor parallelism."""
    import retnet  # noqa: F401
    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.train.data import load_tokenizer, vocab_bound
    from retnet.train.flops import flops_per_token

    split, common = two_ranks.root / "split", TP_COMMON  # single: micro(single, **common, checkpoint__export=True)
    two = two_ranks.tp  # micro(split, **common, train__tensor_parallel=2, checkpoint__export=True) on 2 ranks
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    assert "world 2 / tensor parallel 2 = 1 data-parallel groups × micro 2 × accum 2" in two.stderr
    expected = _losses(read_metrics, single)
    assert len(expected) == 4 and expected[-1] < expected[0] - 0.1
    assert _losses(read_metrics, split) == pytest.approx(expected, rel=1e-5)  # measured 1.6e-7
    assert _losses(read_metrics, split, key="grad_norm") == pytest.approx(
        _losses(read_metrics, single, key="grad_norm"), rel=3e-4)  # measured 4e-5: summation order
    assert _losses(read_metrics, split, "val", "val_loss") == pytest.approx(
        _losses(read_metrics, single, "val", "val_loss"), rel=1e-5)
    assert [r["tokens"] for r in read_metrics(split)] == [r["tokens"] for r in read_metrics(single)]
    config = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      chunk_size=16, intermediate_size=70,
                                      vocab_size=vocab_bound(load_tokenizer(tokenizer_dir)))
    records = read_metrics(split)
    assert [r["mfu"] for r in records] == pytest.approx(
        [flops_per_token(config, 32) * r["tokens_per_s"] / (1e12 * 2) for r in records], rel=1e-9)

    # checkpoints and the export: the unsharded model's tensors
    saved = load_checkpoint(split / "checkpoints" / "step_00000004")
    alone_saved = load_checkpoint(single / "checkpoints" / "step_00000004")
    assert saved["trainer"]["tensor_parallel"] == 2
    assert {k: v.shape for k, v in saved["model"].items()} == {k: v.shape for k, v in alone_saved["model"].items()}
    assert len(saved["optimizer"]["state"]) == len(alone_saved["optimizer"]["state"])
    exported, reference = (RetNetForCausalLM.from_pretrained(out / "export") for out in (split, single))
    weights = exported.state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(torch.equal(weights[k], v) for k, v in saved["model"].items())  # the checkpoint's, gathered alike
    tokens = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # AdamW's normalized steps magnify the rounding in rarely seen embedding rows: 6.5e-4
        torch.testing.assert_close(exported(tokens).logits, reference(tokens).logits, rtol=0, atol=3e-3)

    checkpoint = split / "checkpoints" / "step_00000002"
    resumed, alone = four_ranks.root / "tp-resumed", tmp_path / "alone"
    # ... with the vocabulary (the full checkpoint's embedding cut into each rank's rows) and the sequence split too:
    # micro(resumed, **common, train__tensor_parallel=2, train__vocab_parallel=True, train__sequence_parallel=True,
    # train__resume=checkpoint) on 4 ranks
    four = four_ranks.tp_resumed
    assert four.returncode == 0, four.stderr[-3000:] + four.stdout[-2000:]
    assert "world 4 / tensor parallel 2 = 2 data-parallel groups × micro 2 × accum 1" in four.stderr
    assert "at step 2" in four.stderr and "written by 2 ranks, resuming with 4" in four.stderr
    assert _losses(read_metrics, resumed) == pytest.approx(expected[-2:], rel=1e-5)
    assert _losses(read_metrics, resumed, "val", "val_loss") == pytest.approx(
        _losses(read_metrics, single, "val", "val_loss")[-1:], rel=1e-5)
    capsys.readouterr()
    assert main(micro(alone, **common, train__resume=checkpoint)) == 0
    assert ("written by 2 ranks (train.tensor_parallel 2), resuming with 1 (train.tensor_parallel 1)"
            in capsys.readouterr().err)
    assert _losses(read_metrics, alone) == pytest.approx(expected[-2:], rel=1e-5)


@pytest.mark.slow
def test_fsdp_over_the_data_parallel_groups_logs_the_losses_of_one_process_and_resumes(single, four_ranks,
                                                                                        read_metrics):
    """4 torchrun ranks, 2 data-parallel groups of 2 splitting every layer, with FSDP2 sharding the split model over
    the groups (``train.parallelism=fsdp``: micro 2 × accum 1 × 2 groups), log one process's training and validation
    losses and gradient norms (micro 2 × accum 2, the same global batch). The FFN is 70 wide: a rank's 35 rows of
    the gate and up projections split unevenly over the 2 dp ranks (FSDP2's ``_StridedShard``). Their checkpoints
    take FSDP's default, the sharded layout, and hold the unsharded model's tensors (one process resumes such a
    checkpoint in test_context_parallel_pieces_split_by_tensor_parallelism...[fsdp-vocab-sequence]); the export loads with ``AutoModelForCausalLM`` and holds the last
    checkpoint's weights. The full layout: 4 ranks under both splits resume the one-process step-2 checkpoint (torch's
    own full-state load refuses those uneven shards) to the same losses and save theirs in it. And 4 such ranks resume
    their own sharded step-2 checkpoint to the run's last losses."""
    from transformers import AutoModelForCausalLM

    import retnet  # noqa: F401  (registers the Auto classes)
    from retnet.train.checkpoint import saved_model_shapes, verify_checkpoint

    # single: the module's one-process run (FSDP_COMMON); four_ranks: in its launch of 4 ranks (FSDP_TP) the split
    # run to fsdp-split (with the export), then the two resumes checked after it: single's step 2 in the full
    # layout to fsdp-full, and fsdp-split's step 2 to fsdp-own
    split, full, own_dir = (four_ranks.root / f"fsdp-{name}" for name in ("split", "full", "own"))
    checkpoint = split / "checkpoints" / "step_00000002"
    four, again, own = four_ranks.fsdp, four_ranks.fsdp_full, four_ranks.fsdp_own
    assert four.returncode == 0, four.stderr[-3000:] + four.stdout[-2000:]
    assert ("world 4 / tensor parallel 2 = 2 data-parallel groups × micro 2 × accum 1 = global 4 blocks of 32 "
            "tokens; tensor parallel (vocabulary and sequence split too), fsdp over the data-parallel groups"
            in four.stderr)
    # the gradient norm: one all-reduce over the flattened (dp, tp) mesh, not one a dimension in a row
    assert "sequential all_reduce" not in four.stderr
    expected = _losses(read_metrics, single)
    assert len(expected) == 4 and expected[-1] < expected[0] - 0.1
    assert _losses(read_metrics, split) == pytest.approx(expected, rel=1e-5)  # measured 7.8e-8
    assert _losses(read_metrics, split, key="grad_norm") == pytest.approx(
        _losses(read_metrics, single, key="grad_norm"), rel=3e-4)  # measured 1.2e-5: summation order
    assert _losses(read_metrics, split, "val", "val_loss") == pytest.approx(
        _losses(read_metrics, single, "val", "val_loss"), rel=1e-5)

    assert verify_checkpoint(checkpoint)["layout"] == "sharded"
    # the unsharded model's tensors: one process resumes such a checkpoint (the context-parallel test below does)
    assert saved_model_shapes(checkpoint) == saved_model_shapes(single / "checkpoints" / "step_00000002")

    exported = AutoModelForCausalLM.from_pretrained(split / "export")
    last = load_checkpoint(split / "checkpoints" / "step_00000004")["model"]  # the shards read whole
    weights = exported.state_dict()
    assert last.keys() <= weights.keys() and all(torch.equal(weights[k], v) for k, v in last.items())
    tokens = torch.randint(0, exported.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(exported(tokens).logits).all()

    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-2000:]
    assert ("written by 1 ranks (train.tensor_parallel 1), resuming with 4 (train.tensor_parallel 2)"
            in again.stderr)
    assert _losses(read_metrics, full) == pytest.approx(expected[-2:], rel=1e-5)
    saved = load_checkpoint(full / "checkpoints" / "step_00000004")
    assert saved["layout"] == "full" and saved["trainer"]["tensor_parallel"] == 2
    assert ({k: list(v.shape) for k, v in saved["model"].items()}
            == saved_model_shapes(single / "checkpoints" / "step_00000004"))

    # A preempted run's own path: the same split resumes its sharded checkpoint
    assert own.returncode == 0, own.stderr[-3000:] + own.stdout[-2000:]
    assert "at step 2" in own.stderr and "resuming with" not in own.stderr  # no other split to warn of
    assert _losses(read_metrics, own_dir) == pytest.approx(_losses(read_metrics, split)[-2:], rel=1e-6)


# The packed rows both parallelisms below split (CP_TP_ROWS): one process's run of them, trained once for the module


@pytest.fixture(scope="module")
def cp_tp_single(corpus, tokenizer_dir, cache_dir, tmp_path_factory):
    """The one-process run of ``CP_TP_ROWS`` (its output directory) that both parallelisms of
    test_context_parallel_pieces_split_by_tensor_parallelism... compare with (they only read it)."""
    single = tmp_path_factory.mktemp("cp-tp") / "single"
    assert main(micro_args(corpus, tokenizer_dir, cache_dir, single, **CP_TP_ROWS)) == 0
    return single


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CP_TP_SPLITS))
def test_context_parallel_pieces_split_by_tensor_parallelism_log_the_losses_of_one_process(
        name, micro, tmp_path, four_ranks, run_here, read_metrics, cp_tp_single):
    """4 torchrun ranks: each packed row (micro 3 × 32 tokens) cut in 2 pieces along time (context parallelism,
    the cut inside the second block's document), each piece's layers split across 2 ranks (tensor parallelism):
    one group of 2 × 2 ranks, micro 3 × accum 2, logs one process's training and validation losses and gradient
    norms, and counts each token once. The pieces' ranks exchange their heads' states over their own groups; the
    gradients of the same slice are summed over the pieces (by the trainer, or by FSDP2 over mesh["dp"], which
    holds both pieces' ranks of a slice). Under FSDP2, with the vocabulary and sequence splits too, the step-2
    checkpoint resumes in one process without any split to the last losses."""
    parallelism = CP_TP_SPLITS[name][0]
    single, split, common = cp_tp_single, four_ranks.root / f"cp-{name}", CP_TP_ROWS
    # micro(split, **common, train__context_parallel=2, train__tensor_parallel=2, train__parallelism=parallelism,
    # **CP_TP_SPLITS[name][1]) on 4 ranks
    four = getattr(four_ranks, "cp_" + name.replace("-", "_"))
    assert four.returncode == 0, four.stderr[-3000:] + four.stdout[-2000:]
    assert ("world 4 / context parallel 2 / tensor parallel 2 = 1 data-parallel groups × micro 3 × accum 2"
            in four.stderr)
    expected = _losses(read_metrics, single)
    assert len(expected) == 4 and expected[-1] < expected[0] - 0.1
    assert _losses(read_metrics, split) == pytest.approx(expected, rel=1e-5)
    assert _losses(read_metrics, split, key="grad_norm") == pytest.approx(
        _losses(read_metrics, single, key="grad_norm"), rel=3e-4)
    assert _losses(read_metrics, split, "val", "val_loss") == pytest.approx(
        _losses(read_metrics, single, "val", "val_loss"), rel=1e-5)
    assert [r["tokens"] for r in read_metrics(split)] == [r["tokens"] for r in read_metrics(single)]
    if parallelism != "fsdp":
        return
    alone = tmp_path / "alone"
    resumed = run_here(micro(alone, **common, train__resume=split / "checkpoints" / "step_00000002"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("written by 4 ranks (train.context_parallel 2, train.tensor_parallel 2), resuming with 1 "
            "(train.context_parallel 1, train.tensor_parallel 1)" in resumed.stderr)
    assert _losses(read_metrics, alone) == pytest.approx(expected[-2:], rel=1e-5)


@pytest.mark.slow
def test_dpo_on_ranks_splitting_every_layer_logs_the_records_of_one_process(
        toy, tmp_path, two_ranks, run_here, read_metrics):  # noqa: F811 - toy: the fixture
    """DPO on the toy preference pairs (test_preference's), 3 steps: 2 torchrun ranks splitting every layer (one
    tensor-parallel group, micro 2 × accum 2; LoRA adapters, the vocabulary and the sequence split too, its log-probs
    taken from the gathered logits) log one process's training and validation losses and metrics: each pair counted
    once, not once a rank of the group. The reference pass runs the split model on the same pairs on both ranks and
    gives one process's reference log-probs. (A reward model under the same splits was checked the same way by hand;
    its classifier's split is tested at model level, tests/model/test_tensor_parallel.py.)"""
    from retnet.train.preference import METRICS as DPO_METRICS
    from retnet.train.preference import REFERENCE_FILE

    common = DPO_COMMON
    single, split, resumed_dir = tmp_path / "dpo-single", two_ranks.root / "dpo-split", two_ranks.root / "dpo-resumed"
    alone = run_here(dpo_args(toy, single, **common, checkpoint__interval=2))
    assert alone.returncode == 0, alone.stderr[-3000:]
    # dpo_args(toy, split, **common, checkpoint__interval=2, train__tensor_parallel=2, train__vocab_parallel=True,
    # train__sequence_parallel=True) on 2 ranks
    two = two_ranks.dpo
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    assert "world 2 / tensor parallel 2 = 1 data-parallel groups × micro 2 × accum 2" in two.stderr
    assert "LoRA rank 4 on q_proj" in two.stderr
    for kind, key in (("train", "loss"), ("val", "val_loss")):  # measured 2.2e-7
        assert _losses(read_metrics, split, kind, key) == pytest.approx(_losses(read_metrics, single, kind, key),
                                                                         rel=1e-5)
    # and every metric (rel or abs 2e-4): measured the rewards 1e-6 rel, the log-probs 7e-8 (a reward model's
    # rewards were 4.3e-5 abs in a CI run: AdamW's normalized steps on near-zero gradients amplify the split's
    # other summation order)
    assert_records_match(single, split, DPO_METRICS, tolerance=2e-4)
    assert [r["tokens"] for r in read_metrics(split)] == [r["tokens"] for r in read_metrics(single)]
    # The split run's checkpoint of LoRA adapters (gathered whole: the adapters and their optimizer state alone)
    # resumes under FSDP2 over the split, each rank cutting its own slices of the adapters, to the last loss:
    # dpo_args(toy, resumed_dir, **common, train__tensor_parallel=2, train__parallelism="fsdp",
    # train__resume=split / "checkpoints" / "step_00000002") on 2 ranks, after the split run in its launch
    resumed = two_ranks.dpo_resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:] + resumed.stdout[-2000:]
    assert "at step 2" in resumed.stderr
    assert _losses(read_metrics, resumed_dir) == pytest.approx(_losses(read_metrics, single)[-1:], rel=1e-5)
    for part in ("train", "val"):  # computed by the split model: one process's (measured 3.8e-6 of ~28)
        torch.testing.assert_close(torch.load(split / REFERENCE_FILE)[part],
                                   torch.load(single / REFERENCE_FILE)[part], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_grpo_on_ranks_splitting_every_layer_logs_the_records_of_one_process_and_resumes(
        grpo_toy, tmp_path, two_ranks, run_here, read_metrics):  # noqa: F811 - grpo_toy: the fixture
    """GRPO on test_grpo's toy prompts, 3 steps of grpo.num_iterations 2 with a KL term (micro 8 × accum 2, 4 prompts
    × 4 completions a generation): 2 torchrun ranks splitting every layer (one tensor-parallel group, the vocabulary
    split too) sample one process's completions (the same uniforms and whole logits; the group's first rank's tokens
    broadcast) and log its losses, rewards, KL, clip ratios and step-0 validation record, each completion counted
    once, not once a rank of the group; the KL reference is split as the policy is. From the split run's step-1
    checkpoint, within the generation of step 0, one process resumes to the one-process run's last records (measured:
    losses 3e-7, KL 1.5e-5, rewards equal). About 10 s on 2 CPU cores."""
    single, split, alone = tmp_path / "single", two_ranks.root / "grpo-split", tmp_path / "alone"
    common = GRPO_COMMON
    done = run_here(grpo_args(grpo_toy, single, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    # grpo_args(grpo_toy, split, **common, train__tensor_parallel=2, train__vocab_parallel=True) on 2 ranks
    two = two_ranks.grpo
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    assert "world 2 / tensor parallel 2 = 1 data-parallel groups × micro 8 × accum 2" in two.stderr
    assert "(4 groups per rank)" in two.stderr and "split across the 2 tensor-parallel ranks" in two.stderr
    one, both = read_metrics(single), read_metrics(split)
    assert len(one) == len(both) == 3 and one[0]["kl"] == both[0]["kl"] == 0
    # the same completions: their rewards and lengths equal
    for key in ("reward", "reward_std", "rewards/a_share/mean", "completions/mean_length", "frac_reward_zero_std",
                "completions/clipped_ratio", "tokens"):
        assert [r.get(key) for r in both] == [r.get(key) for r in one], key
    # Measured: the losses 5.6e-7 rel (step 2, -0.03); at step 3 (6.9e-4: the advantages, summing to 0, cancel;
    # step 1's is 4e-9) 1.6e-8 abs, and 1.8e-5 abs with transformers 5.25: the generation of step 3 is sampled by
    # weights up to 1e-4 apart after two updates (summation order, magnified by AdamW's normalized steps), and a
    # token they flip between two of the same length and reward moves that near-zero loss; the clip ratios equal;
    # the KL 1.5e-5 rel and the gradient norms 1.2e-5 at step 3
    for key in ("loss", *CLIP):
        # (rel 1e-4: on another machine's CPU kernels, 2026-12-07, step 2's loss was 2e-5 rel apart)
        assert [r[key] for r in both][:2] == pytest.approx([r[key] for r in one][:2], rel=1e-4, abs=5e-8), key
        assert both[2][key] == pytest.approx(one[2][key], rel=1e-5, abs=5e-5), key
    for key in ("kl", "grad_norm"):  # (step 3's: 2.7% with that flipped token)
        assert [r[key] for r in both][:2] == pytest.approx([r[key] for r in one][:2], rel=1e-4), key
        assert both[2][key] == pytest.approx(one[2][key], rel=5e-2), key
    # Validation at step 0 (the same weights) bit for bit. At step 3 the weights are up to 1.5e-4 apart (AdamW's
    # normalized steps on gradients near zero), enough to flip a sampled token (2 of the 16 completions there):
    # evaluated, not compared.
    val_one, val_both = read_metrics(single, "val"), read_metrics(split, "val")
    assert [r["step"] for r in val_both] == [0, 3]
    assert strip(val_both[:1]) == strip(val_one[:1])

    done = run_here(grpo_args(grpo_toy, alone, **common, train__resume=split / "checkpoints" / "step_00000001"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written by 2 ranks (train.tensor_parallel 2), resuming with 1" in done.stderr
    resumed = read_metrics(alone)
    assert [r["step"] for r in resumed] == [2, 3]
    assert [r.get("reward") for r in resumed] == [r.get("reward") for r in one[1:]]  # step 3's completions
    for key, tolerance in (("loss", 1e-4), ("kl", 1e-4), *((name, 1e-5) for name in CLIP)):  # as above
        assert resumed[0][key] == pytest.approx(one[1][key], rel=tolerance, abs=5e-8), key
        assert resumed[1][key] == pytest.approx(one[2][key], rel=5e-2, abs=5e-5), key  # step 3: as above


def test_a_full_tensor_that_does_not_cut_into_a_ranks_piece_is_refused(tmp_path):
    """copy_full_state (a full checkpoint into FSDP2 over tensor parallelism) cuts each rank's box itself: a full
    tensor whose box is not the rank's piece is refused by shape, not copied in by broadcasting."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from retnet.train.distributed import copy_full_state

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        local = {"w": distribute_tensor(torch.zeros(4, 3), init_device_mesh("cpu", (1,)), [Shard(0)])}
        loaded = copy_full_state({"w": torch.arange(12.0).view(4, 3), "step": 7}, local)
        assert torch.equal(loaded["w"].to_local(), torch.arange(12.0).view(4, 3)) and loaded["step"] == 7
        with pytest.raises(ValueError, match=r"shape \[1, 3\] cuts into \[1, 3\] for this rank, whose piece is \[4, 3\]"):
            copy_full_state({"w": torch.ones(1, 3)}, local)
    finally:
        dist.destroy_process_group()
