"""Structured output, tool calls, the Responses API and the other serving features, as real clients use them, where
the server once answered wrongly; each compared with what vLLM's OpenAI server (or OpenAI's API) answers. Every
test failed before its fix. Sampled at temperature 1 from the random micro model: what holds, holds because the
server makes it."""

from __future__ import annotations

import json

import pytest

CHAT = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def api(server):
    openai = pytest.importorskip("openai", reason="the openai client is in the [dev] extra")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


# No additionalProperties anywhere: vLLM's disable_additional_properties closes every object that lists properties.
OPEN_SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"},
    "inner": {"type": "object", "properties": {"properties": {"type": "boolean"}}, "required": ["properties"]},
}, "required": ["ok", "inner"]}


def _keys(text: str) -> tuple[list[str], list[str]] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return sorted(value), sorted(value["inner"])


def test_disable_additional_properties_keeps_every_object_to_its_properties(api):
    # It was read as one of structured_outputs' options and dropped: the objects took keys of the model's own.
    def keys(schema, **options):
        r = api.chat.completions.create(model="micro", messages=CHAT, max_tokens=60, temperature=1.0, seed=2, n=6,
                                        extra_body={"structured_outputs": {"json": schema, **options}})
        return [(choice.finish_reason, _keys(choice.message.content)) for choice in r.choices]

    closed = [("stop", (["inner", "ok"], ["properties"]))] * 6
    assert keys(OPEN_SCHEMA, disable_additional_properties=True) == closed
    assert keys(json.dumps(OPEN_SCHEMA), disable_additional_properties=True) == closed
    assert keys(OPEN_SCHEMA) != closed  # without it, the same requests' objects take other keys


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "ping"}}])
def test_a_tool_with_empty_parameters_is_called_with_an_object(api, tool_choice):
    # "parameters": {} was compiled as the schema {}, which admits any JSON: calls came back with arguments "[]",
    # "0E6..." (vLLM reads empty parameters as none: an object, as OpenAI's arguments always are).
    tool = {"type": "function", "function": {"name": "ping", "parameters": {}}}
    r = api.chat.completions.create(model="micro", messages=CHAT, tools=[tool], tool_choice=tool_choice,
                                    parallel_tool_calls=False, max_tokens=40, temperature=1.0, seed=1, n=8)
    calls = [choice.message.tool_calls for choice in r.choices if choice.finish_reason != "length"]
    assert len(calls) >= 3
    assert all(isinstance(json.loads(call.function.arguments), dict) for choice in calls for call in choice)


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is no JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("number", ["1e999", "-5E+7101066710", "1.50", "-0", "0.0000001", "7" * 5000])
def test_call_arguments_are_the_numbers_the_model_wrote(number):
    # Re-serialized through Python floats, 1e999 came back as Infinity (no JSON: JavaScript's JSON.parse refuses
    # it) and 1.50 as 1.5; an integer over Python's 4300 digits made the whole answer text, no calls.
    from retnet.serve.tool_parsers import HermesToolParser
    from retnet.serve.tools import ToolCalling

    written = f'{{"x": {number}, "y": [{number}]}}'  # json.dumps' spacing, as vLLM's
    required = ToolCalling([("f", None)], None, True)
    (call,) = required.calls(f'[{{"name":"f","parameters":{{"x":{number},"y":[{number}]}}}}]')
    assert call.function.arguments == written
    if len(number) < 100:
        assert _strict_json(call.function.arguments)
    named = ToolCalling([("f", None)], "f", True)
    (call,) = named.calls(f'{{"x":{number}}}')
    assert call.function.arguments == f'{{"x":{number}}}'
    content, (call,) = HermesToolParser(["f"]).parse(
        f'<tool_call>\n{{"name": "f", "arguments": {{"x": {number}, "y": [{number}]}}}}\n</tool_call>')
    assert content is None and call.function.arguments == written
    # A name is a string: the number 5 names no tool "5" (a number is kept as its text, a str).
    assert HermesToolParser(["5"]).parse('<tool_call>{"name": 5, "arguments": {}}</tool_call>')[1] == []
    assert ToolCalling([("5", None)], None, True).calls('[{"name":5,"parameters":{}}]') is None


