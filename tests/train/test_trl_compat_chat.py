"""TRL-format chat data for supervised fine-tuning (``data.format = "chat"``): ShareGPT's ``from``/``value``
conversations, OpenAI/TRL tool-calling messages and a ``tools`` column, as TRL's SFTTrainer takes them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from retnet.train.chat import (
    BOUNDARY,
    CHAT_COLUMNS,
    ChatEncoder,
    check_conversations,
    conversation_problem,
    messages_column,
    template_messages,
)
from retnet.train.config import ConfigError

from .test_chat_sft import target_runs

# ChatML with tools (a system turn listing them) and tool calls (Hermes' <tool_call> JSON), as Qwen's templates
# render them; a message without content renders none.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SHAREGPT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2 plus 3?"},
            {"from": "gpt", "value": "5."}, {"from": "human", "value": "And 2 times 3?"},
            {"from": "gpt", "value": "6."}]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "4C, rain"},
    {"role": "assistant", "content": "4C and rain in Oslo."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small BPE with ChatML's special tokens and :data:`TOOL_TEMPLATE`."""
    from transformers import AutoTokenizer

    from retnet.tokenization import train_byte_level_bpe

    texts = [json.dumps(WEATHER), json.dumps(TOOL_CHAT), json.dumps(SHAREGPT)] * 4
    path = tmp_path_factory.mktemp("tool-tokenizer")
    train_byte_level_bpe(texts, vocab_size=300).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# ShareGPT
# ----------------------------------------------------------------------------------------------------------
def test_sharegpt_messages_become_role_content_messages():
    """TRL's maybe_convert_to_chatml (from -> role, value -> content), ShareGPT's human/gpt as user/assistant:
    what the server's requests and the assistant-only loss name them."""
    (converted,) = check_conversations("sharegpt.jsonl", "conversations", [SHAREGPT])
    assert converted == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
                         {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 2 times 3?"},
                         {"role": "assistant", "content": "6."}]
    assert conversation_problem(SHAREGPT) is None
    # other roles are kept as written (TRL's); a role/content message is left as it is
    assert template_messages([{"from": "tool", "value": "42"}]) == [{"role": "tool", "content": "42"}]
    assert template_messages([{"role": "human", "content": "x"}]) == [{"role": "human", "content": "x"}]


def test_sharegpt_conversations_train_on_the_gpt_turns(tokenizer):
    ids, flags = ChatEncoder(tokenizer).encode(check_conversations("s.jsonl", "conversations", [SHAREGPT]))
    assert target_runs(tokenizer, ids, flags) == ["5.<|im_end|>\n", "6.<|im_end|>\n<|endoftext|>"]
    assert "<|im_start|>user\nWhat is 2 plus 3?" in tokenizer.decode(ids.tolist())


def test_a_sharegpt_message_without_value_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"row 0: message 1 has content None"):
        check_conversations("s.jsonl", "conversations", [[{"from": "human", "value": "hi"}, {"from": "gpt"}]])


def test_the_conversations_column_stands_in_for_a_missing_messages_column():
    """TRL's SFTTrainer reads ShareGPT sets' ``conversations`` column: with data.messages_field left at its
    default, a dataset without ``messages`` but with ``conversations`` is read from that."""
    assert messages_column("messages", ["conversations", "id"]) == "conversations"
    assert messages_column("messages", ["messages", "conversations"]) == "messages"
    assert messages_column("dialog", ["conversations"]) == "dialog"  # set by the user: theirs
    assert messages_column("messages", ["text"]) == "messages"  # refused later, naming the setting


