"""Sessions on disk (``--session-dir``): a conversation continues across restarts (in-process apps, and real
uvicorn processes stopped and killed) exactly as without them, memory eviction falls back to the files, and a file
of another model or adapter, a corrupt one, an unsafe id and an expired file are each refused or removed. The disk
failing (full, read-only, unreadable, the directory removed) never continues a session from an older state, never
leaves a DELETE unanswered and never stops the writer; faults are injected by patching os-level calls."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import signal
import struct
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch

from retnet.model import RetNetCache, RetNetForCausalLM
from tests.launch import selected_tests

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


def read_only_session_files(monkeypatch) -> None:
    """Session files cannot be removed from now on (a read-only filesystem, EROFS); temp files still can."""
    unlink = Path.unlink

    def refused(self, missing_ok=False):
        if self.suffix == ".safetensors":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)


def rewrite(src: Path, dst: Path, meta: dict, tensors: dict) -> None:
    """``src``'s session file written to ``dst`` with ``meta`` and ``tensors`` over its own."""
    from safetensors.torch import load, save

    data = src.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    dst.write_bytes(save({**load(data), **tensors}, {**json.loads(data[8 : 8 + size])["__metadata__"], **meta}))


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
def real_server(request, model_dir, tmp_path_factory):
    """A real uvicorn process on a session directory of its own, started with the module: its imports take ~10 s
    on two cores, which the other tests' time then covers. Its flag comes from the environment. Started only when
    the test that uses it is selected."""
    if "test_a_real_server_continues_a_session_and_a_killed_one_leaves_it_on_disk" not in selected_tests(request):
        yield None
        return
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
        for bad in ("a%20b", "abc%0A"):  # a trailing newline too (Python's $ matches before one)
            r = await client.delete(f"/v1/sessions/{bad}")
            assert r.status_code == 400 and r.json()["error"]["param"] == "session_id", (bad, r.text)
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
    (tmp_path / ".startup.0123456789ab.tmp").write_bytes(b"left by a crash")
    os.utime(tmp_path / "startup.safetensors", (old, old))
    # Not the sweep's: safetensors that are no session's (weights), other temp files, other names.
    from safetensors.torch import save

    foreign = {"weights.safetensors": save({"w": torch.zeros(2)}), ".notes.tmp": b"x", ".x.0123.tmp": b"x",
               "s.safetensors.bak": b"x", "untagged.safetensors": save({"w": torch.zeros(2)}, {"format": "other"})}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
        os.utime(tmp_path / name, (old, old))
    async with serve_app(model_dir, session_dir=str(tmp_path), session_ttl_s=60) as client:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fresh.safetensors", "lazy.safetensors",
                                                                     *foreign])
        os.utime(tmp_path / "lazy.safetensors", (old, old))
        # Expired: the request starts the session anew, as one never seen.
        assert await turn(client, "lazy", PROMPTS[1]) == fresh
        assert await metric(client, "retnet_session_loads_total") == 0
    async with serve_app(model_dir, session_dir=str(tmp_path), session_ttl_s=0.5) as client:
        deadline = time.monotonic() + 120
        while sorted(p.name for p in tmp_path.iterdir()) != sorted(foreign):  # the writer's sweep, every TTL here
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():  # peft's read of transformers' renamed is_gradient_checkpointing
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
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
        deadline = time.monotonic() + 120
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


