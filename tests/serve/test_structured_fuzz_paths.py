"""Randomised differential tests of structured output and tool calls (retnet/serve/structured.py, tools.py,
tool_parsers.py): seeded random JSON schemas and tools sampled at temperature 1 from random logits, each text
that its grammar ends checked against the schema by a validator of its own; the Hermes parser fed rendered
calls whole and split; and the bugs those rounds found, each pinned by a fixed case."""

from __future__ import annotations

import json
import random
import re
from decimal import Decimal

import pytest
import torch

from retnet.serve.protocol import APIError
from retnet.serve.sampling import RowSampler, SamplingParams, sample_step
from retnet.serve.structured import GrammarFailed, allowed_tokens, requested_grammar
from retnet.serve.tool_parsers import HermesToolParser
from retnet.serve.tools import ToolCalling

from .test_extras import CHAT

# ----------------------------------------------------------------------------------------------------------
# Random schemas, and a validator of the keywords they use
# ----------------------------------------------------------------------------------------------------------
NAMES = ["a", "b", "id", "é", "東", 'q"t', "sp ace", "enum", "pattern"]
PATTERNS = ["^[a-c]{1,4}$", "^x[0-9]+$", "[0-9]", "^(ab|cd)*$", r"^\d{2}-\w$", "a|b", r"^\\$"]


def random_leaf(rng: random.Random) -> dict:
    pick = rng.randrange(9)
    if pick == 0:
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 4)}
    if pick == 1:
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if pick in (2, 3):
        schema = {"type": rng.choice(["integer", "number"])}
        low = rng.randint(-20, 20)
        schema[rng.choice(["minimum", "exclusiveMinimum"])] = low
        if rng.random() < 0.7:
            schema[rng.choice(["maximum", "exclusiveMaximum"])] = low + rng.randint(2, 50)
        return schema
    if pick == 4:
        return {"type": rng.choice(["boolean", "null", "string"])}
    if pick == 5:
        return {"enum": rng.sample(["red", 1, 2.5, None, True, "東京", 'a"b', [1], {"k": 1}], rng.randint(1, 3))}
    if pick == 6:
        return {"const": rng.choice(["fixed", 7, None, {"z": [1, 2]}, "back\\slash"])}
    if pick == 7:
        return {"type": rng.sample(["string", "integer", "null", "boolean"], 2)}
    return {}


def random_schema(rng: random.Random, defs: dict, depth: int = 0) -> dict:
    """A random schema; its definitions (named as other schemas' are, so that two tools' differ) go in ``defs``."""
    pick = rng.random()
    if depth >= 3 or pick < 0.35:
        return random_leaf(rng)
    if pick < 0.6:
        return random_object(rng, defs, depth)
    if pick < 0.75:
        schema = {"type": "array", "items": random_schema(rng, defs, depth + 1)}
        if rng.random() < 0.6:
            schema["minItems"] = rng.randint(0, 2)
        if rng.random() < 0.6:
            schema["maxItems"] = schema.get("minItems", 0) + rng.randint(0, 2)
        return schema
    if pick < 0.87:
        return {"anyOf": [random_schema(rng, defs, depth + 1) for _ in range(rng.randint(1, 3))]}
    name = rng.choice(["Item", "Loc"])
    if name not in defs:
        defs[name] = random_leaf(rng) if rng.random() < 0.5 else random_object(rng, {}, 2)
    return {"$ref": f"#/$defs/{name}"}


def random_object(rng: random.Random, defs: dict, depth: int) -> dict:
    properties = {name: random_schema(rng, defs, depth + 1) for name in rng.sample(NAMES, rng.randint(0, 3))}
    schema = {"type": "object", "properties": properties,
              "required": rng.sample(list(properties), rng.randint(0, len(properties)))}
    if rng.random() < 0.6:
        schema["additionalProperties"] = False
    return schema


def with_defs(schema: dict, defs: dict) -> dict:
    return {**schema, "$defs": dict(defs)} if defs else schema


