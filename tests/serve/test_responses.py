"""OpenAI's Responses API (POST /v1/responses, retnet/serve/responses.py), a translation onto the chat route: the
same conversation gives the same prompt and the same greedy text; the Response object's and the stream's shapes;
what is refused by name; and the official client (create, stream=True, the stream() helper) against a real
uvicorn process."""

from __future__ import annotations

import asyncio
import contextlib
import json
from types import SimpleNamespace

import pytest

from .test_api import _drained, _leaving_client, _post_scope, metric
from .test_structured_output import SCHEMA
from .test_tool_calls import FITS

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
ADD = {"type": "function", "name": "add", "description": "Add two small numbers.",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                       "b": {"type": "integer", "minimum": -9, "maximum": 9}},
                      "required": ["a", "b"], "additionalProperties": False}}
TAG = {"type": "object", "properties": {"tag": {"enum": ["red", "green"]}}, "required": ["tag"],
       "additionalProperties": False}


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


def stream_events(text: str) -> list[dict]:
    """The events of a Responses stream: ``event: <type>`` and ``data: {json}`` pairs (no ``[DONE]``)."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


async def test_a_text_response_has_openais_shape_and_the_chat_routes_greedy_text(client):
    conversation = [{"role": "user", "content": "Hello world!"}]
    chat = (await client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."}, *conversation], "max_tokens": 8, **GREEDY})).json()
    r = await client.post("/v1/responses", json={"model": "micro", "instructions": "Be brief.", "input": "Hello world!",
                                                 "max_output_tokens": 8, "metadata": {"k": "v"}, "user": "u1",
                                                 "store": False, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("resp_") and body["object"] == "response" and isinstance(body["created_at"], int)
    assert (body["status"], body["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert body["model"] == "micro" and body["error"] is None
    (item,) = body["output"]
    assert item["type"] == "message" and item["id"].startswith("msg_") and item["role"] == "assistant"
    assert item["status"] == "incomplete"
    assert item["content"] == [{"type": "output_text", "text": chat["choices"][0]["message"]["content"],
                                "annotations": []}]
    usage = chat["usage"]
    # The chat request left the prompt's state in the prefix cache: the same prompt, so cached here.
    cached = body["usage"]["input_tokens_details"]["cached_tokens"]
    assert 0 < cached <= usage["prompt_tokens"]
    assert body["usage"] == {"input_tokens": usage["prompt_tokens"], "output_tokens": 8,
                             "total_tokens": usage["prompt_tokens"] + 8,
                             "input_tokens_details": {"cached_tokens": cached},
                             "output_tokens_details": {"reasoning_tokens": 0}}
    # The request's settings are echoed.
    assert (body["instructions"], body["max_output_tokens"], body["temperature"], body["top_p"]) == (
        "Be brief.", 8, 0, 1.0)
    assert (body["metadata"], body["user"], body["text"], body["tools"], body["tool_choice"]) == (
        {"k": "v"}, "u1", {"format": {"type": "text"}}, [], "auto")
    assert body["parallel_tool_calls"] is True and body["previous_response_id"] is None


async def test_input_items_template_as_the_same_chat_conversation(client):
    # Messages as items (parts, joined with newlines as vLLM joins them; output_text for the assistant's), a call
    # history, and instructions first: the same prompt tokens as the chat route's conversation.
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}
    messages = [{"role": "system", "content": "Sum."}, {"role": "developer", "content": "Be exact."},
                {"role": "user", "content": "1 + \n2?"}, {"role": "assistant", "content": "Let me add.",
                                                         "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    items = [{"role": "developer", "content": "Be exact."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "1 + "},
                                                              {"type": "input_text", "text": "2?"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me add."}]},
             {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": "{\"a\": 1, \"b\": 2}"},
             {"type": "function_call_output", "call_id": "call_1", "output": "3"}]
    chat = (await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, **GREEDY})).json()
    r = await client.post("/v1/responses", json={"instructions": "Sum.", "input": items, "max_output_tokens": 6,
                                                 **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert r.json()["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]


async def test_a_json_schema_format_gives_text_that_parses(client):
    fmt = {"type": "json_schema", "name": "reply", "schema": SCHEMA, "strict": True}
    r = await client.post("/v1/responses", json={"input": "Answer:", "text": {"format": fmt},
                                                 "max_output_tokens": 60, "temperature": 1.0, "seed": 3})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "completed", r.text
    value = json.loads(body["output"][0]["content"][0]["text"])
    assert set(value) == {"ok", "n", "tag"} and value["tag"] in ("red", "green")
    assert body["text"] == {"format": fmt}
    r = await client.post("/v1/responses", json={"input": "Answer:", "text": {"format": {"type": "json_object"}},
                                                 "max_output_tokens": 60, "temperature": 1.0, "seed": 3})
    assert isinstance(json.loads(r.json()["output"][0]["content"][0]["text"]), dict)


async def test_a_required_tool_choice_gives_function_call_items(client):
    r = await client.post("/v1/responses", json={"input": "1 + 2?", "tools": [ADD], "tool_choice": "required",
                                                 "parallel_tool_calls": False, "max_output_tokens": 80,
                                                 "temperature": 1.0, "seed": 1})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "completed", r.text
    (call,) = body["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert call["name"] == "add" and FITS["add"](json.loads(call["arguments"])) and call["status"] == "completed"
    assert body["tools"] == [ADD] and body["tool_choice"] == "required"
    named = await client.post("/v1/responses", json={"input": "1 + 2?", "tools": [ADD], "max_output_tokens": 80,
                                                     "tool_choice": {"type": "function", "name": "add"}})
    assert named.status_code == 200 and named.json()["output"][0]["name"] == "add", named.text


async def test_the_stream_builds_the_same_response_event_by_event(client):
    body = {"input": "1 + 2?", "tools": [ADD], "tool_choice": {"type": "function", "name": "add"},
            "max_output_tokens": 40, "temperature": 1.0, "seed": 2}
    whole = (await client.post("/v1/responses", json=body)).json()
    r = await client.post("/v1/responses", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = stream_events(r.text)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    assert events[3]["delta"] == events[4]["arguments"] == final["output"][0]["arguments"]
    assert events[5]["item"] == final["output"][0] and final["id"] == events[0]["response"]["id"]
    # Sampled with the same seed: the same call as the whole response's, but for the ids.
    strip = lambda item: {k: v for k, v in item.items() if k not in ("id", "call_id")}
    assert [strip(i) for i in final["output"]] == [strip(i) for i in whole["output"]]
    assert final["usage"]["output_tokens"] == whole["usage"]["output_tokens"]
    assert final["status"] == whole["status"] == "completed"


async def test_a_streamed_text_message_opens_fills_and_closes_its_part(client):
    body = {"input": "Hello world!", "max_output_tokens": 6, **GREEDY}
    whole = (await client.post("/v1/responses", json=body)).json()
    events = stream_events((await client.post("/v1/responses", json={**body, "stream": True})).text)
    kinds = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"} and deltas
    item_id = events[2]["item"]["id"]
    assert all((d["item_id"], d["output_index"], d["content_index"]) == (item_id, 0, 0) for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    assert text == events[-4]["text"] == whole["output"][0]["content"][0]["text"]
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"] == [events[-2]["item"]] and final["output"][0]["status"] == "incomplete"
    assert final["usage"]["input_tokens"] == whole["usage"]["input_tokens"]  # the prompt's state now cached
    assert final["usage"]["output_tokens"] == whole["usage"]["output_tokens"] == 6


@pytest.mark.parametrize(("extra", "param", "code"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "previous_response_not_found"),
    ({"previous_response_id": 5}, "previous_response_id", None),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"include": ["message.output_text.logprobs"]}, "include", "unsupported_parameter"),
    ({"reasoning": {"effort": "low", "budget_tokens": 5}}, "reasoning.budget_tokens", "unsupported_parameter"),
    ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"truncation": "auto"}, "truncation", "unsupported_parameter"),
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"max_tokens": 4}, "max_tokens", "unsupported_parameter"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "unsupported_parameter"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0].type", "unsupported_content_type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "unsupported_parameter"),
    ({"input": [{"type": "function_call", "name": "add", "arguments": "{}"}]}, "input[0].call_id", "missing"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", None),
    # a schema llguidance refuses when compiling is named where it is
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objec"}}}}, "text.format.schema",
     "invalid_grammar"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type", "invalid_grammar"),
    ({"tools": [ADD]}, "tools", "unsupported_parameter"),  # "auto" without the server's tool_call_parser
    ({"tools": [{**ADD, "parameters": {"type": "objec"}}], "tool_choice": "required"}, "tools[0].parameters",
     "invalid_grammar"),
    ({"tool_choice": {"type": "function", "name": "sub"}, "tools": [ADD]}, "tool_choice", None),
    ({"max_output_tokens": 10**6}, "max_output_tokens", None),
    ({"max_output_tokens": True}, "max_output_tokens", None),
    ({"top_k": "x"}, "top_k", None),
    ({"model": "gpt-4o"}, "model", "model_not_found"),
    ({"input": 5}, "input", None),
    ({"input": [1]}, "input[0]", None),
    ({"input": [], "instructions": None}, "input", "empty_prompt"),
    ({"metadata": {"k": 1}}, "metadata.k", None),
])
async def test_what_is_not_supported_is_refused_by_name(client, extra, param, code):
    r = await client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 4, **extra})
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert param.split("[")[0] in error["message"] or code == "model_not_found"
    assert "null or null" not in error["message"]  # (a field whose no-op value is null: "only null")
    if code is not None:
        assert error["code"] == code, error


async def test_no_op_values_and_store_pass_and_the_route_is_counted(client):
    r = await client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, "store": True,
                                                 "background": False, "include": [], "reasoning": None,
                                                 "truncation": "disabled", "previous_response_id": None,
                                                 "service_tier": "auto", "text": {"format": {"type": "text"}},
                                                 "tool_choice": "none", "tools": [ADD]})
    assert r.status_code == 200, r.text
    metrics = (await client.get("/metrics")).text
    assert 'retnet_requests_total{route="/v1/responses",status="200"} 1.0' in metrics


async def test_a_failure_mid_stream_is_an_error_event_then_a_failed_response(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated sampler failure")

    monkeypatch.setattr("retnet.serve.engine.sample_step", broken)
    r = await asyncio.wait_for(client.post("/v1/responses", json={"input": "boom", "stream": True}), 30)
    events = stream_events(r.text)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    # the request's own first tokens: it fails alone (internal_error; the engine serves on)
    assert events[2]["code"] == "internal_error" and "simulated sampler failure" in events[2]["message"]
    assert events[3]["response"]["status"] == "failed" and events[3]["response"]["error"]["code"] == "server_error"


async def test_auto_tool_choice_runs_on_a_server_with_a_tool_call_parser(open_app):
    # The random model writes no <tool_call>: a message, whose text is the chat route's for the same request.
    async with open_app(tool_call_parser="hermes") as c:
        chat = (await c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "1 + 2?"}], "max_tokens": 6, **GREEDY,
            "tools": [{"type": "function", "function": {k: v for k, v in ADD.items() if k != "type"}}]})).json()
        body = {"input": "1 + 2?", "tools": [ADD], "max_output_tokens": 6, **GREEDY}
        whole = (await c.post("/v1/responses", json=body)).json()
        events = stream_events((await c.post("/v1/responses", json={**body, "stream": True})).text)
    assert whole["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert whole["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]  # the tools reached the template
    assert events[-1]["response"]["output"][0]["content"] == whole["output"][0]["content"]


async def test_text_after_a_call_streams_the_unstreamed_output():
    """With "auto" a model may write text after a call: the stream's Response is the whole one's (one message of
    all the text, then the call), and every event names its item's place in that output."""
    from retnet.serve.protocol import AssistantMessage, ChatChoice, ChatCompletionResponse, Usage
    from retnet.serve.response_store import ResponseStore
    from retnet.serve.responses import ResponsesRequest, ResponsesServing, _Shape
    from retnet.serve.tool_parsers import HermesToolParser

    text = 'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\nDone.'
    pieces = ["Sure.", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', "\nDone."]
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
             "prompt_tokens_details": {"cached_tokens": 0}}
    parser, chunks = HermesToolParser(["add"]), []  # what the chat stream sends for these pieces
    for i, piece in enumerate(pieces):
        content, calls = parser.feed(piece)
        content += parser.finish() if i == len(pieces) - 1 else ""
        delta = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = [{"index": 0, "id": c.id, "type": "function", "function": c.function.model_dump()}
                                   for c in calls]
        chunks.append({"choices": [{"index": 0, "delta": delta}]})
    chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
               {"choices": [], "usage": usage}]
    content, calls = HermesToolParser(["add"]).parse(text)

    class Chat:
        model_name = "micro"

        async def chat_chunks(self, chat, run):
            for chunk in chunks:
                yield chunk

    serving = ResponsesServing(Chat(), ResponseStore(8))
    request = ResponsesRequest(input="1 + 2?", tools=[ADD], stream=True)
    run = SimpleNamespace(handle=None)  # (the stream's request, which only a failure would cancel)
    sent = [event async for event in serving._events(None, run, _Shape(request, "micro"), [], [])]
    events = stream_events("".join(sent))
    final = events[-1]["response"]
    whole = _Shape(request, "micro").from_chat(ChatCompletionResponse(
        id="c", model="micro", usage=Usage(**usage), choices=[ChatChoice(
            index=0, finish_reason="tool_calls",
            message=AssistantMessage(content=content, tool_calls=calls))]))
    strip = lambda item: {k: v for k, v in item.items() if k not in ("id", "call_id")}
    assert [strip(i) for i in final["output"]] == [strip(i) for i in whole["output"]]
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Sure.Done."
    for event in events:
        if "output_index" in event:
            item = final["output"][event["output_index"]]
            assert event.get("item_id", event.get("item", {}).get("id")) == item["id"], event
        if event["type"] == "response.output_item.done":
            assert event["item"] == final["output"][event["output_index"]]
    assert serving.store.get(final["id"]).response == final


