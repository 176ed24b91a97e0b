"""Structured output: a choice's text made to follow a JSON schema, a regex, a list of choices or a grammar.

A request names what its text must follow: OpenAI's ``response_format`` (``json_object``, ``json_schema``),
vLLM's ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` and ``structured_outputs``, or
llama.cpp's ``json_schema`` and ``grammar`` (GBNF). llguidance compiles it against the tokenizer, and before every
step of a choice its matcher gives the tokens that keep the text inside the grammar: the sampler draws from
those alone (a mask, not rejection, so the text follows the grammar whatever the model, as far as
``max_tokens`` lets it finish). EOS is allowed exactly where the text is complete, and a grammar that admits
nothing more ends the choice there (``finish_reason: "stop"``). Chat's tool calls (``tool_choice``
``"required"`` or a named function) are such a grammar too, built from the tools' schemas (:func:`tool_call_grammar`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from typing import Any

import torch

from retnet.serve.protocol import APIError, check_finite_json

# JSON as OpenAI's structured outputs write it, without whitespace between tokens: with any whitespace allowed a
# model unsure of what comes next can fill max_tokens with blank lines. A oneOf whose branches llguidance cannot
# prove disjoint is read as anyOf, as vLLM's default backend (xgrammar) reads every oneOf, rather than refused: a
# 400 for schemas that vLLM serves. A schema's "x-guidance" key overrides these ({"coerce_one_of": false}: the 400).
JSON_DEFAULTS = {"whitespace_flexible": False, "coerce_one_of": True}
# The response_format types and structured_outputs keys compiled here (others, e.g. vLLM's structural_tag: a 400).
_FORMAT_KINDS = ("text", "json_object", "json_schema")
_STRUCTURED_OUTPUT_KEYS = ("json", "regex", "choice", "grammar", "json_object")


class GrammarFailed(Exception):
    """A choice's grammar failed while its text was generated: a grammar that compiled can still need more than
    llguidance's lexer or parser allow (``(a{1000}){1000}``), and its matcher then lets only EOS through. The request
    fails (400 ``invalid_grammar`` naming ``param``) rather than end on a text the grammar does not admit."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class GrammarMatcher:
    """One choice's position in its grammar (``param``: the request's field it came from)."""

    __slots__ = ("matcher", "param", "tokenizer_vocab", "vocab_size")

    def __init__(self, matcher, tokenizer_vocab: int, vocab_size: int, param: str):
        self.matcher, self.tokenizer_vocab, self.vocab_size = matcher, tokenizer_vocab, vocab_size
        self.param = param

    def check(self) -> None:
        """GrammarFailed when the matcher has failed (at its last mask or token)."""
        if self.matcher.is_error():
            reason = self.matcher.get_error().strip().splitlines()
            told = reason[0] if reason else "an error"
            # NoExtensionBias: the text so far is in the grammar, and no token (nor EOS) continues it
            told = ("nothing can continue the text so far (what the grammar asks for next admits no text, e.g. a "
                    "$ref that leads only to itself, or none that the tokenizer's tokens can spell)"
                    if told.startswith("NoExtensionBias")
                    else f"{told} (the grammar needs more than llguidance's limits allow; simplify it)")
            raise GrammarFailed(f"{self.param} failed while generating: {told}", self.param)

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def ended(self) -> bool:
        """Nothing may follow (the grammar is complete and admits no more, or EOS was taken); also after an
        error (:meth:`check`, which the engine calls first, fails the request instead)."""
        return self.matcher.is_stopped()


_BIT = torch.arange(32, dtype=torch.int32)
_executor = None
_executor_lock = threading.Lock()


def _parallel_executor():
    from llguidance import LLExecutor

    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = LLExecutor()
        return _executor


# Masks are computed on llguidance's thread pool from this many rows, where the machine has cores to spare for it:
# its threads spin a while after each batch, which on a few cores takes them from the model's forward.
PARALLEL_MASKS_FROM_ROWS = 8
PARALLEL_MASKS_MIN_CPUS = 8