def _key(value) -> str:  # JSON equality: 1 is not true, 2.5 is Decimal("2.5")
    return json.dumps(value, sort_keys=True, default=str) + type(value).__name__.replace("Decimal", "float")


def conforms(value, schema: dict, root: dict) -> bool:
    """Whether ``value`` (numbers read as Decimal or int) follows ``schema``, for the keywords generated above."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/") if schema["$ref"] != "#" else []:
            target = target[part]
        if not conforms(value, target, root):
            return False
    if "anyOf" in schema and not any(conforms(value, option, root) for option in schema["anyOf"]):
        return False
    if "enum" in schema and _key(value) not in {_key(json.loads(json.dumps(item), parse_float=Decimal))
                                                  for item in schema["enum"]}:
        return False
    if "const" in schema and _key(value) != _key(json.loads(json.dumps(schema["const"]), parse_float=Decimal)):
        return False
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    number = isinstance(value, (int, Decimal)) and not isinstance(value, bool)
    of_kind = {"string": isinstance(value, str), "boolean": isinstance(value, bool), "null": value is None,
               "object": isinstance(value, dict), "array": isinstance(value, list), "number": number,
               "integer": number and (isinstance(value, int) or value == value.to_integral_value())}
    if kinds is not None and not any(of_kind[kind] for kind in kinds):
        return False
    if number:
        bounds = (("minimum", lambda limit: value >= limit), ("maximum", lambda limit: value <= limit),
                  ("exclusiveMinimum", lambda limit: value > limit), ("exclusiveMaximum", lambda limit: value < limit))
        if not all(check(schema[name]) for name, check in bounds if name in schema):
            return False
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            return False
        # ECMAScript's \d and \w are ASCII's
        ascii_pattern = schema.get("pattern", "").replace(r"\d", "[0-9]").replace(r"\w", "[0-9A-Za-z_]")
        if "pattern" in schema and not re.search(ascii_pattern, value):
            return False
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        if "items" in schema and not all(conforms(item, schema["items"], root) for item in value):
            return False
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if not set(schema.get("required", [])) <= set(value):
            return False
        for name, item in value.items():
            rule = properties.get(name, schema.get("additionalProperties", {}))
            if rule is False or (rule is not True and not conforms(item, rule, root)):
                return False
    return True


def sampled(compiler, tokenizer, grammar, seed: int, steps: int = 120) -> str | None:
    """A text sampled at temperature 1 from random logits under ``grammar``; None when ``steps`` cut it."""
    sampler = RowSampler(SamplingParams(temperature=1.0, seed=seed), [], compiler.vocab_size,
                         grammar=grammar.matcher())
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(steps):
        token = sample_step(torch.randn(1, compiler.vocab_size, generator=generator) * 3, [sampler]).tokens[0]
        sampler.grammar.check()
        if token == tokenizer.eos_token_id:
            break
        tokens.append(token)
        if sampler.grammar.ended:
            break
    else:
        return None
    return tokenizer.decode(tokens)


def test_the_validator_can_fail():
    """The rounds below can fail: the validator refuses what breaks each kind of keyword."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 0},
                                               "s": {"type": "string", "pattern": r"^\d$"},
                                               "r": {"$ref": "#/$defs/Loc"}},
              "required": ["n"], "additionalProperties": False, "$defs": {"Loc": {"enum": [1, "x"]}}}
    assert conforms({"n": 1, "s": "5", "r": 1}, schema, schema)
    for value in ({"n": 0}, {"n": 1.5}, {"s": "5"}, {"n": 1, "s": "٥"}, {"n": 1, "r": True}, {"n": 1, "x": 1}, []):
        assert not conforms(json.loads(json.dumps(value), parse_float=Decimal), schema, schema), value


