"""Requests a fuzzer of the HTTP routes sent where the server broke its contract (a 500, a 200 that did not keep
to what was asked, a 400 showing a form the route refuses); each now answered as the rest of its kind. Every test failed
before its fix. In-process app on the random micro model."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.anyio

PROMPT = {"model": "micro", "prompt": "Hello", "max_tokens": 3}
CHAT = {"model": "micro", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 3}


def _nested_enum(depth: int) -> str:
    """A schema's JSON text whose enum holds lists nested ``depth`` deep."""
    return '{"enum": [' + "[" * depth + "]" * depth + "]}"


def _post(client, path: str, body: dict):
    # json.dumps writes NaN and Infinity as Python's json (and so FastAPI) reads them, as a careless client sends them
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {**PROMPT, "guided_json": _nested_enum(2000)}, "guided_json"),
    ("/v1/completions", {**PROMPT, "structured_outputs": {"json": _nested_enum(2000)}}, "structured_outputs.json"),
])
async def test_a_schema_sent_as_deeply_nested_json_text_is_a_400(open_app, path, body, param):
    # The body's own nesting is capped before it is read, but a schema sent as a string was json.loads'ed as it came:
    # past Python's recursion limit that raised RecursionError, answered 500 "internal error".
    async with open_app() as client:
        error = _error(await _post(client, path, body))
        assert error["param"] == param
        assert "nested deeper than" in error["message"]
        # Nested as deep as the body itself may be, it is read as before
        assert (await _post(client, path, {**body, **_as_shallow(body)})).status_code == 200


def _as_shallow(body: dict) -> dict:
    shallow = _nested_enum(3)
    if "guided_json" in body:
        return {"guided_json": shallow}
    return {"structured_outputs": {"json": shallow}}


@pytest.mark.parametrize(("field", "schema_at", "param"), [
    ("structured_outputs", lambda s: {"json": s}, "structured_outputs.json.enum[0]"),
    ("response_format", lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}},
     "response_format.json_schema.schema.enum[0]"),
    ("guided_json", lambda s: s, "guided_json.enum[0]"),
])
async def test_a_schema_holding_nan_is_refused_naming_the_number(open_app, field, schema_at, param):
    # Python's json reads NaN, llguidance wrote it as null: enum [NaN] held the text to `null`, answered 200 with an
    # output no such schema admits.
    async with open_app() as client:
        error = _error(await _post(client, "/v1/completions", {**PROMPT, field: schema_at({"enum": [float("nan")]})}))
        assert error["param"] == param
        assert "nan is no JSON number" in error["message"]


async def test_an_infinite_bound_in_a_tools_schema_is_refused_naming_it(open_app):
    # An infinite minimum failed inside llguidance as "Expected f64 for 'minimum', got null": a null the client never
    # sent, named as the whole parameters.
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "number", "minimum": float("-inf")}}}}}
    async with open_app() as client:
        error = _error(await _post(client, "/v1/chat/completions", {**CHAT, "tools": [tool], "tool_choice": "required"}))
    assert error["param"] == "tools[0].function.parameters.properties.a.minimum"
    assert "-inf is no JSON number" in error["message"]


async def test_a_responses_named_tool_choice_without_tools_is_shown_in_the_responses_form(open_app):
    # The chat handler's refusal echoed the choice as chat writes it ({"type": "function", "function": {"name": ...}}),
    # a shape the Responses API refuses: the client was shown a form it must not send.
    async with open_app() as client:
        error = _error(await _post(client, "/v1/responses", {
            "model": "micro", "input": "hi", "max_output_tokens": 2,
            "tool_choice": {"type": "function", "name": 'get_"weather"'}}))
    assert error["param"] == "tool_choice"
    assert error["message"] == 'tool_choice: {"type": "function", "name": "get_\\"weather\\""} needs tools to call; got none'


@pytest.mark.parametrize("stream", [False, True])
async def test_a_grammar_past_llguidances_limits_while_generating_fails_the_request_not_the_text(open_app, stream):
    """A regex that compiles but needs more of llguidance's lexer than it allows: its matcher failed at the first
    step and then let EOS alone through, a 200 with "" and finish_reason "stop", which the regex does not admit. The
    request fails (400 naming the field; a stream's error event) and the server goes on serving."""
    body = {**PROMPT, "max_tokens": 8, "structured_outputs": {"regex": "(a{1000}){1000}"}, "stream": stream}
    async with open_app() as client:
        response = await _post(client, "/v1/completions", body)
        if stream:
            assert response.status_code == 200
            events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
        else:
            error = _error(response)
        assert error["code"] == "invalid_grammar" and error["param"] == "structured_outputs.regex", error
        assert error["type"] == "invalid_request_error"
        assert "failed while generating" in error["message"]
        fine = await _post(client, "/v1/completions", {**PROMPT, "structured_outputs": {"regex": "a{3}"}})
        assert fine.status_code == 200 and fine.json()["choices"][0]["text"] == "aaa", fine.text
