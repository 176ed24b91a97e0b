"""Paths a randomised differential driver found or walked (Responses requests against the same chat requests, a
``previous_response_id`` chain against its whole conversation sent as input items, streams against the whole
response, batch files against the server's own answers): ``input_items`` listed a text part as it was sent, which
the official client's item types refuse (an assistant's ``output_text`` without ``annotations``, an ``input_text``
in an assistant's message); and a lone surrogate escape in a batch line's ``custom_id`` (``"cut\\ud83d"``, echoed
in its output line) ended the whole batch with a UnicodeEncodeError, writing no line for it or those after it. A
few of the driver's rounds are kept as coverage."""

from __future__ import annotations

import json
import random

import pytest

from retnet.serve.run_batch import parse_lines, run_batch, served_urls
from tests.serve.test_responses import sdk_errors, stream_events
from tests.serve.test_run_batch import without_ids

pytestmark = pytest.mark.anyio

WORDS = ("Hello", " world", "def", " add", "café", "東京", "🙂", "\n", " ", "x", "{", "the", " retention", "\t")
ADD = {"type": "function", "name": "add", "description": "Add.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"],
    "additionalProperties": False}}
CHAT_ADD = {"type": "function", "function": {key: ADD[key] for key in ("name", "description", "parameters")}}


def words(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4)))


def conversation(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """A random conversation as Responses input items and as the chat messages they mean: messages of each role
    (a string or text parts of either kind), and calls with their outputs. A call right after an assistant message
    belongs to that message, as the Responses translation joins them."""
    items, messages = [], []
    for _ in range(rng.randint(1, 4)):
        role = rng.choice(["user", "user", "assistant", "developer", "system", "call"])
        if role == "call":
            call_id, arguments = f"call_{rng.randint(0, 99)}", json.dumps({"a": rng.randint(0, 9)})
            call = {"id": call_id, "type": "function", "function": {"name": "add", "arguments": arguments}}
            items.append({"type": "function_call", "call_id": call_id, "name": "add", "arguments": arguments})
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            output = words(rng)
            items.append({"type": "function_call_output", "call_id": call_id, "output": output})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif rng.random() < 0.5:
            texts = [words(rng) for _ in range(rng.randint(1, 3))]
            # Either kind of part in either role, and an assistant's output_text without annotations (OpenAI's
            # examples send it so): the server takes all of them as text.
            parts = [{"type": rng.choice(["input_text", "output_text"]), "text": text} for text in texts]
            items.append({"type": "message", "role": role, "content": parts})
            messages.append({"role": role, "content": "\n".join(texts)})
        else:
            text = words(rng)
            items.append({"role": role, "content": text, **({"type": "message"} if rng.random() < 0.5 else {})})
            messages.append({"role": role, "content": text})
    return items, messages


def item_errors(item: dict) -> list[str]:
    """Where a listed input item fails the official client's own type for it."""
    responses = pytest.importorskip("openai.types.responses", reason="the openai client is in the [dev] extra")
    from pydantic import TypeAdapter

    kinds = {"function_call": responses.ResponseFunctionToolCallItem,
             "function_call_output": responses.ResponseFunctionToolCallOutputItem}
    kind = kinds.get(item["type"]) or (responses.ResponseOutputMessage if item["role"] == "assistant"
                                       else responses.ResponseInputMessageItem)
    return sdk_errors(TypeAdapter(kind), item)


def without_item_ids(output: list[dict]) -> list[dict]:
    return [{key: value for key, value in item.items() if key not in ("id", "call_id")} for item in output]


def message_text(response: dict) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"])


async def test_input_items_list_text_parts_as_the_clients_types(open_app):
    sent = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
            {"type": "message", "role": "assistant", "content": [
                {"type": "input_text", "text": "A"}, {"type": "output_text", "text": "B", "annotations": []}]},
            {"type": "message", "role": "user", "content": [{"type": "output_text", "text": "More"}]},
            {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": "{\"a\": 1}"},
            {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "output_text", "text": "1"}]}]
    async with open_app() as client:
        created = await client.post("/v1/responses", json={"input": sent, "max_output_tokens": 2, "temperature": 0})
        assert created.status_code == 200, created.text
        listed = (await client.get(f"/v1/responses/{created.json()['id']}/input_items",
                                   params={"order": "asc"})).json()["data"]
        assert [item["content"] for item in listed[:3]] == [
            [{"type": "output_text", "text": "Hi.", "annotations": []}],
            [{"type": "output_text", "text": "A", "annotations": []},
             {"type": "output_text", "text": "B", "annotations": []}],
            [{"type": "input_text", "text": "More"}]]
        assert listed[4]["output"] == [{"type": "input_text", "text": "1"}]
        assert {where: errors for where, errors in enumerate(map(item_errors, listed)) if errors} == {}

        # The driver's rounds: every listed item of random conversations is the client's type, and a continuation
        # of the listed items is the conversation sent whole.
        for seed in range(8):
            rng = random.Random(seed)
            items, _ = conversation(rng)
            first = (await client.post("/v1/responses", json={"input": items, "max_output_tokens": 3,
                                                              "temperature": 0})).json()
            listed = (await client.get(f"/v1/responses/{first['id']}/input_items",
                                       params={"order": "asc", "limit": 100})).json()["data"]
            assert len(listed) == len(items), seed
            assert {where: errors for where, errors in enumerate(map(item_errors, listed)) if errors} == {}, seed
            more = [{"role": "user", "content": words(rng) or "x"}]
            continued = (await client.post("/v1/responses", json={
                "input": more, "previous_response_id": first["id"], "max_output_tokens": 3, "temperature": 0})).json()
            whole = (await client.post("/v1/responses", json={
                "input": [*items, *first["output"], *more], "max_output_tokens": 3, "temperature": 0,
                "store": False})).json()
            assert without_item_ids(continued["output"]) == without_item_ids(whole["output"]), seed
            assert continued["usage"]["input_tokens"] == whole["usage"]["input_tokens"], seed


