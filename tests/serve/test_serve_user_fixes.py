"""Behaviour a user of the server expects from vLLM's OpenAI server, each once wrong here: text parts joined as
vLLM joins them, a session's penalties over its whole history, the sibling choices of a failed request counted as
failed, and guided regexes' ``\\d``/``\\w``/``\\s`` as the grammar backends read them (ASCII)."""

from __future__ import annotations

import asyncio

import pytest

from .test_api import _drained, metric

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


async def _tokens(client, messages) -> list[int]:
    r = await client.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


async def test_text_parts_are_joined_with_newlines_as_vllm_joins_them(client):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    joined = await _tokens(client, [{"role": "user", "content": "Hello\nworld"}])
    assert joined != await _tokens(client, [{"role": "user", "content": "Helloworld"}])
    assert await _tokens(client, [{"role": "user", "content": parts}]) == joined
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}],
                                                        "max_tokens": 1, "return_token_ids": True, **GREEDY})
    assert r.status_code == 200 and r.json()["choices"][0]["prompt_token_ids"] == joined, r.text
    # vLLM's echo of a continued last message joins its parts the same way.
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": parts}],
        "add_generation_prompt": False, "continue_final_message": True, "echo": True, "max_tokens": 1, **GREEDY})
    assert r.json()["choices"][0]["message"]["content"].startswith("Hello\nworld"), r.text
    # The Responses API's input_text parts too.
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                          {"type": "input_text", "text": "world"}]}]
    r = await client.post("/v1/responses", json={"input": items, "max_output_tokens": 1, **GREEDY})
    assert r.status_code == 200 and r.json()["usage"]["input_tokens"] == len(joined), r.text


@pytest.mark.parametrize("penalties", [
    {"repetition_penalty": 3.0},
    # presence and frequency count the output alone (vLLM's rule): this turn's, as for the whole prompt
    {"repetition_penalty": 1.5, "presence_penalty": 2.0, "frequency_penalty": 2.0},
])
async def test_a_sessions_penalties_count_its_whole_history(client, penalties):
    """A turn of a session samples as the whole conversation sent as its prompt would: vLLM's repetition_penalty
    counts every prompt token, and the earlier turns are in the session's state, not in this turn's prompt."""
    penalised = {**penalties, "max_tokens": 12, "return_token_ids": True, **GREEDY}
    first = (await client.post("/v1/completions", json={"prompt": "for i in range(10):", "session_id": "pen",
                                                         **penalised})).json()["choices"][0]
    second = (await client.post("/v1/completions", json={"prompt": " print(i * i)", "session_id": "pen",
                                                          **penalised})).json()["choices"][0]
    history = first["prompt_token_ids"] + first["token_ids"] + second["prompt_token_ids"]
    whole = (await client.post("/v1/completions", json={"prompt": history, **penalised})).json()["choices"][0]
    assert second["token_ids"] == whole["token_ids"]


async def test_a_session_keeps_its_penalty_history_across_a_restart(open_app, tmp_path):
    penalised = {"repetition_penalty": 3.0, "max_tokens": 12, "return_token_ids": True, **GREEDY}
    async with open_app(session_dir=str(tmp_path)) as c:
        first = (await c.post("/v1/completions", json={"prompt": "for i in range(10):", "session_id": "disk",
                                                        **penalised})).json()["choices"][0]
    async with open_app(session_dir=str(tmp_path)) as c:
        second = (await c.post("/v1/completions", json={"prompt": " print(i * i)", "session_id": "disk",
                                                         **penalised})).json()["choices"][0]
        history = first["prompt_token_ids"] + first["token_ids"] + second["prompt_token_ids"]
        whole = (await c.post("/v1/completions", json={"prompt": history, **penalised})).json()["choices"][0]
    assert second["token_ids"] == whole["token_ids"]


