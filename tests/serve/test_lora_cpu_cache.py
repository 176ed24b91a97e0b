"""``--max-cpu-loras`` (vLLM's flag): at most that many LoRA adapters installed at once; the others stay served and
are read again from their directory when a request names them, the least recently used idle one evicted. An
adapter read again keeps its slot, so its cached states and sessions stay valid; one whose files are gone or
changed fails only its own requests."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from retnet.serve.__main__ import parse_settings
from retnet.serve.engine import Engine
from retnet.serve.lora import LoraSlots
from retnet.serve.settings import ServeSettings

from .conftest import make_settings, serve_app
from .test_dora import _perturb_magnitudes
from .test_lora import PROMPTS, _peft_model, assert_same_answer, complete
from .test_lora_runtime import cached, error_of, eventually, installed_slots, listed, load, unload

pytestmark = pytest.mark.anyio

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Three peft directories answering differently: ``a`` LoRA on every projection, ``b`` LoRA on a few, ``c``
    DoRA (its magnitudes must come back with it)."""
    root = tmp_path_factory.mktemp("lora-cpu")
    specs = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        "b": dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj", "down_proj"]),
        "c": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
    }
    for seed, (name, spec) in enumerate(specs.items()):
        peft_model = _peft_model(model_dir, seed + 10, **spec)
        if spec.get("use_dora"):
            _perturb_magnitudes(peft_model, seed)
        peft_model.save_pretrained(root / name)
    return {name: root / name for name in specs}


@pytest.fixture(scope="module")
async def want(model_dir, adapter_dirs) -> dict[tuple[str, str], dict]:
    """Every adapter (and the base) on a server holding all of them: the answers a bounded server must give."""
    flags = [f"{name}={path}" for name, path in adapter_dirs.items()]
    out = {}
    async with serve_app(model_dir, lora_modules=flags, prefix_cache_entries=0) as client:
        for model in ("micro", *NAMES):
            for prompt in PROMPTS[:2]:
                out[model, prompt] = await complete(client, model, prompt)
    texts = {out[model, PROMPTS[0]]["choices"][0]["text"] for model in ("micro", *NAMES)}
    assert len(texts) == 4  # each adapter changes the answer: a mix-up could not go unseen
    return out


def copies(adapter_dirs, tmp_path) -> dict[str, Path]:
    """The adapters in a directory of the test's own, to delete or change."""
    return {name: Path(shutil.copytree(path, tmp_path / name)) for name, path in adapter_dirs.items()}


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, name
    return values[0]


@pytest.fixture(scope="module")
def anyio_backend():  # the module's fixture ``want`` runs on it
    return "asyncio"


class InstalledPerForward:
    """Before every forward of ``engine``: the slots whose matrices its model holds."""

    def __init__(self):
        self.engine = None
        self.seen: list[set[int]] = []


@pytest.fixture
def installed_per_forward(monkeypatch) -> InstalledPerForward:
    watch = InstalledPerForward()
    original = LoraSlots.tokens

    def tokens(self, slots, counts=None):
        watch.seen.append(installed_slots(watch.engine))
        return original(self, slots, counts)

    monkeypatch.setattr(LoraSlots, "tokens", tokens)
    return watch


async def test_one_loaded_adapter_serves_three_as_the_unbounded_server(model_dir, adapter_dirs, want,
                                                                       installed_per_forward):
    flags = [f"{name}={path}" for name, path in adapter_dirs.items()]
    async with serve_app(model_dir, lora_modules=flags, max_cpu_loras=1) as client:
        engine = client.app.state.engine
        installed_per_forward.engine = engine
        assert installed_slots(engine) == {engine.adapters["a"].slot}  # the first --lora-modules one
        assert not engine.adapters["b"].weights and not engine.adapters["c"].magnitudes  # not kept in memory
        assert [m[0] for m in await listed(client)] == ["micro", *NAMES]  # all served
        slots = {name: engine.adapters[name].slot for name in NAMES}

        # One at a time, alternating: every request but the first reads its adapter again.
        for model in ("b", "c", "a", "micro", "c", "b"):
            got = await complete(client, model, PROMPTS[0])
            assert got["model"] == model
            assert_same_answer(got, want[model, PROMPTS[0]], f"{model} alone")
        # Concurrent requests for two evicted adapters (and the base): one waits for the other to finish.
        assert installed_slots(engine) == {slots["b"]}
        jobs = [(model, prompt) for prompt in PROMPTS[:2] for model in ("a", "c", "micro")]
        got = await asyncio.gather(*(complete(client, model, prompt) for model, prompt in jobs))
        for (model, prompt), response in zip(jobs, got, strict=True):
            assert_same_answer(response, want[model, prompt], f"{model} concurrent: {prompt!r}")

        seen = installed_per_forward.seen
        assert seen and all(len(s) <= 1 for s in seen), seen
        assert {name: a.slot for name, a in engine.adapters.items()} == slots  # read again under their own slots
        text = (await client.get("/metrics")).text
        assert metric(text, "retnet_lora_adapters") == 3 and metric(text, "retnet_lora_adapters_loaded") == 1
        # Five alone, at least two concurrent (more as the arrivals interleave a and c); each evicted one first.
        reloads = metric(text, 'retnet_lora_reloads_total{outcome="ok"}')
        assert reloads >= 7 and metric(text, "retnet_lora_evictions_total") == reloads