async def test_a_lone_surrogate_in_a_batch_line_is_written_escaped_and_the_batch_goes_on(open_app, tmp_path):
    good = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
    # json.dumps escapes the surrogate as a file would spell it ("\ud83d"): UTF-8 has no way to write it as is.
    lines = [json.dumps({"custom_id": "cut\ud83d", "method": "POST", "url": "/v1/completions", "body": good}),
             json.dumps({"custom_id": "cut\ud83d", "method": "POST", "url": "/v1/completions", "body": good}),
             json.dumps({"custom_id": "after", "method": "POST", "url": "/v1/completions", "body": good})]
    async with open_app() as client:
        entries = parse_lines(lines, served_urls(client.app))
        path = tmp_path / "results.jsonl"
        with open(path, "w", encoding="utf-8") as out:  # as the CLI opens --output-file
            summary = await run_batch(client.app, entries, out, max_concurrency=2, progress=False)
        direct = (await client.post("/v1/completions", json=good)).json()
    results = [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines()]
    assert [result["custom_id"] for result in results] == ["cut\ud83d", "cut\ud83d", "after"]
    assert [result["response"]["status_code"] for result in results] == [200, 400, 200]
    assert results[1]["error"]["code"] == "duplicate_custom_id"
    assert without_ids(results[2]["response"]["body"]) == without_ids(direct)
    assert (summary.requests, summary.failed) == (3, 1)


async def test_responses_match_chat_and_their_streams(open_app):
    """The driver's rounds: a random Responses request gives the chat route's text, calls and usage for the same
    conversation and sampling, and its stream's events rebuild that response."""
    async with open_app() as client:
        for seed in range(12):
            rng = random.Random(seed)
            items, messages = conversation(rng)
            sampling = {"temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 999)}
            if rng.random() < 0.3:
                sampling["stop"] = rng.sample(["e", "a", "\n", " ", "th"], 2)
            limit = rng.randint(1, 8)
            body, chat = {"input": items, "max_output_tokens": limit, **sampling}, {
                "messages": messages, "max_completion_tokens": limit, **sampling}
            if rng.random() < 0.5:
                body["instructions"] = words(rng)
                chat["messages"] = [{"role": "system", "content": body["instructions"]}, *messages]
            if rng.random() < 0.3:
                body.update(tools=[ADD], tool_choice="required")
                chat.update(tools=[CHAT_ADD], tool_choice="required")
            response = await client.post("/v1/responses", json=body)
            answer = await client.post("/v1/chat/completions", json=chat)
            assert response.status_code == answer.status_code == 200, (seed, response.text, answer.text)
            response, answer = response.json(), answer.json()
            message = answer["choices"][0]["message"]
            assert message_text(response) == (message["content"] or ""), seed
            assert [(item["name"], item["arguments"]) for item in response["output"] if item["type"] == "function_call"
                    ] == [(call["function"]["name"], call["function"]["arguments"])
                          for call in message.get("tool_calls") or ()], seed
            usage = response["usage"]
            assert (usage["input_tokens"], usage["output_tokens"]) == (
                answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]), seed

            events = stream_events((await client.post("/v1/responses", json={**body, "stream": True})).text)
            assert [event["sequence_number"] for event in events] == list(range(len(events))), seed
            final = events[-1]["response"]
            assert without_item_ids(final["output"]) == without_item_ids(response["output"]), seed
            deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
            assert deltas == message_text(response), seed
            for event in events:
                if "output_index" in event:
                    item_id = event["item_id"] if "item_id" in event else event["item"]["id"]
                    assert final["output"][event["output_index"]]["id"] == item_id, (seed, event)


