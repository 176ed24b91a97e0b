"""Streamed chat data: which rows the validation split holds out of training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retnet.train.chat import render_default
from retnet.train.config import DataConfig
from retnet.train.data import build_data, load_tokenizer

from .test_chat_sft import write_jsonl

BUILD = dict(vocab_size=320, seed=0, micro_batch=1, global_batch=1, rank=0, local_rank=0, world_size=1,
             tokenizer_dir=None, barrier=lambda: None)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("tokenizer")
    train_byte_level_bpe([render_default(chat(i)) for i in range(64)], vocab_size=320).save_pretrained(path)
    return path


def streamed_rows(tmp_path: Path, tokenizer_dir: Path, rows: list[dict], **overrides):
    dataset = write_jsonl(tmp_path / "chats.jsonl", rows)
    config = DataConfig(dataset=str(dataset), format="chat", streaming=True, val_documents=1, seq_len=16,
                        tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "cache"), **overrides)
    data = build_data(config, **BUILD)
    # the training stream's rows, one epoch
    return [example for example in data.stream]


@pytest.mark.parametrize("column, held, trained", [
    ("tools", None, json.dumps(TOOLS)),  # (a validation row with tools outgrows its 16-token block's targets)
    ("chat_template_kwargs", {"note": "a"}, {"note": "b"}),
])
def test_a_training_row_differing_from_a_validation_row_only_in_its_template_columns_is_trained(
        tokenizer_dir, tmp_path, column, held, trained):
    """The validation rows are held out of the stream by what is trained on: the same messages with other tools
    or template variables render as another sequence, and were silently dropped from training."""
    rows = [{"messages": chat(1), column: held}, {"messages": chat(1), column: trained},
            {"messages": chat(2), column: trained}]
    got = streamed_rows(tmp_path, tokenizer_dir, rows)
    assert [example["__retnet_stream_row__"] for example in got] == [1, 2]


def test_a_repeat_of_a_validation_row_is_still_held_out(tokenizer_dir, tmp_path):
    rows = [{"messages": chat(1), "chat_template_kwargs": {"note": "a"}}, {"messages": chat(2)},
            {"messages": chat(1), "chat_template_kwargs": {"note": "a"}}]
    got = streamed_rows(tmp_path, tokenizer_dir, rows)
    assert [example["__retnet_stream_row__"] for example in got] == [1]


def test_a_conversation_opening_with_an_assistant_message_is_masked(tokenizer_dir):
    """A greeting before the user's first turn (ShareGPT sets have them): its prompt is what the template renders
    before any message. It was refused as a template that cannot be masked (apply_chat_template refuses an empty
    conversation), failing the whole run on one plausible row."""
    from retnet.train.chat import TARGET, ChatEncoder

    tokenizer = load_tokenizer(tokenizer_dir)
    greeting = [{"role": "assistant", "content": "Hello!"}, *chat(3)]
    ids, flags = ChatEncoder(tokenizer).encode([greeting])
    targets = ids[(flags & TARGET) != 0]
    eos = tokenizer.eos_token_id
    assert tokenizer.decode(targets[targets != eos]) == "Hello!3 plus 3 is 6."
    # the assistant header of each turn is prompt, not target, as for a later turn
    assert "<|assistant|>" not in tokenizer.decode(targets)


def test_a_template_that_cannot_prompt_before_any_message_names_the_row_and_why(tokenizer_dir):
    from retnet.train.chat import ChatEncoder
    from retnet.train.config import ConfigError

    tokenizer = load_tokenizer(tokenizer_dir)
    # reads messages[0] unguarded, as Llama 3's template does
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}S{% endif %}{% for m in messages %}"
                               "<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    greeting = [{"role": "assistant", "content": "Hello!"}, *chat(3)]
    with pytest.raises(ConfigError, match=r"row 7 of 'd\.jsonl'.*message 0 is an assistant's"):
        ChatEncoder(tokenizer, dataset="d.jsonl").encode([greeting], rows=[7])
    assert ChatEncoder(tokenizer).encode([chat(3)])[0].size  # a conversation opening with a user's still renders


def test_a_stream_that_does_not_know_its_columns_still_holds_validation_rows_with_their_columns_out(tokenizer_dir,
                                                                                           tmp_path):
    """A generator's (or a hub set's) stream has no column names before it is read: the validation rows' template
    columns (tools, chat_template_kwargs) were then left out of their key, so a repeat of one with them was no
    repeat and leaked into training."""
    import datasets

    from retnet.train.streaming import build_streaming

    rows = [{"messages": chat(1), "chat_template_kwargs": {"note": "a"}}, {"messages": chat(2)},
            {"messages": chat(1), "chat_template_kwargs": {"note": "a"}}]
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    assert stream.column_names is None
    config = DataConfig(dataset="gen", format="chat", streaming=True, val_documents=1, seq_len=16,
                        tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "cache"))
    data = build_streaming(config, stream, tmp_path / "cache", "gen", tokenizer_dir, vocab_size=320,
                           micro_batch=1, rank=0, local_rank=0, world_size=1, barrier=lambda: None)
    assert [example["__retnet_stream_row__"] for example in data.stream] == [1]


def test_the_default_template_trains_tool_calls_in_the_format_the_server_parses(tokenizer_dir):
    """The default template rendered role and content only: an assistant turn that only calls a tool trained as an
    empty answer. Now the calls are Hermes blocks (targets), which the server's `--tool-call-parser hermes` reads
    back as the same call."""
    from transformers import AutoTokenizer

    from retnet.serve.tool_parsers import HermesToolParser
    from retnet.train.chat import ChatEncoder, check_conversations

    from .test_chat_sft import target_runs

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    row = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
           {"role": "tool", "content": "5"}, {"role": "assistant", "content": "2 plus 3 is 5."}]
    conversations = check_conversations("tools.jsonl", "messages", [row], columns={"tools": [TOOLS]})
    ids, flags = ChatEncoder(tokenizer).encode(conversations)
    text = tokenizer.decode(ids.tolist())
    assert text.startswith("<|user|>\n")  # (the tools' schemas are not listed)
    runs = target_runs(tokenizer, ids, flags)
    assert runs[0] == '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|endoftext|>', runs
    assert runs[1].startswith("2 plus 3 is 5.<|endoftext|>") and "5" not in runs[0]  # the tool's answer is no target
    # the server stops on the EOS and returns the text before it
    content, calls = HermesToolParser(["add"]).parse(runs[0].removesuffix(tokenizer.eos_token))
    assert content is None and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("add", {"a": 2, "b": 3})]
    # without tools nor calls the rendering is the plain one (each message closed by the EOS)
    assert tokenizer.apply_chat_template(chat(1), tokenize=False) == (
        "<|user|>\nWhat is 1 plus 1?<|endoftext|><|assistant|>\n1 plus 1 is 2.<|endoftext|>")
