"""retnet-serve's shell as an operator meets it, found by a bug hunt: an address it cannot listen on is one line
naming --host/--port before the model loads, and the CORS settings are read as browsers send what they are
compared to (--allowed-methods in any case, an origin copied as a URL)."""

from __future__ import annotations

import socket

import pytest

from retnet.serve import app as app_module
from retnet.serve.__main__ import STARTUP_FAILURE, listen_refusal, main
from retnet.serve.settings import ServeSettings

ORIGIN = "https://app.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded for a server that cannot listen")


@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.1"])  # a taken port; an address no interface has (TEST-NET-1)
def test_an_address_the_server_cannot_listen_on_is_one_line_before_the_model_loads(model_dir, monkeypatch, capsys,
                                                                                 host):
    # uvicorn bound once the engine's thread was loading the model: its refusal was a log line naming neither flag
    # (none under --log-level critical), followed by the nanobind leak reports of the interpreter ending under that
    # thread.
    monkeypatch.setattr(app_module, "create_app", _no_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1] if host == "127.0.0.1" else 0
        with pytest.raises(SystemExit) as exited:
            main(["--model", str(model_dir), "--host", host, "--port", str(port), "--log-level", "critical"])
    assert exited.value.code == STARTUP_FAILURE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"retnet-serve: error: cannot listen on --host {host} --port {port}"
                                                   ), lines
    assert ("address already in use" if host == "127.0.0.1" else "cannot assign requested address") in lines[0]


def test_a_free_address_is_no_refusal():
    assert listen_refusal("127.0.0.1", 0) is None
    with socket.socket() as held:  # bound, not listening (a closed server's port in TIME_WAIT reads the same)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
    assert listen_refusal("127.0.0.1", port) is None


def test_cors_methods_and_origins_are_read_as_browsers_send_them():
    settings = ServeSettings(model="m", allowed_methods="get, post",
                             allowed_origins='["https://App.Example/", "http://localhost:3000", "https://b.example:443",'
                                             ' "null", "*"]')
    assert settings.allowed_methods == ["GET", "POST"]
    assert settings.allowed_origins == [ORIGIN, "http://localhost:3000", "https://b.example", "null", "*"]
    with pytest.raises(ValueError, match=r"allowed_origins \(--allowed-origins\): an origin is .*'https://a.example/app'"):
        ServeSettings(model="m", allowed_origins="https://a.example/app")  # a page's URL: no Origin header is one


@pytest.mark.anyio
async def test_a_preflight_is_answered_for_lowercase_methods_and_an_origin_given_as_a_url(open_app):
    # Both were compared as typed: every browser's preflight was a 400 ("Disallowed CORS method" / "origin").
    async with open_app(allowed_methods=["get", "post"], allowed_origins=["https://App.example/"]) as client:
        r = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert r.headers["access-control-allow-methods"] == "GET, POST"


# -- --root-path (vLLM's; the flag was unknown, RETNET_ROOT_PATH silently ignored) ------------------------------------
def test_root_path_is_a_flag_read_as_a_path_prefix(monkeypatch):
    from retnet.serve.__main__ import parse_settings

    assert parse_settings(["--model", "m", "--root-path", "/llm/"]).root_path == "/llm"
    monkeypatch.setenv("RETNET_ROOT_PATH", "/proxy/llm")
    assert ServeSettings(model="m").root_path == "/proxy/llm"
    with pytest.raises(ValueError, match=r"root_path \(--root-path\) must be a path beginning with '/'"):
        ServeSettings(model="m", root_path="llm")


@pytest.mark.anyio
async def test_behind_a_proxy_the_docs_find_their_schema_and_routes_answer_with_or_without_the_prefix(open_app):
    chat = {"model": "micro", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    async with open_app(root_path="/llm", api_keys=["sk-1"]) as client:
        r = await client.get("/docs")  # through a proxy that strips the prefix
        assert r.status_code == 200 and "'/llm/openapi.json'" in r.text, r.text
        assert (await client.get("/openapi.json")).json()["servers"] == [{"url": "/llm"}]
        key = {"Authorization": "Bearer sk-1"}
        for prefix in ("", "/llm"):
            r = await client.post(f"{prefix}/v1/chat/completions", json=chat, headers=key)
            assert r.status_code == 200 and r.json()["choices"], r.text
            # The route's key is asked before its body is read, with the prefix too.
            r = await client.post(f"{prefix}/v1/chat/completions", content=b"{not json")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            r = await client.post(f"{prefix}/v1/messages", content=b"{not json", headers=key)  # Anthropic's body
            assert r.status_code == 400 and r.json()["type"] == "error", r.text
        metrics = (await client.get("/llm/metrics")).text
        assert 'retnet_requests_total{route="/v1/chat/completions",status="401"} 2.0' in metrics, metrics
