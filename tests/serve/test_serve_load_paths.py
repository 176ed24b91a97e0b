"""The server under load and at its edges: concurrent clients, backpressure, shutdown with requests in flight,
and what the engine and its metrics hold once the traffic is gone."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from retnet.serve.serving import OFF_LOOP_PROMPT_SIZE
from tests.serve.conftest import held_serve_env

pytestmark = pytest.mark.anyio

LONG = dict(model="micro", prompt="Hello", temperature=0, ignore_eos=True)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_sigterm_answers_every_request_in_flight_before_the_process_exits(server_process):
    # uvicorn's graceful shutdown cancels the handlers still running when its timeout ends: a stream was cut
    # without its end and a queued request got its connection closed without a response. Past
    # --shutdown-grace-s each is answered instead: the stream's error event and [DONE], the queued one a 503.
    proc = server_process("--max-running", "1", "--max-queue", "4", "--shutdown-grace-s", "1",
                          "--max-tokens-limit", "100000")
    proc.wait_healthy()
    body = {**LONG, "max_tokens": 100000, "stream": True}
    async with httpx.AsyncClient(base_url=proc.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        queued = asyncio.create_task(client.post("/v1/completions", json={**LONG, "max_tokens": 5}))
        deadline = time.monotonic() + 120
        while metric((await client.get("/metrics")).text, "retnet_queue_depth") < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            await asyncio.sleep(0.05)
        proc.proc.send_signal(signal.SIGTERM)
        events = [line[6:] async for line in lines if line.startswith("data: ")]
        answer = await queued
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "shutting down" in error["message"] and error["type"] == "server_error", error
    assert answer.status_code == 503, answer.text
    assert "shutting down" in answer.json()["error"]["message"]
    # The stream was cut by the drain (its error event above), not run to its 100000 tokens; the process then exits.
    proc.proc.wait(timeout=120)


async def test_sigterm_serves_the_requests_it_has_read_that_are_not_yet_in_the_engine(server_process, tmp_path):
    # A request read before the signal but still being prepared (a long prompt tokenized off the event loop) reached
    # the engine after the drain had stopped it accepting: a 503 whatever --shutdown-grace-s said. uvicorn takes no
    # new connection once the shutdown starts, so such requests are the only ones left to arrive: served.
    # The server's prompts wait, once read, until its shutdown has started: the signal is sent only when all four
    # were read (a request not yet read when it arrives is refused, rightly), and each reaches the engine after it,
    # however slowly a loaded machine reads, tokenizes or handles the signal.
    reads = tmp_path / "reads"
    reads.mkdir()
    env = {**held_serve_env(tmp_path, "held_serve", HELD_UNTIL_SHUTDOWN), "HELD_READS": str(reads)}
    proc = server_process("--shutdown-grace-s", "30", "--max-prompt-tokens", "60000", module="held_serve", env=env)
    proc.wait_healthy()
    # More characters than OFF_LOOP_PROMPT_SIZE, so tokenized off the loop, in few tokens since each is prefilled
    # (5.5 characters a token: ~13k, where as much code was 40k).
    body = {"model": "micro", "prompt": " recurrence" * (OFF_LOOP_PROMPT_SIZE // 11 + 1), "max_tokens": 3,
            "temperature": 0}
    async with httpx.AsyncClient(base_url=proc.url, timeout=120) as client:
        sent = [asyncio.create_task(client.post("/v1/completions", json={**body, "prompt": f"# {i}\n{body['prompt']}"}))
                for i in range(4)]
        deadline = time.monotonic() + 120
        while len(list(reads.iterdir())) < 4:
            assert time.monotonic() < deadline, "the server never read the four requests"
            await asyncio.sleep(0.05)
        proc.proc.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*sent)
    assert [a.status_code for a in answers] == [200] * 4, [a.text[:200] for a in answers]
    proc.proc.wait(timeout=60)


# Each request, once read, notes it (a file in $HELD_READS) and waits before its tokenization until the server's
# shutdown has started (its drain thread runs), for two minutes at most.
HELD_UNTIL_SHUTDOWN = """
import asyncio
import os
import threading
import time
import uuid
from pathlib import Path

