"""Context parallelism in the trainer (``train.context_parallel``): what the config refuses; torchrun gloo ranks
splitting every row in two log the losses of one process (packed rows whose documents cross the cut, plain rows
over two data-parallel groups (a run of test_context_parallel_grpo_paths.py's 4-rank launch), chat data, streamed
text and chat read by each group's first rank alone, an xPos ``model.init_from``) and resume them; a checkpoint's
stream positions are keyed by the data-parallel ranks; the logged MFU counts the pieces."""

from __future__ import annotations

import json

import pytest

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from retnet.train.config import ConfigError, load_config

from .conftest import metrics, micro_args, one_thread, run_train_many


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["--train.context_parallel=0"], r"train\.context_parallel must be >= 1.*got 0"),
    # packed too: evaluation's last micro-batch may hold fewer blocks, so a block must split (2 × 33 would not do)
    (["--train.context_parallel=2", "--data.seq_len=33", "--train.micro_batch_size=2",
      "--train.global_batch_size=2"], r"train\.context_parallel must divide data\.seq_len = 33 .*got 2"),
    (["--train.context_parallel=2", "--data.seq_len=33", "--data.document_boundaries=false"],
     r"train\.context_parallel must divide data\.seq_len = 33.*got 2"),
], ids=["zero", "packed-row", "plain-row"])
def test_settings_context_parallelism_cannot_train_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_rows_that_split_evenly_are_taken():
    """A packed row of blocks of 34 splits in 2; a plain row of 32 in 4; xPos too (each piece in frames of its
    own: tests/model/test_context_parallel.py)."""
    load_config("tiny", ["--train.context_parallel=2", "--data.seq_len=34", "--train.micro_batch_size=2"])
    load_config("tiny", ["--train.context_parallel=2", "--model.extra.use_xpos=true"])
    load_config("tiny", ["--train.context_parallel=4", "--data.seq_len=32", "--data.document_boundaries=false"])


def test_a_world_it_does_not_divide_is_refused(micro, tmp_path, capsys):
    """At start-up, before any data is read: naming both numbers. The global batch splits over the data-parallel
    groups (world size / context_parallel), not over the ranks."""
    config = load_config("tiny", ["--train.context_parallel=2", "--train.global_batch_size=8",
                                  "--train.micro_batch_size=2"])
    assert config.train.grad_accum_steps(2) == 4 and config.train.grad_accum_steps(4) == 2
    with pytest.raises(ConfigError, match=r"train\.context_parallel \(2\) must divide the world size \(3\)"):
        config.train.grad_accum_steps(3)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(8\).* 2 × 16 / 2 = 16"):
        config.train.grad_accum_steps(16)
    assert main(micro(tmp_path / "run", train__context_parallel=2)) == EXIT_CONFIG
    assert "train.context_parallel (2) must divide the world size (1)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "tokenizer").exists()


# ----------------------------------------------------------------------------------------------------------
# Resuming on another world: keyed by the data-parallel ranks
# ----------------------------------------------------------------------------------------------------------
STREAMED = dict(data__streaming=True, data__val_documents=10)


@pytest.fixture(scope="module")
def streamed_checkpoint(corpus, tokenizer_dir, cache_dir, tmp_path_factory):
    """The last checkpoint (loaded) of a 2-step one-process run on streamed data: both worlds below move it (they
    copy what they change)."""
    out = tmp_path_factory.mktemp("streamed") / "run"
    assert main(micro_args(corpus, tokenizer_dir, cache_dir, out, **STREAMED, train__steps=2)) == 0
    return load_checkpoint(list_checkpoints(out / "checkpoints")[-1])


