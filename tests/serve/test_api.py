"""Every route and parameter against an in-process app (httpx on ASGI, the engine thread running)."""

import asyncio
import contextlib
import json
import threading

import pytest

from tests.serve.conftest import decoding_held

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def metric(client, name: str) -> float:
    text = (await client.get("/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


async def test_models_health_metrics(client):
    assert (await client.get("/health")).json() == {"status": "ok"}
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "micro"
    text = (await client.get("/metrics")).text
    for name in ("retnet_requests_total", "retnet_queue_depth", "retnet_running_sequences",
                 "retnet_time_to_first_token_seconds_bucket", "retnet_inter_token_latency_seconds_bucket",
                 "retnet_prompt_tokens_total", "retnet_generation_tokens_total", "retnet_prefix_cache_hits_total"):
        assert name in text


async def test_completion_shape_usage_and_length(client):
    r = await client.post("/v1/completions", json={"model": "micro", "prompt": "def add(a, b):", "max_tokens": 7,
                                                    **GREEDY})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and isinstance(choice["text"], str)
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7


async def test_chat_completion_and_stream_format(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    whole = (await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, **GREEDY})).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["role"] == "assistant"
    r = await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "stream": True,
                                                        "stream_options": {"include_usage": True}, **GREEDY})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6


async def test_streamed_completion_equals_whole(client):
    req = {"prompt": "for i in range(10):", "max_tokens": 12, **GREEDY}
    whole = (await client.post("/v1/completions", json=req)).json()["choices"][0]["text"]
    events = sse_events((await client.post("/v1/completions", json={**req, "stream": True})).text)
    assert "usage" not in events[0]
    assert "".join(e["choices"][0]["text"] for e in events) == whole


async def test_seed_reproducible_and_n_choices_differ(client):
    req = {"prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "min_p": 0.01,
           "seed": 1234, "n": 3, "ignore_eos": True}
    a = (await client.post("/v1/completions", json=req)).json()
    b = (await client.post("/v1/completions", json=req)).json()
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert len(set(texts)) > 1


async def test_a_seeded_prompt_samples_the_same_wherever_it_is_in_a_list_of_prompts(client):
    # vLLM's rule: each prompt's choice j draws from seed + j. The offset was the choice's index in the whole
    # response, so a prompt sampled differently alone, second in a list, or next to itself.
    req = {"max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 2, "ignore_eos": True}

    async def texts(prompt) -> list[str]:
        r = await client.post("/v1/completions", json={**req, "prompt": prompt})
        assert r.status_code == 200, r.text
        return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

    alone = await texts("for i in")
    assert alone[0] != alone[1]  # the n choices still differ
    assert await texts(["Hello", "for i in"]) == [*(await texts("Hello")), *alone]
    assert await texts(["for i in", "for i in"]) == alone * 2


async def test_penalties_logprobs_echo_and_token_ids(client):
    req = {"prompt": "Hello world", "max_tokens": 5, "logprobs": 2, "echo": True, "return_token_ids": True,
           "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5, **GREEDY}
    choice = (await client.post("/v1/completions", json=req)).json()["choices"][0]
    assert choice["text"].startswith("Hello world")
    lp = choice["logprobs"]
    prompt_len = len(choice["prompt_token_ids"])
    assert len(lp["tokens"]) == prompt_len + 5 and lp["token_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert all(len(t) <= 3 for t in lp["top_logprobs"][1:])  # the top 2, and the chosen token if not among them
    assert len(choice["token_ids"]) == 5
    chat = (await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
        **GREEDY})).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and len(content[0]["top_logprobs"]) == 2


async def test_logprobs_report_the_true_bytes_of_tokens_that_split_a_character(client):
    # 中 is not in the tokenizer's corpus: it is three byte tokens, none a character on its own.
    prompt = "a 中 b"
    req = {"prompt": prompt, "max_tokens": 6, "logprobs": 5, "echo": True, "return_token_ids": True, **GREEDY}
    choice = (await client.post("/v1/completions", json=req)).json()["choices"][0]
    lp = choice["logprobs"]
    n_prompt = len(choice["prompt_token_ids"])
    assert [t for t in lp["tokens"][:n_prompt] if t.startswith("bytes:")] == ["bytes:\\xe4", "bytes:\\xb8",
                                                                                 "bytes:\\xad"]
    # Offsets count characters of the text: the character starts in its first byte's token.
    starts = [i for i, t in enumerate(lp["tokens"]) if t.startswith("bytes:\\xe4")]
    assert lp["text_offset"][starts[0]] == prompt.index("中")
    assert lp["text_offset"][starts[0] + 3] == prompt.index("中") + 1
    # Every alternative keeps its own key: byte tokens no longer all collapse into "\ufffd".
    assert all(len(top) in (5, 6) for top in lp["top_logprobs"][1:])  # 6: the chosen token outside the top 5
    assert all("\ufffd" not in key for top in lp["top_logprobs"][1:] for key in top)

    chat = (await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "中"}], "max_tokens": 8, "logprobs": True, "top_logprobs": 5,
        **GREEDY})).json()["choices"][0]
    content = chat["logprobs"]["content"]
    # The bytes of the tokens are the message, even where a token alone is not valid UTF-8.
    assert bytes(b for entry in content for b in entry["bytes"]).decode("utf-8") == chat["message"]["content"]
    for entry in content:
        assert len({alt["token"] for alt in entry["top_logprobs"]}) == 5
        for alt in entry["top_logprobs"]:
            raw = bytes(alt["bytes"])
            label = alt["token"]
            assert label == raw.decode("utf-8") if not label.startswith("bytes:") else label == "bytes:" + "".join(
                f"\\x{b:02x}" for b in raw)


