"""Structured output (retnet/serve/structured.py): the request fields that ask for it, the sampler's masks, and
the routes end to end on the micro random model, whose unconstrained text is noise: what it writes under a
grammar follows the grammar only because the masks make it."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from retnet.serve.protocol import APIError
from retnet.serve.sampling import RowSampler, SamplingParams, sample_step
from retnet.serve.structured import GrammarCompiler, requested_grammar

from .test_extras import CHAT, sse_events, streamed_choices

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "tag": {"enum": ["red", "green"]}},
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    # A model vocabulary wider than the tokenizer's (padded embeddings): those ids are never allowed.
    return GrammarCompiler(tokenizer, len(tokenizer) + 8, {tokenizer.eos_token_id})


def compiled(compiler, **fields):
    return compiler.compile(*requested_grammar(fields))


def run_sampler(compiler, tokenizer, fields: dict, *, steps: int = 80, seed: int = 0, **params):
    """Tokens sampled from random logits under the grammar until it ends, EOS, or ``steps``."""
    grammar = compiled(compiler, **fields)
    sampler = RowSampler(SamplingParams(temperature=1.0, seed=seed, **params), [], compiler.vocab_size,
                         grammar=grammar.matcher())
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(steps):
        token = sample_step(torch.randn(1, compiler.vocab_size, generator=generator) * 3, [sampler]).tokens[0]
        tokens.append(token)
        if token == tokenizer.eos_token_id or sampler.grammar.ended:
            break
    return tokens, sampler


# ----------------------------------------------------------------------------------------------------------
# The fields
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    {}, {"response_format": None}, {"response_format": {"type": "text"}}, {"guided_json": None},
])
def test_free_text_asks_for_no_grammar(fields):
    assert requested_grammar(fields) is None


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": {"type": "string", "format": "no-such-format"}}, "guided_json"),
    # schemas llguidance refuses only when compiling are named where they are too, not by the request's field
    ({"guided_json": {"type": 5}}, "guided_json"),
    ({"response_format": {"type": "json_object", "schema": {"type": 5}}}, "response_format.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_regex": 7}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["yes", 1]}, "guided_choice"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"grammar": "root ::= missing"}, "grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
    ({"structured_outputs": "a"}, "structured_outputs"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_a_request_that_cannot_be_compiled_is_refused_by_its_field(compiler, fields, param):
    with pytest.raises(APIError) as refused:
        compiled(compiler, **fields)
    assert refused.value.status == 400 and refused.value.param == param
    assert refused.value.code == "invalid_grammar"


# ----------------------------------------------------------------------------------------------------------
# The sampler under a grammar
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("fields", "check"), [
    ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text)),
    ({"guided_choice": ["yes", "no", "東京 \"quoted\""]}, lambda text: text in ("yes", "no", "東京 \"quoted\"")),
    ({"guided_json": SCHEMA}, lambda text: _fits(json.loads(text))),
    ({"grammar": 'root ::= "(" [a-c]+ ")"'}, lambda text: re.fullmatch(r"\([a-c]+\)", text)),
])
def test_random_logits_under_a_grammar_give_text_in_it(compiler, tokenizer, fields, check, seed):
    tokens, sampler = run_sampler(compiler, tokenizer, fields, seed=seed)
    text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])
    assert sampler.grammar.ended or tokens[-1] == tokenizer.eos_token_id, text
    assert check(text), text
    assert all(t < len(tokenizer) for t in tokens)  # the padded ids past the tokenizer's: never


def _fits(value) -> bool:
    return (set(value) == {"ok", "n", "tag"} and isinstance(value["ok"], bool) and type(value["n"]) is int
            and 0 <= value["n"] <= 99 and value["tag"] in ("red", "green"))


def test_without_the_grammar_the_same_logits_leave_it(compiler, tokenizer):
    """The test above can fail: the same random draws, unmasked, are no three digits and a dash."""
    generator = torch.Generator().manual_seed(0)
    sampler = RowSampler(SamplingParams(temperature=1.0, seed=0), [], compiler.vocab_size)
    tokens = [sample_step(torch.randn(1, compiler.vocab_size, generator=generator) * 3, [sampler]).tokens[0]
              for _ in range(8)]
    assert not re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", tokenizer.decode(tokens))


def test_masks_computed_ahead_give_the_same_tokens(compiler, tokenizer):
    """The engine computes the grammars' masks while the forward runs, then passes them in: the same draws."""
    from retnet.serve.sampling import grammar_masks_of

    grammar = compiled(compiler, guided_json=SCHEMA)
    runs = []
    for ahead in (False, True):
        rows = [RowSampler(SamplingParams(temperature=1.0, seed=i), [], compiler.vocab_size,
                           grammar=grammar.matcher() if i % 2 else None) for i in range(4)]
        generator, tokens = torch.Generator().manual_seed(0), []
        for _ in range(12):
            masks = grammar_masks_of(rows) if ahead else None
            tokens.append(sample_step(torch.randn(4, compiler.vocab_size, generator=generator) * 3, rows,
                                      masks).tokens)
        runs.append(tokens)
    assert runs[0] == runs[1]