@pytest.mark.parametrize("world", [2, 4], ids=["one-group", "two-groups"])
def test_a_streamed_checkpoint_resumes_on_the_same_data_parallel_size(world, micro, tmp_path, capsys,
                                                                      read_metrics, streamed_checkpoint):
    """A stream position is a data-parallel rank's: a checkpoint as though 2 ranks of one context-parallel group
    wrote it (one stream) resumes in one process, with a warning; one of 4 ranks in 2 groups (two streams) is
    refused, naming both data-parallel sizes."""
    moved, args, state = tmp_path / "moved", STREAMED, streamed_checkpoint
    trainer = dict(state["trainer"], world_size=world, context_parallel=2, ranks=state["trainer"]["ranks"] * world)
    save_checkpoint(moved / "checkpoints", state["step"], model=state["model"], optimizer=state["optimizer"],
                    trainer=trainer, keep_last=2)
    capsys.readouterr()
    if world == 4:
        assert main(micro(moved, **args, train__steps=4)) == EXIT_CONFIG
        assert ("written by 2 data-parallel ranks (4 ranks / train.context_parallel 2) on streamed data "
                "(data.streaming=true) and this run has 1 (1 / 1)") in capsys.readouterr().err
        return
    assert main(micro(moved, **args, train__steps=4)) == 0
    assert ("written by 2 ranks (train.context_parallel 2), resuming with 1 (train.context_parallel 1)"
            in capsys.readouterr().err)
    assert [r["step"] for r in read_metrics(moved)] == [3, 4]


# ----------------------------------------------------------------------------------------------------------
# Ranks splitting a row: the losses of one process
# ----------------------------------------------------------------------------------------------------------
# The runs whose rows the launch splits (here, and across tensor-parallel pieces in test_tensor_parallel): 4 steps of
# micro 3 × 32-token blocks, a learning rate at which the model reads its context, checkpoints at step 2.
SPLIT_ROWS = dict(train__steps=4, train__eval_interval=2, train__micro_batch_size=3, train__global_batch_size=6,
                  optim__lr=1e-2, optim__schedule="constant", checkpoint__interval=2)


def _losses(read_metrics, out, kind="train", key="loss"):
    return [r[key] for r in read_metrics(out, kind)]