# ----------------------------------------------------------------------------------------------------------
# Tool calls
# ----------------------------------------------------------------------------------------------------------
def test_tool_call_messages_are_accepted_as_the_server_renders_them():
    """An assistant message of tool_calls has content None (OpenAI's, TRL's): rendered with content "" and the
    arguments' JSON text parsed (as the server's template_message does); a tool message is a message."""
    assert conversation_problem(TOOL_CHAT) is None
    (messages,) = check_conversations("tools.jsonl", "messages", [TOOL_CHAT])
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert messages[2] == TOOL_CHAT[2]
    # datasets fills the keys only some messages (or calls) have with None: left out at every depth
    filled = [{**m, "tool_calls": m.get("tool_calls"), "tool_call_id": m.get("tool_call_id"), "name": m.get("name")}
              for m in TOOL_CHAT]
    filled[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Oslo", "unit": None}
    assert check_conversations("tools.jsonl", "messages", [filled]) == [messages]
    # empty arguments reach the template as {}, as the server's template_message passes them; other text that is
    # no JSON (a Python repr) is refused: rendered {}, the model would be taught calls without arguments
    for text in ("", " ", "{'city': 'Oslo'}"):
        cut = [*TOOL_CHAT[:1], {**TOOL_CHAT[1], "tool_calls": [
            {**TOOL_CHAT[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": text}}]}, *TOOL_CHAT[2:]]
        if text.strip():
            assert "message 1 has a tool call whose arguments" in conversation_problem(cut)
            continue
        (rendered,) = check_conversations("tools.jsonl", "messages", [cut])
        assert rendered[1]["tool_calls"][0]["function"]["arguments"] == {}


@pytest.mark.parametrize(("message", "problem"), [
    ({"role": "assistant", "content": None, "tool_calls": []}, "message 1 has content None"),
    ({"role": "assistant", "content": None, "tool_calls": "get_weather()"}, "message 1 has tool_calls 'get_weather()'"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
     "message 1 has tool_calls"),
])
def test_bad_tool_calls_are_refused_naming_them(message, problem):
    with pytest.raises(ConfigError, match=re.escape(f"row 0: {problem}")):
        check_conversations("tools.jsonl", "messages", [[TOOL_CHAT[0], message]])


def test_tool_calls_and_the_tools_column_are_rendered_and_the_calls_trained_on(tokenizer):
    """TRL passes a row's ``tools`` (a list, or its JSON text) to the chat template; the assistant's tool calls
    are targets, the tool's result is not."""
    rows = [TOOL_CHAT, TOOL_CHAT]
    conversations = check_conversations("tools.jsonl", "messages", rows,
                                        columns={"tools": [[WEATHER], json.dumps([WEATHER])]})
    assert [c.tools for c in conversations] == [[WEATHER], [WEATHER]]
    ids, flags = ChatEncoder(tokenizer).encode(conversations[:1])
    text = tokenizer.decode(ids.tolist())
    assert text.startswith("<|im_start|>system\n" + json.dumps(WEATHER))
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>\n'
    assert target_runs(tokenizer, ids, flags) == [call, "4C and rain in Oslo.<|im_end|>\n<|endoftext|>"]
    # without tools the system turn is not rendered
    plain, _ = ChatEncoder(tokenizer).encode(check_conversations("tools.jsonl", "messages", [TOOL_CHAT],
                                                                 columns={"tools": [None]}))
    assert not tokenizer.decode(plain.tolist()).startswith("<|im_start|>system")
    assert int(np.count_nonzero(flags & BOUNDARY)) == 1


@pytest.mark.parametrize(("tools", "problem"), [
    ("{not json", "column 'tools' of 'tools.jsonl', row 0: holds text that is no JSON"),
    ([["get_weather"]], "column 'tools' of 'tools.jsonl', row 0: holds"),
    ({"type": "function"}, "column 'tools' of 'tools.jsonl', row 0: holds dict"),
])
def test_a_bad_tools_value_is_refused_naming_the_row(tools, problem):
    with pytest.raises(ConfigError, match=problem):
        check_conversations("tools.jsonl", "messages", [TOOL_CHAT], columns={"tools": [tools]})


# ----------------------------------------------------------------------------------------------------------
# As datasets reads them
# ----------------------------------------------------------------------------------------------------------
def test_jsonl_sets_read_by_datasets_load_as_trl_reads_them(tokenizer, tmp_path):
    """Through the loader: a ShareGPT set (data.messages_field=conversations), and a tool-calling set whose
    messages, calls and tool schemas differ in keys, as datasets gives them."""
    import datasets

    from retnet.train.config import DataConfig
    from retnet.train.data import load_conversations, local_files

    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text("".join(json.dumps({"conversations": SHAREGPT[i:]}) + "\n" for i in (0, 1)))
    cfg = DataConfig(dataset=str(sharegpt), format="chat", messages_field="conversations")
    loaded = load_conversations(cfg, local_files(cfg.dataset), tmp_path / "cache")
    assert [row for row, _ in loaded] == [0, 1]
    assert loaded[1][1][0] == {"role": "user", "content": "What is 2 plus 3?"}

    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "local"]}}}}}
    timed = [{"role": "user", "content": "Time?"},
             {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                 "name": "get_time", "arguments": {"zone": "utc"}}}]},
             {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "Noon."}]
    tools = tmp_path / "tools.jsonl"
    tools.write_text(json.dumps({"messages": TOOL_CHAT, "tools": [WEATHER]}) + "\n"
                     + json.dumps({"messages": timed, "tools": [clock]}) + "\n")
    table = datasets.load_dataset("json", data_files=str(tools), split="train", cache_dir=str(tmp_path / "hf"))
    conversations = check_conversations(str(tools), "messages", table["messages"],
                                        columns={"tools": table["tools"]})
    assert conversations[0].tools == [WEATHER] and conversations[1].tools == [clock]
    assert conversations[1][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "utc"}}}]}
    assert conversations[0] == check_conversations("x", "messages", [TOOL_CHAT])[0]
    ids, flags = ChatEncoder(tokenizer).encode(conversations)
    assert target_runs(tokenizer, ids, flags)[-2:] == [
        '<tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call><|im_end|>\n',
        "Noon.<|im_end|>\n<|endoftext|>"]