def test_the_thread_pool_computes_the_masks_one_row_at_a_time_does(compiler, tokenizer, monkeypatch):
    """The pool (large batches on machines with the cores) and the serial loop (this 2-core one) agree."""
    from retnet.serve import structured

    grammar = compiled(compiler, guided_json=SCHEMA)
    matchers = [grammar.matcher() for _ in range(9)]
    for i, matcher in enumerate(matchers):  # each in another state of the schema
        for token in tokenizer.encode('{"ok":true,"n":42,"tag":"red"}', add_special_tokens=False)[:i]:
            matcher.consume(token)
    monkeypatch.setattr(structured, "PARALLEL_MASKS_MIN_CPUS", 10**6)
    serial = structured.allowed_tokens(matchers)
    monkeypatch.setattr(structured, "PARALLEL_MASKS_MIN_CPUS", 1)
    parallel = structured.allowed_tokens(matchers)
    assert torch.equal(serial, parallel)
    assert len({tuple(row.nonzero().flatten().tolist()) for row in serial}) > 3  # the states differ


def test_the_grammar_wins_over_masks_that_would_leave_no_token(compiler, tokenizer):
    """allowed_token_ids without a digit, under a grammar of digits: the grammar's tokens stay."""
    letters = frozenset(tokenizer.convert_tokens_to_ids(list("abc")))
    tokens, _ = run_sampler(compiler, tokenizer, {"guided_regex": "[0-9]{2}"}, steps=4, allowed_token_ids=letters)
    assert re.fullmatch(r"[0-9]{2}", tokenizer.decode(tokens[:2]))


def test_masks_that_leave_grammar_tokens_still_apply(compiler, tokenizer):
    """logit_bias and allowed_token_ids within a grammar: of "a" and "b", only "b" may be sampled."""
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "ab"}
    for seed in range(3):
        tokens, _ = run_sampler(compiler, tokenizer, {"guided_regex": "[ab]{5}"}, seed=seed,
                                allowed_token_ids=frozenset(ids.values()), logit_bias={ids["a"]: -100.0})
        assert tokenizer.decode(tokens[:5]) == "bbbbb"


# ----------------------------------------------------------------------------------------------------------
# The routes
# ----------------------------------------------------------------------------------------------------------
# Every way of asking, each with what its text must be. Sampled at temperature 1 from a random model: the text
# holds only because the masks make it.
ASKED = [
    ({"guided_json": SCHEMA}, lambda text: _fits(json.loads(text))),
    ({"guided_json": json.dumps(SCHEMA)}, lambda text: _fits(json.loads(text))),
    ({"json_schema": SCHEMA}, lambda text: _fits(json.loads(text))),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}},
     lambda text: _fits(json.loads(text))),
    ({"response_format": {"type": "json_object"}}, lambda text: isinstance(json.loads(text), dict)),
    ({"structured_outputs": {"json": SCHEMA}}, lambda text: _fits(json.loads(text))),
    ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text)),
    ({"structured_outputs": {"regex": r"[A-C]{4}"}}, lambda text: re.fullmatch(r"[A-C]{4}", text)),
    ({"guided_choice": ["yes", "no", "maybe"]}, lambda text: text in ("yes", "no", "maybe")),
    ({"structured_outputs": {"choice": ["left", "right"]}}, lambda text: text in ("left", "right")),
    ({"guided_grammar": 'start: "(" /[a-c]+/ ")"'}, lambda text: re.fullmatch(r"\([a-c]+\)", text)),
    ({"grammar": 'root ::= "x" [0-9] [0-9]?'}, lambda text: re.fullmatch(r"x[0-9]{1,2}", text)),
]


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("fields", "check"), ASKED, ids=[f"{next(iter(f))}-{i}" for i, (f, _) in enumerate(ASKED)])
async def test_every_way_of_asking_gives_text_that_follows_it(client, path, fields, check):
    base = CHAT if path.endswith("chat/completions") else {"prompt": "def add(a, b):"}
    body = {**base, **fields, "max_tokens": 120, "temperature": 1.0, "n": 3, "seed": 11}
    r = await client.post(path, json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert choice["finish_reason"] == "stop", text  # the grammar ended it, well before max_tokens
        assert check(text), text


@pytest.mark.anyio
async def test_free_text_from_the_same_request_breaks_the_grammar(client):
    """The test above can fail: unmasked, the same requests' text is no JSON object."""
    body = {**CHAT, "max_tokens": 40, "temperature": 1.0, "n": 3, "seed": 7, "ignore_eos": True}
    for choice in (await client.post("/v1/chat/completions", json=body)).json()["choices"]:
        with pytest.raises(ValueError):
            _fits(json.loads(choice["message"]["content"]))


@pytest.mark.anyio
async def test_a_stream_follows_the_grammar_too(client):
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}},
            "max_tokens": 120, "temperature": 1.0, "seed": 3, "stream": True}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = streamed_choices(sse_events(r.text), chat=True)[0]
    assert choice["finish"] == ["stop"] and _fits(json.loads(choice["text"]))