@pytest.mark.parametrize("round_", range(4))
def test_random_schemas_give_texts_that_follow_them(compiler, tokenizer, round_):
    rng, checked = random.Random(round_), 0
    for case in range(12):
        defs = {}
        schema = with_defs(random_object(rng, defs, 0) if rng.random() < 0.7 else random_schema(rng, defs), defs)
        try:
            grammar = compiler.compile(*requested_grammar({"guided_json": schema}))
        except APIError as refused:  # a schema llguidance cannot take is refused by its field, nothing else
            assert refused.status == 400 and refused.param == "guided_json", refused.message
            continue
        text = sampled(compiler, tokenizer, grammar, seed=100 * round_ + case)
        if text is not None:
            assert conforms(json.loads(text, parse_float=Decimal), schema, schema), (schema, text)
            checked += 1
    assert checked >= 6


# ----------------------------------------------------------------------------------------------------------
# Tool calls: random tools, their calls' arguments each following its own tool's parameters
# ----------------------------------------------------------------------------------------------------------
def random_tools(rng: random.Random) -> list[tuple[str, dict]]:
    tools = []
    for name in rng.sample(["add", "paint", "東京", "get_weather"], rng.randint(1, 3)):
        defs = {}
        tools.append((name, with_defs(random_object(rng, defs, 1), defs)))
    return tools


@pytest.mark.parametrize("round_", range(3))
def test_random_tools_get_calls_whose_arguments_follow_their_parameters(compiler, tokenizer, round_):
    rng, checked = random.Random(round_), 0
    for case in range(8):
        functions = random_tools(rng)
        named = rng.choice([None, functions[0][0]])
        calling = ToolCalling(functions, named, parallel=rng.random() < 0.7)
        try:
            grammar = compiler.compile(*calling.grammar())
        except APIError as refused:
            assert refused.status == 400 and refused.param.startswith("tools"), refused.message
            continue
        text = sampled(compiler, tokenizer, grammar, seed=100 * round_ + case, steps=200)
        if text is None:
            continue
        calls = calling.calls(text)
        assert calls, text
        assert named is None or len(calls) == 1
        assert calling.parallel or len(calls) == 1
        for call in calls:
            schema = dict(functions)[call.function.name]
            arguments = json.loads(call.function.arguments, parse_float=Decimal)
            assert isinstance(arguments, dict) and conforms(arguments, schema, schema), (schema, text)
        checked += 1
    assert checked >= 3


def accepts(compiler, tokenizer, grammar, text: str) -> bool:
    """Whether the grammar admits ``text`` whole."""
    matcher = grammar.matcher().matcher
    return all(matcher.try_consume_tokens([token]) == 1
               for token in tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()


LOC_NAME = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Loc"}}, "required": ["where"],
            "additionalProperties": False, "$defs": {"Loc": {"type": "string", "maxLength": 8}}}
LOC_GRID = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Loc"}}, "required": ["where"],
            "additionalProperties": False,
            "$defs": {"Loc": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                              "additionalProperties": False}}}


def test_tools_whose_definitions_share_a_name_each_keep_their_own(compiler, tokenizer):
    """Two pydantic-made tools, each with its own model named Loc: "required" was a 400 (the definitions were
    gathered by name at the root of the array of calls); each now keeps its own, inside it."""
    grammar = compiler.compile(*ToolCalling([("find", LOC_NAME), ("goto", LOC_GRID)], None, True).grammar())
    assert accepts(compiler, tokenizer, grammar, '[{"name":"find","parameters":{"where":"home"}}]')
    assert accepts(compiler, tokenizer, grammar, '[{"name":"goto","parameters":{"where":{"x":3}}}]')
    assert not accepts(compiler, tokenizer, grammar, '[{"name":"find","parameters":{"where":{"x":3}}}]')
    assert not accepts(compiler, tokenizer, grammar, '[{"name":"goto","parameters":{"where":"home"}}]')
    # A third tool with the first one's Loc shares it; a recursive one (its refs into itself) still resolves.
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1},
                                             "at": {"$ref": "#/$defs/Loc"}},
            "required": ["kids", "at"], "additionalProperties": False, "$defs": {"Loc": {"type": "boolean"}}}
    functions = [("find", LOC_NAME), ("goto", LOC_GRID), ("again", LOC_NAME), ("tree", tree)]
    grammar = compiler.compile(*ToolCalling(functions, None, True).grammar())
    assert accepts(compiler, tokenizer, grammar,
                   '[{"name":"again","parameters":{"where":"x"}},{"name":"tree","parameters":'
                   '{"kids":[{"kids":[],"at":true}],"at":false}}]')
    assert not accepts(compiler, tokenizer, grammar, '[{"name":"tree","parameters":{"kids":[],"at":"x"}}]')


