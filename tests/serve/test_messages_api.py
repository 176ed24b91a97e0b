"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) driven by the official ``anthropic`` SDK,
unchanged, against a real ``python -m retnet.serve`` (uvicorn) process: the SDK's own types read the answers, its
stream helper accumulates the events, and its exception classes are chosen by the status codes. The answers are
checked against /v1/chat/completions for the same conversation (the route they are translated onto)."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import ServerProcess, running_servers

anthropic = pytest.importorskip("anthropic", reason="the anthropic client is in the [dev] extra")

KEY = "sk-messages-test"
# The SDK (2.17) has no sampling arguments any more: the request's temperature is sent as any extra field.
GREEDY = {"extra_body": {"temperature": 0, "ignore_eos": True}}
ASK = [{"role": "user", "content": "def add(a, b):"}]
ADD = {"name": "add", "description": "Add two small numbers.",
       "input_schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                         "b": {"type": "integer", "minimum": -9, "maximum": 9}},
                        "required": ["a", "b"], "additionalProperties": False}}
ADD_CHAT = {"type": "function", "function": {"name": ADD["name"], "description": ADD["description"],
                                             "parameters": ADD["input_schema"]}}


@pytest.fixture(scope="module")
def server(model_dir):
    """One server for the module: keyed (the SDK sends x-api-key), with the Hermes parser (tool_choice auto)."""
    with running_servers(ServerProcess(model_dir, "--api-keys", KEY, "--tool-call-parser", "hermes")) as (proc,):
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60) as api:
        yield api


def chat(server, **body) -> dict:
    """/v1/chat/completions' answer, keyed with the OpenAI clients' header."""
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": "micro", **body},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(client, **kwargs):
    """The message the SDK's stream helper accumulates from the events, and the events' types in order."""
    with client.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        return stream.get_final_message(), kinds


def without_ids(message) -> dict:
    dumped = message.model_dump()
    dumped.pop("id")
    for block in dumped["content"]:
        block.pop("id", None)
    return dumped


def test_text_streamed_equals_whole_equals_chat(client, server):
    system = "Answer in code."
    message = client.messages.create(model="micro", max_tokens=12, system=system, messages=ASK, **GREEDY)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "micro" and message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert [block.type for block in message.content] == ["text"] and message.content[0].text
    assert message.usage.output_tokens == 12

    final, kinds = streamed(client, model="micro", max_tokens=12, system=system, messages=ASK, **GREEDY)
    assert without_ids(final) == without_ids(message)
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"], kinds
    assert kinds[-2:] == ["message_delta", "message_stop"] and kinds.count("content_block_stop") == 1

    answer = chat(server, messages=[{"role": "system", "content": system}, *ASK], max_tokens=12, temperature=0,
                  ignore_eos=True)
    assert answer["choices"][0]["message"]["content"] == message.content[0].text
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (
        message.usage.input_tokens, message.usage.output_tokens)


def test_system_prompt_as_string_or_text_blocks_and_count_tokens(client):
    plain = client.messages.create(model="micro", max_tokens=6, messages=ASK, **GREEDY)
    with_string = client.messages.create(model="micro", max_tokens=6, system="Be brief.", messages=ASK, **GREEDY)
    with_blocks = client.messages.create(model="micro", max_tokens=6, messages=ASK, **GREEDY,
                                         system=[{"type": "text", "text": "Be brief.",
                                                  "cache_control": {"type": "ephemeral"}}])
    assert with_string.usage.input_tokens > plain.usage.input_tokens  # the system prompt is rendered
    assert without_ids(with_blocks) == without_ids(with_string)
    for message, system in ((plain, None), (with_string, "Be brief.")):
        counted = client.messages.count_tokens(model="micro", messages=ASK,
                                               **({"system": system} if system else {}))
        assert counted.input_tokens == message.usage.input_tokens


def test_end_turn_when_the_model_ends_its_answer(client, tokenizer):
    # EOS forced first: the answer ends on its own, with no text
    forced = {"temperature": 0, "logit_bias": {str(tokenizer.eos_token_id): 100}}
    message = client.messages.create(model="micro", max_tokens=8, messages=ASK, extra_body=forced)
    assert (message.stop_reason, message.stop_sequence, message.content) == ("end_turn", None, [])
    final, _ = streamed(client, model="micro", max_tokens=8, messages=ASK, extra_body=forced)
    assert without_ids(final) == without_ids(message)


def test_stop_sequences_name_the_one_matched(client):
    free = client.messages.create(model="micro", max_tokens=24, messages=ASK, **GREEDY).content[0].text
    stop = free[5:8]
    expected = free[: free.find(stop)]
    kwargs = dict(model="micro", max_tokens=24, messages=ASK, stop_sequences=["\x00never", stop], **GREEDY)
    message = client.messages.create(**kwargs)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert "".join(block.text for block in message.content) == expected
    final, _ = streamed(client, **kwargs)
    assert without_ids(final) == without_ids(message)