async def test_stop_strings_across_token_boundaries(client):
    # Find what the model writes greedily, then stop on a string that spans several tokens of it.
    base = (await client.post("/v1/completions", json={"prompt": "The retention", "max_tokens": 30,
                                                       "return_token_ids": True, **GREEDY})).json()["choices"][0]
    text = base["text"]
    tokens = base["token_ids"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(client.app.state.settings.model)
    # A stop string that starts inside the 3rd token and ends inside a later one.
    start = len(tok.decode(tokens[:2])) + 1
    stop = text[start : start + 4]
    assert stop and len(tok.decode(tokens[2:3])) >= 1
    expected = text[: text.index(stop)]
    for stream in (False, True):
        r = await client.post("/v1/completions", json={"prompt": "The retention", "max_tokens": 30, "stop": [stop],
                                                       "stream": stream, **GREEDY})
        if stream:
            events = sse_events(r.text)
            got = "".join(e["choices"][0]["text"] for e in events)
            reason = events[-1]["choices"][0]["finish_reason"]
        else:
            got, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert got == expected and reason == "stop" and stop not in got


async def test_prefix_cache_hit_skips_prefill_and_keeps_output(client, open_app):
    system = {"role": "system", "content": "You are a helpful assistant who answers about Python code. " * 3}
    first = {"messages": [system, {"role": "user", "content": "def add(a, b)"}], "max_tokens": 8, **GREEDY}
    second = {"messages": [system, {"role": "user", "content": "class Stack"}], "max_tokens": 8, **GREEDY}
    a = (await client.post("/v1/chat/completions", json=first)).json()
    assert a["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # sent at 0 too, as OpenAI does
    prefill_before = await metric(client, "retnet_prefill_tokens_total")
    hits_before = await metric(client, "retnet_prefix_cache_hits_total")
    b = (await client.post("/v1/chat/completions", json=second)).json()
    prefilled = await metric(client, "retnet_prefill_tokens_total") - prefill_before
    assert await metric(client, "retnet_prefix_cache_hits_total") == hits_before + 1
    cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 20 and prefilled == b["usage"]["prompt_tokens"] - cached  # the system prompt cost nothing
    # The same request again is a full hit: no prefill at all, the same text as the first time.
    again = (await client.post("/v1/chat/completions", json=first)).json()
    assert again["choices"][0]["message"] == a["choices"][0]["message"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"]
    # And a server with the cache off gives the same text.
    async with open_app(prefix_cache_entries=0) as cold:
        cold_b = (await cold.post("/v1/chat/completions", json=second)).json()
    assert cold_b["choices"][0]["message"] == b["choices"][0]["message"]


async def test_session_continuation_equals_whole_history(client):
    first = (await client.post("/v1/completions", json={
        "prompt": "def add(a, b):", "max_tokens": 6, "session_id": "s-1", "return_token_ids": True, **GREEDY,
    })).json()
    assert first["session_id"] == "s-1"
    turn = first["choices"][0]
    second = (await client.post("/v1/completions", json={
        "prompt": "\nclass Stack:", "max_tokens": 6, "session_id": "s-1", "return_token_ids": True, **GREEDY,
    })).json()["choices"][0]
    history = turn["prompt_token_ids"] + turn["token_ids"] + second["prompt_token_ids"]
    whole = (await client.post("/v1/completions", json={"prompt": history, "max_tokens": 6,
                                                        "return_token_ids": True, **GREEDY})).json()
    assert whole["choices"][0]["token_ids"] == second["token_ids"]
    assert await metric(client, "retnet_session_resumes_total") >= 1
    assert (await client.delete("/v1/sessions/s-1")).status_code == 200
    assert (await client.delete("/v1/sessions/s-1")).status_code == 404


async def test_long_prompt_is_prefilled_in_chunks(open_app):
    async with open_app(prefill_chunk_tokens=16, prefill_token_budget=32, prefix_cache_entries=0) as c:
        prompt = "A recurrent state of fixed size carries the whole context. " * 12
        chunked = (await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, **GREEDY})).json()
    async with open_app(prefix_cache_entries=0) as c:
        whole = (await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, **GREEDY})).json()
    assert chunked["usage"]["prompt_tokens"] > 64
    assert chunked["choices"][0]["text"] == whole["choices"][0]["text"]


BAD_REQUESTS = [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "n": 1000}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": ["x" * 500]}, "stop"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 10**6]}, "prompt"),
    ({"prompt": [[1, 2]] * 17}, "prompt"),  # token-id prompts count against max_prompts too
    ({"prompt": 12}, "prompt"),
    ({"prompt": [True, False]}, "prompt"),  # bool is an int subclass: not token ids 1 and 0
    ({"prompt": [[1, 2], [True]]}, "prompt"),
    ({"prompt": "word " * 3000}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "session_id": "bad id!"}, "session_id"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    # bool is an int subclass: true is not n = 1, one alternative, or a bias of 1, as OpenAI answers too
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "logit_bias": {"5": True}}, "logit_bias"),
]


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
async def test_invalid_completion_requests_name_the_field(client, body, param):
    r = await client.post("/v1/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


async def test_invalid_chat_and_malformed_bodies(client):
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": True}, "top_logprobs"),
    ]
    for body, param in cases:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    headers = {"content-type": "application/json"}
    for raw in (b'{"prompt": ', b'{"prompt": "\xff\xfe"}', b"[1, 2]", b"null", b""):
        r = await client.post("/v1/completions", content=raw, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["message"], (raw, r.text)
    r = await client.post("/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}', headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert (await client.get("/v1/nothing")).json()["error"]["message"]
    ok = await client.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 2})
    assert ok.status_code == 200
    assert await metric(client, 'retnet_requests_total{route="/v1/completions",status="400"}') >= 5


