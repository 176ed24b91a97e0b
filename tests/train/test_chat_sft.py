"""Supervised fine-tuning on conversations (``data.format = "chat"``): the rendering and the loss mask, the
packed inputs, a run that learns, exact resume, two gloo ranks against one process, refusals, and a
fine-tune of a pretrained export (``model.init_from``) on chat data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.chat import BOUNDARY, TARGET, ChatEncoder, check_conversations, without_spilled_targets
from retnet.train.config import ConfigError, build_config, data_changes
from retnet.train.data import packed_segments

from .conftest import micro_args

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def conversation(i: int) -> list[dict[str, str]]:
    """Sums and products of small numbers: a system message on every third, a second turn on every fourth."""
    a, b = i % 7, (i * 3) % 5
    messages = [{"role": "system", "content": "You are a calculator."}] if i % 3 == 0 else []
    messages += [{"role": "user", "content": f"What is {a} plus {b}?"},
                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    if i % 4 == 0:
        messages += [{"role": "user", "content": "And times?"},
                     {"role": "assistant", "content": f"{a} times {b} is {a * b}."}]
    return messages


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl",
                       [{"messages": conversation(i)} for i in range(240)])


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A BPE trained on the rendered conversations, with the default chat template."""
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.chat import render_default

    path = tmp_path_factory.mktemp("chat-tokenizer")
    train_byte_level_bpe([render_default(conversation(i)) for i in range(240)], vocab_size=320).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chatml_tokenizer(chat_tokenizer, tmp_path_factory):
    """The same BPE with ChatML's special tokens, <|im_end|> its EOS (as Qwen's instruct tokenizers)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    path = tmp_path_factory.mktemp("chatml-tokenizer")
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def chat_args(chats, chat_tokenizer, tmp_path):
    def args(output_dir, **overrides):
        values = dict(data__format="chat", data__seq_len=64, optim__lr=1e-2)
        values.update(overrides)
        return micro_args(chats, chat_tokenizer, tmp_path / "cache", output_dir, **values)

    return args


def target_runs(tokenizer, ids, flags) -> list[str]:
    """The decoded runs of consecutive target tokens (a run also ends at a conversation's closing EOS)."""
    runs, current = [], []
    for token, flag in zip(ids.tolist(), flags.tolist()):
        if flag & TARGET:
            current.append(token)
        if current and (not flag & TARGET or flag & BOUNDARY):
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def expected_runs(conversations, end: str, eos: str) -> list[str]:
    runs = []
    for messages in conversations:
        answers = [m["content"] + end for m in messages if m["role"] == "assistant"]
        runs += [*answers[:-1], answers[-1] + eos]
    return runs


# ----------------------------------------------------------------------------------------------------------
# The mask
# ----------------------------------------------------------------------------------------------------------
def test_targets_are_the_assistant_messages_with_the_templates_end_markers(chat_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer)
    conversations = [conversation(i) for i in range(12)]
    ids, flags = ChatEncoder(tokenizer).encode(conversations)
    # each answer ends on the template's EOS (the last one's is the closing EOS: not a second)
    assert target_runs(tokenizer, ids, flags) == expected_runs(conversations, "<|endoftext|>", "")
    assert int(np.count_nonzero(flags & BOUNDARY)) == len(conversations)
    assert ids[flags & BOUNDARY != 0].tolist() == [tokenizer.eos_token_id] * len(conversations)
    # every token of the rendered conversation with data.assistant_only_loss=false, EOS included
    _, every = ChatEncoder(tokenizer, assistant_only_loss=False).encode(conversations)
    assert np.all(every & TARGET)


def test_special_tokens_of_the_template_encode_as_the_server_encodes_them(chatml_tokenizer):
    """ChatML: the template's <|im_start|>/<|im_end|> are single special ids, the ids are the server's
    (``tokenizer.encode(text, add_special_tokens=False)``), and each turn's <|im_end|>, the EOS here, is a
    target of the assistant's turns but no segment start: only the closing EOS is."""
    tokenizer = chatml_tokenizer
    conversations = [conversation(i) for i in range(8)]
    encoder = ChatEncoder(tokenizer)
    ids, flags = encoder.encode(conversations)
    served = []
    for messages in conversations:
        served += [*tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False),
                                     add_special_tokens=False), tokenizer.eos_token_id]
    assert ids.tolist() == served
    assert target_runs(tokenizer, ids, flags) == expected_runs(conversations, "<|im_end|>\n", "<|im_end|>")
    eos = tokenizer.eos_token_id
    assert np.count_nonzero(ids == eos) > np.count_nonzero(flags & BOUNDARY) == len(conversations)


