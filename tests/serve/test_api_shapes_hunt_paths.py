"""The Responses API's and tool calling's paths that once went wrong: each test failed before its fix (see the
docstrings). Grammars are checked on their matchers, without a server: what a matcher takes is what the sampler's
masks let a choice write."""

from __future__ import annotations

import pytest

from retnet.serve.protocol import APIError
from retnet.serve.responses import ResponsesRequest, to_chat_request
from retnet.serve.structured import tool_call_grammar

from .test_serve_client_paths import accepts

# A schema that names itself ($id, as schemas kept in files do) and keeps a type in $defs.
NAMED_SCHEMA = {"$id": "https://example.com/schemas/switch.json", "type": "object",
                "properties": {"on": {"$ref": "#/$defs/State"}}, "required": ["on"], "additionalProperties": False,
                "$defs": {"State": {"type": "boolean"}}}
# Another with the same $id and a definition of the same name, of another type.
SAME_ID = {"$id": "https://example.com/schemas/switch.json", "type": "object",
           "properties": {"level": {"$ref": "#/definitions/State"}}, "required": ["level"],
           "additionalProperties": False, "definitions": {"State": {"type": "integer", "minimum": 0, "maximum": 9}}}
# Draft-04's name for it, id.
DRAFT_4 = {"$schema": "http://json-schema.org/draft-04/schema#", "id": "https://example.com/schemas/mode.json",
           "type": "object", "properties": {"mode": {"$ref": "#/definitions/Mode"}}, "required": ["mode"],
           "additionalProperties": False, "definitions": {"Mode": {"enum": ["fast", "slow"]}}}
# A tree whose children are trees, by a ref to its own root.
NAMED_TREE = {"$id": "tree.json", "type": "object",
              "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
              "required": ["kids"], "additionalProperties": False}

# Refs that name the schema by its id, absolute and relative to it.
BY_ID = {"$id": "https://example.com/schemas/pair.json", "type": "object",
         "properties": {"a": {"type": "integer"}, "b": {"$ref": "https://example.com/schemas/pair.json#/properties/a"},
                        "c": {"$ref": "pair.json#/$defs/Flag"}},
         "required": ["a", "b", "c"], "additionalProperties": False, "$defs": {"Flag": {"type": "boolean"}}}


def test_required_tool_calls_take_a_schema_with_an_id_and_refs(compiler, tokenizer):
    """tool_choice "required" nests each tool's parameters in an array of calls and gathers their $defs at its
    root; an $id left on the nested schema made it a resource of its own, where its refs were looked up instead: a
    400 "Pointer '/$defs/State' does not exist" for a tool a named tool_choice (compiled alone) took."""
    grammar = compiler.compile(*tool_call_grammar([("switch", NAMED_SCHEMA), ("dial", SAME_ID),
                                                   ("tree", NAMED_TREE), ("mode", DRAFT_4)], None))
    assert accepts(tokenizer, grammar, '[{"name":"switch","parameters":{"on":true}}]')
    assert not accepts(tokenizer, grammar, '[{"name":"switch","parameters":{"on":1}}]')
    # each tool's refs still reach its own definitions, though both name the same $id and definition
    assert accepts(tokenizer, grammar, '[{"name":"dial","parameters":{"level":3}}]')
    assert not accepts(tokenizer, grammar, '[{"name":"dial","parameters":{"level":true}}]')
    assert accepts(tokenizer, grammar, '[{"name":"tree","parameters":{"kids":[{"kids":[]}]}}]')
    assert not accepts(tokenizer, grammar,
                       '[{"name":"tree","parameters":{"kids":[[{"name":"tree","parameters":{"kids":[]}}]]}}]')
    assert accepts(tokenizer, grammar, '[{"name":"mode","parameters":{"mode":"slow"}}]')
    # a ref by the schema's own id (which compiled before its id was dropped) still means the schema's own part
    by_id = compiler.compile(*tool_call_grammar([("pair", BY_ID), ("switch", NAMED_SCHEMA)], None))
    assert accepts(tokenizer, by_id, '[{"name":"pair","parameters":{"a":1,"b":2,"c":true}}]')
    assert not accepts(tokenizer, by_id, '[{"name":"pair","parameters":{"a":1,"b":"x","c":true}}]')
    assert not accepts(tokenizer, by_id, '[{"name":"pair","parameters":{"a":1,"b":2,"c":3}}]')
    assert not accepts(tokenizer, grammar, '[{"name":"mode","parameters":{"mode":"any"}}]')
    named = compiler.compile(*tool_call_grammar([("switch", NAMED_SCHEMA)], "switch"))
    assert accepts(tokenizer, named, '{"on":false}')
    assert NAMED_SCHEMA["$id"] == "https://example.com/schemas/switch.json"  # the request's tool is left as sent


@pytest.mark.parametrize("value", [False, True])
def test_responses_stream_options_include_obfuscation_is_taken(value):
    """``stream_options: {"include_obfuscation": false}`` (the official client's setting for bandwidth) was a 400
    unsupported_parameter: OpenAI pads a stream's deltas with an ``obfuscation`` field unless it is false, this
    server pads none, so either value changes nothing (as the chat route, which ignores it). Another setting in
    the object is still refused."""
    request = ResponsesRequest.model_validate({"input": "hi", "stream": True,
                                               "stream_options": {"include_obfuscation": value}})
    chat, _ = to_chat_request(request)
    assert chat.messages[0].content == "hi" and chat.stream
    with pytest.raises(APIError) as refused:
        to_chat_request(ResponsesRequest.model_validate({"input": "hi", "stream_options": {
            "include_obfuscation": False, "include_usage": True}}))
    assert (refused.value.status, refused.value.param, refused.value.code) == (400, "stream_options",
                                                                              "unsupported_parameter")