async def test_api_keys(open_app):
    async with open_app(api_keys=["k1", "k2"]) as c:
        req = {"prompt": "hi", "max_tokens": 2}
        assert (await c.post("/v1/completions", json=req)).status_code == 401
        bad = await c.post("/v1/completions", json=req, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer k2"})).status_code == 200
        good = await c.post("/v1/completions", json=req, headers={"Authorization": "Bearer k1"})
        assert good.status_code == 200
        assert (await c.get("/health")).status_code == 200  # probes need no key
        # A body that is not JSON, or not a valid request, says nothing to a client without a key: 401 first.
        for content in (b"{not json", b'{"prompt": 5}'):
            r = await c.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        keyed = await c.post("/v1/completions", content=b"{not json",
                             headers={"Content-Type": "application/json", "Authorization": "Bearer k1"})
        assert keyed.status_code == 400, keyed.text


async def test_queue_full_gives_429_with_retry_after(open_app, monkeypatch):
    async with open_app(max_running=1, max_queue=1, retry_after_s=3) as c:
        long = {"prompt": "hello", "max_tokens": 400, **GREEDY}
        # Held, the first cannot finish (and free its place) before the third request arrives.
        with decoding_held(c.app.state.engine, monkeypatch):
            first = asyncio.create_task(c.post("/v1/completions", json=long))
            second = asyncio.create_task(c.post("/v1/completions", json=long))
            while c.app.state.engine.in_system < 2:
                await asyncio.sleep(0.01)
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert (await first).status_code == 200 and (await second).status_code == 200
        assert (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200


async def test_more_choices_than_the_server_holds_is_400_not_429(open_app):
    async with open_app(max_running=2, max_queue=0) as c:
        r = await c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        r = await c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert (await c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})).status_code == 200


async def test_a_top_k_beyond_the_vocabulary_harms_nobody(client):
    # It used to overflow int64 in the scheduler thread and kill the engine for every request.
    req = {"prompt": "Hello", "max_tokens": 4, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    vocab = client.app.state.engine.vocab_size
    same = (await client.post("/v1/completions", json={**req, "top_k": vocab})).json()["choices"][0]["text"]
    r = await asyncio.wait_for(client.post("/v1/completions", json={**req, "top_k": 10**30}), 30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == same
    assert (await client.get("/health")).status_code == 200


async def test_a_failure_while_sampling_the_first_token_answers_500_not_never(open_app, monkeypatch):
    """Sampling a request's first tokens is its own work: it fails alone (500), and the engine serves on."""
    async with open_app() as c:
        def broken(*args, **kwargs):
            raise RuntimeError("simulated sampler failure")

        with monkeypatch.context() as patched:
            patched.setattr("retnet.serve.engine.sample_step", broken)
            r = await asyncio.wait_for(c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 3}), 30)
        assert r.status_code == 500 and "simulated sampler failure" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "internal_error"
        assert (await c.get("/health")).status_code == 200
        again = await asyncio.wait_for(c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 3}), 30)
        assert again.status_code == 200, again.text


async def test_health_is_503_when_the_engine_dies(open_app):
    async with open_app() as c:
        engine = c.app.state.engine

        def broken(*args, **kwargs):
            raise RuntimeError("simulated device failure")

        engine.model.forward = broken
        r = await c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 3})
        assert r.status_code == 503 and "simulated device failure" in r.json()["error"]["message"]
        health = await c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        r = await c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 3})
        assert r.status_code == 503


async def test_a_non_streaming_client_that_leaves_mid_generation_frees_its_slot(open_app):
    # Tokens arrive every decode step, so the client's absence must be noticed while they flow too.
    async with open_app() as c:
        app, engine = c.app, c.app.state.engine
        body = json.dumps({"prompt": "hello", "max_tokens": 4096, **GREEDY}).encode()

        async def send(message):
            pass

        await asyncio.wait_for(app(_post_scope(body, "2.3"), _leaving_client(body), send), 60)
        await asyncio.wait_for(_drained(engine), 60)
        assert await metric(c, "retnet_sequences_cancelled_total") == 1
        assert await metric(c, "retnet_generation_tokens_total") < 4096


async def test_completion_text_offset_counts_from_the_prompt_without_echo(client):
    # OpenAI's offsets index prompt + completion: without echo the first generated token starts after the prompt.
    prompts = ["Hello world", "a 中 b"]
    req = {"prompt": prompts, "max_tokens": 5, "logprobs": 1, **GREEDY}
    whole = (await client.post("/v1/completions", json=req)).json()["choices"]
    echoed = (await client.post("/v1/completions", json={**req, "echo": True})).json()["choices"]
    events = sse_events((await client.post("/v1/completions", json={**req, "stream": True})).text)
    for index, prompt in enumerate(prompts):
        offsets = whole[index]["logprobs"]["text_offset"]
        assert offsets[0] == len(prompt)
        assert echoed[index]["logprobs"]["text_offset"][-5:] == offsets
        streamed = [o for e in events if e["choices"][0]["index"] == index
                    for o in (e["choices"][0]["logprobs"] or {}).get("text_offset", [])]
        assert streamed == offsets


