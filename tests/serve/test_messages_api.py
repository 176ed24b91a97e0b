"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) driven by the official ``anthropic`` SDK,
unchanged, against a real ``python -m retnet.serve`` (uvicorn) process: the SDK's own types read the answers, its
stream helper accumulates the events, and its exception classes are chosen by the status codes. The answers are
checked against /v1/chat/completions for the same conversation (the route they are translated onto)."""

from __future__ import annotations

import asyncio
import json
import random

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


def prompt_tokens(usage) -> int:
    """A Message's prompt tokens: Anthropic's ``input_tokens`` leave out those read from a cache (and written to one),
    and the server's prefix cache holds the prompts of this module's earlier requests."""
    usage = usage if isinstance(usage, dict) else usage.model_dump()
    return usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]


def without_ids(message) -> dict:
    """The message without its ids, its usage as its prompt's and its answer's tokens (how many of the prompt's
    the prefix cache held differs between requests)."""
    dumped = message.model_dump()
    dumped.pop("id")
    for block in dumped["content"]:
        block.pop("id", None)
    dumped["usage"] = (prompt_tokens(dumped["usage"]), dumped["usage"]["output_tokens"])
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
        prompt_tokens(message.usage), message.usage.output_tokens)


def test_system_prompt_as_string_or_text_blocks_and_count_tokens(client):
    plain = client.messages.create(model="micro", max_tokens=6, messages=ASK, **GREEDY)
    with_string = client.messages.create(model="micro", max_tokens=6, system="Be brief.", messages=ASK, **GREEDY)
    with_blocks = client.messages.create(model="micro", max_tokens=6, messages=ASK, **GREEDY,
                                         system=[{"type": "text", "text": "Be brief.",
                                                  "cache_control": {"type": "ephemeral"}}])
    assert prompt_tokens(with_string.usage) > prompt_tokens(plain.usage)  # the system prompt is rendered
    assert without_ids(with_blocks) == without_ids(with_string)
    for message, system in ((plain, None), (with_string, "Be brief.")):
        counted = client.messages.count_tokens(model="micro", messages=ASK,
                                               **({"system": system} if system else {}))
        assert counted.input_tokens == prompt_tokens(message.usage)


def test_prompt_tokens_read_from_the_prefix_cache_are_cache_read_input_tokens(client, server):
    """A prompt the server has not seen is all input_tokens; the same prompt again is read from the prefix cache,
    which Anthropic's usage counts apart (``cache_read_input_tokens``; input_tokens the rest), streamed too, in
    message_start as in message_delta. count_tokens counts the whole prompt, as Anthropic's does."""
    ask = [{"role": "user", "content": f"def unseen_{random.randrange(10**9)}(a, b):"}]
    counted = client.messages.count_tokens(model="micro", messages=ask).input_tokens
    first = client.messages.create(model="micro", max_tokens=2, messages=ask, **GREEDY).usage
    assert (first.input_tokens, first.cache_read_input_tokens, first.cache_creation_input_tokens) == (counted, 0, 0)
    again = client.messages.create(model="micro", max_tokens=2, messages=ask, **GREEDY).usage
    assert again.cache_read_input_tokens > 0 and again.cache_creation_input_tokens == 0
    assert again.input_tokens + again.cache_read_input_tokens == counted
    events = raw_events(server, {"model": "micro", "max_tokens": 2, "messages": ask, **GREEDY["extra_body"]})
    start, delta = events[0]["message"]["usage"], events[-2]["usage"]
    assert start["cache_read_input_tokens"] > 0 and start == delta | {"output_tokens": 0}, events
    assert prompt_tokens(start) == counted
    final, _ = streamed(client, model="micro", max_tokens=2, messages=ask, **GREEDY)
    assert final.usage.cache_read_input_tokens > 0 and prompt_tokens(final.usage) == counted


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
    assert same["usage"]["prompt_tokens"] == prompt_tokens(answer.usage)
    counted = client.messages.count_tokens(model="micro", messages=history, tools=[ADD], tool_choice={"type": "none"})
    assert counted.input_tokens == prompt_tokens(answer.usage)

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