@pytest.mark.parametrize("named", [True, False])
def test_a_function_takes_only_an_object_for_arguments(compiler, tokenizer, named):
    """Parameters that name no type (``{"properties": ...}`` admits ``"text"`` and ``5`` as a schema) held the
    arguments to no object: a named call's arguments were ``"text"``. They are held to an object now."""
    untyped = {"properties": {"a": {"type": "integer"}}}
    calling = ToolCalling([("f", untyped), ("g", None)], "f" if named else None, True)
    grammar = compiler.compile(*calling.grammar())
    wrap = (lambda arguments: arguments) if named else (lambda arguments: f'[{{"name":"f","parameters":{arguments}}}]')
    assert accepts(compiler, tokenizer, grammar, wrap('{"a":5}'))
    for not_an_object in ('"text"', "5", "[]", "null"):
        assert not accepts(compiler, tokenizer, grammar, wrap(not_an_object)), not_an_object


@pytest.mark.anyio
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "f"}}])
async def test_parameters_that_admit_no_object_are_refused_by_the_tool(open_app, tool_choice):
    async with open_app() as client:
        for parameters in ({"type": "string"}, {"type": ["array", "null"]}, '{"type": "integer"}',
                           {"anyOf": [{"type": "string"}, {"type": "integer"}]}):
            tools = [{"type": "function", "function": {"name": "g"}},
                     {"type": "function", "function": {"name": "f", "parameters": parameters}}]
            r = await client.post("/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": tool_choice})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "tools[1].function.parameters" and error["code"] == "invalid_grammar", error
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


# ----------------------------------------------------------------------------------------------------------
# Schema patterns; a grammar that reaches a part admitting no text
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "a\\"},
    {"type": "string", "pattern": "a\\\\\\"},
    {"type": "object", "properties": {"enum": {"type": "string", "pattern": "^x\\"}}},
    {"type": "object", "patternProperties": {"^k\\": {"type": "integer"}}},
    {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "\\"}]}},
])
def test_a_schema_pattern_ending_in_a_lone_backslash_is_refused(compiler, schema):
    """llguidance dropped the backslash: ``"a\\"`` held the text to one holding "a" (``"寷śesrannd"``)."""
    with pytest.raises(APIError) as refused:
        compiler.compile(*requested_grammar({"guided_json": schema}))
    assert refused.value.param == "guided_json" and refused.value.code == "invalid_grammar"
    assert "lone trailing backslash" in refused.value.message


def test_a_pattern_ending_in_an_escaped_backslash_and_data_that_ends_in_one_are_kept(compiler, tokenizer):
    schema = {"type": "object", "properties": {"p": {"type": "string", "pattern": "^a\\\\$"},
                                               "c": {"const": "b\\"}, "e": {"enum": ["pattern\\"]}},
              "required": ["p", "c", "e"], "additionalProperties": False}
    grammar = compiler.compile(*requested_grammar({"guided_json": schema}))
    assert accepts(compiler, tokenizer, grammar, '{"p":"a\\\\","c":"b\\\\","e":"pattern\\\\"}')


# ----------------------------------------------------------------------------------------------------------
# Surrogate escapes: a pair is one character; half of one is no Unicode (jiter refuses it, UTF-8 cannot write it).
# The JSON grammar is llguidance's: 1.8 pairs them; 1.7 took "\ud800" as a key (these tests fail on it).
# ----------------------------------------------------------------------------------------------------------
PAIR, HIGH, LOW = "\\ud83d\\ude00", "\\ud800", "\\udc00"
NOT_PAIRED = [HIGH, LOW, HIGH + "x", HIGH + "\\u0041", HIGH + HIGH, LOW + HIGH, "\\uDBFF", "\\uDFFF"]
# An object's key past its properties (the open additionalProperties of most tools' parameters) may be any text
# written with \u escapes; so may a string whose schema asks for them (llguidance's json_allow_general_unicode_escapes).
OPEN = {"type": "object", "properties": {"a": {"type": "integer"}}}
ESCAPED = {"type": "object", "properties": {"s": {"type": "string"}},
           "x-guidance": {"json_allow_general_unicode_escapes": True}}
