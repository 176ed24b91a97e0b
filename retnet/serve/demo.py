"""Start the real server on a model, stream one completion from it as a client would, then keep serving.

    python -m retnet.serve.demo --model runs/demo/export            # serve until Ctrl-C
    python -m retnet.serve.demo --model runs/demo/export --exit-after

Uvicorn runs in a thread of this process on 127.0.0.1:8000 (a free port if 8000 is taken); the completion
is streamed over real HTTP with httpx, printing each piece of text as its SSE chunk arrives. Should it fail
(an error response, or an error event mid-stream), the error is printed and the demo stops with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (imported where used: main names the [serve] extra when httpx is missing)
    import httpx

PROG = "python -m retnet.serve.demo"


def pick_port(host: str, wanted: int) -> int:
    # An IPv6 literal needs an AF_INET6 socket (AF_INET cannot bind "::1": gaierror, a traceback); names such as
    # localhost keep the IPv4 probe, whose address uvicorn binds too.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((host, wanted))
            return sock.getsockname()[1]
        except OSError:
            sock.bind((host, 0))
            return sock.getsockname()[1]


def run_name(model: str) -> str | None:
    """The name of the training run whose export ``model`` is (``runs/demo/export``: ``demo``), which the demo serves
    it under (RETNET_SERVED_MODEL_NAME still wins): every export is a folder named ``export``, the name the server
    would give it. None for any other directory."""
    path = Path(os.path.abspath(os.path.expanduser(model)))
    return (path.parent.name or None) if path.name == "export" and path.is_dir() else None


class StreamFailed(Exception):
    """The server answered the demo's completion with an error."""


def _error_message(data) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return f"{error.get('message')} ({error.get('code') or error.get('type')})"
    return str(data)


