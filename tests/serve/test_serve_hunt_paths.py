"""Requests real OpenAI clients send that the server once answered wrongly, each compared with what vLLM's OpenAI
server (or OpenAI's API) answers; every test failed before its fix."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio

CHAT = [{"role": "user", "content": "Hello!"}]


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


async def test_an_empty_model_name_is_the_served_model_as_vllm_takes_it(client):
    # Clients left unconfigured send "model": "" (vLLM's _is_model_supported: an empty name is the base model).
    r = await client.post("/v1/completions", json={"model": "", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "micro"
    r = await client.post("/v1/chat/completions", json={"model": "", "messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "micro"
    r = await client.post("/tokenize", json={"model": "", "prompt": "Hello"})
    assert r.status_code == 200, r.text
    # Any other unknown name is still refused.
    r = await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(("body", "said"), [
    (b'{"prompt": "\xff", "max_tokens": 1}', "UTF-8"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", "digits"),
])
async def test_a_body_json_cannot_read_is_a_400_saying_why(client, body, said):
    # Each was "could not be read as UTF-8 JSON", also for valid UTF-8: the client was told the wrong thing to fix.
    r = await client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert said in error["message"] and error["code"] == "invalid_json", error
    r = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 1})
    assert r.status_code == 200, r.text


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize(("path", "body"), [
    # Read, run, then copied into the response store: RecursionError, a 500 (or no answer) after the answer was
    # generated.
    ("/v1/responses", '{"input": [{"role": "user", "content": "Hello", "x": %s}], "max_output_tokens": 2}'),
    ("/v1/responses", '{"input": "Hello", "max_output_tokens": 2, "text": {"format": {"type": "text", "x": %s}}}'),
    # The template's recursion: a 400 blaming the messages.
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, '
                             '"chat_template_kwargs": {"x": %s}}'),
])
async def test_json_nested_past_any_real_request_is_refused_before_it_runs(client, path, body):
    r = await client.post(path, content=(body % _nested(700)).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_json" and "nested" in error["message"], error
    # A structured-output schema as deep as OpenAI allows (10 levels) is far from the bound.
    schema = {"type": "string"}
    for _ in range(10):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "guided_json": schema})
    assert r.status_code == 200, r.text


async def test_the_nesting_bound_reads_utf16_and_leaves_other_media_types_to_their_415(client):
    # json.loads reads UTF-16/32 bodies (the server answers them); scanned as UTF-8 bytes an escaped quote was no
    # pair of bytes, so a 700-deep body went through (RecursionError after the model ran) and a shallow one holding
    # an escaped quote was refused.
    headers = {"Content-Type": "application/json"}
    deep = '{"input": "Hello", "max_output_tokens": 2, "text": {"format": {"type": "text", "x": ' + _nested(700) + "}}}"
    r = await client.post("/v1/responses", content=deep.encode("utf-16-le"), headers=headers)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text
    shallow = '{"prompt": "a \\" quote, then ' + "[" * 200 + '", "max_tokens": 1}'
    r = await client.post("/v1/completions", content=shallow.encode("utf-16-le"), headers=headers)
    assert r.status_code == 200, r.text
    # A form is the routes' 415, whatever brackets its text holds.
    r = await client.post("/v1/completions", content=b"prompt=" + b"[" * 300,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415, r.text


def test_a_batch_line_nested_past_the_bound_is_a_400_line_of_its_own():
    from retnet.serve.run_batch import parse_lines

    good = '{"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi"}}'
    deep = '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi", "x": %s}}'
    # 100 000 levels raised RecursionError out of the whole batch; 900 parsed, then failed encoding it again.
    for depth in (100_000, 900):
        first, second = parse_lines([deep % _nested(depth), good], {"/v1/completions"})
        assert first.error is not None and first.error.code == "invalid_json", first
        assert "nested" in first.error.message and "line 1" in first.error.message
        assert second.error is None and second.custom_id == "b"
    # A body as deep as the server takes (the line's object is one level more) runs in a batch too.
    from retnet.serve.app import MAX_JSON_DEPTH

    body = '{"x": ' * (MAX_JSON_DEPTH - 1) + '{"prompt": "Hi"}' + "}" * (MAX_JSON_DEPTH - 1)
    at_bound = '{"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": ' + body + "}"
    (line,) = parse_lines([at_bound], {"/v1/completions"})
    assert line.error is None or "nested" not in line.error.message, line.error


@pytest.mark.parametrize("body", [
    b"[" * 200 + b'"\\' * (1 << 19),  # quotes all escaped: no string ever closes
    b"[" * 200 + b'"' + b"a" * (1 << 20),
    b'"' + b"[" * (1 << 20) + b'"' + b"[" * 200,  # brackets inside a string do not count; those after it do
])
def test_the_nesting_check_reads_a_megabyte_in_linear_time(body):
    import time

    from retnet.serve.app import MAX_JSON_DEPTH, json_nested_deeper_than

    start = time.perf_counter()
    assert json_nested_deeper_than(body, MAX_JSON_DEPTH)
    # Backtracking over unclosed strings took minutes on the first body; linear is milliseconds.
    assert time.perf_counter() - start < 10.0  # (a bound on the complexity, not a speed figure)
    assert not json_nested_deeper_than(b"[]" * (1 << 19), MAX_JSON_DEPTH)
    assert not json_nested_deeper_than(b'{"a": "' + b"[" * 500 + b'\\"]"}', MAX_JSON_DEPTH)