def _conversation(i: int) -> list[dict[str, str]]:
    a, b = i % 7, (i * 3) % 5
    return [{"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]


# The chat runs: a packed row of 3 × 48 tokens, cut at 72: inside the second block
CHAT = dict(data__format="chat", data__seq_len=48, optim__lr=1e-2, train__steps=3, train__eval_interval=3,
            train__micro_batch_size=3, train__global_batch_size=6)
STREAMED_CHAT = dict(data__format="chat", data__streaming=True, data__val_documents=10, data__seq_len=48,
                     optim__lr=1e-2, train__steps=3, train__eval_interval=3, train__micro_batch_size=3,
                     train__global_batch_size=6)
# Streamed plain rows of 32 at chunk size 32 (test_streamed_data_is_read_once_per_group_and_resumes)
STREAMED_ROWS = dict(data__streaming=True, data__val_documents=10, data__document_boundaries=False,
                     model__chunk_size=32, train__steps=4, train__eval_interval=2, checkpoint__interval=2,
                     optim__lr=1e-2, optim__schedule="constant", logging__peak_flops=1e12)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """160 conversations as JSONL, and a tokenizer trained on them: the chat runs' data."""
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.chat import render_default

    root = tmp_path_factory.mktemp("chats")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": _conversation(i)}) + "\n" for i in range(160)))
    train_byte_level_bpe([render_default(_conversation(i)) for i in range(160)],
                         vocab_size=320).save_pretrained(root / "tokenizer")
    return data, root / "tokenizer"


# An xPos model.init_from (xpos_scale_base 4): packed rows of 3 × 32 tokens cut at 48, inside a document
XPOS = dict(train__steps=3, train__eval_interval=3, train__micro_batch_size=3, train__global_batch_size=6,
            optim__lr=1e-2, optim__schedule="constant")


@pytest.fixture(scope="module")
def xpos_base(tmp_path_factory):
    """The xPos run's data and ``model.init_from``: 60 stdlib sources as JSONL, and base/, a micro RetNet saved with
    xPos (xpos_scale_base 4) beside a BPE trained on them."""
    import torch

    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.data import stdlib_files, vocab_bound

    root = tmp_path_factory.mktemp("xpos")
    texts = [file.read_text(errors="replace")[:3000] for file in stdlib_files()[:60]]
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    base = root / "base"
    tokenizer = train_byte_level_bpe(texts, vocab_size=512)
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    config = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      chunk_size=16, vocab_size=vocab_bound(tokenizer), use_xpos=True,
                                      xpos_scale_base=4.0, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    RetNetForCausalLM(config).save_pretrained(base)
    return corpus, base


@pytest.fixture(scope="module")
def two_ranks(corpus, tokenizer_dir, cache_dir, chats, xpos_base, tmp_path_factory):
    """The module's 2-rank runs in one torchrun launch (each rank's process imports torch once, not six times),
    after their one-process runs (in this process, first, as each test ran them: the launch reads the caches they
    wrote): ``name`` -> (the one-process run's output dir, the split run's, the split run finished). The packed rows
    (SPLIT_ROWS), chat data (CHAT), streamed text (STREAMED_ROWS; then ``streamed-resumed``, the split run resumed
    from its step-2 checkpoint on 2 ranks), streamed chat (STREAMED_CHAT) and the xPos ``model.init_from`` (XPOS;
    its one-process run on one thread, as each rank computes)."""
    root = tmp_path_factory.mktemp("two-ranks")
    chat_data, chat_tokenizer = chats
    xpos_corpus, xpos_init = xpos_base

    def text(common):
        return lambda out, **overrides: micro_args(corpus, tokenizer_dir, cache_dir, out, **common, **overrides)

    def chat(common, cache):
        return lambda out, **overrides: micro_args(chat_data, chat_tokenizer, root / cache, out, **common,
                                                   **overrides)

    def xpos(out, **overrides):
        values = micro_args(xpos_corpus, xpos_init, root / "xpos-cache", out, **XPOS, **overrides)
        # the architecture is init_from's: micro_args' shape settings are refused beside it
        shapes = ("--model.hidden_size", "--model.num_hidden_layers", "--model.num_attention_heads")
        # xPos comes from init_from's config.json alone (the trainer refused it there under context parallelism)
        return [*(a for a in values if not a.startswith(shapes)), f"--model.init_from={xpos_init}"]

    args = {"packed": text(dict(SPLIT_ROWS, data__document_boundaries=True)), "chat": chat(CHAT, "chat-cache"),
            "streamed": text(STREAMED_ROWS), "streamed-chat": chat(STREAMED_CHAT, "streamed-chat-cache"),
            "xpos": xpos}
    for name, of in args.items():
        if name == "xpos":
            with one_thread():
                assert main(of(root / name / "single")) == 0, name
        else:
            assert main(of(root / name / "single")) == 0, name
    runs = {name: of(root / name / "split", train__context_parallel=2) for name, of in args.items()}
    runs["streamed-resumed"] = args["streamed"](root / "streamed-resumed" / "split", train__context_parallel=2,
                                                train__resume=root / "streamed" / "split" / "checkpoints"
                                                / "step_00000002")
    finished = run_train_many(list(runs.values()), nproc=2, out=root / "launch")
    return {name: (root / name / "single", root / name / "split", done)
            for name, done in zip(runs, finished, strict=True)}


def assert_split_rows_log_one_process(read_metrics, single, split, many, nproc: int) -> None:
    """The split run (``many``, on ``nproc`` ranks splitting each row in two, output in ``split``) logs the training
    and validation losses, gradient norms and token counts of the one-process run in ``single`` (micro 3 × accum 2),
    on ``nproc // 2`` data-parallel groups (micro 3 × accum ``2 // groups``)."""
    assert many.returncode == 0, many.stderr[-3000:] + many.stdout[-2000:]
    groups = nproc // 2
    assert (f"world {nproc} / context parallel 2 = {groups} data-parallel groups × micro 3 × accum {2 // groups}"
            in many.stderr)
    expected = _losses(read_metrics, single)
    assert len(expected) == 4 and expected[-1] < expected[0] - 0.1
    assert _losses(read_metrics, split) == pytest.approx(expected, rel=1e-5)
    assert _losses(read_metrics, split, key="grad_norm") == pytest.approx(
        _losses(read_metrics, single, key="grad_norm"), rel=3e-4)  # measured 3e-5: summation order
    assert _losses(read_metrics, split, "val", "val_loss") == pytest.approx(
        _losses(read_metrics, single, "val", "val_loss"), rel=1e-5)
    # every token once: the global batch's, not C times
    assert [r["tokens"] for r in read_metrics(split)] == [r["tokens"] for r in read_metrics(single)]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2], ids=["packed"])