def test_tool_use_round_trip(client, server):
    ask = [{"role": "user", "content": "What is 2 + 3?"}]
    kwargs = dict(model="micro", max_tokens=160, messages=ask, tools=[ADD], extra_body={"temperature": 0})
    for choice in ({"type": "tool", "name": "add"}, {"type": "any", "disable_parallel_tool_use": True}):
        message = client.messages.create(**kwargs, tool_choice=choice)
        assert message.stop_reason == "tool_use" and message.stop_sequence is None, message
        (call,) = [block for block in message.content if block.type == "tool_use"]
        assert call.id.startswith("toolu_") and call.name == "add"
        assert set(call.input) == {"a", "b"} and 0 <= call.input["a"] <= 99 and -9 <= call.input["b"] <= 9
        final, kinds = streamed(client, **kwargs, tool_choice=choice)
        assert without_ids(final) == without_ids(message) and "input_json" in kinds

    # The result sent back: rendered as chat renders the same history (assistant tool_calls, then a tool message).
    history = [*ask, {"role": "assistant", "content": [call.model_dump(exclude_none=True)]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": [{"type": "text", "text": "5"}]},
                                            {"type": "text", "text": "Thanks."}]}]
    answer = client.messages.create(model="micro", max_tokens=8, messages=history, tools=[ADD],
                                    tool_choice={"type": "none"}, **GREEDY)
    assert answer.stop_reason == "max_tokens" and answer.content[0].type == "text"
    final, _ = streamed(client, model="micro", max_tokens=8, messages=history, tools=[ADD],
                        tool_choice={"type": "none"}, **GREEDY)
    assert without_ids(final) == without_ids(answer)
    openai_history = [*ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "add", "arguments": json.dumps(
            call.input)}}]}, {"role": "tool", "tool_call_id": call.id, "content": "5"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks."}]}]
    same = chat(server, messages=openai_history, tools=[ADD_CHAT], tool_choice="none", max_tokens=8, temperature=0,
                ignore_eos=True)
    assert same["choices"][0]["message"]["content"] == answer.content[0].text
    assert same["usage"]["prompt_tokens"] == answer.usage.input_tokens
    counted = client.messages.count_tokens(model="micro", messages=history, tools=[ADD], tool_choice={"type": "none"})
    assert counted.input_tokens == answer.usage.input_tokens

    # tool_choice auto (the default with tools) runs on the server's parser: the micro model writes text
    auto = client.messages.create(model="micro", max_tokens=6, messages=ask, tools=[ADD], **GREEDY)
    assert auto.stop_reason == "max_tokens" and [block.type for block in auto.content] == ["text"]


def test_a_final_assistant_message_is_continued(client, server):
    prefill = [*ASK, {"role": "assistant", "content": "    return"}]
    message = client.messages.create(model="micro", max_tokens=6, messages=prefill, **GREEDY)
    same = chat(server, messages=prefill, max_tokens=6, temperature=0, ignore_eos=True,
                add_generation_prompt=False, continue_final_message=True)
    assert message.content[0].text == same["choices"][0]["message"]["content"]


def test_errors_are_the_sdks_exceptions_with_anthropics_body(client, server):
    refused = [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "image"),
        ({"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hm",
                                                          "signature": "x"}]}]}, "thinking"),
        ({"messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"messages": ASK, "extra_body": {"temperature": 1.5}}, "temperature"),
        ({"messages": ASK, "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
         "output_config.format"),
        ({"messages": ASK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search"),
        ({"messages": ASK, "extra_body": {"stop": ["x"]}}, "stop_sequences"),
    ]
    for kwargs, named in refused:
        with pytest.raises(anthropic.BadRequestError) as bad:
            client.messages.create(model="micro", max_tokens=4, **kwargs)
        assert bad.value.status_code == 400 and bad.value.body["type"] == "error", kwargs
        assert bad.value.body["error"]["type"] == "invalid_request_error" and named in bad.value.body["error"]["message"]

    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=ASK)
    assert missing.value.body["error"]["type"] == "not_found_error" and "claude-sonnet-4-5" in str(missing.value)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-sonnet-4-5", messages=ASK)

    with anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0) as stranger, \
            pytest.raises(anthropic.AuthenticationError) as denied:
        stranger.messages.create(model="micro", max_tokens=4, messages=ASK)
    assert denied.value.body == {"type": "error", "error": {"type": "authentication_error", "message": (
        "missing or invalid API key: send `x-api-key: <key>` or `Authorization: Bearer <key>`")}}

    # a body FastAPI refuses before the route runs, and one without the key: Anthropic's body too
    no_max = httpx.post(server.url + "/v1/messages", json={"model": "micro", "messages": ASK},
                        headers={"x-api-key": KEY})
    assert no_max.status_code == 400 and no_max.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in no_max.json()["error"]["message"]
    no_key = httpx.post(server.url + "/v1/messages", json={"model": "micro", "messages": ASK})
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    # the OpenAI routes keep OpenAI's body, and their header
    openai_route = httpx.post(server.url + "/v1/chat/completions", json={"model": "micro", "messages": ASK})
    assert openai_route.status_code == 401 and openai_route.json()["error"]["code"] == "invalid_api_key"

    # and the server keeps serving, with the key in either header
    assert client.messages.create(model="micro", max_tokens=2, messages=ASK).usage.output_tokens <= 2
    bearer = httpx.post(server.url + "/v1/messages", json={"model": "micro", "max_tokens": 2, "messages": ASK},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert bearer.status_code == 200 and bearer.json()["type"] == "message"
