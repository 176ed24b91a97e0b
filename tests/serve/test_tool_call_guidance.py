"""A tool's own ``"x-guidance"`` options under tool_choice "required" (retnet/serve/structured.py's
tool_call_grammar). llguidance reads them at a schema's root only, and "required" nested every tool's parameters
in one schema of the array of calls: a tool's options were ignored there (a lenient schema that a named
tool_choice took was a 400 naming ``tools``; whitespace_flexible held its arguments to no whitespace). Each tool's
parameters are now a grammar of their own inside the array's, their options theirs alone."""

from __future__ import annotations

import json

import pytest

from retnet.serve.structured import tool_call_grammar

from .test_extras import CHAT
from .test_serve_client_paths import accepts

pytestmark = pytest.mark.anyio

SPACED = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
          "additionalProperties": False, "x-guidance": {"whitespace_flexible": True}}
TIGHT = {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"],
         "additionalProperties": False}
# uniqueItems is no keyword llguidance enforces: a 400 unless the schema asks for the lenient reading.
LENIENT = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y"]},
                                                     "uniqueItems": True, "maxItems": 2}},
           "required": ["tags"], "additionalProperties": False, "x-guidance": {"lenient": True}}
# Branches that overlap: a oneOf only anyOf can approximate (the default), a 400 with coerce_one_of false.
OVERLAPPING = {"type": "object", "properties": {"n": {"oneOf": [{"type": "integer", "maximum": 9},
                                                                 {"type": "integer", "minimum": 5}]}},
               "required": ["n"], "additionalProperties": False}


def calls(*made: tuple[str, str]) -> str:
    """The text of an array of calls, each (name, its parameters' JSON text)."""
    return "[" + ",".join('{"name":"' + name + '","parameters":' + parameters + "}" for name, parameters in made) + "]"


def test_whitespace_flexible_applies_to_its_tools_arguments_alone(compiler, tokenizer):
    grammar = compiler.compile(*tool_call_grammar([("spaced", SPACED), ("tight", TIGHT)], None))
    assert accepts(tokenizer, grammar, calls(("spaced", '{ "a": 1 }')))
    assert accepts(tokenizer, grammar, calls(("spaced", '{"a":1}'), ("tight", '{"b":2}')))
    assert not accepts(tokenizer, grammar, calls(("tight", '{ "b": 2 }')))  # the other tool's stay tight
    assert not accepts(tokenizer, grammar, "[ " + calls(("spaced", '{"a":1}'))[1:])  # and so does the array of calls
    named = compiler.compile(*tool_call_grammar([("spaced", SPACED), ("tight", TIGHT)], "spaced"))
    assert accepts(tokenizer, named, '{ "a": 1 }')  # as a named call read it already


def test_a_lenient_tool_is_taken_under_required_as_when_named(compiler, tokenizer):
    named = compiler.compile(*tool_call_grammar([("tag", LENIENT)], "tag"))
    assert accepts(tokenizer, named, '{"tags":["x"]}')
    grammar = compiler.compile(*tool_call_grammar([("tag", LENIENT), ("tight", TIGHT)], None))
    assert accepts(tokenizer, grammar, calls(("tag", '{"tags":["x","y"]}'), ("tight", '{"b":3}')))
    assert not accepts(tokenizer, grammar, calls(("tag", '{"tags":["z"]}')))


def test_a_tools_options_do_not_reach_another_tool(compiler, tokenizer):
    strict = {**TIGHT, "x-guidance": {"coerce_one_of": False}}
    grammar = compiler.compile(*tool_call_grammar([("strict", strict), ("count", OVERLAPPING)], None))
    assert accepts(tokenizer, grammar, calls(("count", '{"n":7}')))
    assert accepts(tokenizer, grammar, calls(("strict", '{"b":7}')))


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


async def test_a_lenient_tool_is_called_under_required(client):
    tools = [{"type": "function", "function": {"name": "tag", "parameters": LENIENT}}]
    body = {**CHAT, "tools": tools, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 60,
            "temperature": 1.0, "seed": 3, "n": 2}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text  # was a 400 naming tools: "Unimplemented keys: [\"uniqueItems\"]"
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        (made,) = choice["message"]["tool_calls"]
        assert made["function"]["name"] == "tag"
        tags = json.loads(made["function"]["arguments"])["tags"]
        assert set(tags) <= {"x", "y"} and len(tags) <= 2
