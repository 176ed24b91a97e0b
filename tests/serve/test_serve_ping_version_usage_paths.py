"""vLLM's ``/ping`` (SageMaker's health check: ``/health``'s answer, to GET and POST) and ``/version`` (retnet-stack's
version), open as ``/health`` with --api-keys and counted under their own metrics label; and
``stream_options.continuous_usage_stats`` with several choices, which counts each chunk's own choice as vLLM does
(every chunk carried the sum of all the choices' tokens, and a batch's every prompt)."""

from __future__ import annotations

import importlib.metadata
import json
import warnings

import httpx
import pytest

import retnet
from retnet.serve import app as app_module

from .conftest import make_settings, serve_app

pytestmark = pytest.mark.anyio
KEY = {"Authorization": "Bearer k"}
CONTINUOUS = {"stream": True, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
              "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def client(model_dir):
    async with serve_app(model_dir, api_keys=["k"], root_path="/llm") as c:
        yield c


async def test_ping_is_health_and_version_the_package_version_without_a_key(client):
    version = importlib.metadata.version("retnet-stack")
    for prefix in ("", "/llm"):
        for method in ("GET", "POST"):
            r = await client.request(method, f"{prefix}/ping")
            assert r.status_code == 200 and r.json() == {"status": "ok"}, (prefix, method, r.text)
        r = await client.get(f"{prefix}/version")
        assert r.status_code == 200 and r.json() == {"version": version}, r.text
    assert (await client.delete("/ping")).status_code == 405
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns of an operation id given twice
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths["/ping"]) == {"get", "post"} and set(paths["/version"]) == {"get"}
    metrics = (await client.get("/metrics")).text
    for line in ('route="/ping",status="200"} 4.0', 'route="/ping",status="405"} 1.0',
                 'route="/version",status="200"} 2.0'):
        assert "retnet_requests_total{" + line in metrics, metrics


async def test_ping_is_503_while_the_model_loads(model_dir):
    app = app_module.create_app(make_settings(model_dir))  # the engine not started: loading
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        for method in ("GET", "POST"):
            r = await c.request(method, "/ping")
            assert r.status_code == 503 and r.json()["status"] == "loading", r.text


def test_the_version_of_a_source_tree_not_installed_is_the_package_s(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert app_module.package_version() == retnet.__version__


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def _by_choice(events: list[dict]) -> dict[int, list[tuple[int, int, int]]]:
    """Each choice's chunks as (the tokens it sent so far, the chunk's usage completion_tokens and prompt_tokens)."""
    seen: dict[int, list] = {}
    for event in events:
        if not event["choices"]:
            continue
        choice = event["choices"][0]
        sent = (seen[choice["index"]][-1][0] if choice["index"] in seen else 0) + len(choice.get("token_ids") or [])
        usage = event["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
        seen.setdefault(choice["index"], []).append((sent, usage["completion_tokens"], usage["prompt_tokens"]))
    return seen


async def test_continuous_usage_counts_the_chunk_s_own_choice(client):
    r = await client.post("/v1/chat/completions", headers=KEY, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2, **CONTINUOUS})
    events = sse_events(r.text)
    final = events[-1]["usage"]
    assert final["completion_tokens"] == 6
    chunks = _by_choice(events[:-1])
    assert sorted(chunks) == [0, 1]
    for index, seen in chunks.items():
        assert seen[0][1] == 0  # the opening chunk (the role): nothing generated yet
        assert all(sent == done and prompt == final["prompt_tokens"] for sent, done, prompt in seen), (index, seen)
        assert seen[-1][1] == 3

    prompts = ["hi", "the quick brown fox"]
    r = await client.post("/v1/completions", headers=KEY, json={"prompt": prompts, "max_tokens": 2, "n": 2,
                                                                **CONTINUOUS})
    events = sse_events(r.text)
    final = events[-1]["usage"]
    assert final["completion_tokens"] == 8
    prompt_ids = {e["choices"][0]["index"]: len(e["choices"][0]["prompt_token_ids"])
                  for e in events[:-1] if e["choices"] and e["choices"][0].get("prompt_token_ids")}
    assert sorted(prompt_ids) == [0, 1, 2, 3] and prompt_ids[0] != prompt_ids[2]
    assert sum(prompt_ids.values()) == 2 * final["prompt_tokens"]
    for index, seen in _by_choice(events[:-1]).items():  # each choice's own prompt too, as vLLM counts it
        assert all(sent == done and prompt == prompt_ids[index] for sent, done, prompt in seen), (index, seen)
        assert seen[-1][1] == 2
