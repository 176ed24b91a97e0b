"""End to end: a real ``python -m retnet.serve`` (uvicorn) on loopback, real streaming HTTP clients."""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.launch import finished, selected_tests, stop
from tests.serve.conftest import ServerProcess
from tests.serve.warm_servers import start_python

REPO = Path(__file__).resolve().parents[2]

GREEDY = {"temperature": 0, "ignore_eos": True}

pytestmark = pytest.mark.anyio


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, list[dict]]:
    events = []
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            events.append(json.loads(payload))
    return "".join(c["text"] for e in events for c in e["choices"]), events


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


PROMPTS = [f"{word} {i}:" for i, word in enumerate(["def", "class", "for", "Hello", "The", "import", "A", "x"] * 4)]


async def test_32_concurrent_streams_equal_sequential_greedy(server):
    body = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    usage = {"stream_options": {"include_usage": True}}  # streams only: OpenAI refuses it without stream
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        sequential = []
        for prompt in PROMPTS:
            r = await client.post(server.url + "/v1/completions", json={**body, "prompt": prompt})
            sequential.append(r.json()["choices"][0]["text"])
        results = await asyncio.gather(*(stream_completion(client, server.url, {**body, **usage, "prompt": p})
                                         for p in PROMPTS))
    for (text, events), expected in zip(results, sequential):
        assert text == expected
        assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
        finishes = [c["finish_reason"] for e in events for c in e["choices"]]
        assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 16
    assert len(PROMPTS) == 32


async def test_client_disconnect_frees_its_slot(server):
    cancelled_before = metric(server.url, "retnet_sequences_cancelled_total")
    async with httpx.AsyncClient(timeout=60) as client:
        body = {"prompt": "Hello", "max_tokens": 4000, "stream": True, **GREEDY}
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break
            assert metric(server.url, "retnet_running_sequences") >= 1
        # The connection is closed: the server cancels the sequence and the batch shrinks.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (metric(server.url, "retnet_running_sequences") == 0
                    and metric(server.url, "retnet_sequences_cancelled_total") > cancelled_before):
                break
            await asyncio.sleep(0.1)
        assert metric(server.url, "retnet_running_sequences") == 0
        assert metric(server.url, "retnet_sequences_cancelled_total") == cancelled_before + 1


async def test_a_session_stream_cut_mid_generation_leaves_the_session_as_it_was(server):
    # A session is saved only with a whole response: a client that drops its stream halfway must not leave
    # the session holding the half it generated, so the next turn continues as if the cut one never ran.
    url = server.url + "/v1/completions"
    async with httpx.AsyncClient(timeout=60) as client:
        async def turn(session_id: str, prompt: str) -> list[int]:
            r = await client.post(url, json={"prompt": prompt, "max_tokens": 6, "session_id": session_id,
                                             "return_token_ids": True, **GREEDY})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        assert await turn("e2e-cut", "def add(a, b):") == await turn("e2e-kept", "def add(a, b):")
        cancelled_before = metric(server.url, "retnet_sequences_cancelled_total")
        body = {"prompt": "\nclass Stack:", "max_tokens": 4000, "session_id": "e2e-cut", "stream": True, **GREEDY}
        async with client.stream("POST", url, json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break
        deadline = time.monotonic() + 120
        while metric(server.url, "retnet_sequences_cancelled_total") == cancelled_before:
            assert time.monotonic() < deadline, "the cut stream was never cancelled"
            await asyncio.sleep(0.1)
        for _ in range(100):  # the session is free once the engine has dropped the cut request
            r = await client.post(url, json={"prompt": " for i in", "max_tokens": 6, "session_id": "e2e-cut",
                                             "return_token_ids": True, **GREEDY})
            if r.status_code != 409:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == await turn("e2e-kept", " for i in")


def test_bad_requests_then_a_good_one(server):
    url = server.url + "/v1/completions"
    headers = {"content-type": "application/json"}
    for raw in (b"{not json", b'{"prompt": "\xc3\x28"}', b'{"prompt": "x", "max_tokens": -3}',
                b'{"prompt": "x", "n": "two"}', b'{"prompt": "x", "model": "nope"}', b'{"prompt": ""}'):
        r = httpx.post(url, content=raw, headers=headers)
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text
    r = httpx.post(url, json={"prompt": "def add", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


# The processes of the last tests: one server with an API key that is then shut down gracefully (the API key test
# runs first, the shutdown ends it), and the demo (which starts a server, streams one completion and exits).
OWN_PROCESSES = {
    "keyed": ("test_api_key_on_a_real_server", "test_graceful_shutdown_finishes_the_running_stream"),
    "demo": ("test_demo_streams_one_completion_and_exits",),
}
KEY = {"Authorization": "Bearer secret"}


@pytest.fixture(scope="module")
def processes(request, model_dir, tmp_path_factory):
    """OWN_PROCESSES (those of the selected tests), started together when the first is needed: each start-up
    (imports, the model) keeps one core busy while the test waits for it."""
    selected = selected_tests(request)
    wanted = {name for name, tests in OWN_PROCESSES.items() if selected.intersection(tests)}
    started = {}
    if "keyed" in wanted:
        started["keyed"] = ServerProcess(model_dir, "--api-keys", "secret", "--shutdown-grace-s", "20",
                                         env={"RETNET_MAX_RUNNING": "4"})
    if "demo" in wanted:
        started["demo"] = start_python(  # (forked from the suite's warm interpreter: warm_servers.py)
            ["-m", "retnet.serve.demo", "--model", str(model_dir), "--exit-after", "--port", "0", "--max-tokens",
             "12"], dict(os.environ), tmp_path_factory.mktemp("demo"))
    yield started
    if "keyed" in started:
        started["keyed"].stop()
    if "demo" in started:
        stop(started["demo"])


def test_api_key_on_a_real_server(processes):
    proc = processes["keyed"]
    proc.wait_healthy()
    url = proc.url + "/v1/completions"
    assert httpx.post(url, json={"prompt": "x", "max_tokens": 1}).status_code == 401
    r = httpx.post(url, json={"prompt": "x", "max_tokens": 1}, headers=KEY)
    assert r.status_code == 200


def test_graceful_shutdown_finishes_the_running_stream(processes):
    proc = processes["keyed"]  # the API key test's server (that test runs first): this test ends it
    proc.wait_healthy()
    body = {"prompt": "Hello", "max_tokens": 60, "stream": True, **GREEDY}
    lines = []
    with httpx.Client(timeout=60, headers=KEY) as client, \
            client.stream("POST", proc.url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if len(lines) == 2:
                    proc.proc.send_signal(signal.SIGTERM)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"
    assert proc.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled


def test_demo_streams_one_completion_and_exits(processes):
    demo = finished(processes["demo"], timeout=120)
    assert demo.returncode == 0, demo.stderr
    assert "curl" in demo.stdout and "/v1/completions" in demo.stdout