def test_ranks_splitting_each_row_log_the_losses_of_one_process(nproc, two_ranks, micro, tmp_path, run_here,
                                                                read_metrics):
    """One process (micro 3 × accum 2) and torchrun ranks that split each micro-batch in two log the same training
    and validation losses and gradient norms: 2 ranks (one group: micro 3 × accum 2 again), and 4 (two
    data-parallel groups of 2: micro 3 × accum 1 × 2 groups; plain rows, ``[plain-4-ranks]``: a run of
    test_context_parallel_grpo_paths.py's 4-rank launch, whose test of this name checks it as here).

    Packed (data.document_boundaries, 2 ranks: the module's launch, two_ranks): a micro-batch is one row of
    3 × 32 tokens, cut at 48, inside the second block, whose document then goes on in the second piece from the
    state the first leaves it; the first piece holds two sequences (every block starts one). Plain rows of 32 are
    cut at 16, inside their document. A learning rate at which the model reads its context: dropping the state that
    crosses the cut moves the losses by 5e-3 (the tolerance is 1e-5). Packed, one process (another world, no context
    parallelism) resumes the split run's step-2 checkpoint to the same last losses."""
    single, split, many = two_ranks["packed"]
    assert_split_rows_log_one_process(read_metrics, single, split, many, nproc)
    # (2 ranks resuming their own checkpoint: test_streamed_data_is_read_once_per_group_and_resumes)
    checkpoint, alone = split / "checkpoints" / "step_00000002", tmp_path / "alone"
    once = run_here(micro(alone, **SPLIT_ROWS, data__document_boundaries=True, train__resume=checkpoint))
    assert once.returncode == 0, once.stderr[-3000:]
    assert "written by 2 ranks (train.context_parallel 2), resuming with 1 (train.context_parallel 1)" in once.stderr
    assert _losses(read_metrics, alone)[-2:] == pytest.approx(_losses(read_metrics, single)[-2:], rel=1e-5)