# ----------------------------------------------------------------------------------------------------------
# Randomised differential checks, and the regressions they and the review found
# ----------------------------------------------------------------------------------------------------------
WORDS = ["def", "add", "(a,", "b):", "return", "class", "Stack", "self.items", "for", "i", "in", "range(10)",
         "Hello", "world!", "café", "東京", "🙂", "\n   ", "retention", "state"]


def random_conversation(draw) -> tuple[dict, list]:
    """A Messages request's conversation fields (system as a string or blocks, multi-turn, several text blocks,
    tool_use / tool_result histories, a prefill) and the same conversation as chat's messages."""
    def text() -> str:
        return " ".join(draw.choice(WORDS) for _ in range(draw.randint(1, 6)))

    def blocks() -> list:
        return [{"type": "text", "text": text()} for _ in range(draw.randint(1, 3))]

    fields, chat_messages, messages = {}, [], []
    if draw.random() < 0.5:
        system = text() if draw.random() < 0.5 else blocks()
        fields["system"] = system
        chat_messages.append({"role": "system", "content": system if isinstance(system, str) else [
            {"type": "text", "text": block["text"]} for block in system]})
    for turn in range(draw.randint(0, 2)):
        ask = text() if draw.random() < 0.5 else blocks()
        messages.append({"role": "user", "content": ask})
        chat_messages.append({"role": "user", "content": ask})
        if draw.random() < 0.4:
            call_id, arguments = f"toolu_{turn}", {"a": draw.randint(0, 9), "b": draw.randint(0, 9)}
            messages += [{"role": "assistant", "content": [{"type": "tool_use", "id": call_id, "name": "add",
                                                            "input": arguments}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id,
                                                       "content": str(sum(arguments.values())),
                                                       "is_error": turn == 1}]}]
            chat_messages += [{"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function",
                               "function": {"name": "add", "arguments": json.dumps(arguments)}}]},
                              {"role": "tool", "tool_call_id": call_id,
                               "content": ("Error: " if turn == 1 else "") + str(sum(arguments.values()))}]
        else:
            answer = text() if draw.random() < 0.5 else blocks()
            messages.append({"role": "assistant", "content": answer})
            chat_messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": text()})
    chat_messages.append({"role": "user", "content": messages[-1]["content"]})
    prefill = draw.random() < 0.3
    if prefill:
        messages.append({"role": "assistant", "content": "    return"})
        chat_messages.append(messages[-1])
    return {**fields, "messages": messages}, [chat_messages, prefill]


