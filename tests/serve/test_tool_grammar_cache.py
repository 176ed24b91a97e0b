"""The built grammars of tool_call_grammar are kept per tool set (retnet/serve/structured.py): an agent loop sends
the same tools with every turn. A kept grammar is the one built for exactly these tools and options; others are
built anew."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest

from retnet.serve import structured
from retnet.serve.protocol import APIError
from retnet.serve.structured import tool_call_grammar

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"], "additionalProperties": False}
ONE = {"type": "object", "properties": {"v": {"const": 1}}, "required": ["v"]}


@pytest.fixture
def cache(monkeypatch):
    """An empty cache: (the arguments of each grammar built, not taken from it; the build itself)."""
    monkeypatch.setattr(structured, "_tool_grammars", OrderedDict())
    monkeypatch.setattr(structured, "_tool_grammar_chars", 0)
    made = []
    build = structured._tool_call_grammar

    def counted(functions, named, parallel):
        made.append((functions, named, parallel))
        return build(functions, named, parallel)

    monkeypatch.setattr(structured, "_tool_call_grammar", counted)
    return made, build


def tools(*functions):
    return json.loads(json.dumps(list(functions)))  # a request's own copy, equal but not the same objects


def test_the_same_tools_reuse_their_grammar(cache):
    builds, _ = cache
    first = tool_call_grammar(tools(("weather", WEATHER), ("one", ONE)), None)
    again = tool_call_grammar(tools(("weather", WEATHER), ("one", ONE)), None)
    assert again is first and len(builds) == 1
    named = tool_call_grammar(tools(("weather", WEATHER), ("one", ONE)), "one")
    assert tool_call_grammar(tools(("weather", WEATHER), ("one", ONE)), "one") is named and len(builds) == 2


def test_other_tools_or_options_do_not_share_a_grammar(cache):
    reordered = {**WEATHER, "properties": dict(reversed(WEATHER["properties"].items()))}
    variants = [
        (tools(("weather", WEATHER), ("one", ONE)), None, True),
        (tools(("weather", WEATHER), ("one", ONE)), None, False),  # parallel_tool_calls false
        (tools(("weather", WEATHER), ("one", ONE)), "weather", True),  # a named tool_choice
        (tools(("weather", WEATHER), ("one", ONE)), "one", True),
        (tools(("one", ONE), ("weather", WEATHER)), None, True),  # the tools' order
        (tools(("weather", reordered), ("one", ONE)), None, True),  # the properties' order (the text's)
        (tools(("weather", WEATHER), ("one", {**ONE, "properties": {"v": {"const": True}}})), None, True),
        (tools(("weather", WEATHER), ("one", {**ONE, "properties": {"v": {"const": 1.0}}})), None, True),
        (tools(("weather", WEATHER), ("uno", ONE)), None, True),  # a tool's name
        (tools(("weather", WEATHER), ("one", json.dumps(ONE))), None, True),  # parameters as JSON text
        (tools(("weather", WEATHER), ("one", None)), None, True),
    ]
    made, build = cache
    grammars = [tool_call_grammar(*variant) for variant in variants]
    assert len(made) == len(variants)
    for variant, grammar in zip(variants, grammars, strict=True):
        assert grammar == build(*variant)  # as built without the cache
        assert tool_call_grammar(*variant) is grammar  # each kept under its own key
    assert len(made) == len(variants)
    texts = [grammar for grammar, _ in grammars]
    assert len(set(texts[:9])) == 9  # (the JSON text and None may compile alike, but are built on their own)


def test_a_refused_tool_set_is_refused_every_time(cache):
    builds, _ = cache
    bad = tools(("weather", WEATHER), ("bad", {"type": "object", "properties": {"p": {"pattern": "a\\"}}}))
    for _ in range(2):
        with pytest.raises(APIError) as refused:
            tool_call_grammar(bad, None)
        assert refused.value.param == "tools[1].function.parameters"
    assert len(builds) == 2 and not structured._tool_grammars


def test_the_least_recently_used_grammar_goes_first(cache, monkeypatch):
    builds, _ = cache
    monkeypatch.setattr(structured, "TOOL_GRAMMAR_CACHE_SIZE", 2)
    a, b, c = (tools((name, WEATHER)) for name in "abc")
    kept_a = tool_call_grammar(a, None)
    tool_call_grammar(b, None)
    assert tool_call_grammar(a, None) is kept_a  # a used last: b goes when c comes
    tool_call_grammar(c, None)
    assert len(builds) == 3
    assert tool_call_grammar(a, None) is kept_a and len(builds) == 3
    tool_call_grammar(b, None)
    assert len(builds) == 4 and len(structured._tool_grammars) == 2
    assert structured._tool_grammar_chars == sum(len(text) for text, _ in structured._tool_grammars.values())
    monkeypatch.setattr(structured, "TOOL_GRAMMAR_CACHE_CHARS", len(kept_a[0]) - 1)  # too large to keep
    structured._tool_grammars.clear()
    monkeypatch.setattr(structured, "_tool_grammar_chars", 0)
    assert tool_call_grammar(a, None) == kept_a and not structured._tool_grammars