# ----------------------------------------------------------------------------------------------------------
# Content parts
# ----------------------------------------------------------------------------------------------------------
def test_text_content_parts_are_joined_as_the_server_joins_them():
    """OpenAI's (and TRL's multimodal-ready) content as a list of parts: its text parts joined by newlines, as the
    server's ChatMessage.text() (vLLM's) gives a request's to the template; datasets' None fills left out."""
    row = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "2+3?",
                                                                         "image": None}]},
           {"role": "assistant", "content": [{"type": "text", "text": "5."}]}]
    assert conversation_problem(row) is None
    assert template_messages(row) == [{"role": "user", "content": "Look:\n2+3?"},
                                      {"role": "assistant", "content": "5."}]


@pytest.mark.parametrize(("content", "problem"), [
    ([{"type": "image", "image": "cat.png"}], "message 0 has a content part of type 'image'"),
    ([{"type": "text"}], "message 0 has a content part of type 'text'"),
    (["plain"], "message 0 has a content part of type None"),
])
def test_other_content_parts_are_refused_naming_them(content, problem):
    with pytest.raises(ConfigError, match=re.escape(f"row 0: {problem}")):
        check_conversations("parts.jsonl", "messages", [[{"role": "user", "content": content}]])


# ----------------------------------------------------------------------------------------------------------
# chat_template_kwargs
# ----------------------------------------------------------------------------------------------------------
THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not "
            "(enable_thinking is defined and not enable_thinking) %}<think></think>{% endif %}{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_rows_chat_template_kwargs_reach_the_template(tokenizer):
    """TRL's SFTTrainer passes a row's ``chat_template_kwargs`` (Qwen3's enable_thinking ...) to the template,
    for the whole conversation and every prefix the mask renders; datasets' None fills are left out."""
    from transformers import AutoTokenizer

    assert CHAT_COLUMNS == ("tools", "chat_template_kwargs")
    thinking = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    thinking.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    thinking.chat_template = THINKING
    rows = [SHAREGPT[1:3], SHAREGPT[1:3]]
    conversations = check_conversations("k.jsonl", "conversations", rows, columns={
        "chat_template_kwargs": [{"enable_thinking": False, "other": None}, None]})
    assert conversations[0].template_kwargs == {"enable_thinking": False}
    ids, flags = ChatEncoder(thinking).encode(conversations)
    assert target_runs(thinking, ids, flags) == ["5.<|im_end|>\n<|endoftext|>",
                                                 "<think></think>5.<|im_end|>\n<|endoftext|>"]


@pytest.mark.parametrize(("value", "problem"), [
    ("enable_thinking", "holds str 'enable_thinking'; expected a dict of the template's variables"),
    ({"add_generation_prompt": True}, "'add_generation_prompt' is an argument of the templating"),
    # render_jinja_template's own (a TypeError in every rendering, the BPE's sample's included) and an argument of
    # transformers 5's apply_chat_template (which refuses it without tokenize=True: a misleading template error)
    ({"conversations": []}, "'conversations' is an argument of the templating"),
    ({"sanitize_control_tokens": True}, "'sanitize_control_tokens' is an argument of the templating"),
])
def test_bad_chat_template_kwargs_are_refused_naming_the_row(value, problem):
    expected = re.escape(f"column 'chat_template_kwargs' of 'k.jsonl', row 0: {problem}")
    with pytest.raises(ConfigError, match=expected):
        check_conversations("k.jsonl", "messages", [TOOL_CHAT], columns={"chat_template_kwargs": [value]})


def test_the_loader_reads_a_conversations_column_and_a_rows_tools_by_default(tokenizer, tmp_path):
    """With data.messages_field left at `messages`, a set without that column but with ShareGPT's `conversations`
    is read from it (TRL's SFTTrainer does); a row's `tools` reach its conversation through the loader."""
    from retnet.train.config import DataConfig
    from retnet.train.data import load_conversations, local_files

    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text("".join(json.dumps({"conversations": SHAREGPT[i:]}) + "\n" for i in (0, 1)))
    cfg = DataConfig(dataset=str(sharegpt), format="chat")
    loaded = load_conversations(cfg, local_files(cfg.dataset), tmp_path / "cache")
    assert loaded[1][1][0] == {"role": "user", "content": "What is 2 plus 3?"}
    tools = tmp_path / "tools.jsonl"
    tools.write_text(json.dumps({"messages": TOOL_CHAT, "tools": [WEATHER]}) + "\n")
    cfg = DataConfig(dataset=str(tools), format="chat")
    (_, conversation), = load_conversations(cfg, local_files(cfg.dataset), tmp_path / "cache2")
    assert conversation.tools == [WEATHER]