def base_url(host: str, port: int) -> str:
    """An IPv6 literal goes in brackets: ``http://::1:8000`` is no URL (httpx reads the port as ``:1:8000``)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0-65535 (0: any free port); got {text!r}")
    return value


def stream_once(url: str, prompt: str, max_tokens: int, client: httpx.Client | None = None,
                api_key: str | None = None) -> None:
    """Stream one completion, printing it as it arrives; raises StreamFailed on an error from the server.
    ``api_key``: sent as ``Authorization: Bearer`` (a server with ``--api-keys`` / ``RETNET_API_KEYS``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95, "seed": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    print(f"\n--- streaming from {url}/v1/completions ---\n{prompt}", end="", flush=True)
    with contextlib.ExitStack() as stack:
        if client is None:
            import httpx

            client = stack.enter_context(httpx.Client(timeout=120))
        r = stack.enter_context(client.stream("POST", url + "/v1/completions", json=body, headers=headers))
        if r.status_code != 200:
            r.read()
            try:
                detail = _error_message(r.json())
            except ValueError:
                detail = r.text
            raise StreamFailed(f"HTTP {r.status_code}: {detail}")
        usage = None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:  # the server's error event: the stream ends without the rest of the text
                raise StreamFailed(_error_message(chunk))
            for choice in chunk["choices"]:
                if first is None:
                    first = time.perf_counter() - start
                print(choice["text"], end="", flush=True)
            usage = chunk.get("usage") or usage
    total = time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else 0
    print(f"\n--- {tokens} tokens in {total:.2f} s (first after {1000 * (first or 0):.0f} ms) ---\n")


def main(argv: list[str] | None = None) -> None:
    from retnet.extras import exits_on_ctrl_c, needs_extra

    with exits_on_ctrl_c(PROG), needs_extra(PROG, "serve"):
        _run_command(argv)


def _run_command(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a save_pretrained directory (the training export)")
    # None: RETNET_HOST / RETNET_PORT, else retnet-serve's defaults (the explicit defaults here hid the variables).
    parser.add_argument("--host", default=None, help="the address to listen on (default: RETNET_HOST, else "
                        "127.0.0.1)")
    parser.add_argument("--port", type=_port, default=None,
                        help="the TCP port to listen on, a free one if it is taken; 0: any free port "
                             "(default: RETNET_PORT, else 8000)")
    parser.add_argument("--prompt", default="def fibonacci(n):\n",
                        help="the prompt of the streamed completion (default: %(default)r)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="most tokens the completion generates (default: %(default)s)")
    parser.add_argument("--exit-after", action="store_true", help="stop after the one completion")
    args = parser.parse_args(argv)

    import httpx
    import uvicorn
    from pydantic import ValidationError

    import retnet

    # after the parse (--help and a bad flag answer without torch), before the imports of torch and transformers:
    # it quiets torchao's import-time warnings
    retnet.register()
    from retnet.serve.__main__ import describe_settings_error
    from retnet.serve.app import create_app
    from retnet.serve.lora import LoraError
    from retnet.serve.settings import ServeSettings, StartupError

    # The settings read the RETNET_* environment as retnet-serve's do: a bad variable (RETNET_MAX_RUNNING=0) was a
    # pydantic traceback, and a --lora-modules adapter that cannot be served (RETNET_LORA_MODULES) a LoraError one.
    given = {"model": args.model, **{name: value for name in ("host", "port")
                                     if (value := getattr(args, name)) is not None}}
    try:
        settings = ServeSettings(**given)
        run = run_name(settings.model)
        # "export" still names it too, as retnet-serve's README examples do; an adapter's name stays the adapter's
        # (retnet-serve takes RETNET_LORA_MODULES=demo=... beside runs/demo/export)
        if settings.served_model_name is None and run is not None and all(
                module["name"] != run for module in settings.lora_modules):
            settings = ServeSettings(**given, served_model_name=[run, "export"])
    except ValidationError as exc:
        parser.exit(2, f"{parser.prog}: error: {describe_settings_error(exc, given)}\n")
    host = settings.host
    try:
        port = pick_port(host, settings.port)
    except OSError as exc:  # (socket.gaierror: a host name that does not resolve)
        parser.exit(2, f"{parser.prog}: error: --host {host!r} cannot be bound: {exc.strerror or exc}\n")
    settings = settings.model_copy(update={"port": port})
    try:
        app = create_app(settings)
    except (StartupError, LoraError) as exc:  # as retnet-serve reports it: one line naming the flag, not a traceback
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = base_url(host, port)
    try:
        # The engine runs in this process: its state is read here (what /health would answer), and its failure bare.
        engine = app.state.engine
        deadline = time.monotonic() + 120
        while not (server.started and engine.healthy):
            if engine.failure is not None:  # the model did not load: waiting the 120 s out would change nothing
                _stop(server, thread)
                sys.exit(f"the server failed to start: --model {args.model!r} did not load: {engine.failure}")
            if not thread.is_alive():
                sys.exit("the server failed to start")
            if time.monotonic() > deadline:
                sys.exit("the server did not become ready in 120 s")
            time.sleep(0.1)

        print(f"retnet-serve is up at {url} serving {settings.model_name!r}")
        try:
            # RETNET_API_KEYS makes the server require a key: the demo's own request sends one (it was a 401).
            stream_once(url, args.prompt, args.max_tokens, api_key=settings.api_keys[0] if settings.api_keys else None)
        except (StreamFailed, httpx.HTTPError) as exc:
            print(f"\n--- the completion failed: {exc} ---", file=sys.stderr, flush=True)
            _stop(server, thread)
            sys.exit(1)
    except KeyboardInterrupt:
        # Stopped as at the end: the server's and the engine's threads run torch (a model loading, a completion),
        # and left running as the process exits they aborted it (status 134 after the one "interrupted" line)
        _stop(server, thread)
        raise
    body = json.dumps({"model": settings.model_name, "prompt": "def add(a, b):", "max_tokens": 32, "stream": True})
    print("Try it yourself:")
    # With keys set, each /v1 command below needs one too (the key itself is not printed: it is a secret).
    auth = " -H \"Authorization: Bearer $KEY\"" if settings.api_keys else ""
    if auth:
        print("  (KEY: one of the server's keys, RETNET_API_KEYS)")
    print(f"  curl -N {url}/v1/completions{auth} -H 'Content-Type: application/json' -d {shlex.quote(body)}")
    chat = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    print(f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d {shlex.quote(chat)}")
    # Structured output: whatever the tiny model would write, the reply is JSON of this schema.
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "lines": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["name", "lines"], "additionalProperties": False}
    structured = json.dumps({"messages": [{"role": "user", "content": "Describe a function."}], "max_tokens": 200,
                             "response_format": {"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}})
    print(f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d {shlex.quote(structured)}")
    print(f"  curl {url}/metrics")  # (no key: /metrics and /health are outside --api-keys)
    if args.exit_after:
        _stop(server, thread)
        return
    print("Serving until Ctrl-C.")
    try:
        while thread.is_alive():
            time.sleep(0.5)  # (not thread.join: see _stop)
    except KeyboardInterrupt:
        print("\nstopping ...")
        _stop(server, thread)


def _stop(server, thread: threading.Thread, timeout_s: float = 30.0) -> None:
    """Stop the server and wait, up to ``timeout_s``, for its thread to end (its lifespan stops the engine's). A
    Ctrl-C meanwhile (a second one, as a user presses again) waits on: the threads left running torch as the
    process exits abort it (status 134). Polled, not joined: Python 3.11's Thread.join interrupted by a Ctrl-C
    marks the thread stopped while it still runs (is_alive() False from then on)."""
    server.should_exit = True
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not thread.is_alive() or time.monotonic() > deadline:
                return
            time.sleep(0.05)
        except KeyboardInterrupt:
            continue


if __name__ == "__main__":
    main()