def test_user_tokens_have_label_minus_100_and_segments_start_at_closing_eos(chatml_tokenizer):
    tokenizer = chatml_tokenizer
    conversations = [conversation(i) for i in range(4)]
    ids, flags = ChatEncoder(tokenizer).encode(conversations)
    length = 48
    rows = len(ids) // length
    blocks = torch.from_numpy(ids[: rows * length].astype(np.int64)).reshape(rows, length)
    marks = torch.from_numpy(flags[: rows * length]).reshape(rows, length)
    inputs = packed_segments(blocks.clone(), tokenizer.eos_token_id, marks)
    labels, flat_ids = inputs["labels"].flatten(), blocks.flatten()
    user = tokenizer.encode("What", add_special_tokens=False)[0]
    at_user = (flat_ids == user).nonzero().flatten()
    assert len(at_user) and torch.all(labels[at_user] == -100)
    counted = labels != -100
    assert torch.equal(flat_ids[counted], flat_ids[(marks.flatten() & TARGET != 0) & counted])
    assert torch.all(labels[::length] == -100)  # each block's first token
    starts = set(inputs["cu_seqlens"][:-1].tolist())
    expected = {i for i in range(rows * length) if i % length == 0 or marks.flatten()[i] & BOUNDARY}
    assert starts == expected