def sdk_errors(model, data: dict) -> list[str]:
    """Where ``data`` fails the official client's pydantic type ``model`` (a TypeAdapter). The
    one field the client's types require that is not sent: ``cache_write_tokens`` (the prefix cache's writes are
    not counted per request)."""
    pydantic = pytest.importorskip("pydantic")
    try:
        model.validate_python(data)
    except pydantic.ValidationError as exc:
        return [".".join(map(str, e["loc"])) for e in exc.errors()
                if not (e["type"] == "missing" and e["loc"][-1] == "cache_write_tokens")]
    return []


@pytest.mark.parametrize("body", [
    {"input": "hi", "max_output_tokens": 5, "temperature": 0},
    {"input": "hi", "tools": [ADD], "tool_choice": {"type": "function", "name": "add"}, "max_output_tokens": 40,
     "seed": 0},
    {"input": "hi", "text": {"format": {"type": "json_schema", "name": "t", "schema": TAG}}, "max_output_tokens": 20},
], ids=["text", "call", "json"])
async def test_responses_and_events_validate_as_the_official_clients_types(client, body):
    responses = pytest.importorskip("openai.types.responses", reason="the openai client is in the [dev] extra")
    from pydantic import TypeAdapter

    response = (await client.post("/v1/responses", json=body)).json()
    # Not narrowed by the discriminator alone: a union's failure lists every member, so each event is checked
    # against its own type.
    assert sdk_errors(TypeAdapter(responses.Response), response) == []
    by_type = {}
    for name in dir(responses):
        kind = getattr(responses, name)
        if name.endswith("Event") and hasattr(kind, "model_fields") and "type" in kind.model_fields:
            by_type[kind.model_fields["type"].annotation.__args__[0]] = kind
    for event in stream_events((await client.post("/v1/responses", json={**body, "stream": True})).text):
        assert sdk_errors(TypeAdapter(by_type[event["type"]]), event) == [], event


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_frees_its_slot(open_app, stream):
    async with open_app() as c:
        app, engine = c.app, c.app.state.engine
        body = json.dumps({"input": "hello", "max_output_tokens": 4096, "stream": stream, **GREEDY}).encode()
        scope = {**_post_scope(body, "2.3"), "path": "/v1/responses", "raw_path": b"/v1/responses"}

        async def send(message):
            if message["type"] == "http.response.start":
                await asyncio.sleep(0.5)  # the disconnect is heard meanwhile

        with contextlib.suppress(Exception):
            await asyncio.wait_for(app(scope, _leaving_client(body), send), 60)
        await asyncio.wait_for(_drained(engine), 60)
        assert await metric(c, "retnet_sequences_cancelled_total") == 1
        assert await metric(c, "retnet_generation_tokens_total") < 4096


