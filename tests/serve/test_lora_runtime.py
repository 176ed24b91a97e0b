"""LoRA adapters loaded and unloaded while the server runs (vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``, with ``--allow-runtime-lora-updating``): served as a ``--lora-modules`` adapter is,
under slots never reused, and without disturbing the requests already running."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest

from retnet.serve.lora import LoraLinear
from retnet.serve.settings import ServeSettings

from .conftest import make_settings, serve_app
from .test_lora import PROMPTS, _peft_model, assert_same_answer, complete

pytestmark = pytest.mark.anyio

RUNTIME = {"allow_runtime_lora_updating": True, "max_lora_rank": 4}
PROMPT = PROMPTS[3]


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    """peft directories: ``a`` (rank 4, every projection) and ``b`` (rank 2, a few) answer differently from the
    base and each other; ``big`` (rank 8) is over the tests' --max-lora-rank 4."""
    root = tmp_path_factory.mktemp("lora-runtime")
    specs = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        "b": dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj", "down_proj"]),
        "big": dict(r=8, lora_alpha=8, target_modules=["q_proj"]),
    }
    for seed, (name, spec) in enumerate(specs.items()):
        _peft_model(model_dir, seed, **spec).save_pretrained(root / name)
    return {name: root / name for name in specs}


async def load(client, name: str, path, **extra):
    return await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})


async def unload(client, name: str, **extra):
    return await client.post("/v1/unload_lora_adapter", json={"lora_name": name, **extra})


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def cached(response: dict) -> int:
    return response["usage"]["prompt_tokens_details"]["cached_tokens"]


async def listed(client) -> list[tuple[str, str | None, str]]:
    return [(m["id"], m["parent"], m["root"]) for m in (await client.get("/v1/models")).json()["data"]]


def installed_slots(engine) -> set[int]:
    """The slots whose matrices some wrapped Linear of the served model holds."""
    # Each module's dict copied at once (tuple holds the GIL throughout): the scheduler thread may install or free
    # a slot meanwhile, and iterating the dict itself then raised "dictionary changed size during iteration".
    return {slot for m in engine.model.modules() if isinstance(m, LoraLinear) for slot in tuple(m.adapters)}


async def eventually(condition, timeout: float = 120.0) -> None:
    # The deadline only bounds a condition that never holds: a loaded machine may take long to reach one that does.
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)



async def running_request(client, max_tokens: int) -> asyncio.Task:
    """A completion started and running (under decoding_held it holds the scheduler, so a load waits, queued)."""
    task = asyncio.create_task(client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens,
                                                                    "ignore_eos": True}))
    await eventually(lambda: bool(client.app.state.engine.running))
    return task