async def test_a_failed_write_never_lets_the_session_continue_from_an_older_file(model_dir, tmp_path, monkeypatch):
    async with serve_app(model_dir, session_dir=str(tmp_path), max_sessions=1, prefix_cache_entries=0) as client:
        files = files_of(client)
        fresh = await turn(client, "fresh", PROMPTS[2])  # a session's first turn on PROMPTS[2]
        for session_id in ("s", "t"):
            await turn(client, session_id, PROMPTS[0])
        assert files.flush(20)
        write = files._write

        def full_disk(path, session_id, state):
            raise OSError(errno.ENOSPC, "No space left on device")

        files._write = full_disk
        await turn(client, "s", PROMPTS[1])  # the session goes on in memory ...
        assert files.flush(20)
        assert not (tmp_path / "s.safetensors").exists()  # ... and its older file is gone
        read_only_session_files(monkeypatch)  # now the older file cannot be removed either
        await turn(client, "t", PROMPTS[1])
        assert files.flush(20)
        monkeypatch.undo()
        files._write = write
        assert await metric(client, "retnet_session_write_failures_total") == 2
        # Evicted from memory, neither continues from its older turn: "s" starts anew (as an expired session),
        # "t", whose file is still there, is refused until it is deleted.
        await turn(client, "other", PROMPTS[0])
        assert await turn(client, "s", PROMPTS[2]) == fresh
        r = await client.post("/v1/completions", json={"prompt": "x", "session_id": "t", "max_tokens": 2})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "session_lost" and r.json()["error"]["param"] == "session_id"
        assert (await client.delete("/v1/sessions/t")).status_code == 200
        assert await turn(client, "t", PROMPTS[2]) == fresh


async def test_deletes_behind_a_slow_disk_are_all_answered_and_hold_no_thread(model_dir, tmp_path):
    async with serve_app(model_dir, session_dir=str(tmp_path)) as client:
        files, sessions = files_of(client), client.app.state.engine.sessions
        for session_id in ("x", "y"):
            await turn(client, session_id, PROMPTS[0])
        assert files.flush(20)
        gate, write = threading.Event(), files._write

        def held_write(path, session_id, state):
            gate.wait(20)
            write(path, session_id, state)

        files._write = held_write
        try:
            await turn(client, "blocker", PROMPTS[0])  # the writer sits in its write
            # A delete replaced by a later write of its session (a DELETE whose client left, the session then
            # continued): done once that write has replaced the file.
            replaced = files.delete("x")
            files.save("x", sessions.sessions["x"].cache, [], 1, 0)
            # More DELETEs than the default executor has threads (min(32, cpus + 4)), two of them of "y".
            ids = ["y", *(f"k{i}" for i in range((os.cpu_count() or 1) + 5)), "y"]
            deletes = [asyncio.create_task(client.delete(f"/v1/sessions/{i}")) for i in ids]
            await asyncio.sleep(0.2)
            assert not any(task.done() for task in deletes)
            # Each waits on a future the writer completes: the worker threads stay free for everyone.
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 60) == "free"
        finally:
            gate.set()
        answers = await asyncio.wait_for(asyncio.gather(*deletes), 120)
        assert [r.status_code for r in answers] == [200] + [404] * (len(ids) - 2) + [200]  # "y" twice: one job
        assert await asyncio.to_thread(replaced.done.wait, 60) and replaced.existed and replaced.error is None
        from safetensors import safe_open

        with safe_open(tmp_path / "x.safetensors", "pt") as f:
            assert f.metadata()["tokens"] == "1"  # the later write
        assert not (tmp_path / "y.safetensors").exists() and "y" not in sessions.sessions