def raw_events(server, body) -> list[dict]:
    """The SSE stream's events, each checked to carry its type as the SSE event name."""
    events = []
    with httpx.stream("POST", server.url + "/v1/messages", json={**body, "stream": True},
                      headers={"x-api-key": KEY}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                assert events[-1]["type"] == name, (name, events[-1])
    return events


def well_formed(events) -> str:
    """The streamed text, after checking the events' order: message_start, ping, blocks indexed from 0, each
    started, filled and stopped before the next, one message_delta, message_stop."""
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"], kinds
    open_index, count, text = None, 0, ""
    for event in events[2:-2]:
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == count, kinds
            open_index, count = event["index"], count + 1
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index, kinds
            text += event["delta"].get("text", "")
        else:
            assert event["type"] == "content_block_stop" and event["index"] == open_index, kinds
            open_index = None
    assert open_index is None, kinds
    return text


def test_random_conversations_match_chat_streamed_and_counted(client, server):
    draw = random.Random(7)
    for case in range(6):
        fields, (chat_messages, prefill) = random_conversation(draw)
        max_tokens = draw.randint(1, 16)
        sampling = {"temperature": 0, "ignore_eos": draw.random() < 0.5} if case % 2 else {
            "temperature": 0.8, "seed": case, "top_k": 20}
        openai = {"messages": chat_messages, "max_tokens": max_tokens, **sampling,
                  "add_generation_prompt": not prefill, "continue_final_message": prefill}
        free = chat(server, **openai)["choices"][0]["message"]["content"]
        # Stop sequences cut from the free answer: spanning tokens, sharing prefixes, overlapping
        stops = sorted({free[i : i + draw.randint(1, 3)] for i in draw.sample(range(len(free)), min(3, len(free)))}
                       ) if case % 3 and len(free) > 1 else []
        body = {"model": "micro", "max_tokens": max_tokens, **fields, **sampling,
                **({"stop_sequences": stops} if stops else {})}
        response = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)
        assert response.status_code == 200, response.text
        message = response.json()
        text = "".join(block["text"] for block in message["content"])
        same = chat(server, **openai, **({"stop": stops} if stops else {}))
        context = (case, stops, free, message)
        assert prompt_tokens(message["usage"]) == same["usage"]["prompt_tokens"], context
        if message["stop_sequence"] is not None:
            # the stop that ends first in the free answer (the longest of those ending there), cut
            first = min((free.index(stop) + len(stop), -len(stop), stop) for stop in stops if stop in free)
            assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", first[2]), context
            assert free.startswith(text + first[2]) and len(text + first[2]) == first[0], context
        else:
            reason = {"length": "max_tokens", "stop": "end_turn"}[same["choices"][0]["finish_reason"]]
            assert (text, message["stop_reason"]) == (same["choices"][0]["message"]["content"], reason), context
            assert message["usage"]["output_tokens"] == same["usage"]["completion_tokens"], context

        events = raw_events(server, body)
        assert well_formed(events) == text, context
        assert events[-2]["delta"] == {"stop_reason": message["stop_reason"],
                                       "stop_sequence": message["stop_sequence"]}, context
        # message_start's usage is the prompt's final counts (sent once the engine has taken the request in)
        assert events[-2]["usage"] == events[0]["message"]["usage"] | {
            "output_tokens": message["usage"]["output_tokens"]}, context
        assert prompt_tokens(events[-2]["usage"]) == prompt_tokens(message["usage"]), context
        counted = client.messages.count_tokens(model="micro", **fields)
        assert counted.input_tokens == prompt_tokens(message["usage"]), context


def test_concurrent_streams_and_a_client_that_leaves_mid_stream(server):
    async def text_of(http, body, stream):
        if not stream:
            message = (await http.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY})).json()
            return "".join(block["text"] for block in message["content"])
        text = ""
        async with http.stream("POST", server.url + "/v1/messages", json={**body, "stream": True},
                               headers={"x-api-key": KEY}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"text_delta"' in line:
                    text += json.loads(line.removeprefix("data: "))["delta"]["text"]
        return text

    def metric(name: str) -> float:
        lines = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text.splitlines()
        return float(next(line.split()[-1] for line in lines if line.startswith(name + " ")))

    async def run():
        async with httpx.AsyncClient(timeout=60) as http:
            bodies = [{"model": "micro", "max_tokens": 12 + i, "temperature": 0, "ignore_eos": True,
                       "messages": [{"role": "user", "content": f"question {i}"}],
                       "stop_sequences": ["an", "\n"] if i % 2 else []} for i in range(6)]
            streamed_texts = await asyncio.gather(*(text_of(http, body, True) for body in bodies))
            assert streamed_texts == [await text_of(http, body, False) for body in bodies]

            cancelled = metric("retnet_sequences_cancelled_total")
            left = {"model": "micro", "max_tokens": 4000, "ignore_eos": True, "messages": ASK, "stream": True}
            async with http.stream("POST", server.url + "/v1/messages", json=left,
                                   headers={"x-api-key": KEY}) as response:
                async for line in response.aiter_lines():
                    if "text_delta" in line:
                        break  # the client leaves mid-stream: its engine work is cancelled
            for _ in range(100):
                if metric("retnet_sequences_cancelled_total") > cancelled and not metric("retnet_running_sequences"):
                    break
                await asyncio.sleep(0.05)
            assert metric("retnet_sequences_cancelled_total") == cancelled + 1
            assert metric("retnet_running_sequences") == 0

    asyncio.run(run())


def test_an_empty_system_prompt_is_none(client):
    plain = client.messages.count_tokens(model="micro", messages=ASK).input_tokens
    for system in ("", []):
        assert client.messages.count_tokens(model="micro", messages=ASK, system=system).input_tokens == plain
        answer = client.messages.create(model="micro", max_tokens=2, messages=ASK, system=system, **GREEDY)
        assert prompt_tokens(answer.usage) == plain


def test_tools_without_tool_choice_need_the_parser_said_in_this_apis_terms():
    from retnet.serve.messages import MessagesRequest, to_chat_body
    from retnet.serve.protocol import APIError

    # Tools without tool_choice are tool_choice auto: without the server's parser, refused in this API's terms
    request = MessagesRequest.model_validate({"model": "micro", "max_tokens": 4, "messages": ASK, "tools": [ADD]})
    with pytest.raises(APIError) as refused:
        to_chat_body(request, None)
    assert refused.value.param == "tool_choice" and '{"type": "any"}' in refused.value.message
    assert "required" not in refused.value.message


def test_an_output_config_that_is_not_an_object_is_refused_by_its_name():
    from retnet.serve.messages import MessagesRequest, to_chat_body
    from retnet.serve.protocol import APIError

    # [] was read as no settings, and "x" refused as if it were a format
    for value in ([], "x", 3, "", False):
        request = MessagesRequest.model_validate({"model": "micro", "max_tokens": 4, "messages": ASK,
                                                  "output_config": value})
        with pytest.raises(APIError) as refused:
            to_chat_body(request, None)
        assert (refused.value.status, refused.value.param) == (400, "output_config"), value
        assert refused.value.message.startswith("output_config must be an object")
    for value in (None, {}, {"effort": None}):
        request = MessagesRequest.model_validate({"model": "micro", "max_tokens": 4, "messages": ASK,
                                                  "output_config": value})
        assert to_chat_body(request, None)[0]["reasoning_effort"] is None


def test_a_prefill_with_automatic_tool_use_is_refused_naming_the_message(client):
    # chat's own refusal would name continue_final_message, which this client never sent
    prefill = [*ASK, {"role": "assistant", "content": "    return"}]
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="micro", max_tokens=4, messages=prefill, tools=[ADD])
    message = bad.value.body["error"]["message"]
    assert message.startswith("messages[1]: ") and "prefill" in message and "continue_final_message" not in message
    assert client.messages.count_tokens(model="micro", messages=prefill, tools=[ADD]).input_tokens > 0


