"""Bugs found hunting the server's newer APIs (the Responses API, Anthropic's Messages API, structured output, tool
calls), each test failing on the code before its fix."""

from __future__ import annotations

import json

import pytest

from .conftest import serve_app

NUMBER = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"],
          "additionalProperties": False}


def _chat_result(arguments: str, text: str | None = None):
    from retnet.serve.protocol import ChatCompletionResponse

    return ChatCompletionResponse.model_validate({
        "id": "chatcmpl-1", "created": 0, "model": "micro",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": text,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})


@pytest.mark.parametrize("arguments", [
    '{"x": 1e999}',  # past a double's range: json.loads made it inf, which the JSON answer could not write (500)
    '{"s": "\\ud800"}',  # a lone surrogate's escape: json.loads made it a str that UTF-8 could not encode (500)
    '{"x": 1e1, "y": 1.50}',  # written back as 10.0 and 1.5
])
def test_a_messages_tool_use_input_is_written_as_the_model_wrote_it(arguments):
    """The whole Message's tool_use ``input`` is the call's arguments as chat has them (what a stream's
    input_json_delta sends), not their json.loads written back."""
    from retnet.serve.messages import from_chat, render_message

    body = render_message(from_chat(_chat_result(arguments, "Sure: ")))
    assert f'"input":{arguments}}}]' in body.decode()
    message = json.loads(body)
    assert [block["type"] for block in message["content"]] == ["text", "tool_use"]
    assert message["content"][0]["text"] == "Sure: " and message["stop_reason"] == "tool_use"
    assert message["content"][1]["input"] == json.loads(arguments)


@pytest.mark.anyio
async def test_a_messages_call_with_a_number_past_a_double_is_answered_not_a_500(model_dir, tokenizer):
    """End to end: a named tool's number held by the grammar, the sampler pushed (logit_bias) to write 1e1...1
    exponents; before the fix those past 1e308 failed the answer with a 500 after the generation."""
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "e1}"}
    bias = {str(ids["e"]): 30, str(ids["1"]): 25, str(ids["}"]): 23}
    body = {"model": "micro", "max_tokens": 30, "logit_bias": bias, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "f", "input_schema": NUMBER}], "tool_choice": {"type": "tool", "name": "f"}}
    written = []
    async with serve_app(model_dir) as client:
        for seed in range(6):
            response = await client.post("/v1/messages", json={**body, "seed": seed})
            assert response.status_code == 200, response.text
            (block,) = response.json()["content"]
            assert block["type"] == "tool_use" and block["name"] == "f"
            written.append(response.text.split('"input":', 1)[1].split("}", 1)[0] + "}")
    assert any(float(json.loads(text)["x"]) == float("inf") for text in written), written  # one did overflow
    assert all(json.loads(text)["x"] != 0 for text in written)


# A call whose string holds an escaped lone surrogate (JSON's syntax admits "\ud800", and so do the grammars) and
# whose number is past a double's range, as a model trained on it writes it.
ODD_CALL = '<tool_call>\n{"name": "echo", "arguments": {"s": "\\ud800x", "n": 1e999}}\n</tool_call>'
ODD_ARGUMENTS = '{"s": "\\ud800x", "n": 1e999}'


@pytest.fixture(scope="module")
def odd_call_model_dir(tmp_path_factory):
    """A micro RetNet trained (as test_tool_parser's) to answer "Echo." with ODD_CALL."""
    from retnet.tokenization import train_byte_level_bpe

    from . import test_tool_parser
    from .conftest import CORPUS

    saved = test_tool_parser.CONVERSATIONS
    test_tool_parser.CONVERSATIONS = {"Echo.": ODD_CALL}
    try:
        tokenizer = train_byte_level_bpe(CORPUS + [ODD_CALL] * 10, vocab_size=384, min_frequency=1)
        return test_tool_parser.micro_hermes_model(tmp_path_factory.mktemp("retnet-odd-call"), tokenizer)
    finally:
        test_tool_parser.CONVERSATIONS = saved


