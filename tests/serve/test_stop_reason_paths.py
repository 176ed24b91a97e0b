"""vLLM's ``stop_reason`` on completion and chat choices (whole, and on a streamed choice's last chunk): the stop
string that ended the choice, or the ``stop_token_ids`` token it sampled; null for EOS (even one listed in
stop_token_ids, as vLLM checks EOS first) and for its length. The Messages API reads it for its ``stop_reason`` /
``stop_sequence``, where it used to guess the stop sequence from the end of the text: ``min_tokens`` and
``stop_token_ids`` now go with ``stop_sequences``."""

from __future__ import annotations

import json

import pytest

from tests.serve.conftest import serve_app

pytestmark = pytest.mark.anyio
GREEDY = {"temperature": 0, "ignore_eos": True}


def chunks(response) -> list[dict]:
    """An OpenAI stream's chunks (``data: {json}`` events before ``[DONE]``)."""
    assert response.status_code == 200, response.text
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def events(response) -> list[dict]:
    """A Messages stream's events' data."""
    assert response.status_code == 200, response.text
    return [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines()
            if line.startswith("data: ")]


def streamed_ending(items: list[dict]) -> tuple[str | None, object]:
    """(finish_reason, stop_reason) of a one-choice stream, checking that only its last chunk says either."""
    choices = [choice for item in items for choice in item["choices"]]
    assert all("stop_reason" in choice for choice in choices), choices
    assert all(choice["finish_reason"] is None and choice["stop_reason"] is None for choice in choices[:-1]), choices
    return choices[-1]["finish_reason"], choices[-1]["stop_reason"]


async def test_completions_name_the_stop_string_or_token_that_ended_a_choice(model_dir, tokenizer):
    eos = tokenizer.eos_token_id
    base = {"model": "micro", "prompt": "def add(a, b):", "max_tokens": 12, **GREEDY}
    async with serve_app(model_dir) as client:
        free = (await client.post("/v1/completions", json={**base, "return_token_ids": True})).json()["choices"][0]
        assert (free["finish_reason"], free["stop_reason"]) == ("length", None)
        stop, token = free["text"][3:5], free["token_ids"][2]
        cases = [({"stop": ["\x00never", stop]}, stop),
                 ({"stop_token_ids": [token]}, token),
                 # EOS: null, also where stop_token_ids lists it (vLLM checks EOS before the stop tokens)
                 ({"ignore_eos": False, "logit_bias": {str(eos): 100}, "stop_token_ids": [eos, token]}, None)]
        for extra, expected in cases:
            whole = (await client.post("/v1/completions", json={**base, **extra})).json()["choices"][0]
            assert (whole["finish_reason"], whole["stop_reason"]) == ("stop", expected), (extra, whole)
            assert type(whole["stop_reason"]) is type(expected), whole  # a token id stays a number
            items = chunks(await client.post("/v1/completions", json={**base, **extra, "stream": True}))
            assert streamed_ending(items) == ("stop", expected), (extra, items)


async def test_a_generation_configs_other_eos_is_named_as_a_stop_token(model_dir, tokenizer, tmp_path):
    # vLLM adds generation_config's EOS ids other than the tokenizer's to the stop tokens: a choice one of them ends
    # names it (a chat model's end-of-turn id); the tokenizer's EOS stays null
    import shutil

    other = 7
    model = shutil.copytree(model_dir, tmp_path / "model")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, other]}))
    base = {"model": "micro", "prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0}
    async with serve_app(model) as client:
        for token, expected in ((other, other), (tokenizer.eos_token_id, None)):
            whole = (await client.post("/v1/completions", json={**base, "logit_bias": {str(token): 100}})).json()
            assert (whole["choices"][0]["finish_reason"], whole["choices"][0]["stop_reason"]) == ("stop", expected)


async def test_chat_choices_name_the_stop_string_or_token_that_ended_them(model_dir, tokenizer):
    base = {"model": "micro", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, **GREEDY}
    async with serve_app(model_dir) as client:
        free = (await client.post("/v1/chat/completions", json={**base, "return_token_ids": True})).json()
        free = free["choices"][0]
        stop, token = free["message"]["content"][2:4], free["token_ids"][3]
        for extra, expected in [({"stop": [stop]}, stop), ({"stop_token_ids": [token]}, token), ({}, None)]:
            whole = (await client.post("/v1/chat/completions", json={**base, **extra})).json()["choices"][0]
            finish = "stop" if extra else "length"
            assert (whole["finish_reason"], whole["stop_reason"]) == (finish, expected), (extra, whole)
            items = chunks(await client.post("/v1/chat/completions", json={**base, **extra, "stream": True}))
            assert streamed_ending(items) == (finish, expected), (extra, items)


async def test_messages_read_the_stop_sequence_that_ended_the_answer(model_dir, tokenizer):
    """``min_tokens`` with ``stop_sequences`` (was a 400, before that a wrong stop_sequence): a stop sequence the
    first min_tokens tokens passed over, right before EOS, left the answer ``end_turn`` with its whole text; and
    ``stop_token_ids`` with ``stop_sequences`` (was a 400): a stop token ends it ``end_turn``, its text left out."""
    base = {"model": "micro", "max_tokens": 40, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}],
            # the greedy answer: the min_tokens tokens, then EOS (biased to come first as soon as it may)
            "logit_bias": {str(tokenizer.eos_token_id): 100}}
    async with serve_app(model_dir) as client:
        plain = (await client.post("/v1/messages", json={**base, "min_tokens": 6})).json()
        assert plain["stop_reason"] == "end_turn" and plain["usage"]["output_tokens"] == 7, plain
        text = plain["content"][0]["text"]
        stop = text[-2:]
        body = {**base, "min_tokens": 6, "stop_sequences": [stop]}
        whole = (await client.post("/v1/messages", json=body)).json()
        assert (whole["stop_reason"], whole["stop_sequence"], whole["content"][0]["text"]) == ("end_turn", None, text)
        streamed = events(await client.post("/v1/messages", json={**body, "stream": True}))
        assert "".join(e["delta"]["text"] for e in streamed if e["type"] == "content_block_delta") == text
        assert streamed[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}, streamed

        free = {**base, "logit_bias": {}, "ignore_eos": True, "max_tokens": 10}
        chat = {"model": "micro", "messages": base["messages"], "max_tokens": 10, **GREEDY, "return_token_ids": True}
        answer = (await client.post("/v1/chat/completions", json=chat)).json()["choices"][0]
        token, never = answer["token_ids"][4], "\x00never"
        cut = (await client.post("/v1/chat/completions", json={**chat, "stop_token_ids": [token]})).json()
        for stream in (False, True):
            body = {**free, "stop_token_ids": [token], "stop_sequences": [never], "stream": stream}
            response = await client.post("/v1/messages", json=body)
            if stream:
                streamed = events(response)
                got = "".join(e["delta"]["text"] for e in streamed if e["type"] == "content_block_delta")
                ending = streamed[-2]["delta"]
            else:
                got, ending = response.json()["content"][0]["text"], response.json()
            assert got == cut["choices"][0]["message"]["content"], (stream, got, cut)
            assert (ending["stop_reason"], ending["stop_sequence"]) == ("end_turn", None), ending
        # a stop sequence before the stop token ends it
        stop = answer["message"]["content"][1:3]
        ended = (await client.post("/v1/messages", json={**free, "stop_token_ids": [token],
                                                          "stop_sequences": [never, stop]})).json()
        assert (ended["stop_reason"], ended["stop_sequence"]) == ("stop_sequence", stop), ended