@pytest.mark.slow
def test_chat_data_split_across_two_ranks_logs_the_losses_of_one_process(two_ranks, read_metrics):
    """Chat data (CHAT: a packed row of 3 × 48 tokens, cut at 72, inside the second block): each piece's summed loss
    over the global batch's target count; the pieces of a row hold its targets once, so the world-size scaling of
    the gradients holds, and validation counts each block once."""
    single, split, two = two_ranks["chat"]
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    expected = _losses(read_metrics, single)
    assert len(expected) == 3 and expected[0] != expected[-1]
    assert _losses(read_metrics, split) == pytest.approx(expected, rel=1e-5)
    assert _losses(read_metrics, split, "val", "val_loss") == pytest.approx(
        _losses(read_metrics, single, "val", "val_loss"), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Streamed data: read by a group's first rank; MFU of the pieces
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_streamed_data_is_read_once_per_group_and_resumes(two_ranks, read_metrics, tokenizer_dir):
    """Streamed data under context parallelism: the group's first rank reads and tokenizes its blocks and
    broadcasts them, so the other rank never reads its stream (its checkpointed data position stays 0, where
    each rank reading the stream had the first's), and the 2 ranks log one process's losses and resume from their
    step-2 checkpoint to the same ones (the rank that read nothing starts from the first's position).

    MFU: plain rows of 32 at chunk size 32, so each rank's retention runs over pieces of 16 tokens in chunks of 16;
    the logged MFU counts flops_per_token at 16 (the row's 32 overstated it), the global batch's tokens per second
    and all W devices."""
    import retnet  # noqa: F401
    from retnet.model import RetNetConfig
    from retnet.train.data import load_tokenizer, vocab_bound
    from retnet.train.flops import flops_per_token

    # (the runs' settings: STREAMED_ROWS; the resume: two_ranks' streamed-resumed, from split's step-2 checkpoint)
    single, split, many = two_ranks["streamed"]
    _, resumed, again = two_ranks["streamed-resumed"]
    assert many.returncode == 0, many.stderr[-3000:] + many.stdout[-2000:]
    expected = _losses(read_metrics, single)
    assert len(expected) == 4 and expected[-1] < expected[0]
    assert _losses(read_metrics, split) == pytest.approx(expected, rel=1e-5)
    assert _losses(read_metrics, split, "val", "val_loss") == pytest.approx(
        _losses(read_metrics, single, "val", "val_loss"), rel=1e-5)
    ranks = load_checkpoint(list_checkpoints(split / "checkpoints")[-1])["trainer"]["ranks"]
    assert [r["data"]["position"] for r in ranks] == [4 * 4, 0]  # 4 steps of 4 blocks, all read by rank 0

    config = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      chunk_size=32, vocab_size=vocab_bound(load_tokenizer(tokenizer_dir)))
    assert flops_per_token(config, 16) < flops_per_token(config, 32)
    for out, span, world in ((single, 32, 1), (split, 16, 2)):
        records = read_metrics(out)
        assert [r["mfu"] for r in records] == pytest.approx(
            [flops_per_token(config, span) * r["tokens_per_s"] / (1e12 * world) for r in records], rel=1e-9)

    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 2" in again.stderr
    assert _losses(read_metrics, resumed) == pytest.approx(_losses(read_metrics, split)[-2:], rel=1e-6)


@pytest.mark.slow
def test_streamed_chat_data_read_once_per_group_logs_the_losses_of_one_process(two_ranks, read_metrics):
    """Streamed chat data (STREAMED_CHAT): the group's second rank gets the blocks and their flags from the first,
    and the step's target count is counted once per group, by the first rank (counted once and divided by C, as when
    every rank of a group counted, the losses would double)."""
    single, split, two = two_ranks["streamed-chat"]
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    expected = _losses(read_metrics, single)
    assert len(expected) == 3 and expected[0] != expected[-1]
    assert _losses(read_metrics, split) == pytest.approx(expected, rel=1e-5)
    assert _losses(read_metrics, split, "val", "val_loss") == pytest.approx(
        _losses(read_metrics, single, "val", "val_loss"), rel=1e-5)


@pytest.mark.slow
def test_an_xpos_model_split_across_two_ranks_logs_the_losses_of_one_process(two_ranks):
    """``--train.context_parallel=2`` on a ``model.init_from`` saved with xPos (XPOS, xpos_base: xpos_scale_base 4):
    packed rows of 3 × 32 tokens cut at 48, inside a document, log one process's training and validation losses
    (each piece in xPos frames of its own: tests/model/test_context_parallel.py)."""
    single, split, two = two_ranks["xpos"]
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    expected = [r["loss"] for r in metrics(single)]
    assert len(expected) == 3 and expected[0] != expected[-1]
    assert [r["loss"] for r in metrics(split)] == pytest.approx(expected, rel=1e-5)
    assert [r["val_loss"] for r in metrics(split, "val")] == pytest.approx(
        [r["val_loss"] for r in metrics(single, "val")], rel=1e-5)
