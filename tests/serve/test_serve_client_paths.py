"""Client paths through structured output, tool calls, the Responses API and sessions that once went wrong: each
test failed before its fix (see the docstrings). Grammars are checked on their matchers, without a server: what a
matcher takes is what the sampler's masks let a choice write."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from retnet.serve.protocol import APIError
from retnet.serve.structured import requested_grammar, tool_call_grammar

# A recursive schema: a tree whose children are trees (``$ref: "#"``, the schema's own root).
TREE = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["v", "kids"], "additionalProperties": False}
# A ref to another part of the same schema (JSON pointer from its root).
SAME_AS_A = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"$ref": "#/properties/a"}},
             "required": ["a", "b"], "additionalProperties": False}




def accepts(tokenizer, grammar, text: str) -> bool:
    """Whether ``grammar`` takes ``text`` whole: every token allowed where it comes, and complete after them."""
    matcher = grammar.matcher().matcher
    return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) \
        and matcher.is_accepting()


def test_required_tool_calls_keep_a_schemas_refs_to_its_own_root_inside_the_tool(compiler, tokenizer):
    """tool_choice "required" nests each tool's parameters in an array of calls: a ``#`` ref then pointed at that
    array (a tree's children had to be arrays of calls, a real child was refused), and ``#/properties/a`` at
    nothing (a 400 for a valid tool). A named call, compiled alone, always read them right."""
    grammar = compiler.compile(*tool_call_grammar([("tree", TREE), ("pair", SAME_AS_A), ("any", None)], None))
    assert accepts(tokenizer, grammar, '[{"name":"tree","parameters":{"v":1,"kids":[{"v":2,"kids":[]}]}}]')
    assert not accepts(tokenizer, grammar,
                       '[{"name":"tree","parameters":{"v":1,"kids":[[{"name":"tree","parameters":{"v":2,"kids":[]}}]]}}]')
    assert accepts(tokenizer, grammar, '[{"name":"pair","parameters":{"a":"x","b":"y"}},{"name":"any","parameters":{}}]')
    assert not accepts(tokenizer, grammar, '[{"name":"pair","parameters":{"a":"x","b":"z"}}]')
    named = compiler.compile(*tool_call_grammar([("tree", TREE)], "tree"))
    assert accepts(tokenizer, named, '{"v":1,"kids":[{"v":2,"kids":[]}]}')


@pytest.mark.parametrize("fields", [
    {"guided_regex": r"[^\s\S]"}, {"structured_outputs": {"regex": r"[^\d\D]"}},
    {"guided_grammar": r"start: /[^\s\S]/"},
])
def test_a_grammar_that_admits_no_text_is_a_400(compiler, fields):
    """A regex (or grammar) whose language is empty compiled, and the first step's matcher, with nothing it could
    allow, let EOS through: a 200 with the text "" and finish_reason "stop", which the regex does not match."""
    with pytest.raises(APIError) as info:
        compiler.compile(*requested_grammar(fields))
    assert (info.value.status, info.value.code) == (400, "invalid_grammar")
    # (structured_outputs' key named: the grammar came from it)
    assert info.value.param == next(iter(fields)) + (".regex" if "structured_outputs" in fields else "")
    assert "admits no text" in info.value.message


def test_grammars_that_admit_text_still_compile(compiler, tokenizer):
    """The check above refuses only the empty language: a regex that also takes "" (its text may be empty) and
    an alternative with one empty branch compile, and their text is still held to them."""
    for fields, text in (({"guided_regex": "a?"}, "a"), ({"guided_regex": r"b|[^\s\S]"}, "b")):
        grammar = compiler.compile(*requested_grammar(fields))
        assert accepts(tokenizer, grammar, text) and not accepts(tokenizer, grammar, "c")


def test_llama_cpps_json_object_with_a_schema_follows_the_schema(compiler, tokenizer):
    """llama.cpp reads ``{"type": "json_object", "schema": {...}}`` as that schema; the schema was dropped and the
    text only had to be some JSON object (``{}`` passed, the schema's own values did not)."""
    fields = {"response_format": {"type": "json_object", "schema": {"enum": ["red", "green"]}}}
    grammar = compiler.compile(*requested_grammar(fields))
    assert accepts(tokenizer, grammar, '"red"') and not accepts(tokenizer, grammar, "{}")
    with pytest.raises(APIError) as info:
        requested_grammar({"response_format": {"type": "json_object", "schema": "{"}})
    assert (info.value.status, info.value.param) == (400, "response_format.schema")
    plain = compiler.compile(*requested_grammar({"response_format": {"type": "json_object"}}))
    assert accepts(tokenizer, plain, '{"a":1}') and not accepts(tokenizer, plain, '"red"')


ADD = {"type": "function", "name": "add", "parameters": {"type": "object"}}


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [ADD], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "name": 5}}, "tool_choice"),
    ({"tools": [{**ADD, "strict": "yes"}]}, "tools[0].strict"),
    ({"tools": [{**ADD, "description": 5}]}, "tools[0].description"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "strict": "yes"}}}, "text.format.strict"),
    ({"input": [{"role": "user", "content": "x", "id": 5}]}, "input[0].id"),
    ({"input": [{"role": "user", "content": "x", "status": "done"}]}, "input[0].status"),
])
def test_a_responses_field_of_the_wrong_shape_is_a_400_naming_it_in_the_responses_terms(fields, param):
    """These were taken as they came (and echoed back in the Response, or listed by input_items with an id that is
    no string), or, for a named tool_choice without a name, refused with chat's shape of it
    (``{"type": "function", "function": {"name": ...}``), which a Responses client never sends."""
    from retnet.serve.responses import ResponsesRequest, to_chat_request

    with pytest.raises(APIError) as info:
        to_chat_request(ResponsesRequest.model_validate({"input": "hi", **fields}))
    assert (info.value.status, info.value.param) == (400, param)
    assert '"function": {' not in info.value.message