class _Fatal(BaseException):
    """What no ``except Exception`` catches (the writer stops)."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_the_writer_survives_its_directory_removed_and_a_fatal_stop_fails_every_job(model_dir, tmp_path):
    directory = tmp_path / "sessions"
    async with serve_app(model_dir, session_dir=str(directory), session_ttl_s=0.3) as client:
        files = files_of(client)
        shutil.rmtree(directory)  # every session cleared by hand: the next sweeps fail
        deadline = time.monotonic() + 120
        while await metric(client, "retnet_session_sweep_failures_total") < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert files.thread.is_alive()
        await turn(client, "t", PROMPTS[0])
        assert files.flush(60) and (directory / "t.safetensors").is_file()  # the directory made again
        assert (await client.delete("/v1/sessions/t")).status_code == 200

        def fatal(session_id, job):
            raise _Fatal

        files._do = fatal
        jobs = [files.delete("a"), files.delete("b")]
        for job in jobs:
            assert await asyncio.to_thread(job.done.wait, 60)
        assert all(isinstance(job.error, RuntimeError) for job in jobs)
        files.thread.join(5)
        r = await asyncio.wait_for(client.delete("/v1/sessions/c"), 5)  # answered at once, not queued for nobody
        assert r.status_code == 500 and r.json()["error"]["code"] == "session_delete_failed"
        assert files.flush(1)


async def test_a_delete_that_cannot_remove_the_file_is_500_and_keeps_the_session(model_dir, tmp_path, monkeypatch,
                                                                                reference):
    async with serve_app(model_dir, session_dir=str(tmp_path)) as client:
        turns = [await turn(client, "x", PROMPTS[0])]
        assert files_of(client).flush(20)
        read_only_session_files(monkeypatch)
        r = await client.delete("/v1/sessions/x")
        assert r.status_code == 500, r.text
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "server_error",
                                      "param": "session_id", "code": "session_delete_failed"}}
        assert "Read-only file system" in r.json()["error"]["message"]
        monkeypatch.undo()
        turns.append(await turn(client, "x", PROMPTS[1]))  # kept in memory, and its file is its latest turn
    async with serve_app(model_dir, session_dir=str(tmp_path)) as client:  # on disk only
        read_only_session_files(monkeypatch)
        assert (await client.delete("/v1/sessions/x")).status_code == 500
        monkeypatch.undo()
        turns.append(await turn(client, "x", PROMPTS[2]))
        assert await metric(client, "retnet_session_loads_total") == 1
    assert turns == reference["completions"]


def test_the_session_dir_is_checked_at_startup(model_dir, tmp_path, adapter_dir, capsys, monkeypatch):
    import uvicorn

    from retnet.serve.__main__ import main
    from retnet.serve.settings import ServeSettings

    def never(*args, **kwargs):  # a directory let through would start a server here
        raise AssertionError("retnet-serve started")

    monkeypatch.setattr(uvicorn, "run", never)
    (tmp_path / "a-file").write_text("")
    cases = {str(model_dir): "--model's directory", str(model_dir / "sessions"): "--model's directory",
             str(adapter_dir): "LoRA adapter 'a'", str(tmp_path / "a-file"): "cannot be written"}
    for session_dir, why in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(model_dir), "--lora-modules", f"a={adapter_dir}", "--session-dir", session_dir])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"retnet-serve: error: --session-dir {session_dir!r}"), err
        assert why in err and len(err.strip().splitlines()) == 1
    assert not (model_dir / "sessions").exists()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ServeSettings(model="m", session_dir="~/sessions").session_dir == str(tmp_path / "sessions")


async def test_the_writer_runs_with_the_lifespan_and_nothing_bypasses_the_files(model_dir, tmp_path, caplog):
    from retnet.serve.app import create_app
    from retnet.serve.sampling import SamplingParams

    from .conftest import make_settings

    app = create_app(make_settings(model_dir, session_dir=str(tmp_path)))
    files = app.state.engine.sessions.files
    assert files.thread is None  # created, not started: nothing swept, no thread
    async with app.router.lifespan_context(app):
        assert files.thread.is_alive()
        assert await asyncio.to_thread(app.state.engine.wait_ready, 60)
        with pytest.raises(ValueError, match="acquired and restored"):  # would skip the file's state
            app.state.engine.submit([[5, 6]], SamplingParams(max_tokens=1), session_id="s")
    assert not files.thread.is_alive()
    with caplog.at_level(logging.WARNING, logger="retnet.serve"):
        files.save("late", RetNetCache(2), [], 0, 0)  # after close: said, not silently lost
    assert "'late'" in caplog.text and "writer has stopped" in caplog.text
    assert files.metrics.session_write_failures._value.get() == 1


async def test_a_file_the_model_cannot_run_is_409_and_one_unreadable_now_is_503(model_dir, tmp_path, monkeypatch):
    async with serve_app(model_dir, session_dir=str(tmp_path)) as client:
        await turn(client, "s", PROMPTS[0])
    saved = tmp_path / "s.safetensors"
    state = torch.zeros(1, 4, 16, 16)  # the micro model's [1, H, K, V]
    bad = {"vocab": ({"pending": "[100000]"}, {}), "counts": ({"tokens": "-3"}, {}),
           "offsets": ({}, {"offsets": torch.tensor([-1])}), "nan": ({}, {"state.0": state.fill_(float("nan"))}),
           "shape": ({}, {"state.1": torch.zeros(1, 4, 16, 8)}), "seen": ({}, {"seen": torch.tensor([3, 100000])}),
           "seen_dtype": ({}, {"seen": torch.tensor([0.5])})}
    for name, (meta, tensors) in bad.items():
        rewrite(saved, tmp_path / f"{name}.safetensors", {"session_id": name, **meta}, tensors)
    from retnet.serve import session_store

    open_regular = session_store._open_regular

    def io_error(path):
        if path.name == "s.safetensors":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return open_regular(path)

    async with serve_app(model_dir, session_dir=str(tmp_path)) as client:
        for name in bad:
            r = await client.post("/v1/completions", json={"prompt": "x", "session_id": name, "max_tokens": 2})
            assert r.status_code == 409 and r.json()["error"]["code"] == "session_corrupt", (name, r.text)
            assert r.json()["error"]["param"] == "session_id"
        assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200
        assert (await client.get("/health")).status_code == 200  # the engine ran none of them
        monkeypatch.setattr(session_store, "_open_regular", io_error)
        r = await client.post("/v1/completions", json={"prompt": "x", "session_id": "s", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "server_error",
                                     "param": "session_id", "code": "session_unavailable"}
        monkeypatch.undo()
        await turn(client, "s", PROMPTS[1])  # retried: continued from the file
        assert await metric(client, "retnet_session_loads_total") == 1


async def test_the_fingerprint_covers_the_chat_template_and_the_dtype(model_dir, tmp_path):
    from retnet.model import RetNetConfig
    from retnet.serve.session_store import model_fingerprint

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    config = RetNetConfig.from_pretrained(model)
    base = model_fingerprint(model, config)

    def changed(other: dict[str, str]) -> list[str]:
        return sorted(part for part in base if other[part] != base[part])

    assert changed(model_fingerprint(model, config, chat_template="{{ messages }}")) == ["chat_template"]
    assert changed(model_fingerprint(model, config, dtype="bfloat16")) == ["dtype"]
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 123}))
    assert model_fingerprint(model, config) == base  # changes no token
    (model / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m.content }}>>{% endfor %}")
    assert changed(model_fingerprint(model, config)) == ["chat_template"]
    sessions = tmp_path / "sessions"
    async with serve_app(model_dir, session_dir=str(sessions)) as client:
        await turn(client, "s", PROMPTS[0])
    async with serve_app(model_dir, session_dir=str(sessions), chat_template="{{ messages }}") as client:
        r = await client.post("/v1/completions", json={"prompt": "x", "session_id": "s", "max_tokens": 2})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_model_changed", r.text
        assert "chat template" in r.json()["error"]["message"]


def test_run_batch_keeps_no_session_on_disk(model_dir, tmp_path, monkeypatch):
    from retnet.serve import run_batch

    seen = []

    async def run(settings, *args):
        seen.append(settings)
        return 0

    monkeypatch.setattr(run_batch, "_run", run)
    monkeypatch.setenv("RETNET_SESSION_DIR", str(tmp_path / "live-server"))  # a server's, beside the batch
    (tmp_path / "in.jsonl").write_text("")
    assert run_batch.main(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                           "--model", str(model_dir)]) == 0
    assert seen[0].session_dir is None