def allowed_tokens(matchers: list[GrammarMatcher]) -> torch.Tensor:
    """``[len(matchers), vocab_size]`` bool: the tokens each matcher allows next (ids past the tokenizer's
    never). The masks are written into one bitmask (a bit per token), in parallel for a large batch on a
    machine with the cores for it, and expanded here in one vectorised step."""
    vocab_size, tokenizer_vocab = matchers[0].vocab_size, matchers[0].tokenizer_vocab
    words = (tokenizer_vocab + 31) // 32
    bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)
    if len(matchers) >= PARALLEL_MASKS_FROM_ROWS and (os.cpu_count() or 1) >= PARALLEL_MASKS_MIN_CPUS:
        _parallel_executor().unsafe_compute_mask_ptr([(m.matcher, i) for i, m in enumerate(matchers)],
                                                     bitmask.data_ptr(), words * 4, len(matchers))
    else:
        for i, m in enumerate(matchers):
            m.matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
    bits = ((bitmask.unsqueeze(-1) >> _BIT) & 1).bool().flatten(1)  # bit j of word w: token 32·w + j
    allowed = torch.zeros(len(matchers), vocab_size, dtype=torch.bool)
    size = min(tokenizer_vocab, vocab_size)
    allowed[:, :size] = bits[:, :size]
    return allowed


class Grammar:
    """A compiled grammar: every choice of the request gets its own matcher, copied from this one."""

    __slots__ = ("param", "prototype", "tokenizer_vocab", "vocab_size")

    def __init__(self, prototype, tokenizer_vocab: int, vocab_size: int, param: str):
        self.prototype, self.tokenizer_vocab, self.vocab_size = prototype, tokenizer_vocab, vocab_size
        self.param = param

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.prototype.deep_copy(), self.tokenizer_vocab, self.vocab_size, self.param)


class GrammarCompiler:
    """Compiles requests' grammars against the served tokenizer (wrapped once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int], tokenizer_lock: threading.Lock | None = None):
        """``tokenizer_lock``: held while the tokenizer is read (the server's, which other threads encode with)."""
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self._llg_tokenizer = None
        self._lock = threading.Lock()

    def _wrapped(self, param: str):
        with self._lock:
            if self._llg_tokenizer is None:
                _llguidance(param)
                import llguidance.hf
                eos = sorted(t for t in self.eos_ids if t < len(self.tokenizer))
                try:
                    with self.tokenizer_lock:
                        self._llg_tokenizer = llguidance.hf.from_tokenizer(
                            self.tokenizer, n_vocab=len(self.tokenizer), eos_token=eos or None)
                except ValueError as error:  # a slow (Python) tokenizer: llguidance reads the fast one's JSON
                    raise APIError(400, f"{param}: structured output needs a fast tokenizer; this model's "
                                   f"cannot be used ({error})", param, "unsupported_parameter") from None
            return self._llg_tokenizer

    def compile(self, grammar: str, param: str) -> Grammar:
        """The grammar (llguidance's form, see :func:`requested_grammar`) checked and compiled; a 400 naming
        ``param`` when it cannot be (a bad regex, a schema feature llguidance lacks, an unknown rule ...)."""
        from llguidance import LLMatcher

        tokenizer = self._wrapped(param)
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise APIError(400, f"{param} cannot be used: {matcher.get_error().strip()}", param, "invalid_grammar")
        # A grammar whose language is empty (a regex such as [^\s\S]) compiles; only its first mask finds that
        # nothing can start it, and the matcher then lets EOS through: an empty text it does not admit, answered 200.
        first = matcher.deep_copy()
        first.compute_bitmask()
        if first.is_error():
            reason = first.get_error().strip()
            # NoExtensionBias: nothing can start it; another stop (a parser limit) is told in llguidance's words
            told = ("it admits no text (no string matches it, or none that the tokenizer's tokens can spell)"
                    if reason.startswith("NoExtensionBias") else reason.splitlines()[0] if reason else "it stops at once")
            raise APIError(400, f"{param} cannot be used: {told}", param, "invalid_grammar")
        return Grammar(matcher, tokenizer.vocab_size, self.vocab_size, param)


def requested_grammar(fields: dict[str, Any]) -> tuple[str, str] | None:
    """(llguidance grammar, where in the request it came from) of a request's structured-output fields (name ->
    value, those not sent left out or None), or None when it asks for free text: the field, or for
    ``response_format`` the schema inside it (``response_format.json_schema.schema``), which a compile error then
    names, as a malformed schema is named here; the field is what precedes the first dot. More than one field is
    refused, as is a value of the wrong shape, each with a 400 naming the field."""
    asked = [(name, value) for name, value in fields.items() if value is not None]
    response_format = dict(asked).get("response_format")
    if response_format is not None and _format_kind(response_format) == "text":
        asked = [(name, value) for name, value in asked if name != "response_format"]
    if not asked:
        return None
    if len(asked) > 1:
        names = ", ".join(name for name, _ in asked)
        raise APIError(400, f"give one way of structuring the output; got {names}", asked[1][0], "invalid_grammar")
    name, value = asked[0]
    _llguidance(name)  # without it: a 400 naming the field, before any of its values is read
    if name == "response_format":
        kind = _format_kind(value)
        if kind == "json_object":
            # llama.cpp's form of a schema: {"type": "json_object", "schema": {...}}; dropped, any object would do.
            if value.get("schema") is not None:
                return _json("response_format.schema", value["schema"]), "response_format.schema"
            return _json(name, {"type": "object"}), name
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "response_format of type json_schema needs a json_schema object: {\"name\": ..., "
                           "\"schema\": {...}}", "response_format.json_schema", "invalid_grammar")
        where = "response_format.json_schema.schema" if "schema" in spec else name
        return _json(where, spec.get("schema", {"type": "object"})), where
    if name in ("guided_json", "json_schema"):
        return _json(name, value), name
    if name == "guided_regex":
        return _regex(name, value), name
    if name == "guided_choice":
        return _choice(name, value), name
    if name in ("guided_grammar", "grammar"):
        return _lark(name, value), name
    if name == "structured_outputs":
        return _structured_outputs(value)
    raise AssertionError(name)


