"""Tool calling on /v1/chat/completions: tool_choice "required" or a named function holds the output to the tools'
schemas (retnet/serve/structured.py's tool_call_grammar), and the text comes back as OpenAI's tool calls. The
micro model is random: its calls are whole JSON that fits the schemas only because the masks make them."""

from __future__ import annotations

import json

import pytest

from .test_extras import CHAT, sse_events

pytestmark = pytest.mark.anyio

ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two small numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": -9, "maximum": 9}},
                   "required": ["a", "b"], "additionalProperties": False},
}}
PAINT = {"type": "function", "function": {
    "name": "paint",
    "parameters": {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "glossy": {"type": "boolean"},
                                                    "label": {"type": "string", "maxLength": 6}},
                   "required": ["color", "glossy", "label"], "additionalProperties": False},
}}


def fits_add(arguments: dict) -> bool:
    return (set(arguments) == {"a", "b"} and type(arguments["a"]) is int and 0 <= arguments["a"] <= 99
            and type(arguments["b"]) is int and -9 <= arguments["b"] <= 9)


def fits_paint(arguments: dict) -> bool:
    return (set(arguments) == {"color", "glossy", "label"} and arguments["color"] in ("red", "green")
            and isinstance(arguments["glossy"], bool) and isinstance(arguments["label"], str)
            and len(arguments["label"]) <= 6)


FITS = {"add": fits_add, "paint": fits_paint}
NAMED = {"type": "function", "function": {"name": "paint"}}
SAMPLED = {"max_tokens": 160, "temperature": 1.0}


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


def assert_calls(choice: dict, names: set[str], finish: str = "tool_calls") -> list[tuple[str, dict]]:
    """The choice's calls, checked: whole, each to one of ``names`` with arguments that fit its schema; ``finish``:
    OpenAI's (and vLLM's) finish_reason, "stop" for a named function's call."""
    message = choice["message"]
    assert choice["finish_reason"] == finish, choice
    assert message["role"] == "assistant" and message["content"] is None and message["tool_calls"], message
    calls = []
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
        name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
        assert name in names and FITS[name](arguments), call
        calls.append((name, arguments))
    assert len({call["id"] for call in message["tool_calls"]}) == len(calls)
    return calls


@pytest.mark.parametrize("seed", range(4))
async def test_a_named_function_gets_one_call_that_fits_its_schema(client, seed):
    body = {**CHAT, **SAMPLED, "tools": [ADD, PAINT], "tool_choice": NAMED, "n": 2, "seed": seed}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert len(assert_calls(choice, {"paint"}, "stop")) == 1
        # The arguments are the generated text itself, as OpenAI's are.
        assert choice["message"]["tool_calls"][0]["function"]["arguments"].startswith('{"color":')


async def test_a_function_without_parameters_takes_an_object(client):
    tool = {"type": "function", "function": {"name": "ping"}}
    body = {**CHAT, **SAMPLED, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "ping"}},
            "n": 3, "seed": 2, "max_tokens": 300}  # (a seed re-picked when the default template changed)
    choices = (await client.post("/v1/chat/completions", json=body)).json()["choices"]
    done = [c for c in choices if c["finish_reason"] == "stop"]
    assert done  # a free object may run past max_tokens; those that end are whole
    for choice in done:
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "ping" and isinstance(json.loads(call["function"]["arguments"]), dict)


async def test_required_gets_calls_to_the_tools_each_fitting_its_own(client):
    # Seeds whose choices finish well within max_tokens: each item of the array is ~70 tokens, and a random
    # model may go on adding items. (Re-picked when the default template's prompt changed: messages end with EOS.)
    body = {**CHAT, **SAMPLED, "max_tokens": 320, "tools": [ADD, PAINT], "tool_choice": "required", "n": 6,
            "seed": 18}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    calls = [assert_calls(choice, {"add", "paint"}) for choice in r.json()["choices"]]
    assert all(calls) and max(map(len, calls)) > 1  # each choice its own calls, some more than one
    assert {name for choice in calls for name, _ in choice} == {"add", "paint"}


async def test_parallel_tool_calls_false_makes_one_call(client):
    body = {**CHAT, **SAMPLED, "tools": [ADD, PAINT], "tool_choice": "required", "parallel_tool_calls": False,
            "n": 4, "seed": 100}
    for choice in (await client.post("/v1/chat/completions", json=body)).json()["choices"]:
        assert len(assert_calls(choice, {"add", "paint"})) == 1


async def test_tool_defs_are_gathered_where_their_refs_point(client):
    """A pydantic-made schema keeps its types in $defs: nested in the array of calls, its #/$defs refs still
    resolve (the tools' $defs are moved to the root)."""
    shape = {"type": "function", "function": {"name": "shape", "parameters": {
        "type": "object", "properties": {"kind": {"$ref": "#/$defs/Kind"}}, "required": ["kind"],
        "additionalProperties": False, "$defs": {"Kind": {"enum": ["box", "ball"]}}}}}
    body = {**CHAT, **SAMPLED, "tools": [ADD, shape], "tool_choice": "required", "parallel_tool_calls": False,
            "n": 4, "seed": 3}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        (call,) = choice["message"]["tool_calls"]
        arguments = json.loads(call["function"]["arguments"])
        assert arguments in ({"kind": "box"}, {"kind": "ball"}) or fits_add(arguments), call