def test_input_items_sent_with_a_null_id_or_status_are_listed_with_their_own():
    """An item's ``id: null`` (``status: null``) was kept as null: input_items then listed an item without an id,
    and its ``first_id`` was null while it had items."""
    from retnet.serve.responses import ResponsesRequest, _input_items, to_chat_request

    request = ResponsesRequest.model_validate({"input": [{"role": "user", "content": "x", "id": None, "status": None}]})
    to_chat_request(request)
    (item,) = _input_items(request)
    assert item["id"].startswith("msg_") and item["status"] == "completed"


def test_the_session_evicted_first_is_the_one_idle_longest_not_the_one_started_first():
    """Eviction followed the order the sessions' turns started in: a long turn on "a", started before "b"'s but
    finished after it, left "a" first in line, so a third session evicted "a", whose turn had just ended, and kept
    "b", idle longer; "a"'s next turn then silently started anew."""
    from retnet.model import RetNetCache
    from retnet.serve.state_cache import SessionStore

    def state():
        cache = RetNetCache(1)
        cache.states, cache.offsets = [torch.zeros(1, 1, 2, 2)], torch.zeros(1, dtype=torch.long)
        return cache

    store = SessionStore(max_sessions=2, max_bytes=1 << 20, ttl_s=60)
    store.acquire("a")
    store.acquire("b")
    store.release("b", state(), [1], tokens=2)
    store.release("a", state(), [2], tokens=2)
    store.acquire("c")
    store.release("c", state(), [3], tokens=2)
    assert sorted(store.sessions) == ["a", "c"]
    assert store.acquire("a").pending == [2]


@pytest.mark.parametrize("overrides, refused", [
    (dict(session_bytes=1000), True),
    (dict(session_bytes=1000, max_sessions=0), False),  # sessions off: no bound to meet
    (dict(session_bytes=1000, session_dir="{tmp}"), False),  # evicted sessions wait on disk
    ({}, False),
])
def test_session_bytes_that_hold_no_state_are_refused_at_startup(model_dir, tmp_path, overrides, refused):
    """Every session was evicted as its turn ended, so each continuation silently started over."""
    from retnet.serve.engine import Engine
    from retnet.serve.metrics import ServeMetrics
    from retnet.serve.settings import StartupError
    from tests.serve.conftest import make_settings

    settings = make_settings(model_dir, **{k: str(tmp_path) if v == "{tmp}" else v for k, v in overrides.items()})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if refused:
        with pytest.raises(StartupError, match=r"--session-bytes 1000 cannot hold one session: its state is \d+ bytes"):
            Engine(settings, tokenizer, ServeMetrics())
    else:
        Engine(settings, tokenizer, ServeMetrics())