def test_a_conversations_part_past_its_first_block_is_no_target():
    """A block that continues a conversation from the block before starts from a fresh state: its tokens up to
    that conversation's closing EOS would be learnt without the question, so they are no targets."""
    t, tb = TARGET, TARGET | BOUNDARY
    blocks = np.array([
        [t, t, t, t],  # a conversation starts with the stream
        [t, tb, 0, t],  # ... spills here up to its closing EOS; the next starts after it
        [t, t, tb, t],  # that one spills here too
        [0, t, t, tb],  # and the one starting at the end of the block before spills here whole
        [t, t, 0, 0],  # the block before ended with a closing EOS: this one starts a conversation
        [t, t, t, t],  # ... which continues here
    ], dtype=np.uint8)
    out = without_spilled_targets(blocks)
    assert ((out & TARGET) != 0).astype(int).tolist() == [
        [1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert np.array_equal(out & BOUNDARY, blocks & BOUNDARY)
    assert blocks[1, 0] == t  # the input is not changed


def test_validation_samples_the_blocks_that_hold_targets():
    """A validation sample of blocks without a single target would be a loss of 0/0."""
    from retnet.train.data import PackedData

    tokens = np.arange(6 * 4, dtype=np.uint16).reshape(6, 4)
    flags = np.zeros((6, 4), dtype=np.uint8)
    flags[1, 2] = flags[4, 1:] = TARGET
    data = PackedData(tokens, tokens, None, seed=0, micro_batch=8, global_batch=8, rank=0, world_size=1,
                      train_flags=flags, val_flags=flags)
    (batch,) = data.val_batches(8)
    assert batch.tokens[:, 0].tolist() == [4, 16]  # the blocks 1 and 4
    assert data.val_batches(1)[0].tokens.shape[0] == 1


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer)
    # an earlier answer is shortened (as templates that drop past reasoning do): not where the prefix has it
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' and "
                               "not loop.last %}...{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.raises(ConfigError, match=r"chat template cannot be masked on row 0 of 'set.jsonl'"):
        ChatEncoder(tokenizer, dataset="set.jsonl").encode([conversation(0)])
    ChatEncoder(tokenizer, assistant_only_loss=False).encode([conversation(0)])  # unmasked, it renders


# Phi-3's template: each turn ends with <|end|>, the EOS is written once, after the last message
PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")


def test_a_template_that_writes_the_eos_only_at_the_conversations_end_is_masked(chat_tokenizer):
    """A prefix ending with an answer renders that EOS after it, where the whole conversation goes on with the
    next turn. It was refused as a template that rewrites earlier turns; an answer ends before that EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer)
    tokenizer.add_tokens(["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], special_tokens=True)
    tokenizer.chat_template = PHI3
    conversations = [conversation(i) for i in range(5)]  # 0 and 4 have two turns
    ids, flags = ChatEncoder(tokenizer).encode(conversations)
    served = []
    for messages in conversations:  # the template's own EOS closes each: no second one
        served += tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    assert ids.tolist() == served
    assert target_runs(tokenizer, ids, flags) == expected_runs(conversations, "<|end|>\n", "<|endoftext|>")
    assert ids[flags & BOUNDARY != 0].tolist() == [tokenizer.eos_token_id] * len(conversations)


def test_a_template_that_closes_with_other_text_is_refused_naming_where_the_renderings_part(chat_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer)
    tokenizer.chat_template = PHI3.replace("{{ eos_token }}", "[done]")
    with pytest.raises(ConfigError, match=r"first 3 messages \(up to assistant message 2\) is not a prefix of the "
                                          r"whole conversation's: at character \d+ it has '\[done\]' where the whole "
                                          r"conversation has '<\|user\|>\\nAnd times\?"):
        ChatEncoder(tokenizer, dataset="set.jsonl").encode([conversation(0)])


def test_a_refused_template_names_the_conversations_row_in_the_dataset(chat_tokenizer, tmp_path):
    """build_data encodes the shuffled train/val splits, without the empty rows: the error names the row of the
    dataset (7 here), not the conversation's index in its split."""
    from transformers import AutoTokenizer

    from retnet.train.config import DataConfig
    from retnet.train.data import build_data

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' and "
                               "not loop.last %}...{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    # single-turn conversations render alike in every prefix; row 7's second turn cannot be masked
    rows = [{"messages": conversation(i)} for i in (1, 2, 3, 5, 6, 7, 9)]
    rows[2:2] = [{"messages": []}]
    rows[7:7] = [{"messages": conversation(0)}]
    rows += [{"messages": conversation(i)} for i in (10, 11, 13)]
    dataset = write_jsonl(tmp_path / "set.jsonl", rows)
    config = DataConfig(dataset=str(dataset), format="chat", tokenizer=str(tmp_path / "tokenizer"), seq_len=16,
                        val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"cannot be masked on row 7 of "):
        build_data(config, vocab_size=320, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0,
                   world_size=1, tokenizer_dir=None, barrier=lambda: None)


def test_the_token_cache_is_keyed_by_the_chat_settings(chats, chat_tokenizer, tmp_path):
    """The same conversations with and without assistant_only_loss: the same tokens, other targets, two caches;
    a text config's data fingerprint does not see the chat settings (its caches keep their keys)."""
    from retnet.train.config import DataConfig
    from retnet.train.data import build_data, data_fingerprint

    built = {}
    for only in (True, False):
        config = DataConfig(dataset=str(chats), format="chat", assistant_only_loss=only, tokenizer=str(chat_tokenizer),
                            seq_len=64, val_fraction=0.1, cache_dir=str(tmp_path))
        built[only] = build_data(config, vocab_size=320, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0,
                                 world_size=1, tokenizer_dir=None, barrier=lambda: None)
    assert np.array_equal(built[True].train, built[False].train)
    # without assistant_only_loss every token is a target, but for the parts spilled past a conversation's block
    everything = np.asarray(built[False].train_flags) | TARGET
    assert np.array_equal(built[False].train_flags, without_spilled_targets(everything))
    assert np.count_nonzero(built[True].train_flags & TARGET) < np.count_nonzero(built[False].train_flags & TARGET)
    assert len(list(tmp_path.glob("tokens-*"))) == 2
    text = DataConfig(dataset=str(chats))
    assert data_fingerprint(text, [chats]) == data_fingerprint(
        DataConfig(dataset=str(chats), messages_field="m", assistant_only_loss=False), [chats])
    assert data_fingerprint(text, [chats]) != data_fingerprint(DataConfig(dataset=str(chats), format="chat"), [chats])


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
def test_a_chat_run_trains_its_own_bpe_on_the_rendered_conversations_and_learns(chat_args, tmp_path,
                                                                                  read_metrics):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    args = [a for a in chat_args(out, train__steps=12, train__eval_interval=12, model__vocab_size=320)
            if not a.startswith("--data.tokenizer=")]
    assert main(args) == 0
    losses = [r["loss"] for r in read_metrics(out)]
    val = [r["val_loss"] for r in read_metrics(out, "val")]
    assert losses[-1] < losses[0] - 1.5 and val[-1] < val[0] - 1.5, (losses, val)  # from ~5.8 (uniform)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    # its merges were learnt from the template's tags: <|, assistant, |>, \n (the byte-level pre-tokens), not 14 bytes
    assert len(tokenizer.encode("<|assistant|>\n", add_special_tokens=False)) == 4


def test_the_step_loss_is_the_mean_over_the_global_batchs_targets(chat_args, tmp_path, read_metrics):
    """Micro-batches of 2 blocks, accumulated twice, give the losses of one micro-batch of 4: each is divided
    by the global batch's target count, not its own (blocks hold different counts)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(chat_args(one, train__steps=4, train__micro_batch_size=4)) == 0
    assert main(chat_args(two, train__steps=4, train__micro_batch_size=2)) == 0
    for key in ("loss", "grad_norm"):  # the gradients' scale too, which AdamW's steps would hide
        assert [r[key] for r in read_metrics(two)] == pytest.approx([r[key] for r in read_metrics(one)], rel=1e-5)


def test_a_resumed_chat_run_retraces_its_losses(chat_args, tmp_path, read_metrics):
    out = tmp_path / "run"
    args = chat_args(out, checkpoint__interval=3)
    assert main(args) == 0
    losses = {r["step"]: r["loss"] for r in read_metrics(out)}
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    assert main(args) == 0
    again = {r["step"]: r["loss"] for r in read_metrics(out)}
    assert sorted(again) == sorted(losses) == list(range(1, 7))
    assert again == losses  # bit for bit


@pytest.fixture(scope="module")
def two_rank_runs(chats, chat_tokenizer, tmp_path_factory):
    """One process's run, then the DDP and the FSDP2 two-rank runs of the same settings in one torchrun launch:
    ``(single, {parallelism: (output_dir, finished run)})``."""
    from .conftest import run_train_many

    root = tmp_path_factory.mktemp("two-ranks")

    def args(output_dir, **overrides):
        values = dict(data__format="chat", data__seq_len=64, optim__lr=1e-2, train__steps=4, train__eval_interval=4)
        values.update(overrides)
        return micro_args(chats, chat_tokenizer, root / "cache", output_dir, **values)

    single = root / "single"
    assert main(args(single)) == 0  # global 4 = micro 2 × accum 2 × 1 rank
    kinds = ("ddp", "fsdp")  # micro 2 × accum 1 × 2 ranks
    done = run_train_many([args(root / kind, train__parallelism=kind) for kind in kinds], 2, root / "launch")
    return single, {kind: (root / kind, run) for kind, run in zip(kinds, done)}


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(two_rank_runs, read_metrics, parallelism):
    """The losses, gradient norms and validation losses of one process accumulating two micro-batches; DDP and
    FSDP2 both average the ranks' gradients, which the target-count scaling undoes."""
    single, runs = two_rank_runs
    ddp, two = runs[parallelism]
    assert two.returncode == 0, two.stderr + two.stdout
    assert "world 2 × micro 2 × accum 1" in two.stderr
    a, b = [r["loss"] for r in read_metrics(single)], [r["loss"] for r in read_metrics(ddp)]
    assert len(a) == len(b) == 4 and a[0] != a[-1]
    assert b == pytest.approx(a, rel=1e-4)
    # DDP averages the ranks' gradients: the norm shows they are the global mean's (AdamW's steps would not)
    assert [r["grad_norm"] for r in read_metrics(ddp)] == pytest.approx(
        [r["grad_norm"] for r in read_metrics(single)], rel=1e-4)
    assert [r["val_loss"] for r in read_metrics(ddp, "val")] == pytest.approx(
        [r["val_loss"] for r in read_metrics(single, "val")], rel=1e-4)


def test_a_pretrained_export_fine_tunes_on_conversations(corpus, tokenizer_dir, chats, tmp_path, read_metrics):
    """``model.init_from`` + chat: a text run's export (its stdlib-trained BPE has the default template) is
    fine-tuned on the conversations, and its export serves them (the tokenizer keeps its template)."""
    from transformers import AutoTokenizer

    from retnet.tokenization import DEFAULT_CHAT_TEMPLATE

    base = tmp_path / "base"
    assert main(micro_args(corpus, tokenizer_dir, tmp_path / "cache", base, train__steps=2,
                           checkpoint__export=True)) == 0
    tuned = tmp_path / "tuned"
    args = [a for a in micro_args(chats, tokenizer_dir, tmp_path / "cache", tuned, train__steps=12,
                                  optim__lr=1e-2, data__format="chat", data__seq_len=64, checkpoint__export=True)
            if not a.startswith(("--data.tokenizer=", "--model.hidden_size=", "--model.num_hidden_layers=",
                                 "--model.num_attention_heads="))]
    assert main([*args, f"--model.init_from={base / 'export'}"]) == 0
    losses = [r["loss"] for r in read_metrics(tuned)]
    assert losses[-1] < losses[0] - 1.0, losses
    assert AutoTokenizer.from_pretrained(tuned / "export").chat_template == DEFAULT_CHAT_TEMPLATE


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "key"), [
    ({"format": "xml"}, r"data.format must be one of \('text', 'chat', 'preference', 'unpaired', 'prompts'\); got 'xml'"),
    ({"format": "chat", "messages_field": ""}, r"data.messages_field must name the column.*got ''"),
    ({"format": "chat"}, r"data.dataset must hold conversations with data.format 'chat'.*got 'stdlib'"),
])
def test_bad_chat_configs_are_refused_by_name(data, key):
    with pytest.raises(ConfigError, match=key):
        build_config({"data": data})