@pytest.mark.anyio
async def test_batching_leaves_a_constrained_choice_as_it_is_alone(client):
    """Greedy under a grammar gives the same tokens alone and among other requests, constrained or not."""
    constrained = {"prompt": "class Stack:", "guided_json": SCHEMA, "max_tokens": 60, "temperature": 0,
                   "return_token_ids": True}
    alone = (await client.post("/v1/completions", json=constrained)).json()["choices"][0]
    others = [{"prompt": f"for i in range({n}):", "max_tokens": 30, "temperature": 1.0, "seed": n,
               **({"guided_regex": "[a-z]{3,9}"} if n % 2 else {})} for n in range(8)]
    together = await asyncio.gather(*(client.post("/v1/completions", json=body) for body in [*others, constrained]))
    assert all(r.status_code == 200 for r in together)
    assert together[-1].json()["choices"][0]["token_ids"] == alone["token_ids"]
    assert _fits(json.loads(alone["text"]))


@pytest.mark.anyio
async def test_max_tokens_cuts_the_text_short_of_the_grammar(client):
    r = await client.post("/v1/completions", json={"prompt": "hi", "guided_json": SCHEMA, "max_tokens": 3})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"].startswith("{")


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_grammar_that_cannot_be_compiled_is_a_400_and_the_server_serves_on(client, path):
    base = CHAT if path.endswith("chat/completions") else {"prompt": "hi", "max_tokens": 3}
    for field, value in (("guided_regex", "(unclosed"), ("guided_json", {"type": "nonsense"}),
                         ("guided_choice", "yes"), ("response_format", {"type": "xml"}),
                         ("grammar", "root ::= undefined")):
        r = await client.post(path, json={**base, field: value})
        assert r.status_code == 400, (field, r.text)
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"] and error["code"] == "invalid_grammar"
    assert (await client.post(path, json=base)).status_code == 200


@pytest.mark.anyio
async def test_min_tokens_and_ignore_eos_do_not_take_the_text_past_its_grammar(client):
    """min_tokens bans EOS while the grammar could go on (the digits continue), and a grammar with nothing
    left ends the choice before min_tokens, with ignore_eos too: the text never leaves the grammar."""
    body = {"prompt": "hi", "max_tokens": 30, "temperature": 1.0, "seed": 1, "n": 4}
    digits = (await client.post("/v1/completions", json={**body, "guided_regex": "[0-9]+", "min_tokens": 6})).json()
    for choice in digits["choices"]:
        assert re.fullmatch("[0-9]+", choice["text"]) and choice["finish_reason"] in ("stop", "length")
        assert len(choice["text"]) >= 6 or choice["finish_reason"] == "length"
    short = (await client.post("/v1/completions", json={**body, "guided_choice": ["yes", "no"], "min_tokens": 10,
                                                        "ignore_eos": True})).json()
    assert {c["text"] for c in short["choices"]} <= {"yes", "no"}
    assert {c["finish_reason"] for c in short["choices"]} == {"stop"}


@pytest.mark.anyio
async def test_without_llguidance_free_text_is_served_and_structured_output_is_a_400(client, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llguidance", None)  # what an install without it gives: ImportError
    assert requested_grammar({"response_format": {"type": "text"}, "guided_json": None}) is None
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "guided_regex": "[a-z]+"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "guided_regex" and error["code"] == "unsupported_parameter"
    assert "llguidance" in error["message"]
    tool = {"type": "function", "function": {"name": "f"}}
    r = await client.post("/v1/chat/completions", json={**CHAT, "tools": [tool], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


@pytest.mark.anyio
async def test_structured_requests_are_counted_by_the_field_that_asked(client):
    bodies = [{"guided_regex": "[0-9]{2}"}, {"guided_regex": "[a-c]{2}"}, {"response_format": {"type": "json_object"}},
              {"response_format": {"type": "text"}}, {"guided_regex": "(bad"}]
    for body in bodies:
        await client.post("/v1/chat/completions", json={**CHAT, **body, "max_tokens": 8})
    text = (await client.get("/metrics")).text
    assert 'retnet_structured_requests_total{field="guided_regex"} 2.0' in text  # the refused one is not counted
    assert 'retnet_structured_requests_total{field="response_format"} 1.0' in text
