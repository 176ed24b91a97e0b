"""Walkthrough of the README's runtime LoRA loading: loads of one adapter name sent together are taken one after
the other (as vLLM's per-name lock does), so a second ``load_inplace`` replaces the first rather than being
refused as a name "already loaded"."""

from __future__ import annotations

import asyncio

import pytest

from . import test_lora_runtime
from .conftest import decoding_held, serve_app
from .test_lora_runtime import RUNTIME, eventually, listed, load, running_request

adapter_dirs = test_lora_runtime.adapter_dirs  # its fixture: peft directories "a" and "b"

pytestmark = pytest.mark.anyio


async def test_an_in_place_load_sent_while_another_of_the_name_waits_replaces_it(model_dir, adapter_dirs, monkeypatch):
    path_a, path_b = adapter_dirs["a"], adapter_dirs["b"]
    async with serve_app(model_dir, **RUNTIME) as client:
        engine = client.app.state.engine
        with decoding_held(engine, monkeypatch):
            # A running request holds the scheduler, so the first load waits, queued, for it to install.
            running = await running_request(client, 4)
            first = asyncio.create_task(load(client, "x", path_a, load_inplace=True))
            await eventually(lambda: "x" in engine.loading)
            second = asyncio.create_task(load(client, "x", path_b, load_inplace=True))
            plain = asyncio.create_task(load(client, "y", path_a))
            await eventually(lambda: "y" in engine.loading)  # the other name is not held up by x's loads
        assert (await running).status_code == 200
        r1, r2, r3 = await first, await second, await plain
        assert (r1.status_code, r2.status_code, r3.status_code) == (200, 200, 200), (r1.text, r2.text, r3.text)
        assert r2.text == "Success: LoRA adapter 'x' added successfully."
        assert ("x", "micro", str(path_b)) in await listed(client)  # the later load's files
        # A plain load of a name being loaded waits for it, then is refused as vLLM refuses a name served.
        again = asyncio.create_task(load(client, "z", path_a))
        dup = asyncio.create_task(load(client, "z", path_b))
        codes = sorted([(await again).status_code, (await dup).status_code])
        assert codes == [200, 400]
        assert [m for m in await listed(client) if m[0] == "z"] in ([("z", "micro", str(path_a))],
                                                                    [("z", "micro", str(path_b))])
        assert not client.app.state.serving.lora_load_locks  # each name's lock dropped once its loads are answered
