"""Chat requests as OpenAI and vLLM read them, before the engine: a tool's parameters are a schema object, a
tool_choice needs tools, an assistant history's refusal parts and argument-less calls reach the template as vLLM
passes them. Every test failed before its fix. In-process app on the random micro model."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": "micro", "messages": USER, "max_tokens": 2}
OBJECT = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _error(response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error


async def test_tool_parameters_sent_as_json_text_are_refused_naming_them(open_app):
    # Accepted before: the grammar read the text as a schema, but the chat template was given the string itself (a
    # template's `tools | tojson` showed the model an escaped string). OpenAI and vLLM take an object only.
    tools = [{"type": "function", "function": {"name": "g", "parameters": OBJECT}},
             {"type": "function", "function": {"name": "f", "parameters": json.dumps(OBJECT)}}]
    async with open_app() as client:
        for choice in ("required", "none", {"type": "function", "function": {"name": "g"}}):
            error = _error(await client.post("/v1/chat/completions", json={**CHAT, "tools": tools,
                                                                             "tool_choice": choice}),
                           "tools[1].function.parameters")
            assert "not its JSON text" in error["message"]
        _error(await client.post("/tokenize", json={"messages": USER, "tools": tools, "tool_choice": "none"}),
               "tools[1].function.parameters")
        ok = {**CHAT, "tools": tools[:1], "tool_choice": "required"}
        assert (await client.post("/v1/chat/completions", json=ok)).status_code == 200


async def test_a_tool_choice_without_tools_is_refused_but_none(open_app):
    # OpenAI's "tool_choice is only allowed when tools are specified" (vLLM's "When using `tool_choice`, `tools` must
    # be set"): "auto" without tools was answered as plain text, silently.
    named = {"type": "function", "function": {"name": "f"}}
    async with open_app() as client:
        for choice in ("auto", "required", named):
            for tools in ({}, {"tools": []}):
                body = {**CHAT, **tools, "tool_choice": choice}
                error = _error(await client.post("/v1/chat/completions", json=body), "tool_choice")
                assert "only allowed when tools are specified" in error["message"]
                _error(await client.post("/tokenize", json={"messages": USER, **tools, "tool_choice": choice}),
                       "tool_choice")
        for extra in ({"tool_choice": "none"}, {"tool_choice": "none", "tools": []}, {}):
            assert (await client.post("/v1/chat/completions", json={**CHAT, **extra})).status_code == 200, extra


async def test_an_assistant_history_reaches_the_template_as_vllm_passes_it(open_app):
    async with open_app() as client:
        async def ids(messages) -> list[int]:
            r = await client.post("/tokenize", json={"messages": messages})
            assert r.status_code == 200, r.text
            return r.json()["tokens"]

        # OpenAI's assistant content holds refusal parts (a history sent back holds them): vLLM reads their text, as
        # a text part's. They were refused as an unsupported content type.
        said = [{"type": "text", "text": "Well."}, {"type": "refusal", "refusal": "I cannot help with that."}]
        as_parts = [*USER, {"role": "assistant", "content": said}, {"role": "user", "content": "ok"}]
        as_text = [*USER, {"role": "assistant", "content": "Well.\nI cannot help with that."},
                   {"role": "user", "content": "ok"}]
        assert await ids(as_parts) == await ids(as_text)
        r = await client.post("/v1/chat/completions", json={**CHAT, "messages": as_parts})
        assert r.status_code == 200, r.text
        # Only an assistant's, and with its text
        refused = [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]
        _error(await client.post("/v1/chat/completions", json={**CHAT, "messages": refused}),
               "messages[0].content[0].type")
        empty = [*USER, {"role": "assistant", "content": [{"type": "refusal"}]}, {"role": "user", "content": "ok"}]
        _error(await client.post("/v1/chat/completions", json={**CHAT, "messages": empty}),
               "messages[1].content[0].refusal")

        # A call without arguments (""): vLLM gives the template {}; it was the string "", which a template writes as
        # `"arguments": ""` (or fails on, iterating it as an object).
        def called(arguments: str) -> list[dict]:
            return [*USER, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "pong"}]

        assert await ids(called("")) == await ids(called("{}"))
        # Text that is no JSON (a call a model cut short): {} too, as vLLM reads it (it was the string itself, which
        # a template writes escaped or fails iterating); the chat and Responses routes answer the conversation.
        assert await ids(called('{"city": 1}')) != await ids(called("{}"))
        for text in ("{oops", '{"city": "Par', " "):
            assert await ids(called(text)) == await ids(called("{}")), text
        r = await client.post("/v1/chat/completions", json={**CHAT, "messages": called("{oops")})
        assert r.status_code == 200, r.text
        items = [{"role": "user", "content": "hi"},
                 {"type": "function_call", "call_id": "call_1", "name": "ping", "arguments": "{oops"},
                 {"type": "function_call_output", "call_id": "call_1", "output": "pong"}]
        r = await client.post("/v1/responses", json={"model": "micro", "input": items, "max_output_tokens": 2})
        assert r.status_code == 200, r.text
