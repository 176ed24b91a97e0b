"""Review of runtime LoRA loading and hub ids: races between a request and an unload, sessions of an adapter
unloaded meanwhile, run_batch and the adapter routes, a hub id's names (``--served-model-name``, the adapter
names checked at startup) and ``--revision`` without a hub id. All in-process and fast."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest

from retnet.serve.app import create_app
from retnet.serve.run_batch import parse_lines, served_urls
from retnet.serve.settings import ServeSettings, resolve_model_source

from . import test_lora_runtime
from .conftest import decoding_held, make_settings, serve_app
from .test_lora_runtime import PROMPT, RUNTIME, eventually, installed_slots, load, running_request, unload

adapter_dirs = test_lora_runtime.adapter_dirs  # its fixture: peft directories "a" and "b"

pytestmark = pytest.mark.anyio


def test_run_batch_refuses_the_adapter_routes_per_line(model_dir):
    """With runtime updating allowed the app serves /v1/load_lora_adapter, whose plain-text answer run_batch
    wrote as a 500 "without a JSON body" (after loading the adapter, for lines that run concurrently and could
    not count on it): such a line is refused before anything runs, saying why and what to use instead."""
    app = create_app(make_settings(model_dir, allow_runtime_lora_updating=True))  # no lifespan: nothing loads
    urls = served_urls(app)
    assert "/v1/completions" in urls and not urls & {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
    lines = [json.dumps({"custom_id": str(i), "method": "POST", "url": url, "body": {"lora_name": "a",
                                                                                   "lora_path": "/x"}})
             for i, url in enumerate(("/v1/load_lora_adapter", "/v1/unload_lora_adapter"))]
    for entry in parse_lines(lines, urls):
        assert entry.error is not None, entry.url
        assert (entry.error.status, entry.error.param, entry.error.code) == (400, "url", "unsupported_url")
        assert "--lora-modules" in entry.error.message and entry.url in entry.error.message


async def test_a_session_held_across_its_adapters_unload_is_dropped_with_it(model_dir, adapter_dirs, monkeypatch):
    """A session's next request is read (its session held) while its adapter is replaced, then unloaded: the
    engine frees the old slot meanwhile and skips the session, busy. The request fails (409 session_stale, then
    404 model_not_found), and the session's state, made under a slot no longer served, must go with it rather
    than stay held until its TTL."""
    body = {"prompt": PROMPT, "max_tokens": 2, "model": "a", "session_id": "s"}
    async with serve_app(model_dir, lora_modules=[f"a={adapter_dirs['a']}"], **RUNTIME) as client:
        engine, serving = client.app.state.engine, client.app.state.serving
        gate = asyncio.Event()
        tokenizing = serving._tokenizing

        async def held_tokenizing(*args):  # the request waits here, its session held, until the gate opens
            await gate.wait()
            return await tokenizing(*args)

        async def read_during(change) -> dict:
            assert (await client.post("/v1/completions", json=body)).status_code == 200  # s has a history
            assert engine.sessions.sessions["s"].cache is not None
            gate.clear()
            monkeypatch.setattr(serving, "_tokenizing", held_tokenizing)
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            await eventually(lambda: engine.sessions.sessions["s"].busy)
            old = engine.adapters["a"].slot
            assert (await change()).status_code == 200
            await eventually(lambda: old not in installed_slots(engine))  # freed: s was busy, so skipped
            gate.set()
            response = await task
            monkeypatch.setattr(serving, "_tokenizing", tokenizing)
            return response.json()["error"]

        error = await read_during(lambda: load(client, "a", adapter_dirs["b"], load_inplace=True))
        assert error["code"] == "session_stale"
        assert "s" not in engine.sessions.sessions
        error = await read_during(lambda: unload(client, "a"))
        assert error["code"] == "model_not_found"
        assert "s" not in engine.sessions.sessions


def test_adapter_names_are_checked_against_the_hub_ids_served_name(tmp_path):
    """Checked at startup, before the id is resolved: the base is served as ``acme/retnet-micro`` (the id as
    given), so an adapter may be named ``retnet-micro`` (the id's last part, which was taken for the base's
    name as a directory's would be) but not ``acme/retnet-micro``."""
    settings = ServeSettings(model="acme/retnet-micro", lora_modules=[f"retnet-micro={tmp_path}"])
    assert settings.model_name == "acme/retnet-micro"
    with pytest.raises(ValueError, match="is the base model's name"):
        ServeSettings(model="acme/retnet-micro", lora_modules=[f"acme/retnet-micro={tmp_path}"])


async def test_a_hub_id_served_under_another_name_is_still_the_base_by_its_id(model_dir, hub_cache, tmp_path):
    """``--model acme/retnet-micro --served-model-name micro``: as a directory's path does, the id as given names
    the base model in a request (its snapshot's path replaced it in the settings, so it was a 404), and an
    adapter cannot be loaded under it."""
    hub_cache("acme/retnet-micro", model_dir)
    async with serve_app("acme/retnet-micro", served_model_name="micro", **RUNTIME) as client:
        r = await client.post("/v1/completions", json={"model": "acme/retnet-micro", "prompt": PROMPT,
                                                       "max_tokens": 1})
        assert (r.status_code, r.json().get("model")) == (200, "micro"), r.text
        assert (await client.get("/v1/models/acme/retnet-micro")).json()["id"] == "micro"
        r = await load(client, "acme/retnet-micro", tmp_path)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "lora_name"), r.text


