"""CORS (vLLM's --allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials): a browser's preflight
is answered, not 405, without the API key it cannot carry, while a real request still needs the key; several
--served-model-name names (vLLM's aliases); the process entry's engine freezing the heap once its model is loaded; and the
lone-surrogate check's common case building no location."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from types import SimpleNamespace

import pytest

from retnet.serve.__main__ import build_parser, parse_settings
from retnet.serve.settings import ServeSettings

pytestmark = pytest.mark.anyio

ORIGIN = "https://app.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
CHAT = {"model": "micro", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}


async def test_a_preflight_is_answered_without_the_key_and_a_real_request_still_needs_it(open_app):
    frozen = gc.get_freeze_count()
    async with open_app(api_keys=["sk-1"]) as client:
        r = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert r.status_code == 200, r.text  # was 405: no browser client could call the server
        assert r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"].lower() == "authorization, content-type"
        assert "access-control-allow-credentials" not in r.headers
        # The cross-origin request itself: without the key a 401 the browser may read, with it the answer.
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*", r.text
        r = await client.post("/v1/chat/completions", json=CHAT,
                              headers={"Origin": ORIGIN, "Authorization": "Bearer sk-1"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", r.text
        r = await client.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer sk-1"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", r.text
        r = await client.get("/health", headers={"Origin": ORIGIN})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", r.text
        # What is no preflight is answered by the routes as before: an OPTIONS without
        # Access-Control-Request-Method, a method a route does not take, a path no route has.
        r = await client.options("/v1/chat/completions", headers={"Origin": ORIGIN, "Authorization": "Bearer sk-1"})
        assert r.status_code == 405, r.text
        r = await client.put("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-1"})
        assert r.status_code == 405 and r.json()["error"], r.text
        r = await client.get("/v1/no-such-route", headers={"Authorization": "Bearer sk-1"})
        assert r.status_code == 404, r.text
    assert gc.get_freeze_count() == frozen  # the app factory freezes nothing (the process entry does)


async def test_allowed_origins_methods_headers_and_credentials_are_held_to(open_app):
    async with open_app(allowed_origins=[ORIGIN], allowed_methods=["GET", "POST"],
                        allowed_headers=["authorization", "content-type"], allow_credentials=True) as client:
        r = await client.options("/v1/completions", headers=PREFLIGHT)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert r.headers["access-control-allow-credentials"] == "true"
        r = await client.options("/v1/completions", headers={**PREFLIGHT, "Origin": "https://elsewhere.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, r.text
        r = await client.options("/v1/completions", headers={**PREFLIGHT, "Access-Control-Request-Method": "DELETE"})
        assert r.status_code == 400, r.text
        r = await client.options("/v1/completions", headers={**PREFLIGHT, "Access-Control-Request-Headers": "x-other"})
        assert r.status_code == 400, r.text
        r = await client.get("/v1/models", headers={"Origin": ORIGIN})
        assert r.headers["access-control-allow-origin"] == ORIGIN, r.headers
        r = await client.get("/v1/models", headers={"Origin": "https://elsewhere.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers, r.headers


def test_the_cors_settings_are_flags_and_variables_with_vllms_defaults(monkeypatch):
    settings = parse_settings(["--model", "m"])
    assert (settings.allowed_origins, settings.allowed_methods, settings.allowed_headers,
            settings.allow_credentials) == (["*"], ["*"], ["*"], False)
    settings = parse_settings(["--model", "m", "--allowed-origins", json.dumps([ORIGIN, "http://localhost:3000"]),
                               "--allowed-methods", "GET,POST", "--allow-credentials"])
    assert settings.allowed_origins == [ORIGIN, "http://localhost:3000"]
    assert settings.allowed_methods == ["GET", "POST"] and settings.allow_credentials is True
    monkeypatch.setenv("RETNET_ALLOWED_ORIGINS", json.dumps([ORIGIN]))
    monkeypatch.setenv("RETNET_ALLOWED_HEADERS", "authorization")
    monkeypatch.setenv("RETNET_ALLOW_CREDENTIALS", "true")
    settings = ServeSettings(model="m")
    assert (settings.allowed_origins, settings.allowed_headers, settings.allow_credentials) == \
        ([ORIGIN], ["authorization"], True)
    text = build_parser().format_help()
    for flag in ("--allowed-origins", "--allowed-methods", "--allowed-headers", "--allow-credentials"):
        assert flag in text
    assert "default ['*']; env RETNET_ALLOWED_ORIGINS" in " ".join(text.split())


def test_a_malformed_json_list_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--model", "m", "--allowed-origins", '["https://a'])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "--allowed-origins" in error, error


# -- --served-model-name a b (vLLM's aliases) ------------------------------------------------------------------------
def test_several_served_names_are_read_from_the_flag_and_the_variable(monkeypatch):
    assert parse_settings(["--model", "m", "--served-model-name", "micro"]).model_name == "micro"
    settings = parse_settings(["--model", "m", "--served-model-name", "micro", "gpt-4", "micro"])
    assert settings.served_model_name == ["micro", "gpt-4"] and settings.model_name == "micro"
    assert "gpt-4" in settings.model_paths
    assert parse_settings(["--model", "m", "--served-model-name", ""]).served_model_name is None
    monkeypatch.setenv("RETNET_SERVED_MODEL_NAME", "a, b")  # one name: a name may hold a comma
    assert ServeSettings(model="m").model_name == "a, b"
    monkeypatch.setenv("RETNET_SERVED_MODEL_NAME", '["a", "b"]')
    assert ServeSettings(model="m").served_model_name == ["a", "b"]
    monkeypatch.setenv("RETNET_SERVED_MODEL_NAME", "[beta] model")  # no JSON: one name
    assert ServeSettings(model="m").model_name == "[beta] model"
    with pytest.raises(ValueError, match="served_model_name"):
        ServeSettings(model="m", served_model_name=["a", 3])


def test_an_adapter_may_not_take_a_served_alias():
    with pytest.raises(ValueError, match="base model's name"):
        ServeSettings(model="m", served_model_name=["micro", "alias"], lora_modules=["alias=/tmp/adapter"])


@pytest.mark.parametrize("convert", [None, "embed"])
async def test_the_model_cards_list_every_served_name(open_app, convert):
    # (a pooling server's cards, ClassifyServing._card, are its own: their signature must take the name too)
    async with open_app(served_model_name=["micro", "alias"], **({"convert": convert} if convert else {})) as client:
        for name in ("micro", "alias"):
            r = await client.get(f"/v1/models/{name}")
            assert r.status_code == 200 and r.json()["id"] == name, r.text
        r = await client.get("/v1/models")
        assert [card["id"] for card in r.json()["data"]] == ["micro", "alias"], r.text


async def test_a_request_may_name_any_served_name_and_the_answer_carries_the_first(open_app):
    async with open_app(served_model_name=["micro", "alias"]) as client:
        for name in ("micro", "alias"):
            r = await client.post("/v1/chat/completions", json={**CHAT, "model": name})
            assert r.status_code == 200 and r.json()["model"] == "micro", r.text
        r = await client.get("/v1/models/alias")
        assert r.status_code == 200 and r.json()["id"] == "alias", r.text
        r = await client.get("/v1/models")
        assert [card["id"] for card in r.json()["data"]] == ["micro", "alias"], r.text
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "other"})
        assert r.status_code == 404, r.text


# -- gc.freeze once the model is loaded, asked by the process entry ----------------------------------------------------
def test_the_entry_asks_its_engine_to_freeze_the_heap_once_loaded(monkeypatch):
    import retnet.serve.__main__ as entry

    engine = SimpleNamespace(freeze_heap_when_ready=False)
    served = []

    class Server:
        load_failure = None  # the real one's: set when the model did not load
        signals = ()  # the real one's: the signals that stopped it

        def __init__(self, config, engine, grace_s):
            self.started = False

        def run(self, sockets=None):
            served.append(engine.freeze_heap_when_ready)
            self.started = True

    monkeypatch.setattr("retnet.serve.app.create_app", lambda settings: SimpleNamespace(state=SimpleNamespace(
        engine=engine)))
    monkeypatch.setattr(entry, "_draining_server", lambda: Server)
    entry.main(["--model", "m", "--log-level", "warning"])
    assert served == [True]


@pytest.mark.parametrize("convert", [None, "embed"])
async def test_an_engine_asked_to_freezes_the_heap_after_its_model_loaded(model_dir, monkeypatch, convert):
    from retnet.serve.app import create_app

    from .conftest import make_settings

    events = []
    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))
    app = create_app(make_settings(model_dir, **({"convert": convert} if convert else {})))
    engine = app.state.engine
    load = engine._load
    monkeypatch.setattr(engine, "_load", lambda: (load(), events.append("loaded")))
    engine.freeze_heap_when_ready = True
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(engine.wait_ready, 60)
    assert events == ["loaded", "freeze"]


# -- the lone-surrogate check ------------------------------------------------------------------------------------------
def test_a_body_without_surrogates_builds_no_location(monkeypatch):
    from retnet.serve import protocol

    located = []
    locate = protocol._locate_surrogate
    monkeypatch.setattr(protocol, "_locate_surrogate", lambda value, where: located.append(where) or
                        locate(value, where))
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi 🙂"}]} for _ in range(30000)]
    started = time.perf_counter()
    protocol.ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
    assert located == [], located[:3]
    took = time.perf_counter() - started
    assert took < 30, took  # (was a location formatted for each of 180k items)
    # A hit still names where it is, as before.
    assert protocol._lone_surrogate_at([1, (2, "\ud800"), {"a": ["b", {"c": "\ud800"}]}], "f") == "f[2].a[1].c"
    assert protocol._lone_surrogate_at({1: "x", "k": {"\ud800": 1}}, "f") == "f.k"
    assert protocol._lone_surrogate_at({"k": ["a", "b"], "j": "ok"}, "f") is None
    assert protocol._lone_surrogate_at(["x", [[], {"y": "\udfff"}]], "f") == "f[1][1].y"


@pytest.mark.parametrize("flags, warned", [([], True), (["--api-keys", "sk-1"], False),
                                           (["--allowed-origins", '["https://app.example"]'], False)])
def test_every_origin_without_a_key_is_warned_of_by_the_server(monkeypatch, caplog, flags, warned):
    import retnet.serve.__main__ as entry

    class Server:
        load_failure = None  # the real one's: set when the model did not load
        signals = ()  # the real one's: the signals that stopped it

        def __init__(self, config, engine, grace_s):
            self.started = True

        def run(self, sockets=None):
            pass

    monkeypatch.setattr("retnet.serve.app.create_app", lambda settings: SimpleNamespace(state=SimpleNamespace(
        engine=SimpleNamespace())))
    monkeypatch.setattr(entry, "_draining_server", lambda: Server)
    with caplog.at_level("WARNING", logger="retnet.serve"):
        entry.main(["--model", "m", "--log-level", "warning", *flags])
    assert ("CORS allows every origin" in caplog.text) is warned