def _llguidance(param: str):
    """The llguidance module; without it (a server installed without the [serve] extra's llguidance) a request
    for structured output is a 400 naming its field, and free text is served as ever."""
    try:
        import llguidance
    except ImportError:
        raise APIError(400, f"{param}: structured output needs llguidance on the server (pip install "
                       f"'retnet-stack[serve]')", param, "unsupported_parameter") from None
    return llguidance


def _format_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in _FORMAT_KINDS:
        raise APIError(400, f"response_format type must be one of {', '.join(_FORMAT_KINDS)}; got {kind!r}",
                       "response_format", "invalid_grammar")
    return kind


def _structured_outputs(value: Any) -> tuple[str, str]:
    """vLLM's ``structured_outputs`` object, one of its keys set: (its grammar, ``structured_outputs.<key>``)."""
    if not isinstance(value, dict):
        raise APIError(400, "structured_outputs must be an object with one of the keys "
                       f"{', '.join(_STRUCTURED_OUTPUT_KEYS)}", "structured_outputs", "invalid_grammar")
    given = [key for key, item in value.items() if item is not None and item is not False
             and key not in ("disable_any_whitespace", "disable_fallback", "disable_additional_properties",
                             "whitespace_pattern")]
    unknown = [key for key in given if key not in _STRUCTURED_OUTPUT_KEYS]
    if unknown or len(given) != 1:
        raise APIError(400, f"structured_outputs needs exactly one of {', '.join(_STRUCTURED_OUTPUT_KEYS)}; got "
                       f"{', '.join(given) or 'none'}", "structured_outputs", "invalid_grammar")
    key = given[0]
    param = f"structured_outputs.{key}"
    if key == "json_object":
        return _json(param, {"type": "object"}), param
    if key == "json":
        schema = value[key]
        closing = value.get("disable_additional_properties")
        if closing is not None and not isinstance(closing, bool):  # ("false" is truthy)
            raise APIError(400, f"structured_outputs.disable_additional_properties must be a boolean; got "
                           f"{closing!r}", "structured_outputs.disable_additional_properties", "invalid_grammar")
        if closing:
            schema = _closed(_schema(param, schema))
        return _json(param, schema), param
    if key == "regex":
        return _regex(param, value[key]), param
    if key == "choice":
        return _choice(param, value[key]), param
    return _lark(param, value[key]), param


# Keywords whose value maps names to subschemas: their keys are names, not keywords, so a property named
# "properties" is no object to close. And those whose value is JSON data, not a schema, kept as they are.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA_KEYWORDS = ("const", "enum", "default", "examples")
# Keywords whose value is a schema or a list of schemas.
_SUBSCHEMAS = ("items", "prefixItems", "additionalItems", "contains", "additionalProperties", "propertyNames",
               "unevaluatedItems", "unevaluatedProperties", "allOf", "anyOf", "oneOf", "not", "if", "then", "else")


