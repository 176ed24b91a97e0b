"""``retnet-serve --model DIR`` / ``python -m retnet.serve --model DIR``: the OpenAI-compatible server.

Every setting of :class:`~retnet.serve.settings.ServeSettings` is a flag (``--max-running 32``) and a
``RETNET_*`` environment variable (``RETNET_MAX_RUNNING=32``); flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retnet.serve.settings import ServeSettings


def build_parser() -> argparse.ArgumentParser:
    from retnet.serve.settings import ServeSettings  # (pydantic: main's refusal names the [serve] extra)

    # (not the module docstring's first line: --help printed its reST markup, ``retnet-serve --model DIR``)
    parser = argparse.ArgumentParser(
        prog="retnet-serve", description="Serve a RetNet model over an OpenAI-compatible HTTP API; every flag is "
        "also a RETNET_* environment variable (flags win).")
    for name, info in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = _help_text(name, info)
        # A boolean flag alone means true (vLLM's --enable-auto-tool-choice); "--flag false" is read too.
        toggle = {"nargs": "?", "const": "true"} if info.annotation is bool else {}
        # vLLM's syntax: --lora-modules a=/path b=/other, --api-key k1 k2 (the comma and JSON forms still read).
        # A repeated flag adds its values (argparse kept the last one's alone: `--lora-modules a=x --lora-modules
        # b=y` served b only, and `--lora-modules a=x --lora-modules a=y` a's second path), so that an adapter name
        # given twice is refused wherever it is given, as vLLM refuses loading one twice.
        if name in ("lora_modules", "served_model_name", "api_keys"):
            toggle = {"nargs": "+", "action": "extend"}
        parser.add_argument(flag, dest=name, default=None, help=help_text, **toggle)
    return parser


def _help_text(name: str, info) -> str:
    """The setting's description, then its default and its variable: ``... (default 64; env RETNET_MAX_RUNNING)``."""
    description, env = info.description or name, f"env RETNET_{name.upper()}"
    if info.is_required():
        return f"{description} (required; {env})"
    if "(default" not in description:
        # A list's default as its factory makes it (--allowed-origins ['*']; was "none" for every one).
        return f"{description} (default {info.get_default(call_default_factory=True)!r}; {env})"
    # The description says what leaving the setting out does (--revision: main): the field's own default, None,
    # printed after it was a second default, and a wrong one. A description ending in it takes the variable inside.
    head, _, last = description.rpartition(" (")
    if last.startswith("default") and last.endswith(")"):
        return f"{head} ({last[:-1]}; {env})"
    return f"{description} ({env})"


def parse_settings(argv: list[str] | None = None) -> ServeSettings:
    return settings_from_args(build_parser().parse_args(argv))