async def test_a_batch_of_mixed_lines_answers_each_as_the_server_does(open_app):
    """The driver's rounds: good and bad lines mixed (not JSON, a repeated custom_id, a url not served, stream,
    parameters the server refuses); each line's answer is the server's for its body, in input order."""
    refusals = ({"temperature": -1}, {"model": "gpt-4"}, {"bogus": 1}, {"seed": "x"},
                {"previous_response_id": "resp_missing"})
    async with open_app() as client:
        urls = served_urls(client.app)
        for seed in range(3):
            rng = random.Random(seed)
            lines, sent = [], []  # sent: (url, body) for each non-blank line, None where the line is its own 400
            for index in range(8):
                items, messages = conversation(rng)
                url = rng.choice(["/v1/responses", "/v1/chat/completions"])
                body = ({"input": items, "max_output_tokens": rng.randint(1, 6)} if url == "/v1/responses" else
                        {"messages": messages, "max_tokens": rng.randint(1, 6)})
                body.update(temperature=rng.choice([0, 1.0]), seed=rng.randint(0, 99))
                kind = rng.random()
                if kind < 0.2:
                    body.update(rng.choice(refusals))
                elif kind < 0.3:
                    lines.append('{"custom_id": "cut", "body": ')
                    sent.append(None)
                    continue
                custom_id = f"line-{index}"
                if kind > 0.9 and sent:
                    custom_id, sent_as = "line-0", None  # repeated (line 0 is always there by then)
                elif kind > 0.8:
                    body["stream"], sent_as = True, None
                else:
                    sent_as = (url, body)
                lines.append(json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}))
                sent.append(sent_as)
            entries = parse_lines(lines, urls)
            out = _Lines()
            await run_batch(client.app, entries, out, max_concurrency=3, progress=False)
            assert len(out.lines) == len(lines), seed
            for result, request in zip(out.lines, sent, strict=True):
                response = result["response"]
                assert (result["error"] is None) == (response["status_code"] == 200), (seed, result)
                if request is None:
                    assert response["status_code"] == 400, (seed, result)
                    continue
                url, body = request
                direct = await client.post(url, json=body)
                assert response["status_code"] == direct.status_code, (seed, result, direct.text)
                if direct.status_code != 200:
                    assert response["body"] == direct.json(), seed
                elif url == "/v1/responses":
                    assert without_item_ids(response["body"]["output"]) == without_item_ids(direct.json()["output"])
                else:
                    assert response["body"]["choices"] == direct.json()["choices"], seed


class _Lines:
    """A text file for the batch's writer that keeps each written line, parsed."""

    def __init__(self):
        self.lines: list[dict] = []

    def write(self, text: str) -> None:
        self.lines.extend(json.loads(line) for line in text.splitlines())

    def flush(self) -> None:
        pass


async def test_a_lone_surrogate_key_is_named_as_such_not_as_a_body_that_is_no_object(open_app):
    # Pydantic cannot read the key (a Responses request refuses unknown keys), and its error had no location: the
    # message said the body must be a JSON object, which it is.
    body = b'{"input": "x", "\\ud83d": 1}'
    async with open_app() as client:
        response = await client.post("/v1/responses", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_unicode" and "surrogate" in error["message"], error
        assert "must be a JSON object" not in error["message"], error
        assert (await client.post("/v1/responses", json={"input": "x", "max_output_tokens": 2})).status_code == 200


def test_a_batch_written_to_an_ascii_stream_escapes_what_it_cannot_write():
    """``-o -`` on an ASCII stdout (LC_ALL=C): the first line holding non-ASCII text ended the batch."""
    import io

    from retnet.serve.run_batch import json_line

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    line = {"custom_id": "café", "response": {"body": {"text": "東京"}}}
    out.write(json_line(line, out.encoding) + "\n")
    out.flush()
    assert json.loads(out.buffer.getvalue()) == line
    assert json_line(line) == json.dumps(line, ensure_ascii=False)  # UTF-8 writes it as it is