KEY = '{"a":1,"ESCAPE":2}'  # ESCAPE: where each case's escape goes
SURROGATE_GRAMMARS = {
    "guided_json": (lambda: requested_grammar({"guided_json": OPEN}), KEY),
    "json_schema": (lambda: requested_grammar({"response_format": {
        "type": "json_schema", "json_schema": {"name": "r", "schema": ESCAPED}}}), '{"s":"ESCAPE"}'),
    "required": (lambda: ToolCalling([("f", OPEN)], None, True).grammar(), '[{"name":"f","parameters":' + KEY + "}]"),
    "named": (lambda: ToolCalling([("f", OPEN)], "f", True).grammar(), KEY),
}


@pytest.mark.parametrize(("grammar_of", "form"), SURROGATE_GRAMMARS.values(), ids=SURROGATE_GRAMMARS.keys())
def test_a_surrogate_escape_is_taken_only_as_a_pair(compiler, tokenizer, grammar_of, form):
    """A lone surrogate escape (``"\\ud800"``, or a low one alone) is JSON's syntax but no text: a strict parser
    (the anthropic SDK's jiter) refuses it, Python's json takes it and then cannot encode it, and this server's
    own checks refuse it sent back. The grammar takes a high surrogate only followed by a low one."""
    grammar = compiler.compile(*grammar_of())
    assert accepts(compiler, tokenizer, grammar, form.replace("ESCAPE", PAIR))
    for escape in NOT_PAIRED:
        assert not accepts(compiler, tokenizer, grammar, form.replace("ESCAPE", escape)), escape


def test_the_sampler_pushed_to_end_a_string_after_a_high_surrogate_writes_its_pair(compiler, tokenizer):
    """Logits that favour closing the key right after ``\\ud800``: the masks leave only the low surrogate's escape."""
    grammar = compiler.compile(*ToolCalling([("f", OPEN)], None, True).grammar())
    sampler = RowSampler(SamplingParams(temperature=1.0, seed=0), [], compiler.vocab_size, grammar=grammar.matcher())
    wanted = '[{"name":"f","parameters":{"a":1,"' + HIGH + '":2}}]'
    tokens = []
    for want in tokenizer.encode(wanted, add_special_tokens=False):
        logits = torch.zeros(1, compiler.vocab_size)
        logits[0, want] = 50.0
        tokens.append(sample_step(logits, [sampler]).tokens[0])
        sampler.grammar.check()
        if sampler.grammar.ended:
            break
    text = tokenizer.decode(tokens)
    pushed_to = wanted.index(HIGH) + len(HIGH)
    assert text[:pushed_to] == wanted[:pushed_to] and text[pushed_to] == "\\", text


def test_numbers_strings_and_blanks_are_only_those_strict_json_parsers_take(compiler, tokenizer):
    """RFC 8259's numbers (no leading zero, sign "+", bare "-", "." or exponent), escapes (\\u with four hex
    digits), no raw control characters in a string, and no whitespace (JSON_DEFAULTS) around or inside."""
    number = compiler.compile(*requested_grammar({"guided_json": {"type": "object", "properties": {
        "n": {"type": "number"}}, "required": ["n"], "additionalProperties": False}}))
    for taken in ("0", "-0", "10", "1.5e-3", "2E+10"):
        assert accepts(compiler, tokenizer, number, f'{{"n":{taken}}}'), taken
    for refused in ("01", "-01", "+1", ".5", "1.", "1e", "1e+", "-", "0x1", " 1", "1 "):
        assert not accepts(compiler, tokenizer, number, f'{{"n":{refused}}}'), refused
    string = compiler.compile(*requested_grammar({"response_format": {"type": "json_object"}}))
    assert accepts(compiler, tokenizer, string, '{"s":"\\u001f\\n\\"\\\\"}')
    for refused in ("\\u12", "\\u12g4", "\\x41", "a\x00", "a\x1f", "a\n"):
        assert not accepts(compiler, tokenizer, string, f'{{"s":"{refused}"}}'), refused
    for refused in ('{ "s":1}', '{"s": 1}', '{"s":1}\n', ' {"s":1}'):
        assert not accepts(compiler, tokenizer, string, refused), refused


