"""Sessions on disk (``--session-dir``): a conversation continues across restarts (in-process apps, and real
uvicorn processes stopped and killed) exactly as without them, memory eviction falls back to the files, and a file
of another model or adapter, a corrupt one, an unsafe id and an expired file are each refused or removed."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from retnet.model import RetNetForCausalLM

from .conftest import ServerProcess, serve_app

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPTS = ["def add(a, b):", "\nclass Stack:", "\nfor i in range(3):"]
CHAT = ["Hello! How are you?", "What is a recurrence?", "Thank you."]


async def turn(client, session_id: str, prompt: str, **extra) -> dict:
    """One greedy completion turn of ``session_id``: its generated token ids and usage."""
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "session_id": session_id,
                                                   "return_token_ids": True, **GREEDY, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    return {"token_ids": body["choices"][0]["token_ids"], "usage": body["usage"]}


async def chat_turn(client, session_id: str, content: str) -> dict:
    """One greedy chat turn of ``session_id``: its generated token ids and usage."""
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": content}], "max_tokens": 5, "session_id": session_id,
        "return_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    return {"token_ids": r.json()["choices"][0]["token_ids"], "usage": r.json()["usage"]}


async def metric(client, name: str) -> float:
    """The sum of ``name``'s samples (over its labels)."""
    lines = (await client.get("/metrics")).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name) and line[len(name)] in " {")


def files_of(client):
    return client.app.state.engine.sessions.files


@pytest.fixture(scope="module")
def reference(model_dir) -> dict[str, list[dict]]:
    """The turns of PROMPTS (completions) and CHAT (chat) in one session each, on a server never restarted and
    without --session-dir."""

    async def run():
        async with serve_app(model_dir) as client:
            completions = [await turn(client, "ref", prompt) for prompt in PROMPTS]
            chats = [await chat_turn(client, "ref-chat", content) for content in CHAT]
            assert client.app.state.engine.sessions.files is None
        return {"completions": completions, "chat": chats}

    return asyncio.run(run())


@pytest.fixture(scope="module", autouse=True)
def real_server(model_dir, tmp_path_factory):
    """A real uvicorn process on a session directory of its own, started with the module: its imports take ~10 s
    on two cores, which the other tests' time then covers. Its flag comes from the environment."""
    directory = tmp_path_factory.mktemp("real-sessions")
    server = ServerProcess(model_dir, env={"RETNET_SESSION_DIR": str(directory)})
    yield server, directory
    server.stop()


async def test_a_session_restarted_between_every_turn_continues_exactly(model_dir, tmp_path, reference):
    turns = []
    for i, prompt in enumerate(PROMPTS):
        async with serve_app(model_dir, session_dir=str(tmp_path)) as client:
            turns.append(await turn(client, "s", prompt))
            assert await metric(client, "retnet_session_loads_total") == (i > 0)
        # Leaving the app shut it down: the last turn's state was written before it went.
        assert (tmp_path / "s.safetensors").is_file()
    assert turns == reference["completions"]  # the same tokens and the same usage