@pytest.mark.parametrize(("row", "problem"), [
    ("hello", "holds str 'hello'"),
    (["hello"], "message 0 is str 'hello'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 1 has content None"),
    ([{"role": 3, "content": "hi"}], "message 0 has role 3"),
])
def test_a_row_that_is_no_conversation_is_refused_naming_it(row, problem):
    rows = [conversation(0), None, [], row]
    with pytest.raises(ConfigError) as refused:
        check_conversations("set.jsonl", "messages", rows)
    assert str(refused.value).startswith(f"data.messages_field 'messages' of 'set.jsonl', row 3: {problem}")


def test_bad_chat_data_is_refused_by_the_cli(chat_args, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": conversation(i)} for i in range(5)]
                      + [{"messages": [{"role": "user", "content": 7}]}])
    text = tmp_path / "text"
    text.mkdir()
    for i in range(3):
        (text / f"{i}.txt").write_text("plain text")
    cases = [
        (chat_args(tmp_path / "a", data__dataset=bad), f"of {str(bad)!r}, row 5: message 0 has content 7"),
        (chat_args(tmp_path / "b", data__messages_field="conversation"),
         "data.messages_field 'conversation' is not a column"),
        (chat_args(tmp_path / "c", data__dataset=text), "is text files, which hold no conversations"),
    ]
    for args, problem in cases:
        assert main(args) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, err


def test_a_resume_with_other_chat_settings_is_refused():
    saved = build_config({"data": {"format": "chat", "dataset": "a.jsonl"}}).to_dict()
    now = build_config({"data": {"format": "chat", "dataset": "a.jsonl", "assistant_only_loss": False,
                                 "text_field": "body"}})
    assert data_changes(saved, now, tokenizer_reused=True) == ["data.assistant_only_loss: checkpoint True, now False"]
    text = build_config({"data": {"dataset": "a.jsonl"}})
    assert data_changes(saved, text, tokenizer_reused=True) == ["data.format: checkpoint 'chat', now 'text'"]
    older = text.to_dict()  # a checkpoint from before data.format: text
    for name in ("format", "messages_field", "assistant_only_loss"):
        del older["data"][name]
    assert data_changes(older, now, tokenizer_reused=True) == ["data.format: checkpoint 'text', now 'chat'"]