def test_a_grammar_stuck_on_a_part_that_admits_no_text_says_so(compiler, tokenizer):
    """A $ref that leads only to itself compiles (the text can start), and nothing can follow '{"v":': the
    request fails, by its field, saying why rather than blaming llguidance's limits."""
    schema = {"type": "object", "properties": {"v": {"$ref": "#/$defs/loop"}}, "required": ["v"],
              "additionalProperties": False, "$defs": {"loop": {"$ref": "#/$defs/loop"}}}
    matcher = compiler.compile(*requested_grammar({"guided_json": schema})).matcher()
    for token in tokenizer.encode('{"v":', add_special_tokens=False):
        allowed_tokens([matcher])
        matcher.check()
        matcher.consume(token)
    allowed_tokens([matcher])
    with pytest.raises(GrammarFailed) as failed:
        matcher.check()
    assert failed.value.param == "guided_json"
    assert "nothing can continue the text" in str(failed.value) and "limits" not in str(failed.value)


# ----------------------------------------------------------------------------------------------------------
# The Hermes parser: rendered calls parsed back, whole and split
# ----------------------------------------------------------------------------------------------------------
PIECES = ["x", "<", "<tool", "</tool_call>", "<tool_call>", "\n", " ", "東", '"', "{", "}", "\\", "🙂", "\u2028"]


def random_value(rng: random.Random, depth: int = 0):
    if depth > 2 or rng.random() < 0.4:
        return rng.choice([1, -0.5, 10**20, True, None, "", "".join(rng.choices(PIECES, k=rng.randint(0, 5)))])
    if rng.random() < 0.5:
        return {"".join(rng.choices(PIECES, k=rng.randint(1, 3))): random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def test_random_calls_rendered_in_the_hermes_format_parse_back_however_split():
    """Any strings in the arguments, the call tags among them: a ``</tool_call>`` in a string closed the call
    there, and the whole call was content."""
    tools = ("f", "get", "東")
    for seed in range(300):
        rng = random.Random(seed)
        pieces, expected = [], []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.6:
                name, arguments = rng.choice(tools), {key: random_value(rng, 1) for key in rng.sample("abc", 2)}
                body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=rng.random() < 0.5,
                                  indent=rng.choice([None, 2]))
                pieces.append(f"<tool_call>\n{body}\n</tool_call>" + rng.choice(["", "\n", " "]))
                expected.append((name, arguments))
            else:
                pieces.append("".join(rng.choices(["hi", " ", "\n", "<", "tool", ">"], k=rng.randint(1, 5))))
        text = "".join(pieces)
        content, calls = HermesToolParser(tools).parse(text)
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected, text
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        parser, streamed, streamed_calls = HermesToolParser(tools), "", []
        for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
            delta, closed = parser.feed(text[start:end])
            streamed, streamed_calls = streamed + delta, streamed_calls + closed
        streamed += parser.finish()
        assert (streamed or None if calls else streamed) == content, text
        assert [c.function for c in streamed_calls] == [c.function for c in calls], text