async def test_the_routes_exist_only_when_allowed(model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    async with serve_app(model_dir) as client:
        for response in (await load(client, "a", model_dir), await unload(client, "a")):
            assert response.status_code == 404, response.text
    assert not make_settings(model_dir).allow_runtime_lora_updating
    for value, allowed in (("1", True), ("true", True), ("True", True), ("0", False), ("", False)):
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", value)
        assert make_settings(model_dir).allow_runtime_lora_updating is allowed, value
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    monkeypatch.setenv("RETNET_ALLOW_RUNTIME_LORA_UPDATING", "true")  # our own setting, as every other
    assert ServeSettings(model=str(model_dir)).allow_runtime_lora_updating


async def test_load_serves_as_a_startup_adapter_then_unload_removes_it(model_dir, adapter_dirs, tmp_path):
    path = adapter_dirs["a"]
    async with serve_app(model_dir, lora_modules=[f"a={path}"], prefix_cache_entries=0) as client:
        want_a, want_base = await complete(client, "a", PROMPT), await complete(client, None, PROMPT)
    assert want_a["choices"][0]["text"] != want_base["choices"][0]["text"]

    # A server started without adapters: nothing is wrapped until the first load.
    async with serve_app(model_dir, **RUNTIME) as client:
        engine = client.app.state.engine
        assert engine.adapter_slots.lora is None and not installed_slots(engine)
        r = await load(client, "a", path)
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'a' added successfully.")
        assert await listed(client) == [("micro", None, str(model_dir)), ("a", "micro", str(path))]
        got = await complete(client, "a", PROMPT)
        assert got["model"] == "a"
        assert_same_answer(got, want_a, "a loaded at runtime")
        assert (await client.post("/tokenize", json={"model": "a", "prompt": PROMPT})).status_code == 200
        chat = await client.post("/v1/chat/completions", json={"model": "a", "max_tokens": 2,
                                                                "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 200 and chat.json()["model"] == "a", chat.text

        # Refused, each changing nothing.
        assert error_of(await load(client, "a", adapter_dirs["b"]), 400)["message"] == \
            "The lora adapter 'a' has already been loaded."
        assert error_of(await load(client, "micro", path), 400)["param"] == "lora_name"
        assert error_of(await load(client, "c", tmp_path / "missing"), 404)["param"] == "lora_path"
        assert error_of(await load(client, "c", tmp_path), 404)["code"] == "lora_adapter_not_found"  # no peft files
        assert "max_lora_rank" in error_of(await load(client, "c", adapter_dirs["big"]), 400)["message"]
        # A config the adapter's checks read as peft's (an object, numbers): anything else is the client's 400.
        for i, config in enumerate(('[]', '{"r": 8, "lora_alpha": null}', '{"r": 8, "alpha_pattern": ["q_proj"]}')):
            bad = Path(shutil.copytree(path, tmp_path / f"bad{i}"))
            (bad / "adapter_config.json").write_text(config)
            assert error_of(await load(client, "c", bad), 400)["code"] == "invalid_lora_adapter", config
        assert error_of(await load(client, "", path), 400)["param"] == "lora_name"
        assert error_of(await client.post("/v1/load_lora_adapter", json={"lora_name": "c"}), 400)["param"] == \
            "lora_path"
        assert [m[0] for m in await listed(client)] == ["micro", "a"]
        assert_same_answer(await complete(client, "a", PROMPT), want_a, "a after the refused loads")
        assert_same_answer(await complete(client, None, PROMPT), want_base, "base after the refused loads")
        assert "retnet_lora_adapters 1.0" in (await client.get("/metrics")).text

        r = await unload(client, "a", lora_int_id=1)  # vLLM's id is accepted and not read
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'a' removed successfully.")
        assert error_of(await client.post("/v1/completions", json={"model": "a", "prompt": PROMPT}), 404)["code"] == \
            "model_not_found"
        assert await listed(client) == [("micro", None, str(model_dir))]
        assert_same_answer(await complete(client, None, PROMPT), want_base, "base after the unload")
        assert error_of(await unload(client, "a"), 404)["message"] == "The lora adapter 'a' cannot be found."
        await eventually(lambda: not installed_slots(engine))  # its matrices freed


async def test_reloads_take_new_slots_so_old_states_are_never_reused(model_dir, adapter_dirs):
    path_a, path_b = adapter_dirs["a"], adapter_dirs["b"]
    async with serve_app(model_dir, lora_modules=[f"a={path_a}"], **RUNTIME) as client:
        engine = client.app.state.engine
        assert (await load(client, "b", path_b)).status_code == 200
        want_b = await complete(client, "b", PROMPT)
        want_a = await complete(client, "a", PROMPT)
        assert want_a["choices"][0]["text"] != want_b["choices"][0]["text"]
        assert cached(await complete(client, "a", PROMPT)) > 0  # a's prompt state is cached
        r = await client.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2,
                                                       "session_id": "s-a"})
        assert r.status_code == 200, r.text
        old_slot = engine.adapters["a"].slot

        # load_inplace: b's weights as "a"; the same prompt gets b's answer, from no state of the old "a".
        r = await load(client, "a", path_b, load_inplace=True)
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'a' added successfully.")
        assert [m[:2] for m in await listed(client)] == [("micro", None), ("a", "micro"), ("b", "micro")]
        got = await complete(client, "a", PROMPT)
        assert cached(got) == 0
        assert_same_answer(got, want_b, "a replaced by b's weights")
        assert engine.adapters["a"].slot > engine.adapters["b"].slot > old_slot
        # The old slot's cache entries and its session are dropped once it is freed.
        await eventually(lambda: old_slot not in installed_slots(engine))
        assert all(entry.adapter != old_slot for entry in engine.prefix_cache.entries.values())
        assert "s-a" not in engine.sessions.sessions

        # Unloaded and loaded again with its first weights: yet another slot, and a's first answer.
        assert (await unload(client, "a")).status_code == 200
        assert (await load(client, "a", path_a)).status_code == 200
        got = await complete(client, "a", PROMPT)
        assert cached(got) == 0
        assert_same_answer(got, want_a, "a loaded again")
        assert len({engine.adapters["a"].slot, engine.adapters["b"].slot, old_slot}) == 3


async def test_requests_accepted_under_an_adapter_finish_under_it(model_dir, adapter_dirs, monkeypatch):
    """An unload (or an in-place reload) while a request of the adapter runs: it ends with the answer of the
    weights it was accepted under; the weights are freed when it leaves; new requests see the change."""
    path_a, path_b = adapter_dirs["a"], adapter_dirs["b"]
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    async with serve_app(model_dir, lora_modules=[f"a={path_a}", f"b={path_b}"], prefix_cache_entries=0,
                         **RUNTIME) as client:
        engine = client.app.state.engine
        want = {name: await complete(client, name, PROMPT, max_tokens=12) for name in ("a", "b")}
        gate = threading.Event()
        decode_step = engine._decode_step

        def gated_step():  # the scheduler holds before each decode step until the test opens the gate
            gate.wait(30)
            decode_step()

        monkeypatch.setattr(engine, "_decode_step", gated_step)

        async def start(model: str) -> asyncio.Task:
            gate.clear()
            task = asyncio.create_task(client.post("/v1/completions", json={**body, "model": model}))
            slot = engine.adapters[model].slot
            # Prefilled, its first token out, held before its next step (the list may still hold a finished one).
            await eventually(lambda: any(s.group.adapter == slot and s.finish_reason is None for s in engine.running))
            return task

        # Unloaded while running: the request goes on under a; a new one for a is 404 at once. Loaded again (b's
        # weights) before it ends: the new "a" takes a new slot, the running request keeps the old one.
        slot_a = engine.adapters["a"].slot
        running = await start("a")
        assert (await unload(client, "a")).status_code == 200
        assert (await client.post("/v1/completions", json={**body, "model": "a"})).status_code == 404
        loading = asyncio.create_task(load(client, "a", path_b))
        await eventually(lambda: bool(engine.adapter_slots.installs))  # read, and queued for the scheduler
        assert slot_a in installed_slots(engine)  # still in use
        gate.set()
        assert (await loading).status_code == 200
        r = await running
        assert r.status_code == 200 and r.json()["model"] == "a", r.text
        assert_same_answer(r.json(), want["a"], "a unloaded and loaded again mid-request")
        assert_same_answer(await complete(client, "a", PROMPT, max_tokens=12), want["b"], "a loaded again")
        await eventually(lambda: slot_a not in installed_slots(engine))  # freed once its request left

        # Replaced in place while running: installed between two decode steps, the running request keeps b's
        # weights, the next request gets the new ones (a's).
        running = await start("b")
        loading = asyncio.create_task(load(client, "b", path_a, load_inplace=True))
        await eventually(lambda: bool(engine.adapter_slots.installs))
        gate.set()
        assert (await loading).status_code == 200
        r = await running
        assert r.status_code == 200, r.text
        assert_same_answer(r.json(), want["b"], "b replaced mid-request")
        assert_same_answer(await complete(client, "b", PROMPT, max_tokens=12), want["a"], "b after the reload")