def _schema_map(node: Any, transform) -> Any:
    """The schema with ``transform`` applied to each of its objects, innermost first: it is handed a new dict
    (its to change) whose subschemas are already transformed. Every value but data (``_DATA_KEYWORDS``) is
    walked; a ``_SCHEMA_MAPS`` value's keys are names, not a schema, and only its values are walked."""
    if isinstance(node, list):
        return [_schema_map(item, transform) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: value if key in _DATA_KEYWORDS
           else {name: _schema_map(sub, transform) for name, sub in value.items()}
           if key in _SCHEMA_MAPS and isinstance(value, dict)
           else _schema_map(value, transform) for key, value in node.items()}
    return transform(out)


def _closed(node: Any) -> Any:
    """vLLM's ``disable_additional_properties``: the schema with ``additionalProperties: false`` on every object
    that lists its properties and does not say otherwise (vLLM's guidance backend does the same)."""
    return _schema_map(node, _close)


def _close(node: dict) -> dict:
    if "additionalProperties" not in node and ("properties" in node or "patternProperties" in node):
        node["additionalProperties"] = False
    return node


def _text(param: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{param} must be a non-empty string", param, "invalid_grammar")
    return value


# vLLM's regex backends read \d, \w and \s (and \D, \W, \S) as ASCII classes (xgrammar's [0-9], [a-zA-Z0-9_],
# outlines' likewise); llguidance's regexes are Rust's, whose classes are Unicode's (\d takes "١٢٣"). A JSON schema's
# "pattern" is left to llguidance, which reads it as ECMAScript does.
ASCII_CLASSES = "dws"


def _regex(param: str, regex: Any) -> str:
    """A regex (``guided_regex``, ``structured_outputs.regex``) as the whole text, its classes ASCII."""
    from llguidance import LLMatcher, regex_to_lark

    text = _text(param, regex)
    if (len(text) - len(text.rstrip("\\"))) % 2:  # regex_to_lark would drop the lone backslash, not refuse it
        raise APIError(400, f"{param} cannot be used: it ends inside an escape (a lone trailing backslash); got "
                       f"{text[-40:]!r}", param, "invalid_grammar")
    return LLMatcher.grammar_from_lark(f"start: /{regex_to_lark(text, ASCII_CLASSES)}/")


def _json(param: str, schema: Any) -> str:
    """A JSON schema (an object, or its JSON text as vLLM's guided_json also takes it)."""
    return _checked_json(param, _checked(param, schema))


def _checked_json(param: str, schema: dict) -> str:
    """The grammar of a schema :func:`_checked` already returned."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
    except ValueError as error:
        raise APIError(400, f"{param} cannot be used: {error}", param, "invalid_grammar") from None


def _checked(param: str, schema: Any) -> dict:
    """The schema as it is compiled (discriminated unions' tags required), a 400 naming ``param`` for what
    llguidance would misread."""
    schema = _tags_required(_schema(param, schema))
    # llguidance would write NaN and Infinity as null: an enum of [NaN] held the text to `null`, and a minimum of
    # Infinity failed naming a null
    check_finite_json(schema, param, "invalid_grammar")
    _check_patterns(param, schema)
    return schema


def _tags_required(node: Any) -> Any:
    """The schema with each discriminated union's tag required: OpenAPI's ``discriminator`` beside a ``oneOf`` (or
    ``anyOf``), as pydantic writes a ``Field(discriminator=...)`` union, names a property every value holds. pydantic
    writes a tag with a default (``kind: Literal["cat"] = "cat"``) as optional: open branches then overlap, and the
    oneOf was a 400; closed ones compiled, but a text could leave the tag out, which pydantic refuses ("Unable to
    extract tag"). Required, the branches are disjoint by their tags' ``const``s, and the oneOf is exact."""
    return _schema_map(node, _tag_required)


def _tag_required(node: dict) -> dict:
    discriminator, required = node.get("discriminator"), node.get("required", [])
    tag = discriminator.get("propertyName") if isinstance(discriminator, dict) else None
    if (isinstance(tag, str) and ("oneOf" in node or "anyOf" in node) and isinstance(required, list)
            and tag not in required):
        node["required"] = [*required, tag]
    return node


def _check_patterns(param: str, node: Any) -> None:
    """A 400 for a ``pattern`` (or a ``patternProperties`` key) that ends in a lone backslash, which no regex
    dialect reads: llguidance dropped the backslash, and ``"a\\"`` held the text to one holding ``a``."""
    if isinstance(node, list):
        for item in node:
            _check_patterns(param, item)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        patterns = ([value] if key == "pattern" and isinstance(value, str)
                    else list(value) if key == "patternProperties" and isinstance(value, dict) else [])
        for pattern in patterns:
            if (len(pattern) - len(pattern.rstrip("\\"))) % 2:
                raise APIError(400, f"{param} cannot be used: the {key} {pattern[-40:]!r} ends inside an escape (a "
                               f"lone trailing backslash)", param, "invalid_grammar")
        if key in (*_SCHEMA_MAPS, "dependencies") and isinstance(value, dict):  # names, then subschemas
            for subschema in value.values():
                _check_patterns(param, subschema)
        elif key in _SUBSCHEMAS:  # only keywords whose value is a schema (or a list of them): not annotations,
            _check_patterns(param, value)  # data or extensions ("example", "x-..."), which may hold a "pattern"


def _schema(param: str, schema: Any) -> dict:
    if isinstance(schema, str):
        from retnet.serve.app import MAX_JSON_DEPTH, json_nested_deeper_than

        # The body's own nesting is refused before it is read; a schema sent as JSON text is read here, where
        # json.loads' RecursionError (past ~1000 levels) was a 500 and a schema below it still too deep for the
        # recursive code that reads it next.
        if json_nested_deeper_than(schema.encode(errors="surrogatepass"), MAX_JSON_DEPTH):
            raise APIError(400, f"{param}: its JSON is nested deeper than {MAX_JSON_DEPTH} levels", param,
                           "invalid_grammar")
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise APIError(400, f"{param} is not JSON: {error}", param, "invalid_grammar") from None
    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON schema object; got {type(schema).__name__}", param,
                       "invalid_grammar")
    return schema


# A function whose parameters are left out takes any JSON object (OpenAI's reading).
NO_PARAMETERS = {"type": "object"}


def _parameters(param: str, parameters: Any) -> dict:
    """A tool's ``parameters`` as the schema of its arguments, which are a JSON object (OpenAI's rule for a
    function's parameters; the "auto" parser takes no other arguments either). Empty (``{}``) is left out, as vLLM
    reads it. A schema that names no ``type`` is held to an object (as a schema, ``{"properties": ...}`` admits
    ``"text"`` and ``0``, which were then a call's arguments), and one whose ``type`` leaves objects out is a 400."""
    schema = NO_PARAMETERS if parameters is None else _schema(param, parameters)
    if not schema:
        return NO_PARAMETERS
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else None
    if kind is not None and kinds is not None and "object" not in kinds:
        raise APIError(400, f"{param} cannot be used: a function's arguments are a JSON object, and its parameters' "
                       f"type is {json.dumps(kind)}", param, "invalid_grammar")
    if kind is None or kinds is not None:  # (a type of another shape is llguidance's to refuse)
        return {**schema, "type": "object"}
    return schema


def tool_call_grammar(functions: list[tuple[str, Any]], named: str | None, parallel: bool = True) -> tuple[str, str]:
    """(llguidance grammar, the field it came from) of tool calls to ``functions`` (each tool's name and
    ``parameters``, in the request's order; None or empty: ``NO_PARAMETERS``).

    ``named``: one call to that function, the text its arguments (its parameters' schema). None
    (``tool_choice: "required"``): vLLM's format, a JSON array of at least one ``{"name": ..., "parameters":
    {...}}``, the name one of the functions' and the parameters that function's (at most one item unless
    ``parallel``), written as JSON_DEFAULTS write JSON (no whitespace). Each schema is checked on its own first, so
    that an error names its tool, and is then a grammar of its own inside the array's (Lark's ``%json``), as a
    named call compiles it: its refs (``#``, ``#/$defs/...``, by its ``$id``) resolve in it alone, whatever the
    other tools define, and its ``"x-guidance"`` options apply to it alone (llguidance reads them at a schema's
    root only, so nested in one schema of the whole array they were ignored: ``whitespace_flexible``, ``lenient``
    ...).

    The grammars of the last TOOL_GRAMMAR_CACHE_SIZE tool sets are kept (TOOL_GRAMMAR_CACHE_CHARS of text at
    most): an agent loop sends the same tools with every turn, and building 128 tools' grammar takes ~60 ms of
    CPU (checking each schema on its own, mostly)."""
    _llguidance("tool_choice")  # (without it: the 400, cached or not)
    try:
        # As JSON, not as Python compares them ({"const": 1} and {"const": true} differ), keys in their order (a
        # schema's properties are written in it); a digest, so that the keys kept hold no schemas
        key = hashlib.sha256(json.dumps([functions, named, parallel]).encode()).digest()
    except (TypeError, ValueError, RecursionError):  # no JSON (called with other values): built, not kept
        return _tool_call_grammar(functions, named, parallel)
    global _tool_grammar_chars
    with _tool_grammars_lock:
        built = _tool_grammars.get(key)
        if built is not None:
            _tool_grammars.move_to_end(key)
            return built
    built = _tool_call_grammar(functions, named, parallel)  # (an error is raised anew each time, not kept)
    with _tool_grammars_lock:
        if key not in _tool_grammars and len(built[0]) <= TOOL_GRAMMAR_CACHE_CHARS:
            _tool_grammars[key] = built
            _tool_grammar_chars += len(built[0])
            while len(_tool_grammars) > TOOL_GRAMMAR_CACHE_SIZE or _tool_grammar_chars > TOOL_GRAMMAR_CACHE_CHARS:
                _tool_grammar_chars -= len(_tool_grammars.popitem(last=False)[1][0])
    return built


TOOL_GRAMMAR_CACHE_SIZE = 32
TOOL_GRAMMAR_CACHE_CHARS = 1 << 24
_tool_grammars: OrderedDict[bytes, tuple[str, str]] = OrderedDict()
_tool_grammar_chars = 0
_tool_grammars_lock = threading.Lock()


def _tool_call_grammar(functions: list[tuple[str, Any]], named: str | None, parallel: bool) -> tuple[str, str]:
    LLMatcher = _llguidance("tool_choice").LLMatcher

    if named is not None:
        index = [name for name, _ in functions].index(named)
        param = f"tools[{index}].function.parameters"
        return _json(param, _parameters(param, functions[index][1])), param
    calls, rules = [], []
    for index, (name, parameters) in enumerate(functions):
        param = f"tools[{index}].function.parameters"
        schema = _checked(param, _parameters(param, parameters))
        error = LLMatcher.validate_grammar(_checked_json(param, schema))
        if error:
            raise APIError(400, f"{param} cannot be used: {error.strip()}", param, "invalid_grammar")
        # (a %json takes no defaults: the schema's own options go over them, as grammar_from_json_schema's would)
        options = schema.get("x-guidance")
        schema = {**schema, "x-guidance": {**JSON_DEFAULTS, **(options if isinstance(options, dict) else {})}}
        # One literal up to the parameters (the name is the text json.dumps writes, as a const of it was): a
        # shorter one shared by the calls, followed by the name, let llguidance's lexer take it where a longer
        # literal was meant, and no call could be written
        head = "{" + f'"name":{json.dumps(name, ensure_ascii=False)},"parameters":'
        calls.append(f"{json.dumps(head)} parameters_{index} \"}}\"")
        rules.append(f"parameters_{index}: %json {json.dumps(schema)}")
    items = "call" if not parallel else 'call ("," call)*'
    lark = "\n".join([f'start: "[" {items} "]"', "call: " + " | ".join(calls), *rules])
    return LLMatcher.grammar_from_lark(lark), "tools"


def _choice(param: str, choices: Any) -> str:
    """One of the strings, exactly: a Lark rule of their literals (JSON string syntax is Lark's)."""
    from llguidance import LLMatcher

    if (not isinstance(choices, list) or not choices
            or not all(isinstance(choice, str) and choice for choice in choices)):
        raise APIError(400, f"{param} must be a non-empty list of non-empty strings", param, "invalid_grammar")
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in choices))


def _lark(param: str, grammar: Any) -> str:
    """A Lark grammar (llguidance's dialect), or a GBNF one (llama.cpp's), told apart as llguidance does."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return LLMatcher.grammar_from_lark(any_to_lark(_text(param, grammar)))
    except APIError:
        raise
    except Exception as error:  # the GBNF converter's own errors
        raise APIError(400, f"{param} cannot be used: {error}", param, "invalid_grammar") from None


__all__ = ["Grammar", "GrammarCompiler", "GrammarFailed", "GrammarMatcher", "allowed_tokens", "requested_grammar", "tool_call_grammar"]