async def test_max_tokens_zero_with_echo_scores_the_prompt(client):
    prompt = "Hello world"
    before = await metric(client, "retnet_generation_tokens_total")
    req = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "return_token_ids": True, **GREEDY}
    r = await client.post("/v1/completions", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length" and choice["token_ids"] == []
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] == len(choice["prompt_token_ids"])
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(choice["prompt_token_ids"]) and lp["token_logprobs"][0] is None
    scored = (await client.post("/v1/completions", json={**req, "max_tokens": 2})).json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][1:] == pytest.approx(scored["token_logprobs"][1 : len(lp["tokens"])])
    events = sse_events((await client.post("/v1/completions", json={**req, "stream": True})).text)
    assert "".join(e["choices"][0]["text"] for e in events) == prompt
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    plain = (await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True})).json()
    assert plain["choices"][0]["text"] == prompt and plain["choices"][0]["logprobs"] is None
    assert await metric(client, "retnet_generation_tokens_total") == before + 2  # only the max_tokens=2 request
    assert client.app.state.engine.in_system == 0
    # Without echo there is nothing to return: refused, naming the field and saying why.
    for url, body in (("/v1/completions", {"prompt": prompt, "max_tokens": 0}),
                      ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})):
        r = await client.post(url, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        assert "echo" in r.json()["error"]["message"]


async def test_max_tokens_zero_in_a_session_adds_the_prompt_to_it(client):
    first = (await client.post("/v1/completions", json={
        "prompt": "def add(a, b):", "max_tokens": 0, "echo": True, "session_id": "s-zero", "return_token_ids": True,
        **GREEDY})).json()["choices"][0]
    assert first["token_ids"] == []
    second = (await client.post("/v1/completions", json={
        "prompt": "\nclass Stack:", "max_tokens": 6, "session_id": "s-zero", "return_token_ids": True,
        "echo": True, "logprobs": 0, **GREEDY,
    })).json()["choices"][0]
    # The session kept no token to feed, so no logits score this prompt's first token: null, then aligned.
    n = len(second["prompt_token_ids"])
    assert len(second["logprobs"]["tokens"]) == n + 6 and second["logprobs"]["token_logprobs"][0] is None
    history = first["prompt_token_ids"] + second["prompt_token_ids"]
    whole = (await client.post("/v1/completions", json={"prompt": history, "max_tokens": 6,
                                                        "return_token_ids": True, **GREEDY})).json()
    assert whole["choices"][0]["token_ids"] == second["token_ids"]


async def test_chat_content_parts_other_than_text_are_refused_by_name(client):
    parts = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}],
        "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages[1].content[1].type" and error["type"] == "invalid_request_error"
    assert "only text" in error["message"] and "image_url" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "text"}]}],
                                                        "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].text", r.text
    # A malformed part is named too, not reported as content failing to be a string.
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"text": "hi"}]}],
                                                        "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].type", r.text
    ok = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts[:1] * 2}],
                                                         "max_tokens": 2})
    assert ok.status_code == 200, ok.text


async def test_streamed_chat_sends_the_role_once_per_choice(client):
    req = {"messages": [{"role": "user", "content": "Hello world!"}], "max_tokens": 4, "n": 2, "stream": True,
           "temperature": 1.0, "seed": 5, "ignore_eos": True}
    events = sse_events((await client.post("/v1/chat/completions", json=req)).text)
    for index in range(2):
        deltas = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == index]
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in d["delta"] for d in deltas[1:])
        assert deltas[-1]["finish_reason"] == "length" and deltas[-1]["delta"] == {}  # OpenAI's last delta is {}


async def test_max_completion_tokens_errors_name_it(client):
    msgs = [{"role": "user", "content": "hi"}]
    for value in (10**9, 0, -3):
        r = await client.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": value})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "max_completion_tokens" and "max_completion_tokens" in error["message"], error