def test_calls_json_cannot_hold_or_python_cannot_nest_are_text():
    # NaN/Infinity (json.loads takes them) would be arguments no JSON parser reads; arguments nested 600 levels
    # (a tool whose $defs chain that deep) raised RecursionError out of the re-serialization: a 500.
    from retnet.serve.tool_parsers import HermesToolParser
    from retnet.serve.tools import ToolCalling

    deep = '{"a": ' * 600 + "1" + "}" * 600
    for arguments in ('{"x": NaN}', '{"x": -Infinity}', deep):
        text = f'<tool_call>{{"name": "f", "arguments": {arguments}}}</tool_call>'
        content, calls = HermesToolParser(["f"]).parse(text)
        assert calls == [] and content == text
        assert ToolCalling([("f", None)], None, True).calls(f'[{{"name":"f","parameters":{arguments}}}]') is None


def test_disable_additional_properties_must_be_a_boolean():
    from retnet.serve.protocol import APIError
    from retnet.serve.structured import _structured_outputs

    with pytest.raises(APIError, match="disable_additional_properties must be a boolean"):
        _structured_outputs({"json": {"type": "object"}, "disable_additional_properties": "false"})


@pytest.mark.anyio
async def test_an_embedding_request_with_messages_is_refused_by_name(open_app):
    # vLLM's /v1/embeddings also takes a conversation (messages); here it was an unknown field: dropped beside an
    # input (the input's embedding answered as the conversation's), and alone a 400 that asked for input.
    async with open_app(convert="embed") as client:
        conversation = [{"role": "user", "content": "Hello!"}]
        for body in ({"input": "a", "messages": conversation}, {"messages": conversation}):
            r = await client.post("/v1/embeddings", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "messages"
            assert r.json()["error"]["code"] == "unsupported_parameter"
        assert (await client.post("/v1/embeddings", json={"input": "a", "messages": None})).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize(("field", "where"), [
    ('"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"x": '
     '{"type": "number", "maximum": 1e999}}}}], "tool_choice": "none"', "tools[0].parameters.properties.x.maximum"),
    ('"input": [{"role": "user", "content": "Hello!", "x": [NaN]}]', "input[0].x[0]"),
], ids=["tools", "input"])
@pytest.mark.parametrize("stream", ["false", "true"])
async def test_a_response_echoing_a_number_json_cannot_write_is_refused_naming_it(open_app, field, where, stream):
    # A request's tools and input items are echoed (the Response, input_items) as sent; a number past a double's
    # range (1e999, read as inf) or a NaN there made the answer a 500 after generating it, a stream's events
    # Infinity (no JSON), and the stored response one that GET could never return.
    async with open_app() as client:
        body = f'{{"input": "Hello!", "max_output_tokens": 2, "stream": {stream}, {field}}}'
        r = await client.post("/v1/responses", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == where and r.json()["error"]["code"] == "invalid_value"


@pytest.mark.anyio
@pytest.mark.parametrize(("tools", "where"), [
    ([5], "tools[0].type"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": 5}}], "tools[0].function.parameters"),
], ids=["not-a-tool", "no-name", "parameters-5"])
async def test_a_malformed_tool_is_refused_with_tool_choice_none_too(open_app, tools, where):
    # With "none" the tools reach the template unchecked (vLLM's request model refuses them whatever the choice):
    # a tool without a name was rendered as it came, and the Responses API echoed parameters 5 back.
    async with open_app() as client:
        r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "tools": tools,
                                                            "tool_choice": "none"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == where
        responses_tools = [{"type": "function", **(tool.get("function") or {})} if isinstance(tool, dict) else tool
                           for tool in tools]
        if isinstance(tools[0], dict):
            r = await client.post("/v1/responses", json={"input": "Hello!", "max_output_tokens": 2,
                                                         "tools": responses_tools, "tool_choice": "none"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == where.replace(".function", "")
        # Well-formed tools with "none" still pass, duplicates included (no call names them).
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "tools": [tool, tool],
                                                            "tool_choice": "none"})
        assert r.status_code == 200, r.text