# -- stored responses: GET, DELETE, input_items, previous_response_id ------------------------------------------
async def test_a_stored_response_is_retrieved_listed_and_deleted(client):
    created = (await client.post("/v1/responses", json={
        "instructions": "Be brief.", "input": [{"role": "user", "content": "Hello"},
                                               {"role": "assistant", "content": "Hi."},
                                               {"role": "user", "content": [{"type": "input_text", "text": "More"}]}],
        "max_output_tokens": 4, **GREEDY})).json()
    rid = created["id"]
    got = await client.get(f"/v1/responses/{rid}")
    assert got.status_code == 200 and got.json() == created
    listed = (await client.get(f"/v1/responses/{rid}/input_items", params={"order": "asc"})).json()
    assert [(i["type"], i["role"], i["content"]) for i in listed["data"]] == [
        ("message", "user", [{"type": "input_text", "text": "Hello"}]),
        ("message", "assistant", [{"type": "output_text", "text": "Hi.", "annotations": []}]),
        ("message", "user", [{"type": "input_text", "text": "More"}])]
    assert (listed["object"], listed["has_more"]) == ("list", False)
    assert (listed["first_id"], listed["last_id"]) == (listed["data"][0]["id"], listed["data"][-1]["id"])
    newest = (await client.get(f"/v1/responses/{rid}/input_items", params={"limit": 2})).json()  # desc: OpenAI's
    assert newest["data"] == listed["data"][::-1][:2] and newest["has_more"] is True
    rest = (await client.get(f"/v1/responses/{rid}/input_items", params={"limit": 2, "after": newest["last_id"]}))
    assert rest.json()["data"] == listed["data"][:1] and rest.json()["has_more"] is False
    deleted = await client.delete(f"/v1/responses/{rid}")
    assert deleted.status_code == 200 and deleted.json() == {"id": rid, "object": "response", "deleted": True}
    assert (await client.get(f"/v1/responses/{rid}")).status_code == 404
    # store: false keeps nothing.
    unstored = (await client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, "store": False})).json()
    assert (await client.get(f"/v1/responses/{unstored['id']}")).status_code == 404
    metrics = (await client.get("/metrics")).text
    # Counted by route template (GET and DELETE), not by id.
    assert 'retnet_requests_total{route="/v1/responses/{response_id}",status="200"} 2.0' in metrics
    assert 'retnet_requests_total{route="/v1/responses/{response_id}",status="404"} 2.0' in metrics
    assert 'retnet_requests_total{route="/v1/responses/{response_id}/input_items",status="200"} 3.0' in metrics


