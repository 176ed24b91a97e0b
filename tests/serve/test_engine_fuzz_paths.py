"""Batching invariance over the request features the randomised differential fuzzing mixed: each request of a
concurrent burst, on a server that queues, preempts by priority, prefills in small pieces, shares prefixes and
speculates, answers exactly what it answers sent alone to an idle plain server (no speculation, default prefill)."""

import asyncio
import json
import math

import pytest

from tests.serve.conftest import serve_app

pytestmark = pytest.mark.anyio

SHARED = "def add return class Stack self items for range print hello world the retention state token " * 3
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
BUSY = dict(scheduling_policy="priority", max_running=2, prefill_chunk_tokens=5, prefill_token_budget=7,
            speculative_config=SPECULATIVE)
PLAIN = dict(scheduling_policy="priority", max_running=2)

REQUESTS = [
    {"prompt": SHARED, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True, "logprobs": 3},
    {"prompt": SHARED + "café", "max_tokens": 10, "temperature": 1.0, "seed": 4, "n": 2, "ignore_eos": True,
     "priority": 2, "presence_penalty": 0.8, "stream": True, "stream_options": {"include_usage": True}},
    {"prompt": [SHARED, "hello 東京"], "max_tokens": 6, "temperature": 0.7, "seed": 9, "top_k": 10,
     "stop": ["an", "e"], "include_stop_str_in_output": True, "priority": -1},
    {"prompt": "Stack self", "max_tokens": 3, "echo": True, "logprobs": 1, "prompt_logprobs": 2,
     "temperature": 0.0, "repetition_penalty": 1.3},
    {"messages": [{"role": "user", "content": SHARED}], "max_tokens": 8, "temperature": 0.0, "logprobs": True,
     "top_logprobs": 2, "frequency_penalty": 0.5, "ignore_eos": True, "priority": 2},
    {"messages": [{"role": "user", "content": "add"}], "max_tokens": 20, "temperature": 0.0,
     "guided_choice": ["alpha", "beta", "gamma delta"], "priority": -1},
    {"prompt": "range token", "max_tokens": 8, "temperature": 1.5, "seed": 1, "min_tokens": 5,
     "guided_regex": "[a-z]{2,6}( [a-z]{1,4})?", "stream": True},
    {"prompt": [5, 17, 40, 41, 200], "max_tokens": 9, "temperature": 0.0, "logit_bias": {"104": 5},
     "bad_words": ["the"], "stop_token_ids": [120], "return_token_ids": True},
]


def comparable(value):
    """``value`` without what differs between any two responses (ids, timestamps) or between a cold and a warm
    prefix cache (cached_tokens)."""
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items()
                if key not in ("id", "created", "system_fingerprint", "prompt_tokens_details")}
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return value


def assert_close(got, expected, where="response"):
    """Equal, but for floats (logprobs) within 1e-4: a batch's rows and a speculative step's tokens are computed in
    other shapes than a lone plain step's."""
    if isinstance(expected, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and isinstance(expected, (int, float)), where
        assert got == expected or math.isclose(got, expected, abs_tol=1e-4), (where, got, expected)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), (where, got, expected)
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (where, got, expected)
        for index, (item, expected_item) in enumerate(zip(got, expected)):
            assert_close(item, expected_item, f"{where}[{index}]")
    else:
        assert got == expected, (where, got, expected)


def folded(chunks: list[dict]) -> dict:
    """A stream's chunks as one answer per choice: its text, its logprob entries in order, its finish reason, and
    the usage chunk (a speculative step may carry several tokens in one chunk, so chunk boundaries differ)."""
    choices: dict[int, dict] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            entry = choices.setdefault(choice["index"], {"text": "", "logprobs": {}, "finish_reason": None})
            entry["text"] += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            for key, items in (choice.get("logprobs") or {}).items():
                entry["logprobs"].setdefault(key, []).extend(items if isinstance(items, list) else [items])
            entry["finish_reason"] = choice.get("finish_reason") or entry["finish_reason"]
    return comparable({"choices": choices, "usage": usage})


async def answer(client, body: dict):
    url = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    body = {"model": "micro", **body}
    if not body.get("stream"):
        response = await client.post(url, json=body)
        assert response.status_code == 200, response.text
        return comparable(response.json())
    chunks = []
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return folded(chunks)


async def test_a_mixed_burst_on_a_busy_speculating_server_answers_each_request_as_a_plain_idle_server(model_dir):
    async with serve_app(model_dir, **PLAIN) as client:
        alone = [await answer(client, body) for body in REQUESTS]
    async with serve_app(model_dir, **BUSY) as client:
        together = await asyncio.gather(*(answer(client, body) for body in REQUESTS))
        engine = client.app.state.engine
        assert engine.in_system == 0
        # the burst really drafted (whether it also preempted depends on when the engine thread saw each arrival)
        assert engine.metrics.registry.get_sample_value("retnet_spec_decode_num_draft_tokens_total") > 0
        again = [await answer(client, body) for body in REQUESTS]  # its prefix cache now warm from the burst
    for index in range(len(REQUESTS)):
        assert_close(together[index], alone[index], f"request {index} in the burst")
        assert_close(again[index], alone[index], f"request {index} after the burst")