@pytest.mark.parametrize(("text", "calls", "content"), [
    # the tag in a string, after a \uXXXX escape (json's message for that cut is not "Unterminated string")
    ('<tool_call>{"name": "f", "arguments": {"s": "\\u6771</tool_call>"}}</tool_call>',
     [("f", {"s": "東</tool_call>"})], None),
    # a call that is none either way closes at its first tag, and the call after it is read
    ('<tool_call>{"name": "f", "arguments": {"s": "open</tool_call> then <tool_call>{"name": "f", "arguments": {}}'
     '</tool_call>', [("f", {})], '<tool_call>{"name": "f", "arguments": {"s": "open</tool_call> then '),
    # a tag in a string of a call left open at the end: content, as any call left open
    ('<tool_call>{"name": "f", "arguments": {"s": "a</tool_call>b', [],
     '<tool_call>{"name": "f", "arguments": {"s": "a</tool_call>b'),
])
def test_a_closing_tag_inside_a_calls_string(text, calls, content):
    got_content, got_calls = HermesToolParser(["f"]).parse(text)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got_calls] == calls
    assert got_content == content


# ----------------------------------------------------------------------------------------------------------
# End to end: random requests streamed and not, the same seed giving the same choices
# ----------------------------------------------------------------------------------------------------------
def random_request(rng: random.Random) -> dict:
    defs = {}
    pick = rng.randrange(4)
    if pick == 0:
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "r", "schema": with_defs(random_object(rng, defs, 0), defs)}}}
    if pick == 1:
        return {"guided_choice": rng.sample(["a", "ab", "東京", 'x"y', "new\nline"], rng.randint(1, 3))}
    tools = [{"type": "function", "function": {"name": name, "parameters": parameters}}
             for name, parameters in random_tools(rng)]
    named = {"type": "function", "function": {"name": tools[0]["function"]["name"]}}
    return {"tools": tools, "tool_choice": "required" if pick == 2 else named}


def stream_of(text: str) -> dict[int, dict]:
    """Per choice: its content, its calls (name, arguments) and finish reasons, gathered from a stream."""
    out: dict[int, dict] = {}
    for line in text.split("\n"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[len("data: "):])["choices"]:
            mine = out.setdefault(choice["index"], {"content": "", "calls": [], "finish": []})
            mine["content"] += choice["delta"].get("content") or ""
            mine["calls"] += [(c["function"]["name"], c["function"]["arguments"])
                              for c in choice["delta"].get("tool_calls") or []]
            mine["finish"] += [choice["finish_reason"]] if choice["finish_reason"] else []
    return out


@pytest.mark.anyio
async def test_random_requests_stream_what_they_answer_whole(open_app):
    async with open_app() as client:
        for seed in range(12):
            rng = random.Random(seed)
            body = {**CHAT, **random_request(rng), "max_tokens": rng.choice([12, 120, 120]), "temperature": 1.0,
                    "seed": seed, "n": 2}
            # One after the other: the same batch shapes, so the same logits to the last bit
            whole = await client.post("/v1/chat/completions", json=body)
            streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
            if whole.status_code == 400:
                assert whole.json()["error"]["code"] == "invalid_grammar", whole.text
                continue
            assert whole.status_code == 200 and streamed.status_code == 200, whole.text
            chunks = stream_of(streamed.text)
            for choice in whole.json()["choices"]:
                message = choice["message"]
                calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
                assert chunks[choice["index"]] == {"content": message["content"] or "", "calls": calls,
                                                   "finish": [choice["finish_reason"]]}, body
                ids = [c["id"] for c in message.get("tool_calls") or []]
                assert len(set(ids)) == len(ids)
                if "response_format" in body and choice["finish_reason"] == "stop":
                    schema = body["response_format"]["json_schema"]["schema"]
                    assert conforms(json.loads(message["content"], parse_float=Decimal), schema, schema), choice
                if "tools" in body and choice["finish_reason"] != "length":
                    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in body["tools"]}
                    assert calls and all(conforms(json.loads(arguments, parse_float=Decimal), schemas[name],
                                                  schemas[name]) for name, arguments in calls), choice


def _tool_with_definition(definition: dict) -> dict:
    return {"type": "object", "properties": {"v": {"$ref": "#/$defs/V"}}, "required": ["v"],
            "additionalProperties": False, "$defs": {"V": definition}}