@pytest.mark.parametrize(("method", "path", "param"), [
    ("GET", "/v1/responses/resp_x", "response_id"), ("DELETE", "/v1/responses/resp_x", "response_id"),
    ("GET", "/v1/responses/resp_x/input_items", "response_id"),
])
async def test_an_unknown_response_id_is_404(client, method, path, param):
    r = await client.request(method, path)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "not_found")
    assert "resp_x" in error["message"]


async def test_a_bad_input_items_query_parameter_is_named_as_sent(client):
    # FastAPI locates a query parameter's error under "query": the param was "query.limit", a name no client sent.
    for query, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "newest"}, "order")):
        r = await client.get("/v1/responses/resp_x/input_items", params=query)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}: "), error


async def test_the_store_routes_need_the_api_key(open_app):
    async with open_app(api_keys=["k"]) as c:
        for method, path in (("GET", "/v1/responses/r"), ("DELETE", "/v1/responses/r"),
                             ("GET", "/v1/responses/r/input_items")):
            assert (await c.request(method, path)).status_code == 401
            assert (await c.request(method, path, headers={"Authorization": "Bearer k"})).status_code == 404


async def test_a_continuation_prompts_as_the_whole_chat_conversation_and_starts_from_the_cached_prompt(client):
    first = (await client.post("/v1/responses", json={"input": "Hello world!", "max_output_tokens": 6,
                                                      **GREEDY})).json()
    # Streamed, and so stored when complete.
    body = {"previous_response_id": first["id"], "input": "And then?", "max_output_tokens": 6, "stream": True,
            **GREEDY}
    events = stream_events((await client.post("/v1/responses", json=body)).text)
    second = events[-1]["response"]
    assert second["previous_response_id"] == first["id"]
    assert (await client.get(f"/v1/responses/{second['id']}")).json() == second
    # The earlier prompt's state was left in the prefix cache: the continuation's prompt starts with it. (The
    # state after the answer is cached too, but this random model's answer need not encode back to the tokens it
    # sampled, so here the hit may end at the prompt; tests/serve/test_answer_cache.py covers the answer's.)
    assert 0 < second["usage"]["input_tokens_details"]["cached_tokens"] < second["usage"]["input_tokens"]
    conversation = [{"role": "user", "content": "Hello world!"},
                    {"role": "assistant", "content": first["output"][0]["content"][0]["text"]},
                    {"role": "user", "content": "And then?"}]
    chat = (await client.post("/v1/chat/completions", json={"messages": conversation, "max_tokens": 6,
                                                            **GREEDY})).json()
    assert second["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert second["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    # A chain: the third continues the second, whose conversation holds the first's. Instructions are each
    # response's own (OpenAI's rule): the third's system message is first, and none is carried to a fourth.
    third = (await client.post("/v1/responses", json={"previous_response_id": second["id"], "input": "Ok.",
                                                      "instructions": "Be brief.", "max_output_tokens": 2,
                                                      **GREEDY})).json()
    conversation = [*conversation, {"role": "assistant", "content": second["output"][0]["content"][0]["text"]},
                    {"role": "user", "content": "Ok."}]
    chat = (await client.post("/v1/chat/completions", json={"max_tokens": 2, **GREEDY, "messages": [
        {"role": "system", "content": "Be brief."}, *conversation]})).json()
    assert third["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"] and third["instructions"] == "Be brief."
    fourth = (await client.post("/v1/responses", json={"previous_response_id": third["id"], "input": "Bye.",
                                                       "max_output_tokens": 1, **GREEDY})).json()
    chat = (await client.post("/v1/chat/completions", json={"max_tokens": 1, **GREEDY, "messages": [
        *conversation, {"role": "assistant", "content": third["output"][0]["content"][0]["text"]},
        {"role": "user", "content": "Bye."}]})).json()
    assert fourth["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"] and fourth["instructions"] is None
    listed = (await client.get(f"/v1/responses/{fourth['id']}/input_items")).json()["data"]
    assert [i["content"][0]["text"] for i in listed] == ["Bye."]  # its own input only


async def test_a_tool_call_is_continued_with_its_output(client):
    call = (await client.post("/v1/responses", json={"input": "1 + 2?", "tools": [ADD], "tool_choice": "required",
                                                     "parallel_tool_calls": False, "max_output_tokens": 80,
                                                     "temperature": 1.0, "seed": 1})).json()
    (item,) = call["output"]
    assert item["type"] == "function_call"
    r = await client.post("/v1/responses", json={
        "previous_response_id": call["id"], "tools": [ADD], "tool_choice": "none", "max_output_tokens": 4,
        "input": [{"type": "function_call_output", "call_id": item["call_id"], "output": "3"}], **GREEDY})
    assert r.status_code == 200, r.text
    chat = (await client.post("/v1/chat/completions", json={
        "max_tokens": 4, "tool_choice": "none", **GREEDY,
        "tools": [{"type": "function", "function": {k: v for k, v in ADD.items() if k != "type"}}],
        "messages": [{"role": "user", "content": "1 + 2?"},
                     {"role": "assistant", "content": None, "tool_calls": [{
                         "id": item["call_id"], "type": "function",
                         "function": {"name": "add", "arguments": item["arguments"]}}]},
                     {"role": "tool", "tool_call_id": item["call_id"], "content": "3"}]})).json()
    assert r.json()["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert r.json()["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]


async def test_an_item_reference_is_the_stored_item_it_names(client):
    call = (await client.post("/v1/responses", json={"input": "1 + 2?", "tools": [ADD], "tool_choice": "required",
                                                     "parallel_tool_calls": False, "max_output_tokens": 80,
                                                     "temperature": 1.0, "seed": 1})).json()
    (item,) = call["output"]
    question = (await client.get(f"/v1/responses/{call['id']}/input_items")).json()["data"][0]
    output = {"type": "function_call_output", "call_id": item["call_id"], "output": "3"}
    body = {"tools": [ADD], "tool_choice": "none", "max_output_tokens": 4, **GREEDY}
    sent = (await client.post("/v1/responses", json={**body, "store": False, "input": [
        {"role": "user", "content": "1 + 2?"}, item, output]})).json()
    # the stored input message and the output call by id (the call's type left out, as OpenAI's type allows)
    r = await client.post("/v1/responses", json={**body, "input": [
        {"type": "item_reference", "id": question["id"]}, {"id": item["id"]}, output]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] == sent["usage"]["input_tokens"]
    assert r.json()["output"][0]["content"][0]["text"] == sent["output"][0]["content"][0]["text"]
    listed = (await client.get(f"/v1/responses/{r.json()['id']}/input_items?order=asc")).json()["data"]
    assert listed[1] == item and listed[0]["id"] == question["id"]  # the new response's input holds them
    # an unknown id, or one gone with the responses that held it (the call's, and the one it was input to)
    await client.delete(f"/v1/responses/{call['id']}")
    assert (await client.post("/v1/responses", json={**body, "store": False, "input": [
        {"type": "item_reference", "id": item["id"]}, output]})).status_code == 200
    await client.delete(f"/v1/responses/{r.json()['id']}")
    for i, ref in enumerate(({"type": "item_reference", "id": "fc_nope"}, {"type": "item_reference", "id": item["id"]})):
        r = await client.post("/v1/responses", json={**body, "input": [*[output] * i, ref]})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == f"input[{i}].id" and ref["id"] in error["message"], error
    r = await client.post("/v1/responses", json={**body, "input": [{"type": "item_reference", "id": 5}]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "input[0].id")
    # an id twice (input_items pages by id: a page ending on the second copy began the next after the first, forever)
    r = await client.post("/v1/responses", json={**body, "input": [{"type": "item_reference", "id": "fc_x"}] * 2})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "input[1].id") and "Duplicate" in r.text


async def test_the_store_keeps_the_most_recent_entries(open_app):
    async with open_app(responses_store_entries=1) as c:
        old = (await c.post("/v1/responses", json={"input": "a", "max_output_tokens": 1})).json()
        new = (await c.post("/v1/responses", json={"input": "b", "max_output_tokens": 1})).json()
        assert (await c.get(f"/v1/responses/{old['id']}")).status_code == 404
        assert (await c.get(f"/v1/responses/{new['id']}")).status_code == 200
        r = await c.post("/v1/responses", json={"previous_response_id": old["id"], "input": "c"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "previous_response_not_found"
    async with open_app(responses_store_entries=0) as c:
        kept = (await c.post("/v1/responses", json={"input": "a", "max_output_tokens": 1, "store": True})).json()
        assert (await c.get(f"/v1/responses/{kept['id']}")).status_code == 404


def test_the_store_keeps_within_its_bytes():
    """Entries go least recently used first when the bytes run out; one alone over the bound is not kept."""
    from retnet.serve.response_store import ResponseStore

    def response(rid: str, text: str) -> dict:
        return {"id": rid, "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}]}

    store = ResponseStore(entries=10, max_bytes=1200)  # two of these entries (about 540 bytes each), not three
    store.put(response("a", "x" * 200), [], [])
    store.put(response("b", "y" * 200), [], [])
    store.get("a")  # now the most recently used: b goes first
    store.put(response("c", "z" * 200), [], [])
    assert sorted(store._stored) == ["a", "c"] and 0 < store.bytes <= 1200
    store.put(response("d", "w" * 2000), [], [])  # alone over the bound
    assert sorted(store._stored) == ["a", "c"]
    store.delete("a")
    store.delete("c")
    assert store.bytes == 0


def test_the_stores_items_go_with_their_response():
    from retnet.serve.response_store import ResponseStore

    store = ResponseStore(entries=1)
    store.put({"id": "r1", "output": [{"type": "message", "id": "msg_1"}]}, [{"type": "message", "id": "msg_0"}], [])
    assert store.item("msg_0")["id"] == "msg_0" and store.item("msg_1")["id"] == "msg_1"
    store.put({"id": "r2", "output": [{"type": "message", "id": "msg_2"}]}, [], [])  # r1 evicted
    assert store.item("msg_0") is None and store.item("msg_1") is None and store.item("msg_2") is not None
    # A response that referenced an item holds it too; dropped, it leaves the item found in the one it came from
    store = ResponseStore(entries=4)
    store.put({"id": "a", "output": [{"type": "message", "id": "msg_a", "from": "a"}]}, [], [])
    store.put({"id": "b", "output": []}, [{"type": "message", "id": "msg_a", "from": "b"}], [])
    assert store.item("msg_a")["from"] == "b"  # the newest holder's
    store.delete("b")
    assert store.item("msg_a")["from"] == "a"
    store.delete("a")
    assert store.item("msg_a") is None and not store._items


# -- the official client, against a real uvicorn process -------------------------------------------------------
@pytest.fixture
def api(server):
    openai = pytest.importorskip("openai", reason="the openai client is in the [dev] extra")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_the_official_client_creates_streams_and_accumulates(api):
    response = api.responses.create(model="micro", instructions="Be brief.", input="Hello!", max_output_tokens=8,
                                    temperature=0, extra_body={"ignore_eos": True})
    chat = api.chat.completions.create(model="micro", max_tokens=8, temperature=0, extra_body={"ignore_eos": True},
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello!"}])
    assert response.output_text == chat.choices[0].message.content and response.status == "incomplete"
    assert response.usage.input_tokens == chat.usage.prompt_tokens and response.usage.output_tokens == 8

    events = list(api.responses.create(model="micro", instructions="Be brief.", input="Hello!", max_output_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True}, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    assert events[-1].response.output_text == response.output_text

    # The stream() helper (structured output, so that the response completes) and its final response.
    fmt = {"format": {"type": "json_schema", "name": "tag", "schema": TAG, "strict": True}}
    with api.responses.stream(model="micro", input="Pick:", text=fmt, max_output_tokens=20, temperature=0) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    whole = api.responses.create(model="micro", input="Pick:", text=fmt, max_output_tokens=20, temperature=0)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.status == whole.status == "completed"
    assert final.output_text == whole.output_text and json.loads(final.output_text)["tag"] in ("red", "green")
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens,
                                                                       whole.usage.output_tokens)


def test_the_official_client_retrieves_continues_and_deletes(api):
    openai = pytest.importorskip("openai")
    first = api.responses.create(model="micro", input="Hello!", max_output_tokens=4, temperature=0)
    assert api.responses.retrieve(first.id) == first
    second = api.responses.create(model="micro", input="More.", previous_response_id=first.id, max_output_tokens=4,
                                  temperature=0)
    assert second.previous_response_id == first.id
    assert [i.content[0].text for i in api.responses.input_items.list(second.id)] == ["More."]
    api.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.create(model="micro", input="x", previous_response_id=first.id)


@pytest.mark.parametrize("retention", ["in_memory", "24h", None])
def test_prompt_cache_retention_is_accepted_as_a_cache_hint(retention):
    # The official client's create(prompt_cache_retention=...): a hint to OpenAI's prompt cache, as
    # prompt_cache_key is, so it changes nothing here; it was refused as an unknown parameter.
    from retnet.serve.responses import ResponsesRequest, to_chat_request

    request = ResponsesRequest.model_validate({"input": "hi", "prompt_cache_retention": retention,
                                               "prompt_cache_key": "k"})
    chat, origins = to_chat_request(request)
    assert [m.text() for m in chat.messages] == ["hi"] and origins == ["input"]