def settings_from_args(args: argparse.Namespace, prog: str = "retnet-serve") -> ServeSettings:
    """The settings named by ``args`` (flags left out: environment, then defaults); invalid ones exit 2.
    Attributes that are not settings (another command's own flags) are ignored."""
    from pydantic import ValidationError

    from retnet.serve.settings import ServeSettings

    given = {k: v for k, v in vars(args).items() if v is not None and k in ServeSettings.model_fields}
    try:
        return ServeSettings(**given)
    except ValidationError as exc:
        print(f"{prog}: error: {describe_settings_error(exc, given)}", file=sys.stderr)
        raise SystemExit(2) from None
    except ModuleNotFoundError:  # a validator's import of an extra's package (the engine's): main names the extra
        raise
    except Exception as exc:  # a validator's own bug: still one line, naming what it could
        print(f"{prog}: error: invalid settings: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def describe_settings_error(exc, given: dict) -> str:
    """pydantic's errors on one line, each naming the setting as the operator gave it: its flag, or its
    ``RETNET_*`` variable when no flag set it (pydantic's own text named the field alone, on several lines, with
    a link), and the value received."""
    from retnet.serve.settings import ServeSettings, _environment_variable

    described, named = [], set()
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        name = error["loc"][0] if error["loc"] else None
        if name is not None and name in named:  # a union's members each fail: the first says enough
            continue
        named.add(name)
        if name not in ServeSettings.model_fields or (error["type"] == "value_error" and str(name) in message):
            # The validators' messages name the setting and the value themselves, by its flag.
            described.append(_with_variables(message, given))
            continue
        flag = "--" + str(name).replace("_", "-")
        if error["type"] == "missing":
            described.append(f"{name}: {flag} (or RETNET_{str(name).upper()}) is required")
            continue
        variable = None if name in given else _environment_variable(ServeSettings, str(name))
        source = flag if variable is None else f"{variable[0]}, {flag}"
        shown = variable[1] if variable is not None else given.get(name, error.get("input"))
        if isinstance(shown, list):  # --lora-modules' items, as typed
            shown = " ".join(map(str, shown))
        item = next((part for part in error["loc"][1:] if isinstance(part, int)), None)  # not the union's tags
        described.append(f"{name} ({source}){'' if item is None else f' item {item}'}: {message}; got "
                         f"{str(shown)[:120]!r}")
    return "; ".join(described)


def _with_variables(message: str, given: dict) -> str:
    """``message`` with each ``name (--flag)`` it holds whose value came from its ``RETNET_*`` variable, not a flag,
    written ``name (RETNET_NAME, --flag)``: an operator who set the variable never typed that flag."""
    from retnet.serve.settings import ServeSettings, _environment_variable

    for name in ServeSettings.model_fields:
        flag = "--" + name.replace("_", "-")
        if f"{name} ({flag}" not in message or name in given:
            continue
        variable = _environment_variable(ServeSettings, name)
        if variable is not None:
            message = message.replace(f"{name} ({flag}", f"{name} ({variable[0]}, {flag}")
    return message


def main(argv: list[str] | None = None) -> None:
    from retnet.extras import exits_on_ctrl_c, needs_extra

    with exits_on_ctrl_c("retnet-serve"), needs_extra("retnet-serve", "serve"):
        _run_command(argv)


def _run_command(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)  # first: --help and a bad flag answer without importing torch
    import retnet

    # before the settings' checks import torch and transformers: it quiets torchao's import-time warnings
    retnet.register()
    settings = settings_from_args(args)
    refusal = listen_refusal(settings.host, settings.port)
    if refusal is not None:
        print(f"retnet-serve: error: {refusal}", file=sys.stderr)
        raise SystemExit(STARTUP_FAILURE)
    import uvicorn

    from retnet.extras import EXIT_INTERRUPTED
    from retnet.serve.app import create_app

    DrainingServer = _draining_server()
    logging.basicConfig(level=settings.logging_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from retnet.serve.lora import LoraError
    from retnet.serve.settings import StartupError

    try:
        app = create_app(settings)
    except LoraError as exc:  # an adapter this server cannot serve: the message names it and the field
        print(f"retnet-serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except StartupError as exc:  # --model, --generation-config, --chat-template: one line naming the flag
        print(f"retnet-serve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + ANSWER_S)
    server = DrainingServer(config, app.state.engine, settings.shutdown_grace_s)
    app.state.engine.freeze_heap_when_ready = True  # (engine.freeze_startup_heap: this process serves one app)
    if "*" in settings.allowed_origins and not settings.api_keys:  # (here: retnet-run-batch serves no network)
        logging.getLogger("retnet.serve").warning(
            "CORS allows every origin (--allowed-origins, vLLM's default) and no --api-keys are set: any web page a "
            "browser on this network opens may call this server and read its answers")
    server.run()
    if signal.SIGINT in server.signals:
        # As every retnet-* command's Ctrl-C, now that the shutdown has drained the requests (uvicorn's own ending,
        # the signal raised again, was a KeyboardInterrupt in its event loop: status 0, or tracebacks).
        print("retnet-serve: interrupted; the server stopped after its graceful shutdown", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)
    if server.load_failure is not None:
        spec = settings.speculative
        draft = " (or --speculative-config's draft model)" if spec is not None and spec.model is not None else ""
        print(f"retnet-serve: error: --model {settings.model!r}{draft} did not load: {server.load_failure}",
              file=sys.stderr)
        raise SystemExit(STARTUP_FAILURE)
    if not server.started:  # uvicorn.run's exit: the port taken, say (uvicorn logged why)
        raise SystemExit(STARTUP_FAILURE)


# uvicorn.run's exit status for a server that did not start.
STARTUP_FAILURE = 3
# Past --shutdown-grace-s, how long the requests the engine then ends have to send their answers before uvicorn
# cancels what is left.
ANSWER_S = 5

_LISTEN_HINTS = {errno.EADDRINUSE: "another process listens there: stop it or pick another --port",
                 errno.EACCES: "a port below 1024 needs privileges: pick a higher --port",
                 errno.EADDRNOTAVAIL: "no interface of this machine has that address: 0.0.0.0 listens on every one"}


def listen_refusal(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on ``host``:``port``, found by binding the addresses it binds (asyncio's
    create_server: every address the host resolves to, SO_REUSEADDR, IPv6 sockets IPv6-only) and letting them go;
    None when it can. Asked before the model loads: uvicorn binds once the engine's thread is loading it, and its
    refusal was a log line naming neither flag (none at all under --log-level critical), then the nanobind leak reports of
    the interpreter ending under that thread."""
    try:
        infos = set(socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
    except (socket.gaierror, UnicodeError) as exc:  # (UnicodeError: a name no IDNA label can encode)
        return f"--host {host!r}: not an address or a name this machine resolves ({getattr(exc, 'strerror', None) or exc})"
    with contextlib.ExitStack() as held:  # all bound at once, as uvicorn holds them
        for family, kind, proto, _, address in infos:
            try:
                sock = held.enter_context(socket.socket(family, kind, proto))
            except OSError:  # a family this kernel lacks (IPv6 off): asyncio skips it too
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                hint = _LISTEN_HINTS.get(exc.errno)
                return (f"cannot listen on --host {host} --port {port} ({address[0]} port {address[1]}): {reason}"
                        + (f"; {hint}" if hint else ""))
    return None


def _draining_server():
    import uvicorn
    from uvicorn.server import HANDLED_SIGNALS

    from retnet.extras import EXIT_INTERRUPTED

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, whose shutdown (SIGTERM, Ctrl-C) drains the engine itself. uvicorn's own graceful
        shutdown waits for the connections to close, then cancels the handlers still running: a stream past the
        grace was cut without its end, a queued request's connection closed without a response. Here, as uvicorn
        starts waiting, the engine takes no new work, lets what is in flight finish for ``grace_s``, then ends
        the rest (a 503 ``unavailable``; a stream its error event and ``[DONE]``), in time for uvicorn to send
        those answers."""

        def __init__(self, config, engine, grace_s: float):
            super().__init__(config)
            self.engine, self.grace_s = engine, grace_s
            self.load_failure: str | None = None
            self.signals: list[int] = []  # those that stopped it (main reads SIGINT's status off them)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's, without raising the signals again once its shutdown is over: a SIGINT so raised was a
            # KeyboardInterrupt inside the event loop, whose cancelled tasks logged their tracebacks, and the command
            # ended with status 0; a SIGTERM killed the process after its drain (status -15). main ends it instead:
            # 130 after a Ctrl-C, as every retnet-* command; 0 after SIGTERM, as vLLM's server.
            if threading.current_thread() is not threading.main_thread():  # (signals reach the main thread only)
                yield
                return
            before = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                # A second Ctrl-C ends the process at once (uvicorn's force_exit cancelled the handlers as asyncio
                # ended, each logging a CancelledError's traceback, with the engine's thread still running the model
                # as the interpreter finalized). Its clients see their connections closed.
                with contextlib.suppress(OSError):
                    os.write(2, b"\nretnet-serve: interrupted again; stopped at once, the requests in flight cut\n")
                os._exit(EXIT_INTERRUPTED)
            self.signals.append(sig)
            self.should_exit = True

        async def on_tick(self, counter: int) -> bool:
            # The model loads on the engine's thread once the server listens (/health says "loading" meanwhile). A
            # model that never loaded (weights missing or corrupt, out of memory) left a server running with every
            # request 503 for good, which only a health check would notice: it stops, as vLLM's does. An engine
            # that dies after serving is /health's "failed" instead (README).
            if self.engine.failure is not None and not self.engine.ready and self.load_failure is None:
                self.load_failure = self.engine.failure
                return True
            return await super().on_tick(counter)

        async def shutdown(self, sockets=None) -> None:
            # A daemon thread, not the loop's executor: a forced exit (a second Ctrl-C) must not wait for it.
            threading.Thread(target=self._drain, name="retnet-drain", daemon=True).start()
            await super().shutdown(sockets)

        def _drain(self) -> None:
            # uvicorn (super().shutdown) closes the listeners and each connection once its response is sent: no
            # request arrives any more. Those already read but not yet in the engine (tokenizing a long prompt,
            # compiling a grammar, reading a session file) are in flight too: the engine takes them for the grace.
            deadline = time.monotonic() + self.grace_s
            while ((self.server_state.tasks or self.engine._in_flight()) and self.engine.dead is None
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            self.engine.stop(0.0)

    return DrainingServer


if __name__ == "__main__":
    main()