async def test_without_the_tool_masks_the_same_request_gives_no_calls(client):
    """The tests above can fail: with tool_choice none the same requests' text is no JSON, let alone calls."""
    body = {**CHAT, **SAMPLED, "max_tokens": 40, "tools": [ADD, PAINT], "tool_choice": "none", "n": 3, "seed": 0,
            "ignore_eos": True}
    for choice in (await client.post("/v1/chat/completions", json=body)).json()["choices"]:
        assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "length"
        with pytest.raises(ValueError):
            json.loads(choice["message"]["content"])


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
async def test_a_stream_sends_each_choices_calls_whole_as_the_response_has_them(client, tool_choice):
    body = {**CHAT, "max_tokens": 300, "temperature": 0, "tools": [ADD, PAINT], "tool_choice": tool_choice, "n": 2}
    whole = (await client.post("/v1/chat/completions", json=body)).json()["choices"]
    events = sse_events((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
    finish = "tool_calls" if tool_choice == "required" else "stop"
    for index, choice in enumerate(whole):
        assert_calls(choice, {"add", "paint"}, finish)
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        with_calls = [c for c in mine if "tool_calls" in c["delta"]]
        assert len(with_calls) == 1 and not any(c["delta"].get("content") for c in mine)
        streamed = with_calls[0]["delta"]["tool_calls"]
        assert [c["index"] for c in streamed] == list(range(len(streamed)))
        assert [(c["type"], c["function"]) for c in streamed] == [(c["type"], c["function"])
                                                                 for c in choice["message"]["tool_calls"]]
        assert all(c["id"].startswith("call_") for c in streamed)
        assert [c["finish_reason"] for c in mine] == [None, None, finish]  # the calls' chunk, then the end


async def test_calls_cut_short_by_max_tokens_are_text_with_finish_length(client):
    for tool_choice, opening in (("required", "["), (NAMED, "{")):
        body = {**CHAT, "max_tokens": 4, "temperature": 0, "tools": [ADD, PAINT], "tool_choice": tool_choice}
        choice = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
        assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
        assert choice["message"]["content"].startswith(opening), choice
        events = sse_events((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
        deltas = [e["choices"][0]["delta"] for e in events]
        assert "".join(d.get("content") or "" for d in deltas) == choice["message"]["content"]
        assert not any("tool_calls" in d for d in deltas) and events[-1]["choices"][0]["finish_reason"] == "length"


TOOLS_TEMPLATE = ("{% for t in tools or [] %}<{{ t['function']['name'] }}>{% endfor %}"
                  "{% for m in messages %}[{{ m['content'] }}]{% endfor %}")


async def _templated(client, **extra) -> str:
    tokenizer = client.app.state.serving.tokenizer
    r = await client.post("/tokenize", json={"messages": CHAT["messages"], **extra})
    assert r.status_code == 200, r.text
    return tokenizer.decode(r.json()["tokens"])


async def test_the_tools_reach_the_template_with_any_tool_choice(client):
    """As vLLM and OpenAI: tool_choice "none" makes no call, but the model still sees the tools."""
    tokenizer = client.app.state.serving.tokenizer
    tokenizer.chat_template = TOOLS_TEMPLATE

    async def prompt(**extra) -> str:
        return await _templated(client, **extra)

    assert await prompt(tools=[ADD, PAINT], tool_choice="required") == "<add><paint>[hi]"
    assert await prompt(tools=[ADD, PAINT], tool_choice=NAMED) == "<add><paint>[hi]"
    assert await prompt(tools=[ADD, PAINT], tool_choice="none") == "<add><paint>[hi]"
    # /tokenize counts what chat runs
    r = await client.post("/v1/chat/completions", json={**CHAT, "tools": [ADD, PAINT], "tool_choice": NAMED,
                                                        "return_token_ids": True, "max_tokens": 2})
    assert tokenizer.decode(r.json()["choices"][0]["prompt_token_ids"]) == "<add><paint>[hi]"


async def test_exclude_tools_when_tool_choice_none_leaves_them_out_of_the_template(open_app):
    """vLLM's --exclude-tools-when-tool-choice-none: "none" then templates the messages alone; other choices keep
    the tools."""
    async with open_app(exclude_tools_when_tool_choice_none=True) as client:
        client.app.state.serving.tokenizer.chat_template = TOOLS_TEMPLATE
        assert await _templated(client, tools=[ADD, PAINT], tool_choice="none") == "[hi]"
        assert await _templated(client, tools=[ADD, PAINT], tool_choice="required") == "<add><paint>[hi]"


HISTORY = [
    {"role": "user", "content": "Add 2 and 3, then paint it."},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
        {"id": "call_2", "type": "function", "function": {"name": "paint", "arguments": "not json"}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "tool", "tool_call_id": "call_2", "content": "done"},
]


async def test_a_history_of_calls_and_results_reaches_the_template(client):
    tokenizer = client.app.state.serving.tokenizer
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}"
        "{% for c in m['tool_calls'] or [] %}{{ c['id'] }}={{ c['function']['name'] }}"
        "{% if c['function']['arguments'] is mapping %}(a={{ c['function']['arguments']['a'] }})"
        "{% else %}({{ c['function']['arguments'] }}){% endif %}{% endfor %}"
        "{% if m['tool_call_id'] %}#{{ m['tool_call_id'] }}{% endif %}]{% endfor %}")
    # Arguments that are no JSON reach it as {}, as vLLM reads them (they were the text itself)
    expected = "[user:Add 2 and 3, then paint it.][assistant:call_1=add(a=2)call_2=paint(a=)][tool:5#call_1]" \
               "[tool:done#call_2]"
    r = await client.post("/tokenize", json={"messages": HISTORY})
    assert r.status_code == 200, r.text
    assert tokenizer.decode(r.json()["tokens"]) == expected
    body = {"messages": HISTORY, "tools": [ADD, PAINT], "tool_choice": "required", "max_tokens": 300,
            "temperature": 0, "return_token_ids": True}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert tokenizer.decode(choice["prompt_token_ids"]) == expected
    assert_calls(choice, {"add", "paint"})


async def test_a_history_of_calls_runs_on_the_default_template(client):
    r = await client.post("/v1/chat/completions", json={"messages": HISTORY, "max_tokens": 3})
    assert r.status_code == 200, r.text


TOOLS = {"tools": [ADD, PAINT]}


@pytest.mark.parametrize(("extra", "param", "code"), [
    # "auto", said or OpenAI's default with tools: without the tool_call_parser setting, the model's own call
    # format cannot be parsed.
    (TOOLS, "tools", "unsupported_parameter"),
    ({**TOOLS, "tool_choice": "auto"}, "tools", "unsupported_parameter"),
    ({**TOOLS, "tool_choice": "sometimes"}, "tool_choice", None),
    ({**TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", None),
    ({**TOOLS, "tool_choice": {"type": "custom", "custom": {"name": "add"}}}, "tool_choice", None),
    ({**TOOLS, "tool_choice": {"type": "function", "function": {"name": "divide"}}}, "tool_choice", None),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"tools": [], "tool_choice": NAMED}, "tool_choice", None),
    ({"tools": [ADD, {"type": "custom", "custom": {"name": "x"}}], "tool_choice": "required"}, "tools[1].type",
     "unsupported_parameter"),
    ({"tools": [ADD, "paint"], "tool_choice": "required"}, "tools[1].type", "unsupported_parameter"),
    ({"tools": [ADD, {"type": "function", "function": {"parameters": {}}}], "tool_choice": "required"},
     "tools[1].function.name", "missing"),
    ({"tools": [ADD, ADD], "tool_choice": "required"}, "tools[1].function.name", None),
    ({"tools": [ADD, {"type": "function", "function": {"name": "p", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools[1].function.parameters", "invalid_grammar"),
    ({"tools": [ADD, {"type": "function", "function": {"name": "p", "parameters": {"type": "nonsense"}}}],
      "tool_choice": {"type": "function", "function": {"name": "p"}}}, "tools[1].function.parameters",
     "invalid_grammar"),
    ({"tools": [{"type": "function", "function": {"name": "p", "parameters": [1]}}], "tool_choice": "required"},
     "tools[0].function.parameters", "invalid_grammar"),
    ({**TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "invalid_grammar"),
    ({**TOOLS, "tool_choice": NAMED, "guided_regex": "[a-z]+"}, "guided_regex", "invalid_grammar"),
    ({**TOOLS, "tool_choice": NAMED, "guided_json": {"type": "object"}}, "guided_json", "invalid_grammar"),
    ({**TOOLS, "tool_choice": "required", "echo": True}, "echo", None),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions", "unsupported_parameter"),
    ({"function_call": {"name": "f"}}, "function_call", "unsupported_parameter"),
], ids=lambda v: None if isinstance(v, dict) else v)
async def test_tool_calls_that_cannot_be_made_are_refused_by_name(client, extra, param, code):
    r = await client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert code is None or error["code"] == code, error
    assert param.split(".")[0].split("[")[0] in error["message"], error


async def test_auto_is_refused_with_what_to_send_instead(client):
    error = (await client.post("/v1/chat/completions", json={**CHAT, **TOOLS})).json()["error"]
    assert "parser" in error["message"] and "'required'" in error["message"] and "named" in error["message"]
    assert "tool_call_parser" in error["message"]  # the setting that answers it (test_tool_parser.py)


async def test_tool_choice_none_and_a_response_format_of_text_still_pass(client):
    for extra in ({**TOOLS, "tool_choice": "none"}, {"tools": []},
                  {**TOOLS, "tool_choice": "required", "response_format": {"type": "text"}, "max_tokens": 300}):
        r = await client.post("/v1/chat/completions", json={**CHAT, **extra})
        assert r.status_code == 200, (extra, r.text)