from retnet.serve import serving

tokenizing = serving.OpenAIServing._tokenizing


async def held(self, size, function, *args):
    (Path(os.environ["HELD_READS"]) / uuid.uuid4().hex).touch()
    deadline = time.monotonic() + 120
    while not any(t.name == "retnet-drain" for t in threading.enumerate()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return await tokenizing(self, size, function, *args)


serving.OpenAIServing._tokenizing = held
"""


async def _one_running_one_queued(client) -> tuple[asyncio.Task, asyncio.Task]:
    """A request decoding (it would run long) and one queued behind it, on an engine of max_running=1."""
    engine = client.app.state.engine
    running = asyncio.create_task(client.post("/v1/completions", json={**LONG, "max_tokens": 100000}))
    while not engine.running:
        await asyncio.sleep(0.01)
    queued = asyncio.create_task(client.post("/v1/completions", json={**LONG, "max_tokens": 5}))
    while engine._queued() < 1:
        await asyncio.sleep(0.01)
    return running, queued


async def test_shutdown_counts_the_sequences_it_cancels(open_app):
    # retnet_sequences_cancelled says it counts the sequences a shutdown cancels; a shutdown that ended a running
    # request and a queued one counted neither. Both are told the server is going (code unavailable, as a request
    # refused meanwhile), not that the engine failed.
    async with open_app(max_running=1, max_queue=4, max_tokens_limit=100000) as client:
        engine = client.app.state.engine
        running, queued = await _one_running_one_queued(client)
        await asyncio.to_thread(engine.shutdown, 0.0)
        answers = [await running, await queued]
        assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
        errors = [a.json()["error"] for a in answers]
        assert all("shutting down" in e["message"] and e["code"] == "unavailable" for e in errors), errors
        cancelled = metric((await client.get("/metrics")).text, "retnet_sequences_cancelled_total")
        assert cancelled == 2


async def test_a_draining_server_reports_stopping_and_refuses_new_work_saying_why(open_app):
    # While the engine drains (shutdown's grace) it takes no new request: /health said "ok" all the same, so a
    # load balancer kept sending work, each refused with "the engine is not ready".
    async with open_app(max_tokens_limit=100000) as client:
        engine = client.app.state.engine
        running = asyncio.create_task(client.post("/v1/completions", json={**LONG, "max_tokens": 100000}))
        while not engine.running:
            await asyncio.sleep(0.01)
        drain = asyncio.ensure_future(asyncio.to_thread(engine.shutdown, 30.0))
        while engine.accepting:
            await asyncio.sleep(0.01)
        health = await client.get("/health")
        refused = await client.post("/v1/completions", json={**LONG, "max_tokens": 2})
        engine.running[0].group.handle.cancel()  # as when its client leaves: nothing in flight, the drain ends
        await drain
        await running
    assert health.status_code == 503 and health.json()["status"] == "stopping", health.text
    assert refused.status_code == 503, refused.text
    assert "shutting down" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"]


def metrics_of(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def wait_idle(client: httpx.AsyncClient) -> dict[str, float]:
    """The metrics once nothing is queued, prefilled or running (a cancel is reaped at the next iteration)."""
    deadline = time.monotonic() + 30
    while True:
        now = metrics_of((await client.get("/metrics")).text)
        if not (now["retnet_running_sequences"] or now["retnet_queue_depth"] or now["retnet_prefilling_sequences"]):
            return now
        assert time.monotonic() < deadline, "the engine never emptied"
        await asyncio.sleep(0.05)


async def test_mixed_concurrent_traffic_is_answered_once_and_the_sequence_counters_add_up(server):
    # Many clients at once: greedy and seeded, n > 1, streams read to the end or left after their first event, a
    # non-streaming request on a long prompt left mid-way, refused requests. Each gets one well-formed answer, a
    # neighbour's departure changes no greedy text, and once idle every sequence submitted was counted once as
    # finished, failed or cancelled (there was no counter of the sequences submitted or finished to check that by).
    greedy = [dict(model="micro", prompt=p, max_tokens=12, temperature=0) for p in ("def add", "class Stack", "Hi")]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        alone = [(await client.post("/v1/completions", json=body)).json()["choices"][0]["text"] for body in greedy]
        before = await wait_idle(client)

        async def stream(body: dict, leave: bool) -> list[str]:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                events = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if leave:
                            return events
                return events

        long_prompt = " ".join(f"w{i}" for i in range(1500))
        leavers = [stream({**LONG, "max_tokens": 4000}, True) for _ in range(3)]
        long_prompt_leaver = asyncio.create_task(client.post("/v1/completions", json={**LONG, "prompt": long_prompt,
                                                                                   "max_tokens": 4000}))
        served = [client.post("/v1/completions", json=body) for body in greedy]
        seeded = [client.post("/v1/completions", json={**LONG, "n": 3, "temperature": 1.0, "seed": 7,
                                                        "max_tokens": 8})]
        streamed = [stream(body, False) for body in greedy]
        refused = [client.post("/v1/completions", json={**LONG, "logit_bias": {"99999": 1}}),
                   client.post("/v1/completions", json={**LONG, "prompt": "a " * 9000}),
                   client.post("/v1/completions", json={**LONG, "max_tokens": 10**6})]
        results = await asyncio.gather(*leavers, *served, *seeded, *streamed, *refused)
        long_prompt_leaver.cancel()
        left, answers = results[:3], results[3:]
        after = await wait_idle(client)

    assert all(len(events) == 1 for events in left)
    answered = answers[:4]
    assert [r.status_code for r in answered] == [200] * 4, [r.text for r in answered]
    assert [r.json()["choices"][0]["text"] for r in answered[:3]] == alone
    assert len(answered[3].json()["choices"]) == 3
    for events, text in zip(answers[4:7], alone):
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == text
    for response, code in zip(answers[7:], ("invalid_token_id", "context_length_exceeded", None)):
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == code and error["message"] and error["param"], error

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    finished = sum(delta(f'retnet_sequences_finished_total{{finished_reason="{r}"}}') for r in ("stop", "length"))
    submitted = delta("retnet_sequences_submitted_total")
    assert submitted == 3 + 1 + 3 + 3 + 3  # the leavers, the prefill one, greedy, n=3, streams
    assert delta("retnet_sequences_cancelled_total") == 4
    assert submitted == finished + delta("retnet_sequences_cancelled_total") + delta("retnet_sequences_failed_total")
    # Each token counted once: as a request's first, as one after a sequence's first, or (2) as the first of the
    # n=3 request's other choices (time to first token is observed once a request, as vLLM's).
    assert delta("retnet_generation_tokens_total") == (delta("retnet_time_to_first_token_seconds_count")
                                                        + delta("retnet_inter_token_latency_seconds_count") + 2)


async def test_the_sequences_of_a_dead_engine_are_counted_as_failed(open_app):
    # An engine that dies ends every request with a 503: their sequences must be counted, or submitted would never
    # again add up to finished + failed + cancelled.
    async with open_app(max_running=1, max_tokens_limit=100000) as client:
        engine = client.app.state.engine
        running, queued = await _one_running_one_queued(client)

        def broken_step():
            raise RuntimeError("the batched forward failed (simulated)")

        engine._decode_step = broken_step
        answers = [await running, await queued]
        assert [a.json()["error"]["code"] for a in answers] == ["engine_failure"] * 2
        now = metrics_of((await client.get("/metrics")).text)
    assert now["retnet_sequences_submitted_total"] == 2
    assert now["retnet_sequences_failed_total"] == 2 and now["retnet_sequences_cancelled_total"] == 0