async def test_cached_states_and_sessions_survive_an_eviction(model_dir, adapter_dirs, want):
    path_a, path_b = adapter_dirs["a"], adapter_dirs["b"]
    async with serve_app(model_dir, lora_modules=[f"a={path_a}", f"b={path_b}"], max_cpu_loras=1) as client:
        engine = client.app.state.engine
        first = await complete(client, "a", PROMPTS[1])
        r = await client.post("/v1/completions", json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 2,
                                                       "session_id": "s"})
        assert r.status_code == 200, r.text
        await complete(client, "b", PROMPTS[1])  # a evicted
        assert installed_slots(engine) == {engine.adapters["b"].slot}
        again = await complete(client, "a", PROMPTS[1])  # a read again: its prompt's state is still its own
        assert cached(again) > 0 and cached(first) == 0
        assert_same_answer(again, want["a", PROMPTS[1]], "a from its cached state after a reload")
        assert "s" in engine.sessions.sessions
        await complete(client, "b", PROMPTS[1])  # a evicted again; its session continues after the reload
        r = await client.post("/v1/completions", json={"model": "a", "prompt": " more", "max_tokens": 2,
                                                       "session_id": "s"})
        assert r.status_code == 200, r.text
        assert metric((await client.get("/metrics")).text, "retnet_session_resumes_total") == 1  # not started anew


async def test_a_reload_that_fails_fails_only_its_requests(model_dir, adapter_dirs, want, tmp_path):
    paths = copies(adapter_dirs, tmp_path)
    flags = [f"{name}={path}" for name, path in paths.items()]
    async with serve_app(model_dir, lora_modules=flags, max_cpu_loras=1, allow_runtime_lora_updating=True,
                         max_lora_rank=4) as client:
        engine = client.app.state.engine
        assert_same_answer(await complete(client, "b", PROMPTS[0]), want["b", PROMPTS[0]], "b")  # a evicted
        shutil.rmtree(paths["a"])
        # c's files rewritten (the same bytes, a new modification time): not the files its slot was made with.
        weights = paths["c"] / "adapter_model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))

        body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 1}
        gone, b, base = await asyncio.gather(*(client.post("/v1/completions", json={**body, "model": model})
                                               for model in ("a", "b", "micro")))
        error = error_of(gone, 500)
        assert (error["code"], error["param"], error["type"]) == ("lora_reload_failed", "model", "server_error")
        assert "'a'" in error["message"] and "could not be read again" in error["message"]
        assert_same_answer(b.json(), want["b", PROMPTS[0]], "b beside a's failed reload")
        assert_same_answer(base.json(), want["micro", PROMPTS[0]], "base beside a's failed reload")
        changed = error_of(await client.post("/v1/completions", json={**body, "model": "c"}), 500)
        assert changed["code"] == "lora_adapter_changed" and "load_inplace" in changed["message"], changed
        stream = await client.post("/v1/completions", json={**body, "model": "c", "stream": True})
        assert stream.status_code == 200 and '"code":"lora_adapter_changed"' in stream.text.replace(" ", "")

        # Both stay served (a failure may pass: a directory back in place is read again), and the server goes on.
        assert [m[0] for m in await listed(client)] == ["micro", *NAMES]
        assert not engine.waiting and engine.in_system == 0
        # c loaded again in place: a new slot, the new files' fingerprint, served.
        assert (await load(client, "c", paths["c"], load_inplace=True)).status_code == 200
        assert_same_answer(await complete(client, "c", PROMPTS[0]), want["c", PROMPTS[0]], "c after load_inplace")
        # An evicted adapter unloads; a runtime load takes the place of the idle loaded one.
        assert (await unload(client, "a")).status_code == 200
        # c's request may still be leaving the engine (its answer goes out first, and its finished sequence stays in
        # the batch until the next step rebuilds it): then c is not idle, and d would be served evicted (every place
        # in use), as it should

        def idle() -> bool:
            with engine.cond:
                return engine.in_system == 0 and not engine._active_adapters()

        await eventually(idle)
        assert (await load(client, "d", adapter_dirs["b"])).status_code == 200
        assert installed_slots(engine) == {engine.adapters["d"].slot}
        assert_same_answer(await complete(client, "d", PROMPTS[1]), want["b", PROMPTS[1]], "d")
        assert [m[0] for m in await listed(client)] == ["micro", "b", "c", "d"]
        text = (await client.get("/metrics")).text
        assert metric(text, 'retnet_lora_reloads_total{outcome="failed"}') == 1
        assert metric(text, 'retnet_lora_reloads_total{outcome="changed"}') == 2
        # The requests failed by their adapter's reload (a's, c's and c's stream), not cancelled.
        assert metric(text, "retnet_sequences_failed_total") == 3
        assert metric(text, "retnet_sequences_cancelled_total") == 0