async def test_sessions_evicted_from_memory_continue_from_their_files(model_dir, tmp_path, reference):
    # One session in memory at a time: every turn evicts the other session, which its next turn reads back.
    async with serve_app(model_dir, session_dir=str(tmp_path), max_sessions=1, prefix_cache_entries=0) as client:
        a, b = [], []
        for prompt in PROMPTS:
            a.append(await turn(client, "a", prompt))
            b.append(await turn(client, "b", prompt))
            assert list(client.app.state.engine.sessions.sessions) == ["b"]
        assert await metric(client, "retnet_session_loads_total") == 4  # all but each session's first turn
        files_of(client).flush()
    assert a == b == reference["completions"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


async def test_a_later_turn_is_never_overtaken_by_an_earlier_write(model_dir, tmp_path, reference):
    from safetensors import safe_open

    async with serve_app(model_dir, session_dir=str(tmp_path), max_sessions=1, prefix_cache_entries=0) as client:
        files = files_of(client)
        gate, write = threading.Event(), files._write

        def held_write(path, session_id, state):  # the disk is slow: turns finish faster than files are written
            gate.wait(20)
            write(path, session_id, state)

        files._write = held_write
        a = [await turn(client, "a", PROMPTS[0]), await turn(client, "a", PROMPTS[1])]
        await turn(client, "b", PROMPTS[0])  # evicts "a" from memory before any of its states is on disk
        a.append(await turn(client, "a", PROMPTS[2]))  # continues from the state queued, not from no file
        assert not (tmp_path / "a.safetensors").exists()
        gate.set()
        assert files.flush(20)
        kept = client.app.state.engine.sessions.sessions["a"]
        with safe_open(tmp_path / "a.safetensors", "pt") as f:  # the last turn's state, not an earlier one
            assert int(f.metadata()["tokens"]) == kept.tokens
            assert all(torch.equal(f.get_tensor(f"state.{i}"), s) for i, s in enumerate(kept.cache.states))
    assert a == reference["completions"]


async def test_delete_removes_the_file_in_memory_or_not(model_dir, tmp_path):
    async with serve_app(model_dir, session_dir=str(tmp_path)) as client:
        await turn(client, "gone", PROMPTS[0])
        await turn(client, "kept", PROMPTS[0])
        assert (await client.delete("/v1/sessions/gone")).json() == {"id": "gone", "object": "session",
                                                                     "deleted": True}
        assert not (tmp_path / "gone.safetensors").exists()  # removed before the answer, and not written again
        assert (await client.delete("/v1/sessions/gone")).status_code == 404
    async with serve_app(model_dir, session_dir=str(tmp_path)) as client:  # "kept" is on disk only now
        assert client.app.state.engine.sessions.sessions == {}
        assert (await client.delete("/v1/sessions/kept")).status_code == 200
        assert (await client.delete("/v1/sessions/kept")).status_code == 404
    assert list(tmp_path.iterdir()) == []


def _other_model(model_dir: Path, dst: Path) -> Path:
    """A copy of the micro model with other weights of the same shapes (its config and tokenizer unchanged)."""
    shutil.copytree(model_dir, dst)
    model = RetNetForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    model.save_pretrained(dst)
    return dst


async def test_a_file_of_another_model_or_a_corrupt_one_is_refused_and_kept(model_dir, tmp_path, reference):
    sessions = tmp_path / "sessions"
    async with serve_app(model_dir, session_dir=str(sessions)) as client:
        first = await turn(client, "s", PROMPTS[0])
    saved = (sessions / "s.safetensors").read_bytes()
    (sessions / "cut.safetensors").write_bytes(saved[: len(saved) // 2])  # cut short (a copy interrupted)
    (sessions / "junk.safetensors").write_bytes(b"not a session")
    async with serve_app(_other_model(model_dir, tmp_path / "other"), session_dir=str(sessions)) as client:
        r = await client.post("/v1/completions", json={"prompt": PROMPTS[1], "session_id": "s", "max_tokens": 2})
        assert r.status_code == 409
        error = r.json()["error"]
        assert error["param"] == "session_id" and error["code"] == "session_model_changed"
        assert error["type"] == "invalid_request_error" and "weights" in error["message"]
        assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
        for session_id in ("cut", "junk"):
            r = await client.post("/v1/completions", json={"prompt": "x", "session_id": session_id, "max_tokens": 2})
            assert r.status_code == 409 and r.json()["error"]["code"] == "session_corrupt", r.text
            assert r.json()["error"]["param"] == "session_id"
        # Everyone else is served, a new session included; the refused files are left as they were.
        assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200
        await turn(client, "new", PROMPTS[0])
        assert await metric(client, "retnet_session_load_failures_total") == 3
        assert (await client.delete("/v1/sessions/junk")).status_code == 200  # a DELETE clears a corrupt file
        await turn(client, "junk", PROMPTS[0])
    assert (sessions / "s.safetensors").read_bytes() == saved
    async with serve_app(model_dir, session_dir=str(sessions)) as client:  # its own model continues it
        assert [first, await turn(client, "s", PROMPTS[1])] == reference["completions"][:2]


async def test_session_ids_are_safe_file_names(model_dir, tmp_path):
    sessions = tmp_path / "sessions"
    async with serve_app(model_dir, session_dir=str(sessions)) as client:
        for bad in ("../escape", "a/b", "x" * 129, ""):
            r = await client.post("/v1/completions", json={"prompt": "x", "session_id": bad, "max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["param"] == "session_id", (bad, r.text)
        r = await client.delete("/v1/sessions/a%20b")
        assert r.status_code == 400 and r.json()["error"]["param"] == "session_id"
        assert r.json()["error"]["code"] == "invalid_session_id"
        for dots in (".", ".."):  # allowed ids (as without --session-dir), each a plain file in the directory
            await turn(client, dots, PROMPTS[0])
        files_of(client).flush()
    assert sorted(p.name for p in sessions.iterdir()) == ["...safetensors", "..safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sessions"]


async def test_expired_files_are_removed_at_startup_on_request_and_periodically(model_dir, tmp_path):
    old = time.time() - 120
    async with serve_app(model_dir, session_dir=str(tmp_path), session_ttl_s=60) as client:
        await turn(client, "startup", PROMPTS[0])
        await turn(client, "lazy", PROMPTS[0])
        fresh = await turn(client, "fresh", PROMPTS[1])
    (tmp_path / ".startup.0123.tmp").write_bytes(b"left by a crash")
    os.utime(tmp_path / "startup.safetensors", (old, old))
    async with serve_app(model_dir, session_dir=str(tmp_path), session_ttl_s=60) as client:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.safetensors", "lazy.safetensors"]
        os.utime(tmp_path / "lazy.safetensors", (old, old))
        # Expired: the request starts the session anew, as one never seen.
        assert await turn(client, "lazy", PROMPTS[1]) == fresh
        assert await metric(client, "retnet_session_loads_total") == 0
    async with serve_app(model_dir, session_dir=str(tmp_path), session_ttl_s=0.5) as client:
        deadline = time.monotonic() + 10
        while list(tmp_path.iterdir()):  # the writer's sweep, every TTL here
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(RetNetForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                param.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("session-lora") / "a"
    peft_model.save_pretrained(path)
    return path


async def test_a_session_of_a_lora_adapter_continues_only_under_the_same_adapter_files(model_dir, tmp_path,
                                                                                      adapter_dir):
    lora = {"lora_modules": [f"a={adapter_dir}"]}
    async with serve_app(model_dir, **lora) as client:  # the reference, never restarted
        want = [await turn(client, "s", prompt, model="a") for prompt in PROMPTS[:2]]
        base = await turn(client, "base", PROMPTS[0])
    assert want[0]["token_ids"] != base["token_ids"]
    async with serve_app(model_dir, session_dir=str(tmp_path), **lora) as client:
        got = [await turn(client, "s", PROMPTS[0], model="a")]
    async with serve_app(model_dir, session_dir=str(tmp_path), **lora) as client:
        r = await client.post("/v1/completions", json={"prompt": "x", "session_id": "s", "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # as in memory: under its model only
        got.append(await turn(client, "s", PROMPTS[1], model="a"))
    assert got == want
    async with serve_app(model_dir, session_dir=str(tmp_path)) as client:  # the adapter not served
        r = await client.post("/v1/completions", json={"prompt": "x", "session_id": "s", "max_tokens": 2})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_model_changed", r.text
        assert "'a'" in r.json()["error"]["message"]
    weights = adapter_dir / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten
    async with serve_app(model_dir, session_dir=str(tmp_path), **lora) as client:
        r = await client.post("/v1/completions", json={"prompt": "x", "session_id": "s", "max_tokens": 2,
                                                       "model": "a"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_model_changed", r.text
        assert "changed" in r.json()["error"]["message"]


async def test_a_real_server_continues_a_session_and_a_killed_one_leaves_it_on_disk(model_dir, real_server,
                                                                                   reference):
    server, directory = real_server
    async with serve_app(model_dir, session_dir=str(directory)) as client:
        turns = [await chat_turn(client, "chat", CHAT[0])]
    # The real server continues it (read from the file), and is killed (no shutdown) once its turn is on disk:
    # the file alone carries the session to the next server.
    try:
        server.wait_healthy()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            turns.append(await chat_turn(client, "chat", CHAT[1]))
        deadline = time.monotonic() + 10
        while "retnet_session_writes_total 1.0" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "retnet_session_loads_total 1.0" in httpx.get(server.url + "/metrics").text
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    finally:
        server.stop()
    async with serve_app(model_dir, session_dir=str(directory)) as client:
        turns.append(await chat_turn(client, "chat", CHAT[2]))
    assert turns == reference["chat"]


async def test_without_session_dir_nothing_is_written(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with serve_app(model_dir) as client:
        await turn(client, "s", PROMPTS[0])
        await turn(client, "s", PROMPTS[1])
        assert files_of(client) is None
        assert not any(t.name == "retnet-session-writer" for t in threading.enumerate())
        assert await metric(client, "retnet_session_writes_total") == 0
    assert list(tmp_path.iterdir()) == []
