"""TRL's prompt-completion rows as chat SFT data (``data.format = "chat"`` on a set with ``prompt`` and
``completion`` columns): the targets of a standard and a conversational row, every token without
assistant_only_loss, the loader's choice of layout, refusals naming the row, a token cache of its own, the streamed
and mixture paths, and a run that trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retnet.train.chat import (
    BOUNDARY,
    TARGET,
    ChatEncoder,
    Completion,
    chat_template,
    check_prompt_completions,
    render_default,
)
from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import build_data, chat_blocks, load_conversations, load_tokenizer

from .conftest import micro_args
from .test_chat_sft import conversation, target_runs, write_jsonl

BUILD = dict(vocab_size=320, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
             tokenizer_dir=None, barrier=lambda: None)


def standard(i: int) -> dict[str, str]:
    """A standard row: the question's text, the answer's (its leading space keeps the boundary a token boundary)."""
    a, b = i % 7, (i * 3) % 5
    return {"prompt": f"Q: What is {a} plus {b}?\nA:", "completion": f" {a} plus {b} is {a + b}."}


def conversational(i: int) -> dict[str, list]:
    """A conversational row: ``conversation(i)`` up to its last answer as the prompt, that answer the completion (a
    two-turn conversation's first answer is in its prompt)."""
    messages = conversation(i)
    return {"prompt": messages[:-1], "completion": messages[-1:]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A BPE trained on both kinds of rows as a run trains its own (the default chat template)."""
    from retnet.tokenization import train_byte_level_bpe

    texts = [render_default(conversation(i)) for i in range(120)]
    texts += [row["prompt"] + row["completion"] for row in map(standard, range(120))]
    path = tmp_path_factory.mktemp("pc-tokenizer")
    train_byte_level_bpe(texts, vocab_size=320).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def targets(flags: np.ndarray) -> list[int]:
    return ((flags & TARGET) != 0).astype(int).tolist()


# ----------------------------------------------------------------------------------------------------------
# The targets
# ----------------------------------------------------------------------------------------------------------
def test_a_standard_rows_targets_are_its_completion_and_eos(tokenizer):
    row = standard(3)
    ids, flags = ChatEncoder(tokenizer).encode([Completion(row["prompt"], row["completion"])])
    # as TRL's SFTTrainer and the server's /v1/completions encode the text; its prompt's tokens counted alone
    whole = tokenizer.encode(row["prompt"] + row["completion"])
    prompt = tokenizer.encode(row["prompt"])
    assert whole[:len(prompt)] == prompt and len(whole) > len(prompt)
    assert ids.tolist() == [*whole, tokenizer.eos_token_id]
    assert targets(flags) == [0] * len(prompt) + [1] * (len(whole) - len(prompt)) + [1]
    assert flags[-1] & BOUNDARY and not np.any(flags[:-1] & BOUNDARY)
    assert target_runs(tokenizer, ids, flags) == [row["completion"] + tokenizer.eos_token]
    _, every = ChatEncoder(tokenizer, assistant_only_loss=False).encode([Completion(row["prompt"], row["completion"])])
    assert targets(every) == [1] * len(ids)


def test_a_completion_ending_with_the_eos_text_gets_one_eos(tokenizer):
    """TRL's add_eos: a completion that spells out the EOS is not given a second one (which would teach EOS after
    EOS and start the next packed segment one token late)."""
    row = standard(2)
    encoder = ChatEncoder(tokenizer)
    plain = encoder.encode([Completion(row["prompt"], row["completion"])])
    spelled = encoder.encode([Completion(row["prompt"], row["completion"] + tokenizer.eos_token)])
    assert spelled[0].tolist() == plain[0].tolist() and spelled[1].tolist() == plain[1].tolist()


def test_a_conversational_rows_targets_are_its_completions_assistant_messages(tokenizer):
    """The prompt's own assistant message (a two-turn conversation's first answer) is no target; the completion
    is, from where the generation prompt ends (TRL renders the prompt with it) to its end-of-turn, and EOS."""
    row = conversational(4)
    assert any(m["role"] == "assistant" for m in row["prompt"])
    (_, sequence), = check_prompt_completions("set.jsonl", [row["prompt"]], [row["completion"]])
    ids, flags = ChatEncoder(tokenizer).encode([sequence])
    template = chat_template(tokenizer)
    whole = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False, chat_template=template)
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True,
                                           chat_template=template)
    assert whole.startswith(prompt)
    whole_ids = tokenizer.encode(whole, add_special_tokens=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert whole_ids[:len(prompt_ids)] == prompt_ids
    # the default template closes the completion's message with the EOS: that one closes the row, not a second
    assert whole_ids[-1] == tokenizer.eos_token_id and ids.tolist() == whole_ids
    assert targets(flags) == [0] * len(prompt_ids) + [1] * (len(whole_ids) - len(prompt_ids))
    # the same messages as one conversation train on both answers
    _, both = ChatEncoder(tokenizer).encode([conversation(4)])
    assert np.count_nonzero(both & TARGET) > np.count_nonzero(flags & TARGET)
    _, every = ChatEncoder(tokenizer, assistant_only_loss=False).encode([sequence])
    assert targets(every) == [1] * len(ids)


def test_the_rows_tools_and_template_variables_reach_the_template(tokenizer):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    row = conversational(1)
    (_, sequence), = check_prompt_completions("set.jsonl", [row["prompt"]], [row["completion"]],
                                              columns={"tools": [tools], "chat_template_kwargs": [{"x": 1}]})
    assert sequence.tools == tools and sequence.template_kwargs == {"x": 1} and sequence.completion_start == 1


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------
def test_a_set_with_prompt_and_completion_columns_is_read_as_prompt_completion_rows(tmp_path):
    """Without a messages (or conversations) column; an empty completion drops its row, which keeps its index."""
    rows = [standard(i) for i in range(4)]
    rows[2]["completion"] = ""
    dataset = write_jsonl(tmp_path / "set.jsonl", rows)
    read = load_conversations(DataConfig(dataset=str(dataset), format="chat"), [dataset], tmp_path / "cache")
    assert read == [(i, Completion(rows[i]["prompt"], rows[i]["completion"])) for i in (0, 1, 3)]
    both = write_jsonl(tmp_path / "both.jsonl", [{**standard(0), "messages": conversation(0)}])
    (_, messages), = load_conversations(DataConfig(dataset=str(both), format="chat"), [both], tmp_path / "cache")
    assert messages == conversation(0)  # a messages column wins, as in TRL


def test_a_messages_field_named_on_purpose_is_not_guessed_as_prompt_completion(tmp_path):
    """Only the default ``messages`` falls back to prompt and completion columns: a misspelt column is refused."""
    dataset = write_jsonl(tmp_path / "set.jsonl", [standard(i) for i in range(3)])
    with pytest.raises(ConfigError, match="dialog"):
        load_conversations(DataConfig(dataset=str(dataset), format="chat", messages_field="dialog"), [dataset],
                           tmp_path / "cache")


USER = [{"role": "user", "content": "hi"}]
ANSWER = [{"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(("prompt", "completion", "column", "problem"), [
    (None, "x", "prompt", "holds None (a missing value)"),
    ("x", None, "completion", "holds None (a missing value)"),
    (3, "x", "prompt", "holds int 3"),
    ("x", ANSWER, "completion", "holds list"),
    (USER, "x", "completion", "holds str 'x'"),
    (USER, None, "completion", "holds None"),
    ([{"role": "user"}], ANSWER, "prompt", "message 0 has content None"),
    (USER, [{"role": "assistant", "content": 5}], "completion", "message 0 has content 5"),
])
def test_a_bad_row_is_refused_naming_the_dataset_row_and_column(prompt, completion, column, problem):
    prompts, completions = ["a", "b", USER, prompt], ["c", "", [], completion]  # rows 1 and 2 dropped, not refused
    with pytest.raises(ConfigError) as refused:
        check_prompt_completions("set.jsonl", prompts, completions)
    assert str(refused.value).startswith(f"data.format 'chat': column {column!r} of 'set.jsonl', row 3: {problem}")


def test_empty_completions_drop_their_rows():
    kept = check_prompt_completions("set.jsonl", ["a", "b", "c", USER, USER, [], []],
                                    [" x", "", "  ", [], ANSWER, ANSWER, []])
    assert [row for row, _ in kept] == [0, 4, 5]


def test_a_bad_row_of_a_file_is_refused_by_build_data(tokenizer_dir, tmp_path):
    rows = [standard(i) for i in range(6)]
    rows[4]["completion"] = None
    dataset = write_jsonl(tmp_path / "bad.jsonl", rows)
    config = DataConfig(dataset=str(dataset), format="chat", tokenizer=str(tokenizer_dir), seq_len=32,
                        val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=rf"column 'completion' of {str(dataset)!r}, row 4: holds None"):
        build_data(config, **BUILD)


def test_the_token_cache_is_not_a_messages_sets(tokenizer_dir, tmp_path):
    """The same conversations as messages, then (the file rewritten) as prompt-completion rows: two caches, the same
    tokens, the targets of the completions alone (not the first answer of a two-turn prompt)."""
    dataset = tmp_path / "set.jsonl"
    config = DataConfig(dataset=str(dataset), format="chat", tokenizer=str(tokenizer_dir), seq_len=32,
                        val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    write_jsonl(dataset, [{"messages": conversation(i)} for i in range(40)])
    messages = build_data(config, **BUILD)
    write_jsonl(dataset, [conversational(i) for i in range(40)])
    pairs = build_data(config, **BUILD)
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 2
    assert np.array_equal(messages.train, pairs.train)
    fewer = np.count_nonzero(pairs.train_flags & TARGET) < np.count_nonzero(messages.train_flags & TARGET)
    assert fewer and not np.any(pairs.train_flags & ~messages.train_flags & TARGET)


# ----------------------------------------------------------------------------------------------------------
# Streamed, mixed, trained
# ----------------------------------------------------------------------------------------------------------
def test_streamed_rows_are_the_cached_paths_blocks_and_flags(tokenizer_dir, tokenizer, tmp_path):
    rows = [standard(i) if i % 2 else {**standard(i), "completion": f" (#{i})" + standard(i)["completion"]}
            for i in range(30)]
    rows[9]["completion"] = ""  # skipped, as the cached path drops it
    dataset = write_jsonl(tmp_path / "set.jsonl", rows)
    config = DataConfig(dataset=str(dataset), format="chat", streaming=True, val_documents=4, seq_len=24,
                        tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "cache"))
    data = build_data(config, **BUILD)
    assert data.masked and data.pairs
    encoder = ChatEncoder(tokenizer)
    blocks, flags = chat_blocks(encoder, check_prompt_completions("set", [r["prompt"] for r in rows[4:]],
                                                                  [r["completion"] for r in rows[4:]]), 24)
    got = [data._next_block() for _ in range(len(blocks))]
    assert np.array_equal(np.stack([b for b, _ in got]), blocks) and np.array_equal(np.stack([f for _, f in got]), flags)
    val_blocks, val_flags = chat_blocks(encoder, check_prompt_completions(
        "set", [r["prompt"] for r in rows[:4]], [r["completion"] for r in rows[:4]]), 24)
    assert np.array_equal(data.val, val_blocks) and np.array_equal(data.val_flags, val_flags)


def test_a_prompt_completion_source_mixes_with_a_messages_source(tmp_path):
    from retnet.train.mixture import MixedData

    sources = {"chats": write_jsonl(tmp_path / "chats.jsonl", [{"messages": conversation(i)} for i in range(30)]),
               "pairs": write_jsonl(tmp_path / "pairs.jsonl", [standard(i) for i in range(30)])}
    mixture = {label: {"dataset": str(path), "weight": 1} for label, path in sources.items()}
    config = DataConfig(mixture=mixture, format="chat", seq_len=32, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    data = build_data(config, **{**BUILD, "global_batch": 8})
    assert isinstance(data, MixedData) and data.masked
    pairs = data.sources[1]
    runs = target_runs(pairs.tokenizer, np.asarray(pairs.train).ravel(), np.asarray(pairs.train_flags).ravel())
    answers = {row["completion"] + pairs.tokenizer.eos_token for row in map(standard, range(30))}
    # the completions and their EOS (the beginning of one cut by the end of its block)
    assert runs and all(any(answer.startswith(run) for answer in answers) for run in runs)
    assert len(set(runs) & answers) > len(runs) // 2
    data.micro_batches(4)
    assert data.step_targets > 0


def test_a_run_on_prompt_completion_rows_trains(tokenizer_dir, tmp_path, read_metrics):
    from retnet.train.__main__ import main

    dataset = write_jsonl(tmp_path / "pairs.jsonl", [standard(i) for i in range(120)])
    out = tmp_path / "run"
    args = micro_args(dataset, tokenizer_dir, tmp_path / "cache", out, data__format="chat", data__seq_len=64,
                      optim__lr=1e-2, train__steps=4, train__eval_interval=4)
    assert main(args) == 0
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert np.isfinite(read_metrics(out, "val")[-1]["val_loss"])
