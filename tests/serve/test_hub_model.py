"""``--model`` and LoRA adapters named by hub id (``org/name``): served from their snapshot in the HF cache (laid
out here as a download leaves it; the suite is offline, HF_HUB_OFFLINE=1), under the id as given."""

from __future__ import annotations

import json
import shutil

import pytest

from retnet.serve.__main__ import main

from .conftest import serve_app
from .test_lora import PROMPTS, _peft_model, assert_same_answer, complete

pytestmark = pytest.mark.anyio


async def test_a_hub_id_is_served_from_its_snapshot_under_its_id(model_dir, tmp_path, hub_cache):
    hub_cache("acme/retnet-micro", model_dir)
    # Another revision: the same weights, a generation config asking for 3 new tokens by default.
    shutil.copytree(model_dir, tmp_path / "v2")
    config = json.loads((tmp_path / "v2" / "generation_config.json").read_text())
    (tmp_path / "v2" / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 3}))
    hub_cache("acme/retnet-micro", tmp_path / "v2", revision="v2")
    _peft_model(model_dir, 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(
        tmp_path / "adapter")
    hub_cache("acme/micro-lora", tmp_path / "adapter")

    async with serve_app(model_dir, lora_modules=[f"local={tmp_path / 'adapter'}"]) as client:
        base = await complete(client, None, PROMPTS[0])
        adapted = await complete(client, "local", PROMPTS[0])
    async with serve_app("acme/retnet-micro", served_model_name=None, lora_modules=["hub=acme/micro-lora"],
                         allow_runtime_lora_updating=True) as client:
        models = (await client.get("/v1/models")).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("acme/retnet-micro", None),
                                                             ("hub", "acme/retnet-micro")]
        assert_same_answer(await complete(client, "acme/retnet-micro", PROMPTS[0]), base, "the base by hub id")
        assert_same_answer(await complete(client, "hub", PROMPTS[0]), adapted, "an adapter by hub id")
        loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "acme/micro-lora"})
        assert loaded.status_code == 200, loaded.text
        assert_same_answer(await complete(client, "late", PROMPTS[0]), adapted, "an adapter loaded by hub id")
        missing = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "acme/nothing"})
        assert missing.status_code == 404 and "the hub could not provide it" in missing.json()["error"]["message"]
    async with serve_app("acme/retnet-micro", revision="v2") as client:
        body = (await client.post("/v1/completions", json={"prompt": PROMPTS[0], "ignore_eos": True})).json()
        assert body["usage"]["completion_tokens"] == 3  # the revision's generation config


def test_a_hub_id_neither_cached_nor_reachable_is_one_line(hub_cache, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--model", "acme/not-cached"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("retnet-serve: error: --model 'acme/not-cached': no such directory, and the hub could "
                          "not provide it (") and err.count("\n") == 1


def test_run_batch_reads_a_hub_id(model_dir, tmp_path, hub_cache):
    from retnet.serve.run_batch import main as run_batch_main

    hub_cache("acme/retnet-micro", model_dir)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "acme/retnet-micro", "prompt": PROMPTS[0], "max_tokens": 2, "ignore_eos": True}}
    (tmp_path / "in.jsonl").write_text(json.dumps(line) + "\n")
    assert run_batch_main(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                           "--model", "acme/retnet-micro"]) == 0
    response = json.loads((tmp_path / "out.jsonl").read_text())["response"]
    assert response["status_code"] == 200 and response["body"]["usage"]["completion_tokens"] == 2


def test_a_home_relative_model_from_the_environment_is_expanded(model_dir, monkeypatch):
    from retnet.serve.settings import ServeSettings, resolve_model_source

    monkeypatch.setenv("HOME", str(model_dir.parent))
    monkeypatch.setenv("RETNET_MODEL", f"~/{model_dir.name}")
    settings = resolve_model_source(ServeSettings())
    assert settings.model == str(model_dir) and settings.model_name == model_dir.name