def test_the_setting_is_a_flag_and_a_variable_and_is_checked(model_dir, monkeypatch):
    assert make_settings(model_dir).max_cpu_loras is None
    assert parse_settings(["--model", str(model_dir), "--max-cpu-loras", "2"]).max_cpu_loras == 2
    monkeypatch.setenv("RETNET_MAX_CPU_LORAS", "3")
    assert ServeSettings(model=str(model_dir)).max_cpu_loras == 3
    with pytest.raises(ValueError, match=r"max_cpu_loras .*must be >= max_loras .*2\).*max_cpu_loras = 1"):
        make_settings(model_dir, max_loras=2, max_cpu_loras=1)
    with pytest.raises(ValueError, match="max_cpu_loras"):
        make_settings(model_dir, max_cpu_loras=0)
    assert make_settings(model_dir, max_loras=2, max_cpu_loras=2).max_cpu_loras == 2


async def test_unloading_an_evicted_adapter_lets_its_waiting_request_finish(model_dir, adapter_dirs, monkeypatch):
    """The unload takes the name away and retires the slot in one step for the scheduler: a request accepted
    under the evicted adapter, waiting for its read, must not find the slot neither served nor retiring (it was
    failed with "not served any more"). The sleep widens the window a thread switch can open."""
    from retnet.serve.adapter_slots import AdapterSlots

    from .test_lora_runtime import eventually

    original = AdapterSlots._retire

    def retire(self, adapter):
        time.sleep(0.3)
        original(self, adapter)

    monkeypatch.setattr(AdapterSlots, "_retire", retire)
    # a's request holds before each decode step until b is unloaded (the unload needs no scheduler step): it is
    # still running when b's request arrives and while b is unloaded, however slowly a loaded machine sends them.
    gate = threading.Event()
    decode_step = Engine._decode_step

    def held_step(self):
        gate.wait(120)
        decode_step(self)

    monkeypatch.setattr(Engine, "_decode_step", held_step)
    flags = [f"a={adapter_dirs['a']}", f"b={adapter_dirs['b']}"]
    async with serve_app(model_dir, lora_modules=flags, max_cpu_loras=1, allow_runtime_lora_updating=True,
                         max_lora_rank=4) as client:
        engine = client.app.state.engine
        try:
            busy = asyncio.create_task(complete(client, "a", PROMPTS[0], max_tokens=40, ignore_eos=True))
            await eventually(lambda: engine.running)  # a in use: b, evicted, cannot be read until a's request ends
            waiting = asyncio.create_task(client.post("/v1/completions", json={
                "model": "b", "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0}))
            await eventually(lambda: engine.waiting)
            assert (await unload(client, "b")).status_code == 200
        finally:
            gate.set()
        got, _ = await asyncio.gather(waiting, busy)
        assert got.status_code == 200, got.text


def test_a_file_rewritten_while_it_is_read_again_is_refused(model_dir, adapter_dirs, tmp_path, monkeypatch):
    """The fingerprint is taken again after the read: a trainer saving new weights of the same size just as the
    server reads them must not have them served under the old slot (whose cached states are the old weights')."""
    import safetensors.torch
    from transformers import AutoConfig

    from retnet.serve.lora import (
        LoraChanged,
        LoraModule,
        linear_modules,
        load_adapter,
        meta_model,
        read_again,
    )

    paths = copies(adapter_dirs, tmp_path)
    retrained = tmp_path / "retrained"
    _peft_model(model_dir, 99, r=4, lora_alpha=8,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]).save_pretrained(retrained)
    weights = paths["a"] / "adapter_model.safetensors"
    assert os.path.getsize(weights) == os.path.getsize(retrained / "adapter_model.safetensors")
    linears = linear_modules(meta_model(AutoConfig.from_pretrained(model_dir)))
    first = load_adapter(LoraModule("a", str(paths["a"])), linears, 4)
    first.slot = 1
    original = safetensors.torch.load_file

    def load_file(filename, *args, **kwargs):
        shutil.copyfile(retrained / "adapter_model.safetensors", filename)
        return original(filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    with pytest.raises(LoraChanged):
        read_again(first, linears, 4)


async def test_a_request_for_a_changed_adapter_evicts_no_healthy_one(model_dir, adapter_dirs, tmp_path):
    """An idle adapter is evicted only once the adapter it makes room for was read: a read that fails evicts
    nothing, so requests naming a broken adapter cannot keep the server re-reading its healthy ones."""
    paths = copies(adapter_dirs, tmp_path)
    flags = [f"{name}={path}" for name, path in paths.items()]
    async with serve_app(model_dir, lora_modules=flags, max_cpu_loras=1, max_lora_rank=4) as client:
        engine = client.app.state.engine
        weights = paths["c"] / "adapter_model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # c changed
        for _ in range(3):
            assert (await client.post("/v1/completions", json={"model": "a", "prompt": PROMPTS[0],
                                                               "max_tokens": 2})).status_code == 200
            error_of(await client.post("/v1/completions", json={"model": "c", "prompt": PROMPTS[0],
                                                                "max_tokens": 2}), 500)
        assert installed_slots(engine) == {engine.adapters["a"].slot}
        assert engine.metrics.lora_evictions._value.get() == 0