def _leaving_client(body: bytes):
    """An ASGI receive that delivers the request body, then reports the client gone."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _post_scope(body: bytes, spec_version: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("test", 80),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_streaming_client_gone_before_the_headers_frees_its_slot(open_app, spec_version, caplog):
    # ASGI 2.4: the server's send raises OSError; before 2.4 the app hears http.disconnect. Either way the
    # response never starts its body, so the slot must be freed by the response itself, not the body's finally.
    async with open_app() as c:
        app, engine = c.app, c.app.state.engine
        body = json.dumps({"prompt": "hello", "max_tokens": 4096, "stream": True, **GREEDY}).encode()

        async def send(message):
            if message["type"] == "http.response.start":
                if spec_version == "2.4":
                    raise OSError("connection reset by peer")
                await asyncio.sleep(0.5)  # the disconnect is heard meanwhile

        with contextlib.suppress(Exception):
            await asyncio.wait_for(app(_post_scope(body, spec_version), _leaving_client(body), send), 60)
        await asyncio.wait_for(_drained(engine), 60)
        assert await metric(c, "retnet_sequences_cancelled_total") == 1
        assert await metric(c, "retnet_generation_tokens_total") < 4096
        assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a client leaving is not a server bug


async def test_a_client_gone_while_sending_its_body_is_counted_as_499_not_a_server_error(client):
    # No response is sent: the middleware's default status, 500, counted a client's hang-up as a server error.
    body = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
    parts = iter([{"type": "http.request", "body": body[:5], "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(parts)

    async def send(message):
        raise AssertionError(f"nobody is there to answer: {message}")

    await client.app(_post_scope(body, "2.4"), receive, send)
    text = (await client.get("/metrics")).text
    assert 'retnet_requests_total{route="/v1/completions",status="499"} 1.0' in text
    assert 'status="500"' not in text


async def _drained(engine) -> None:
    while engine.in_system:
        await asyncio.sleep(0.01)


async def _released(session) -> None:
    while session.busy:
        await asyncio.sleep(0.01)


async def test_session_echo_logprobs_cover_this_requests_prompt(client):
    await client.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 4, "session_id": "s-echo",
                                               "return_token_ids": True, **GREEDY})
    first = (await client.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 4,
                                                        "return_token_ids": True, **GREEDY})).json()["choices"][0]
    prompt = "\nclass Stack:"
    req = {"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1, "return_token_ids": True, **GREEDY}
    second = (await client.post("/v1/completions", json={**req, "session_id": "s-echo"})).json()["choices"][0]
    alone = (await client.post("/v1/completions", json=req)).json()["choices"][0]
    n = len(second["prompt_token_ids"])
    lp = second["logprobs"]
    assert second["text"].startswith(prompt) and len(lp["tokens"]) == n + 3
    assert lp["tokens"][:n] == alone["logprobs"]["tokens"][:n]
    assert lp["text_offset"][:n] == alone["logprobs"]["text_offset"][:n] and lp["text_offset"][n] == len(prompt)
    # The prompt's logprobs are the ones it has after the session's history, its first token's included.
    history = first["prompt_token_ids"] + first["token_ids"] + second["prompt_token_ids"]
    whole = (await client.post("/v1/completions", json={**req, "prompt": history})).json()["choices"][0]
    assert lp["token_logprobs"][:n] == pytest.approx(whole["logprobs"]["token_logprobs"][-3 - n : -3], abs=1e-4)
    assert lp["tokens"][n:] == whole["logprobs"]["tokens"][-3:]


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def test_stream_options_without_stream_is_400_as_openai_does(client):
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 3}), ("/v1/chat/completions", CHAT)):
        r = await client.post(path, json={**body, "stream_options": {"include_usage": True}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
        # null (what the openai client sends for an unset argument) is no stream_options at all
        assert (await client.post(path, json={**body, "stream_options": None})).status_code == 200


async def test_null_stream_options_fields_mean_their_defaults(client):
    # null is the default for every optional parameter, stream_options' own included (vLLM's are nullable too);
    # they were a 400 "should be a valid boolean".
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 3}), ("/v1/chat/completions", CHAT)):
        options = {"include_usage": None, "continuous_usage_stats": None}
        r = await client.post(path, json={**body, "stream": True, "stream_options": options})
        assert r.status_code == 200, r.text
        assert all("usage" not in e for e in sse_events(r.text))
        options = {"include_usage": True, "continuous_usage_stats": None}
        # ignore_eos: a sampled EOS would end the random model's answer before its 3 tokens
        body = {**body, "stream": True, "stream_options": options, "ignore_eos": True}
        events = sse_events((await client.post(path, json=body)).text)
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
        assert all(e["usage"] is None for e in events[:-1])


async def test_chat_top_logprobs_needs_logprobs_true(client):
    r = await client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text
    r = await client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2, "logprobs": False})
    assert r.status_code == 400, r.text
    ok = await client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2, "logprobs": True})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


async def test_logit_bias_is_applied_on_both_routes(client):
    req = {"prompt": "Hello", "max_tokens": 4, "return_token_ids": True, **GREEDY}
    greedy = (await client.post("/v1/completions", json=req)).json()["choices"][0]["token_ids"]
    banned = (await client.post("/v1/completions", json={**req, "logit_bias": {str(greedy[0]): -100}})).json()
    assert banned["choices"][0]["token_ids"][0] != greedy[0]
    forced_id = 300 if greedy[0] != 300 else 301
    for stream in (False, True):
        r = await client.post("/v1/completions", json={**req, "stream": stream, "logit_bias": {str(forced_id): 100}})
        ids = ([t for e in sse_events(r.text) for t in e["choices"][0]["token_ids"]] if stream
               else r.json()["choices"][0]["token_ids"])
        assert ids == [forced_id] * 4
    sampled = {**req, "temperature": 1.0, "seed": 7, "logit_bias": {str(forced_id): 100}}
    assert (await client.post("/v1/completions", json=sampled)).json()["choices"][0]["token_ids"] == [forced_id] * 4
    chat = await client.post("/v1/chat/completions", json={**CHAT, **GREEDY, "return_token_ids": True,
                                                           "logit_bias": {str(forced_id): 100}})
    assert chat.json()["choices"][0]["token_ids"] == [forced_id] * 3
    # {} is what LangChain's OpenAI LLM sends by default
    assert (await client.post("/v1/completions", json={**req, "logit_bias": {}})).json()["choices"][0][
        "token_ids"] == greedy
    vocab = client.app.state.engine.vocab_size
    # int() would take "1_0" as token 10 and "٣" (an Arabic-Indic 3) as token 3.
    for bad in ({"abc": 1}, {str(vocab): 1}, {"-1": 1}, {"5": 101}, {"5": -100.5}, {"1_0": 1}, {"٣": 1},
                {" 5": 1}, {"5": 1, "05": -1}):
        r = await client.post("/v1/completions", json={**req, "logit_bias": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", (bad, r.text)


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
     "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 1}, "best_of"),  # best_of > n runs: test_beam_search
    ("/v1/chat/completions", {"n": 2, "best_of": 1}, "best_of"),
    # vLLM's: run beside the prompt, their choices dropped with them
    ("/v1/completions", {"prompt": "hi", "prompt_embeds": "AAAAAA=="}, "prompt_embeds"),
], ids=lambda v: v if isinstance(v, str) else None)
async def test_unsupported_openai_features_are_refused_by_name(client, path, extra, param):
    base = CHAT if path.endswith("chat/completions") else {"max_tokens": 3}
    r = await client.post(path, json={**base, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"


# vLLM's fields that change no answer here (see the README): accepted and ignored on both routes.
VLLM_HINTS = {"request_id": "req-1", "cache_salt": "c2FsdA", "kv_transfer_params": {"do_remote_decode": False},
              "vllm_xargs": {"x": 1}, "mm_processor_kwargs": {}, "guided_decoding_backend": "xgrammar",
              "guided_whitespace_pattern": " ", "prompt_embeds": None}


async def test_no_op_values_of_unsupported_features_are_accepted(client):
    for extra in ({"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"},
                  {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
                  {"user": "someone"}, {"parallel_tool_calls": False}, {"best_of": 1},
                  VLLM_HINTS):
        r = await client.post("/v1/chat/completions", json={**CHAT, **extra})
        assert r.status_code == 200, (extra, r.text)
    for extra in ({"best_of": 1}, {"best_of": 2, "n": 2}, {"user": "someone"}, VLLM_HINTS):
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra})
        assert r.status_code == 200, (extra, r.text)


async def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 4}), ("/v1/chat/completions", CHAT)):
        r = await client.post(path, json={**body, **GREEDY, "n": 2, "stream": True, "stream_options": options})
        events = sse_events(r.text)
        final = events[-1]
        assert final["choices"] == [] and final["usage"]["completion_tokens"] == 2 * body["max_tokens"]
        assert all(e["usage"]["prompt_tokens"] == final["usage"]["prompt_tokens"] for e in events[:-1])
        for index in (0, 1):  # vLLM's: each chunk counts its own choice's tokens so far, not the request's
            done = [e["usage"]["completion_tokens"] for e in events[:-1] if e["choices"][0]["index"] == index]
            assert done == sorted(done) and done[-1] == body["max_tokens"], (index, done)
        # without continuous_usage_stats: usage null until the last chunk (OpenAI's shape)
        r = await client.post(path, json={**body, **GREEDY, "stream": True, "stream_options": {"include_usage": True}})
        events = sse_events(r.text)
        assert all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"]["completion_tokens"]


async def test_a_body_that_is_not_sent_as_json_is_415_naming_the_content_type(client):
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):  # curl -d alone sends a form
        r = await client.post("/v1/completions", content=body, headers={"content-type": content_type})
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", content=body)  # no Content-Type at all: read as JSON
    assert r.status_code == 200, r.text


async def test_model_cards_have_a_stable_created(client):
    first = (await client.get("/v1/models")).json()
    await asyncio.sleep(1.1)
    again = (await client.get("/v1/models")).json()
    card = (await client.get("/v1/models/micro")).json()
    assert first["object"] == "list" and first == again
    assert card["created"] == first["data"][0]["created"] and card["owned_by"] == "retnet"


async def test_the_routes_with_an_id_in_the_path_are_counted_by_their_template(client):
    # GET /v1/models/{model_id} and DELETE /v1/sessions/{session_id} were counted as route "other".
    assert (await client.get("/v1/models/micro")).status_code == 200
    assert (await client.get("/v1/models/org/no-such-model")).status_code == 404  # a served name may hold "/"
    assert (await client.delete("/v1/sessions/nobody")).status_code == 404
    text = (await client.get("/metrics")).text
    assert 'retnet_requests_total{route="/v1/models/{model_id}",status="200"} 1.0' in text
    assert 'retnet_requests_total{route="/v1/models/{model_id}",status="404"} 1.0' in text
    assert 'retnet_requests_total{route="/v1/sessions/{session_id}",status="404"} 1.0' in text
    assert 'route="other"' not in text


async def test_model_cards_give_the_most_tokens_a_request_can_span(open_app):
    # max_model_len was null. A RetNet has no context length; the server's two limits bound a request, each
    # on its own, so the card gives their sum and both parts, and a request spanning exactly that is served.
    async with open_app(max_prompt_tokens=20, max_tokens_limit=5) as c:
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card == {**card, "max_model_len": 25, "max_prompt_tokens": 20, "max_completion_tokens": 5}
        assert (await c.get("/v1/models/micro")).json() == card
        prompt = list(range(5, 25))
        r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, **GREEDY})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == card["max_model_len"], r.text
        r = await c.post("/v1/completions", json={"prompt": [*prompt, 5], "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = await c.post("/v1/completions", json={"prompt": prompt[:1], "max_tokens": 6})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


async def test_an_over_long_chat_is_refused_naming_messages_with_the_numbers(open_app):
    async with open_app(max_prompt_tokens=50) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 100}]})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "messages" and error["code"] == "context_length_exceeded"
        assert "50" in error["message"]


async def test_stop_with_n_choices_ends_each_choice_on_its_own(client):
    req = {"prompt": "Hello", "max_tokens": 16, "temperature": 1.0, "seed": 11, "n": 4, "ignore_eos": True}
    free = [c["text"] for c in (await client.post("/v1/completions", json=req)).json()["choices"]]
    stop = next(t[3:5] for t in free if len(t) >= 6)  # a piece of one choice's text: that one stops early
    whole = (await client.post("/v1/completions", json={**req, "stop": stop})).json()["choices"]
    for text, choice in zip(free, whole):
        assert choice["text"] == text.split(stop)[0]
        assert choice["finish_reason"] == ("stop" if stop in text else "length")
    events = sse_events((await client.post("/v1/completions", json={**req, "stop": stop, "stream": True})).text)
    for i, choice in enumerate(whole):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [choice["finish_reason"]]
    chat = {**CHAT, "max_tokens": 16, "temperature": 1.0, "seed": 11, "n": 3, "ignore_eos": True}
    free = [c["message"]["content"] for c in (await client.post("/v1/chat/completions", json=chat)).json()["choices"]]
    stop = next(t[3:5] for t in free if len(t) >= 6)
    events = sse_events((await client.post("/v1/chat/completions", json={**chat, "stop": stop,
                                                                        "stream": True})).text)
    for i, text in enumerate(free):
        mine = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == text.split(stop)[0]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop" if stop in text else "length"]


async def test_concurrent_requests_on_one_session_get_409(client, monkeypatch):
    # Held, the slow request cannot finish (and free its session) before the others arrive.
    with decoding_held(client.app.state.engine, monkeypatch):
        slow = asyncio.create_task(client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 300,
                                                                       "session_id": "s409", **GREEDY}))
        while "s409" not in client.app.state.engine.sessions.sessions:
            await asyncio.sleep(0.01)
        r = await client.post("/v1/completions", json={"prompt": "again", "max_tokens": 2, "session_id": "s409"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy"
        r = await client.delete("/v1/sessions/s409")  # nor can it be deleted under the running request
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy"
    assert (await slow).status_code == 200
    r = await client.post("/v1/completions", json={"prompt": "again", "max_tokens": 2, "session_id": "s409"})
    assert r.status_code == 200


async def test_a_session_whose_client_leaves_mid_generation_is_left_as_it_was(open_app):
    async with open_app() as c:
        app, engine = c.app, c.app.state.engine
        first = {"prompt": "def add(a, b):", "max_tokens": 4, "session_id": "s-left", **GREEDY}
        assert (await c.post("/v1/completions", json=first)).status_code == 200
        before = engine.sessions.sessions["s-left"]
        state, pending, tokens = before.cache, list(before.pending), before.tokens
        body = json.dumps({"prompt": "\nclass", "max_tokens": 4096, "session_id": "s-left", **GREEDY}).encode()
        sent = []

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(app(_post_scope(body, "2.3"), _leaving_client(body), send), 60)
        await asyncio.wait_for(_drained(engine), 60)
        assert sent[0]["status"] == 499
        after = engine.sessions.sessions["s-left"]
        # A cancelled request's slot is freed just before its session is released: wait for the release.
        await asyncio.wait_for(_released(after), 60)
        assert (after.cache, after.pending, after.tokens, after.busy) == (state, pending, tokens, False)


async def test_a_session_finished_before_its_client_left_is_saved_and_answered_whole(open_app, monkeypatch):
    # The engine generated every token and saved the session; the server noticed the client gone only then,
    # with the last outputs still on their way. That request finished: the response is the whole
    # completion (200, unread), not a 499 "client closed" for work that completed and changed the session.
    import time

    monkeypatch.setattr("retnet.serve.streaming.DISCONNECT_POLL_S", 1e-3)
    async with open_app() as c:
        app, engine = c.app, c.app.state.engine
        body = json.dumps({"prompt": "def add(a, b):", "max_tokens": 64, "session_id": "s-done",
                           "return_token_ids": True, **GREEDY}).encode()
        polled = threading.Event()
        receive_body = _leaving_client(body)

        async def receive():
            message = await receive_body()
            if message["type"] == "http.disconnect":
                polled.set()
                # Blocks the event loop (so no output is taken meanwhile) until the engine has saved the session.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    session = engine.sessions.sessions.get("s-done")
                    if session is not None and session.cache is not None and not session.busy:
                        break
                    time.sleep(0.005)
            return message

        sent = []

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(app(_post_scope(body, "2.3"), receive, send), 60)
        assert polled.is_set(), "the server never looked for the client: the test did not test the race"
        assert sent[0]["status"] == 200, sent
        choice = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["choices"][0]
        assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 64
        session = engine.sessions.sessions["s-done"]
        assert session.tokens == len(choice["prompt_token_ids"]) + 64 and session.pending == choice["token_ids"][-1:]
        assert await metric(c, "retnet_sequences_cancelled_total") == 0


async def test_a_request_without_max_tokens_is_served_under_a_lowered_limit(open_app):
    # --max-tokens-limit below the default --default-max-tokens (256) made every request that left out
    # max_tokens a 400 "max_tokens must be <= 8; got 256".
    async with open_app(max_tokens_limit=8) as c:
        r = await c.post("/v1/completions", json={"prompt": "def add", **GREEDY})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **GREEDY})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text


async def test_a_lone_surrogate_in_the_text_is_400_naming_where_it_is(client):
    # JSON can escape half of a surrogate pair ("\ud83d": a client's string cut inside an emoji). That is no
    # Unicode text: the tokenizer cannot take it, and a prompt holding one was a 500.
    cases = [
        ("/v1/completions", '{"prompt": "hi \\ud83d", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "\\udc00 x"], "max_tokens": 2}', "prompt[1]"),
        ("/v1/completions", '{"prompt": "hi", "stop": ["\\ud83d"], "max_tokens": 2}', "stop[0]"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content"),
        ("/v1/chat/completions",
         '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}',
         "messages[0].content[0].text"),
    ]
    for path, body, param in cases:
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == "invalid_unicode", (body, error)
        assert param in error["message"] and "surrogate" in error["message"]
    # A whole pair, escaped as JSON allows, is the character it stands for.
    r = await client.post("/v1/completions", content='{"prompt": "hi \\ud83d\\ude42", "max_tokens": 1}',
                          headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


async def test_a_template_that_refuses_the_history_alone_still_serves_the_conversation(client):
    # The messages before the last one are templated too, only to find a prefix state worth caching. A template
    # may refuse them on their own (Qwen3's raises "No user query found" without a user message): that made a
    # valid [system, user] conversation a 400 "the chat template rejected the messages".
    from retnet.tokenization import DEFAULT_CHAT_TEMPLATE

    client.app.state.serving.tokenizer.chat_template = (
        "{% set ns = namespace(user=false) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set ns.user = true %}{% endif %}{% endfor %}"
        "{% if not ns.user %}{{ raise_exception('No user query found in messages.') }}{% endif %}"
        + DEFAULT_CHAT_TEMPLATE)
    system = {"role": "system", "content": "Be brief."}
    r = await client.post("/v1/chat/completions", json={"messages": [system, {"role": "user", "content": "hi"}],
                                                        "max_tokens": 2, **GREEDY})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", json={"messages": [system], "max_tokens": 2})
    assert r.status_code == 400 and "No user query" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_tokenizing_a_prompt_leaves_the_event_loop_free(client, monkeypatch, path):
    # A megabyte prompt takes the tokenizer about a second; encoded on the event loop, it stalled every other
    # request and every running stream for that long. So a large prompt is encoded on a worker thread (here
    # "large" is lowered to the test's prompt), a small one on the loop (threads would spread a burst of them
    # over more prefill rounds).

    from retnet.serve import serving as serving_module

    tokenizer = client.app.state.serving.tokenizer
    encode = tokenizer.encode
    threads = []

    def recording_encode(*args, **kwargs):
        threads.append(threading.current_thread())
        return encode(*args, **kwargs)

    body = {"prompt": "hi"} if path == "/v1/completions" else CHAT
    monkeypatch.setattr(tokenizer, "encode", recording_encode)
    assert (await client.post(path, json={**body, "max_tokens": 1})).status_code == 200
    assert threads and all(t is threading.main_thread() for t in threads)

    # The encoding ends only once /health has answered (no clock: a loaded machine may take any time to answer).
    # Encoded on the event loop, it would wait for an answer the blocked loop cannot give, until the deadline.
    encoding, answered = threading.Event(), threading.Event()
    health_answered_meanwhile = []

    def encode_after_health(*args, **kwargs):
        encoding.set()
        health_answered_meanwhile.append(answered.wait(30))
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode_after_health)
    monkeypatch.setattr(serving_module, "OFF_LOOP_PROMPT_SIZE", 1)
    slow = asyncio.create_task(client.post(path, json={**body, "max_tokens": 1}))
    assert await asyncio.to_thread(encoding.wait, 60)
    assert (await client.get("/health")).status_code == 200
    answered.set()
    assert (await slow).status_code == 200
    assert health_answered_meanwhile and all(health_answered_meanwhile), health_answered_meanwhile


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_small_prompt_behind_a_large_one_does_not_stall_the_event_loop(client, monkeypatch, path):
    # The large prompt's worker thread holds the tokenizer's lock while it encodes; a small prompt arriving
    # meanwhile was encoded on the event loop, which then waited on that lock: every stream stalled after all.

    from retnet.serve import serving as serving_module

    serving = client.app.state.serving
    tokenizer = serving.tokenizer
    encode = tokenizer.encode
    # The large prompt's encoding, the lock held, ends only once /health has answered (no clock: a loaded machine
    # may take any time to answer). A small prompt encoded on the event loop meanwhile would wait for the lock,
    # and the loop with it: /health could not answer until the deadline.
    large_encoding, answered = threading.Event(), threading.Event()
    health_answered_meanwhile = []

    def large_after_health(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread() and not large_encoding.is_set():
            large_encoding.set()
            health_answered_meanwhile.append(answered.wait(30))
        return encode(*args, **kwargs)

    small_tokenizing = asyncio.Event()
    tokenizing = serving._tokenizing

    async def noting_the_small_one(size, function, *args):
        if large_encoding.is_set():
            small_tokenizing.set()
        return await tokenizing(size, function, *args)

    monkeypatch.setattr(tokenizer, "encode", large_after_health)
    monkeypatch.setattr(serving, "_tokenizing", noting_the_small_one)
    monkeypatch.setattr(serving_module, "OFF_LOOP_PROMPT_SIZE", 50)
    large = {"prompt": "hi " * 40} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": "hi " * 40}]}
    small = {"prompt": "hi"} if path == "/v1/completions" else CHAT
    slow = asyncio.create_task(client.post(path, json={**large, "max_tokens": 1}))
    assert await asyncio.to_thread(large_encoding.wait, 60)  # the worker thread is encoding, the lock held
    behind = asyncio.create_task(client.post(path, json={**small, "max_tokens": 1}))
    await asyncio.wait_for(small_tokenizing.wait(), 60)
    assert (await client.get("/health")).status_code == 200
    answered.set()
    assert (await slow).status_code == 200 and (await behind).status_code == 200
    assert health_answered_meanwhile == [True]


async def test_a_chat_whose_template_gives_ids_beyond_the_model_names_messages(client, monkeypatch):
    # A tokenizer with tokens added after training (a chat template's markers) encodes ids the model does not
    # have; on a chat request the error named `prompt`, a parameter the request does not have.
    monkeypatch.setattr(client.app.state.engine, "vocab_size", 3)
    r = await client.post("/v1/chat/completions", json=CHAT)
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "invalid_token_id", r.text
    assert error["param"] == "messages" and error["message"].startswith("messages:"), error


async def test_a_tokenizer_with_several_named_chat_templates_uses_its_default(client):
    # transformers keeps a tokenizer's named templates as a dict ({"default": ..., "tool_use": ...}); handed
    # back as `chat_template=` that dict is no template, and every chat request was a 400.
    tokenizer = client.app.state.serving.tokenizer
    tokenizer.chat_template = {"default": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
                               "tool_use": "{{ raise_exception('not this one') }}"}
    r = await client.post("/v1/chat/completions", json={**CHAT, "return_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["prompt_token_ids"] == tokenizer.encode("[hi]", add_special_tokens=False)


async def test_completion_top_logprobs_always_hold_the_chosen_token(client):
    # OpenAI's completions: "the API will always return the logprob of the sampled token, so there may be up to
    # logprobs+1 elements" (vLLM does the same, echoed prompt tokens included). A sampled token outside the
    # top k was missing, and logprobs: 0 gave {} everywhere.
    for k in (0, 1):
        req = {"prompt": "Hello world", "max_tokens": 24, "temperature": 2.0, "seed": 3, "ignore_eos": True,
               "logprobs": k, "echo": True}
        for stream in (False, True):
            r = await client.post("/v1/completions", json={**req, "stream": stream})
            if stream:
                events = sse_events(r.text)
                lp = {key: [v for e in events for v in e["choices"][0]["logprobs"][key]]
                      for key in ("tokens", "token_logprobs", "top_logprobs")}
            else:
                lp = r.json()["choices"][0]["logprobs"]
            assert lp["top_logprobs"][0] is None  # the first prompt token has no logprob
            for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
                assert top[token] == value and k <= len(top) <= k + 1, (k, stream, token, top)
            assert any(len(top) == k + 1 for top in lp["top_logprobs"][1:])  # some draw was outside the top k