def test_tool_choice_any_or_tool_without_tools_is_refused_in_this_apis_terms(client):
    for choice in ({"type": "any"}, {"type": "tool", "name": "add"}):
        with pytest.raises(anthropic.BadRequestError) as bad:
            client.messages.create(model="micro", max_tokens=4, messages=ASK, tool_choice=choice)
        assert bad.value.body["error"]["message"] == f"tool_choice: {choice['type']!r} needs tools to call; got none"


def test_disable_parallel_tool_use_must_be_a_boolean(client):
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="micro", max_tokens=4, messages=ASK, tools=[ADD],
                               tool_choice={"type": "any", "disable_parallel_tool_use": "yes"})
    assert "disable_parallel_tool_use" in bad.value.body["error"]["message"]


def test_calls_cut_short_by_max_tokens_stop_for_max_tokens():
    from retnet.serve.messages import _ending

    assert _ending("length", None, True) == ("max_tokens", None)
    assert _ending("tool_calls", None, True) == ("tool_use", None)


def test_unserved_messages_routes_answer_anthropics_404(client, server):
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.batches.list()
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    # the OpenAI routes keep their body
    response = httpx.get(server.url + "/v1/models/none", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and "type" not in response.json()


# ----------------------------------------------------------------------------------------------------------
# Consecutive messages of one role: one turn, as Anthropic combines them
# ----------------------------------------------------------------------------------------------------------
def text_blocks(*texts: str) -> list[dict]:
    return [{"type": "text", "text": text} for text in texts]


CALL = {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2, "b": 3}}
CHAT_CALL = {"id": "toolu_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
# A history split over consecutive messages of each role: strings and blocks, text and calls, results and text
SPLIT_HISTORY = [
    {"role": "user", "content": "What is 2 + 3?"}, {"role": "user", "content": text_blocks("Use the tool.")},
    {"role": "assistant", "content": "Let me add."}, {"role": "assistant", "content": [CALL]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "5"}]},
    {"role": "user", "content": "Thanks."}, {"role": "user", "content": text_blocks("Again?")},
]
# The same as chat's messages: one message a turn, the merged texts as parts (which chat joins with newlines)
SPLIT_HISTORY_CHAT = [
    {"role": "user", "content": text_blocks("What is 2 + 3?", "Use the tool.")},
    {"role": "assistant", "content": text_blocks("Let me add."), "tool_calls": [CHAT_CALL]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": "5"},
    {"role": "user", "content": text_blocks("Thanks.", "Again?")},
]


def test_consecutive_messages_of_one_role_are_one_chat_message():
    from retnet.serve.messages import MessagesRequest, to_chat_body
    from retnet.serve.protocol import APIError

    def translated(messages, **fields):
        request = MessagesRequest.model_validate({"model": "micro", "max_tokens": 4, "messages": messages, **fields})
        return to_chat_body(request, "hermes")

    body, origins = translated(SPLIT_HISTORY, tools=[ADD], tool_choice={"type": "none"})
    assert body["messages"] == SPLIT_HISTORY_CHAT and body["add_generation_prompt"]
    assert origins == ["messages[0..1]", "messages[2..3]", "messages[4].content[0]", "messages[5..6]"]

    # a tool_result after a user's text: the text first, then the tool message, as within one message
    body, origins = translated([{"role": "user", "content": "a"}, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "5"}, {"type": "text", "text": "b"}]}])
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", text_blocks("a")), ("tool", "5"), ("user", text_blocks("b"))]
    assert origins == ["messages[0]", "messages[1].content[0]", "messages[1]"]

    # a prefill split over assistant messages is one final assistant message, continued
    body, origins = translated([*ASK, {"role": "assistant", "content": "    return"},
                                {"role": "assistant", "content": text_blocks(" a")}])
    assert body["messages"][-1] == {"role": "assistant", "content": text_blocks("    return", " a")}
    assert body["continue_final_message"] and not body["add_generation_prompt"] and origins[-1] == "messages[1..2]"

    # a block refused in a merged turn is named by the message it was sent in
    with pytest.raises(APIError) as refused:
        translated([*ASK, {"role": "user", "content": [{"type": "image", "source": {}}]}])
    assert refused.value.param == "messages[1].content[0].type"