def _sse_data(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.anyio
async def test_a_call_holding_a_lone_surrogate_escape_is_answered_on_every_route(odd_call_model_dir):
    """The "auto" parser's arguments (and "required"'s) are written by dumps_exact, which wrote a lone surrogate
    as the character json.loads made of its escape: the answer could not be encoded as UTF-8, a 500 on chat, the
    Responses and the Messages API, and a stream cut off mid-body. Now the escape is written back as the model
    wrote it; the Messages API's tool_use input is that text too (not json.loads' inf for 1e999)."""
    ask = [{"role": "user", "content": "Echo."}]
    chat_tools = [{"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}]
    async with serve_app(odd_call_model_dir, tool_call_parser="hermes") as client:
        base = {"model": "micro", "temperature": 0, "max_tokens": 80}
        response = await client.post("/v1/chat/completions", json={**base, "messages": ask, "tools": chat_tools})
        assert response.status_code == 200, response.text
        (call,) = response.json()["choices"][0]["message"]["tool_calls"]
        assert call["function"]["arguments"] == ODD_ARGUMENTS

        response = await client.post("/v1/chat/completions",
                                     json={**base, "messages": ask, "tools": chat_tools, "stream": True})
        assert response.status_code == 200
        streamed = [call for chunk in _sse_data(response.text) for choice in chunk["choices"]
                    for call in choice["delta"].get("tool_calls") or ()]
        assert [call["function"]["arguments"] for call in streamed] == [ODD_ARGUMENTS]

        response = await client.post("/v1/responses", json={
            "model": "micro", "temperature": 0, "max_output_tokens": 80, "input": "Echo.",
            "tools": [{"type": "function", "name": "echo", "parameters": {"type": "object"}}]})
        assert response.status_code == 200, response.text
        assert [item["arguments"] for item in response.json()["output"]] == [ODD_ARGUMENTS]

        messages_body = {**base, "messages": ask, "tools": [{"name": "echo", "input_schema": {"type": "object"}}]}
        response = await client.post("/v1/messages", json=messages_body)
        assert response.status_code == 200, response.text
        assert f'"input":{ODD_ARGUMENTS}}}]' in response.text
        assert response.json()["stop_reason"] == "tool_use"

        response = await client.post("/v1/messages", json={**messages_body, "stream": True})
        assert response.status_code == 200
        events = _sse_data(response.text)
        assert [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"] == [ODD_ARGUMENTS]
        assert events[-1]["type"] == "message_stop"


@pytest.mark.anyio
async def test_a_call_holding_a_lone_surrogate_escape_can_be_continued(odd_call_model_dir):
    """The server's own answer, continued (the Responses tool loop, or the call sent back in a chat history): its
    arguments reached the chat template as an object holding a lone surrogate, whose text the tokenizer refused,
    a 400 "the chat template rejected the messages". They reach it as their text now, as arguments that are no
    JSON do."""
    tools = [{"type": "function", "name": "echo", "parameters": {"type": "object"}}]
    async with serve_app(odd_call_model_dir, tool_call_parser="hermes") as client:
        base = {"model": "micro", "temperature": 0, "max_output_tokens": 3, "tools": tools}
        first = await client.post("/v1/responses", json={**base, "max_output_tokens": 80, "input": "Echo."})
        assert first.status_code == 200, first.text
        (call,) = first.json()["output"]
        assert call["type"] == "function_call" and call["arguments"] == ODD_ARGUMENTS
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "done"}
        response = await client.post("/v1/responses", json={**base, "previous_response_id": first.json()["id"],
                                                             "input": [output]})
        assert response.status_code == 200, response.text

        history = [{"role": "user", "content": "Echo."},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1", "type": "function", "function": {"name": "echo", "arguments": ODD_ARGUMENTS}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "done"}]
        response = await client.post("/v1/chat/completions", json={"model": "micro", "max_tokens": 3,
                                                                    "messages": history})
        assert response.status_code == 200, response.text
        counted = await client.post("/tokenize", json={"model": "micro", "messages": history,
                                                       "return_token_strs": True})
        assert counted.status_code == 200, counted.text
        assert "ud800x" in "".join(counted.json()["token_strs"])  # the arguments' text, escape and all


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
async def test_run_batch_writes_a_number_past_a_double_as_the_server_wrote_it(encoding):
    """A Messages answer holding a tool input's 1e999 (the server writes it as the model did) was read back as inf and
    written as Infinity: a line no JSON reader takes. The line now holds the server's text."""
    import httpx

    from retnet.serve.run_batch import BatchLine, VerbatimJSON, json_line, output_line, post

    text = '{"content":[{"type":"tool_use","input":{"n":1e999,"s":"é"}}],"usage":{"input_tokens":3}}'

    def answer(request):
        return httpx.Response(200, content=text.encode(), headers={"Content-Type": "application/json"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://t") as client:
        entry = BatchLine(line=1, custom_id="c", url="/v1/messages", body={})
        status, body = await post(client, entry)
    assert status == 200 and isinstance(body, VerbatimJSON) and body["usage"]["input_tokens"] == 3
    written = json_line(output_line(entry, status, body), encoding)
    written.encode(encoding)
    assert "Infinity" not in written and '"n":1e999' in written
    assert json.loads(written)["response"]["body"]["content"][0]["input"]["s"] == "é"