def test_definitions_that_differ_as_json_but_not_as_python_each_keep_their_own(compiler, tokenizer):
    # Python's 1 == True hid the clash: the later tool's definition overwrote the earlier one's.
    tools = [("a", _tool_with_definition({"const": 1})), ("b", _tool_with_definition({"const": True}))]
    grammar = compiler.compile(*ToolCalling(tools, None, True).grammar())
    assert accepts(compiler, tokenizer, grammar, '[{"name":"a","parameters":{"v":1}}]')
    assert not accepts(compiler, tokenizer, grammar, '[{"name":"a","parameters":{"v":true}}]')
    assert accepts(compiler, tokenizer, grammar, '[{"name":"b","parameters":{"v":true}}]')


def test_a_tool_keeps_a_ref_that_is_data(compiler, tokenizer):
    # A "$ref" inside a const is data, not a reference: under "required" it is matched as sent
    schema = {"type": "object", "properties": {"doc": {"const": {"$ref": "#/$defs/V"}}}, "required": ["doc"],
              "$defs": {"V": {"type": "integer"}}}
    grammar = compiler.compile(*ToolCalling([("a", schema)], None, True).grammar())
    assert accepts(compiler, tokenizer, grammar, '[{"name":"a","parameters":{"doc":{"$ref":"#/$defs/V"}}}]')
    assert not accepts(compiler, tokenizer, grammar, '[{"name":"a","parameters":{"doc":1}}]')


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"pattern": {"type": "string"}}, "example": {"pattern": "C:\\"}},
    {"type": "object", "properties": {"p": {"type": "string", "x-hint": {"pattern": "a\\"}}}},
    {"type": "string", "contentMediaType": "application/json", "contentSchema": {"pattern": "a\\"}},
], ids=["example", "extension", "contentSchema"])
def test_a_pattern_in_an_annotation_is_data_not_refused(compiler, schema):
    compiler.compile(*requested_grammar({"guided_json": schema}))  # a 400 since the lone-backslash check came


@pytest.mark.parametrize("schema", [
    {"type": "string", "not": {"pattern": "a\\"}},
    {"type": "object", "propertyNames": {"pattern": "^a\\"}},
    {"type": "array", "items": {"anyOf": [{"type": "string", "pattern": "b\\"}]}},
], ids=["not", "propertyNames", "items-anyOf"])
def test_a_lone_backslash_in_a_nested_schema_pattern_is_still_refused(compiler, schema):
    with pytest.raises(APIError, match="lone trailing backslash"):
        compiler.compile(*requested_grammar({"guided_json": schema}))


def test_closing_tags_inside_strings_cost_linear_work(monkeypatch):
    """Each closing tag in one of the call's strings parsed the whole body again, twice: 16000 of them (one token
    each in Qwen's and Hermes' tokenizers) took 13 s on the event loop. A tag still inside the string the last one
    stood in needs no parse."""
    import retnet.serve.tool_parsers as tool_parsers

    parses = 0
    real = tool_parsers._ends_in_string

    def counted(body):
        nonlocal parses
        parses += 1
        return real(body)

    monkeypatch.setattr(tool_parsers, "_ends_in_string", counted)
    text = '<tool_call>{"name":"f","arguments":{"t":"' + "</tool_call>" * 2000 + '"}}</tool_call>'
    for size in (len(text), 12):
        parser, content, calls = HermesToolParser(["f"]), "", []
        for start in range(0, len(text), size):
            delta, closed = parser.feed(text[start:start + size])
            content, calls = content + delta, calls + closed
        content += parser.finish()
        assert [json.loads(call.function.arguments) for call in calls] == [{"t": "</tool_call>" * 2000}]
        assert content.strip() == ""
    assert parses <= 4
    # tags in strings of their own each need a parse: past 64 of them the call is content (the README's bound)
    many = '<tool_call>{"name":"f","arguments":{"t":[' + ",".join(['"</tool_call>"'] * 100) + ']}}</tool_call>'
    content, calls = HermesToolParser(["f"]).parse(many)
    assert calls == [] and content == many