def test_consecutive_messages_are_answered_and_counted_as_one_turn(client, server):
    split = [{"role": "user", "content": "def add(a, b):"}, {"role": "user", "content": text_blocks("Be brief.")},
             {"role": "assistant", "content": "    return"}, {"role": "assistant", "content": text_blocks(" a")}]
    joined = [{"role": "user", "content": text_blocks("def add(a, b):", "Be brief.")},
              {"role": "assistant", "content": text_blocks("    return", " a")}]
    message = client.messages.create(model="micro", max_tokens=6, messages=split, **GREEDY)
    assert without_ids(message) == without_ids(client.messages.create(model="micro", max_tokens=6, messages=joined,
                                                                      **GREEDY))
    # chat's answer for one user turn and the prefill continued, their texts joined as one message's blocks
    same = chat(server, messages=[{"role": "user", "content": "def add(a, b):\nBe brief."},
                                  {"role": "assistant", "content": "    return\n a"}],
                max_tokens=6, temperature=0, ignore_eos=True, add_generation_prompt=False, continue_final_message=True)
    assert same["choices"][0]["message"]["content"] == message.content[0].text
    assert same["usage"]["prompt_tokens"] == prompt_tokens(message.usage)
    assert client.messages.count_tokens(model="micro", messages=split).input_tokens == prompt_tokens(message.usage)

    # a tool history split over consecutive messages: counted as chat's one-message-a-turn history
    tools = {"tools": [ADD], "tool_choice": {"type": "none"}}
    counted = client.messages.count_tokens(model="micro", messages=SPLIT_HISTORY, **tools).input_tokens
    answered = client.messages.create(model="micro", max_tokens=1, messages=SPLIT_HISTORY, **tools, **GREEDY)
    same = chat(server, messages=SPLIT_HISTORY_CHAT, tools=[ADD_CHAT], tool_choice="none", max_tokens=1)
    assert counted == prompt_tokens(answered.usage) == same["usage"]["prompt_tokens"]