async def test_the_siblings_of_a_failed_choice_count_as_failed_not_cancelled(client, monkeypatch):
    from retnet.serve.engine import Engine

    advance = Engine._advance

    def failing(self, seq, row, sample):
        if seq.index == 1 and len(seq.tokens) >= 2:
            raise RuntimeError("simulated decoder failure")
        return advance(self, seq, row, sample)

    monkeypatch.setattr(Engine, "_advance", failing)
    r = await asyncio.wait_for(client.post("/v1/completions", json={"prompt": "boom", "n": 3, "max_tokens": 50,
                                                                    **GREEDY}), 30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
    await asyncio.wait_for(_drained(client.app.state.engine), 30)
    assert await metric(client, "retnet_sequences_cancelled_total") == 0
    assert await metric(client, "retnet_sequences_failed_total") == 3


@pytest.mark.parametrize(("field", "regex", "text"), [
    ("guided_regex", r"\d{3}", "١٢٣"),  # Arabic-Indic digits: Unicode's \d, not [0-9]
    ("guided_regex", r"\w{3}", "été"),
    ("guided_regex", r"x\sy", "x\u00a0y"),
])
def test_guided_regex_classes_are_ascii_as_the_backends_read_them(model_dir, field, regex, text):
    from llguidance import LLMatcher
    from transformers import AutoTokenizer

    from retnet.serve.structured import GrammarCompiler, requested_grammar

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})

    def accepts(fields, value: str) -> bool:
        matcher = compiler.compile(*requested_grammar(fields)).matcher().matcher
        assert isinstance(matcher, LLMatcher)
        ids = tokenizer.encode(value, add_special_tokens=False)
        return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()

    ascii_text = {"١٢٣": "123", "été": "ete", "x\u00a0y": "x y"}[text]
    for fields in ({field: regex}, {"structured_outputs": {"regex": regex}}):
        assert accepts(fields, ascii_text)
        assert not accepts(fields, text)


def test_a_trailing_backslash_in_a_guided_regex_is_still_refused(model_dir):
    from transformers import AutoTokenizer

    from retnet.serve.protocol import APIError
    from retnet.serve.structured import GrammarCompiler, requested_grammar

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    with pytest.raises(APIError) as refused:
        compiler.compile(*requested_grammar({"guided_regex": "ab\\"}))
    assert refused.value.status == 400 and refused.value.param == "guided_regex"


@pytest.mark.parametrize(("tool_choice", "finish"), [
    ("required", "tool_calls"),
    # OpenAI's rule, which vLLM follows: a call the request forced by name ends with "stop"
    ({"type": "function", "function": {"name": "paint"}}, "stop"),
])
async def test_a_named_functions_call_finishes_with_stop_as_openai_and_vllm_answer(client, tool_choice, finish):
    from .test_extras import sse_events
    from .test_tool_calls import ADD, PAINT

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "temperature": 0,
            "tools": [ADD, PAINT], "tool_choice": tool_choice}
    choice = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
    assert choice["message"]["tool_calls"] and choice["finish_reason"] == finish, choice
    events = sse_events((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == [finish]


async def test_a_session_file_written_before_its_history_was_kept_still_continues(open_app, tmp_path):
    import json
    import struct

    from safetensors.torch import load, save

    async with open_app(session_dir=str(tmp_path)) as c:
        r = await c.post("/v1/completions", json={"prompt": "for i in range(10):", "session_id": "old",
                                                  "max_tokens": 4, **GREEDY})
        assert r.status_code == 200, r.text
    path = tmp_path / "old.safetensors"
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + size])["__metadata__"]
    tensors = load(data)
    assert tensors.pop("seen").dim() == 1  # written now, and dropped as an older file lacks it
    path.write_bytes(save(tensors, meta))
    async with open_app(session_dir=str(tmp_path)) as c:
        r = await c.post("/v1/completions", json={"prompt": " print(i)", "session_id": "old", "max_tokens": 4,
                                                  "repetition_penalty": 2.0, **GREEDY})
        assert r.status_code == 200, r.text
        assert await metric(c, "retnet_session_loads_total") == 1