def test_revision_or_download_dir_without_a_hub_id_is_said_to_be_ignored(model_dir, hub_cache, caplog):
    """A local directory has no revisions: --revision (or --download-dir) with one was silently ignored. Said
    once, and not again when the settings of a hub id already resolved are resolved again (run_batch, then
    create_app)."""
    with caplog.at_level(logging.WARNING, logger="retnet.serve"):
        local = resolve_model_source(make_settings(model_dir, revision="v2"))
        assert resolve_model_source(local).model == str(model_dir)
    assert [r.getMessage() for r in caplog.records if "--revision" in r.getMessage()] == [
        f"--revision v2 is ignored: --model {str(model_dir)!r} is a local directory, not a hub id"]
    caplog.clear()
    hub_cache("acme/retnet-micro", model_dir, revision="v2")
    with caplog.at_level(logging.WARNING, logger="retnet.serve"):
        resolved = resolve_model_source(make_settings("acme/retnet-micro", revision="v2", served_model_name=None))
        assert resolve_model_source(resolved) is resolved
    assert resolved.model_name == "acme/retnet-micro" and not caplog.records


async def test_an_install_failing_halfway_changes_nothing(model_dir, adapter_dirs, monkeypatch):
    """The scheduler's install fails after some modules took the adapter's matrices (out of device memory): the
    load is a 500, no slot keeps a matrix of it, the name is free again, and the base answers as before."""
    import retnet.serve.adapter_slots as adapter_slots_module

    install = adapter_slots_module.install_adapter

    def failing_install(model, slots, adapter, dtype):  # a module wrapped last, whose copy fails
        adapter.weights["model.layers.1.retention.g_proj"] = (object(), object())
        install(model, slots, adapter, dtype)

    async with serve_app(model_dir, lora_modules=[f"b={adapter_dirs['b']}"], **RUNTIME) as client:
        engine = client.app.state.engine
        greedy = {"prompt": PROMPT, "temperature": 0, "max_tokens": 4}
        base = (await client.post("/v1/completions", json=greedy)).json()
        monkeypatch.setattr(adapter_slots_module, "install_adapter", failing_install)
        r = await load(client, "a", adapter_dirs["a"])
        assert (r.status_code, r.json()["error"]["code"]) == (500, "lora_install_failed"), r.text
        assert installed_slots(engine) == {engine.adapters["b"].slot} and not engine.loading
        monkeypatch.setattr(adapter_slots_module, "install_adapter", install)
        assert (await load(client, "a", adapter_dirs["a"])).status_code == 200
        again = (await client.post("/v1/completions", json=greedy)).json()
        assert again["choices"][0]["text"] == base["choices"][0]["text"]


async def test_a_load_queued_at_shutdown_is_answered(model_dir, adapter_dirs, monkeypatch):
    """The server stops while a load waits for the scheduler (busy in a forward): the load is answered 503, as
    the running request is, rather than left waiting on a future nobody resolves."""
    async with serve_app(model_dir, **RUNTIME) as client:
        engine = client.app.state.engine
        with decoding_held(engine, monkeypatch):
            running = await running_request(client, 20)
            loading = asyncio.create_task(load(client, "a", adapter_dirs["a"]))
            await eventually(lambda: bool(engine.adapter_slots.installs))
            stopping = threading.Thread(target=engine.shutdown)
            stopping.start()
            await eventually(lambda: engine.stopping)
        r = await asyncio.wait_for(loading, 60)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "unavailable"), r.text
        assert (await asyncio.wait_for(running, 60)).status_code == 503
        await asyncio.to_thread(stopping.join)
        assert not engine.loading and "a" not in engine.adapters
