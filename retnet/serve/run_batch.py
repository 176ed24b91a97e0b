"""``retnet-run-batch -i requests.jsonl -o results.jsonl --model DIR``: offline batch inference.

OpenAI's batch file format, as vLLM's ``vllm.entrypoints.openai.run_batch`` reads and writes it. Each input line is
``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}``; each output line, in input
order, ``{"id": "batch_req_...", "custom_id": ..., "response": {"status_code", "request_id", "body"}, "error"}``.
Every request runs through the server's own app in this process (``create_app`` behind httpx's ASGI transport:
the same validation, sampling, errors and metrics as ``retnet-serve``), many at once, so the engine decodes them
together in its batched recurrent step. Every ``retnet-serve`` flag is accepted (``RETNET_*`` variables too). A
classifier or reward model ``--model`` is served as ``retnet-serve`` serves it: its lines name ``/v1/classify``, or
(one label) vLLM's ``/v1/score`` and ``/v1/rerank``.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import errno
import json
import logging
import math
import os
import re
import signal
import stat
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from retnet.extras import BROKEN_PIPE, to_devnull

if TYPE_CHECKING:  # (imported where used: pydantic; main names the [serve] extra when it is missing)
    from retnet.serve.protocol import APIError

logger = logging.getLogger("retnet.serve.run_batch")
PROG = "retnet-run-batch"
RETRY_429_S = 600.0  # how long a line waits out the server's queue (429s) before its 429 is written
# Routes the app may serve (--allow-runtime-lora-updating) that a batch line may not name: they answer plain text,
# not a JSON body, and the lines run concurrently, so no other line could count on the adapter one loads.
NOT_IN_A_BATCH = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
# A prompt's tokens in the Responses API's usage (input_tokens) and in Anthropic's, whose input_tokens leave out
# those read from the prefix cache.
INPUT_COUNTS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
INTERRUPTED_STOP_S = 30.0  # how long a Ctrl-C's cleanup (the engine stopped, the requests cancelled) may take


@dataclass
class BatchLine:
    """One non-blank input line: ``line`` its 1-based number in the file, ``error`` why it is not run."""

    line: int
    custom_id: str | None = None
    url: str | None = None
    body: dict | None = None
    error: APIError | None = None


@dataclass
class BatchSummary:
    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    def line(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"run_batch: {self.requests} requests, {self.failed} failed, {self.prompt_tokens} prompt + "
                f"{self.completion_tokens} completion tokens in {self.seconds:.1f} s ({rate:.1f} completion tokens/s)")


def parse_lines(text_lines: list[str], urls: set[str]) -> list[BatchLine]:
    """Read each non-blank line into a :class:`BatchLine`; a line that cannot run gets its ``error`` (400 naming
    the field) and the others are unaffected. ``urls``: the POST routes the app answers."""
    from retnet.serve.app import MAX_JSON_DEPTH, json_nested_deeper_than
    from retnet.serve.protocol import APIError

    parsed, seen = [], set()
    for number, text in enumerate(text_lines, start=1):
        if not text.strip():
            continue
        entry = BatchLine(number)
        parsed.append(entry)
        # Before json.loads, whose RecursionError would end the whole batch: the server's own refusal, per line.
        # (one level more than the server's: the line's object holds the request's body)
        if json_nested_deeper_than(text.encode(errors="surrogatepass"), MAX_JSON_DEPTH + 1):
            entry.error = APIError(400, f"line {number}: its JSON is nested deeper than {MAX_JSON_DEPTH} levels",
                                   None, "invalid_json")
            continue
        try:
            item = json.loads(text)
        except ValueError as exc:
            entry.error = APIError(400, f"line {number} is not valid JSON ({exc})", None, "invalid_json")
            continue
        if not isinstance(item, dict):
            entry.error = APIError(400, f"line {number} must be a JSON object; got {type(item).__name__}", None,
                                   "invalid_request")
            continue
        custom_id = item.get("custom_id")
        entry.custom_id = custom_id if isinstance(custom_id, str) else None
        entry.url, entry.body = item.get("url"), item.get("body")
        entry.error = _line_error(number, item, urls, seen)
        if entry.custom_id is not None:
            seen.add(entry.custom_id)
    return parsed


def _line_error(number: int, item: dict, urls: set[str], seen: set[str]) -> APIError | None:
    from retnet.serve.protocol import APIError

    custom_id, method, url, body = (item.get(key) for key in ("custom_id", "method", "url", "body"))
    where = f"line {number}"
    if not isinstance(custom_id, str) or not custom_id:
        return APIError(400, f"{where}: custom_id must be a non-empty string; got {custom_id!r}", "custom_id",
                        "invalid_value")
    if custom_id in seen:  # OpenAI's rule: each custom_id names one request, so results can be matched to it
        return APIError(400, f"{where}: custom_id {custom_id!r} was used by an earlier line; each must be unique",
                        "custom_id", "duplicate_custom_id")
    if not isinstance(method, str) or method.upper() != "POST":
        return APIError(400, f"{where}: method must be \"POST\"; got {method!r}", "method", "invalid_value")
    if not isinstance(url, str):  # a list or an object would fail the lookups below (unhashable)
        return APIError(400, f"{where}: url must be a string naming a route; got {json.dumps(url)[:80]}", "url",
                        "unsupported_url")
    if url in NOT_IN_A_BATCH:
        return APIError(400, f"{where}: url {url!r} is not run in a batch (its lines run concurrently, so none could "
                        "count on an adapter loaded by another); name the adapters with --lora-modules",
                        "url", "unsupported_url")
    if not _served(url, urls):
        listed = getattr(urls, "listed", urls)
        return APIError(400, f"{where}: url {url!r} is not served; expected one of {', '.join(sorted(listed))}",
                        "url", "unsupported_url")
    if not isinstance(body, dict):
        return APIError(400, f"{where}: body must be a JSON object; got {type(body).__name__}", "body",
                        "invalid_request")
    if body.get("stream") not in (None, False):  # a results file holds one response per request, not chunks
        return APIError(400, f"{where}: stream is not supported in a batch; send false or leave it out (got "
                        f"{body['stream']!r})", "stream", "unsupported_parameter")
    return None


def output_line(entry: BatchLine, status: int, body: Any) -> dict:
    """The output line for ``entry``: vLLM's and OpenAI's ``BatchRequestOutput`` shape. A failure keeps the
    server's error body as ``response.body`` (what the HTTP request answered) and sets ``error`` to its
    ``{"code", "message", "param", "line"}``, so ``error is None`` tells success alone."""
    error = None
    if status != 200:
        info = body.get("error", {}) if isinstance(body, dict) else {}
        # (an Anthropic error body, /v1/messages', names its kind as "type" and has no "code")
        error = {"code": info.get("code", info.get("type")), "message": info.get("message"), "param": info.get("param"),
                 "line": entry.line}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": entry.custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:24]}", "body": body},
            "error": error}


class OrderedWriter:
    """Write output lines in input order as results arrive: a result waits only for the ones before it."""

    def __init__(self, out: IO[str]):
        self.out, self.next, self.buffer = out, 0, {}
        # JSONL is UTF-8. An output in another encoding (`-o -` under a Latin-1 locale) is written ASCII alone, the
        # rest as JSON's escapes: its own encoding wrote "é" as one Latin-1 byte, no UTF-8, on the lines that held
        # nothing it could not encode (the others escaped), so a file mixed both.
        encoding = getattr(out, "encoding", None) or "utf-8"
        self.encoding = "utf-8" if codecs.lookup(encoding).name == "utf-8" else "ascii"

    def put(self, index: int, line: dict) -> None:
        self.buffer[index] = line
        try:
            while self.next in self.buffer:
                self.out.write(json_line(self.buffer.pop(self.next), self.encoding) + "\n")
                self.next += 1
            self.out.flush()
        except OSError as exc:
            raise OutputError(exc, "the lines after it were not written") from exc


class OutputError(Exception):
    """Writing the output failed (``error``: the OSError: a full disk, EIO, the reader of ``-o -`` gone): the run
    ends there, in one line naming the output, the error and ``lost``, what it cost (it was a traceback, but for a
    broken pipe)."""

    def __init__(self, error: OSError, lost: str):
        super().__init__(f"{error}; {lost}")
        self.error, self.lost = error, lost


def json_line(line: dict, encoding: str = "utf-8") -> str:
    """``line`` as one line of JSON, its text unescaped, unless ``encoding`` (the output's) cannot write it: a lone
    surrogate (a ``custom_id`` the input line spelled ``"a\\ud83d"``, which its output line echoes) in UTF-8, any
    non-ASCII text on an ASCII stdout (``-o -`` under ``LC_ALL=C``). The UnicodeEncodeError ended the whole batch
    there, no line written for it or any after it. Such a line is written with JSON's escapes instead, which read
    back as the same string. A :class:`VerbatimJSON` body is written as the server wrote it."""
    body = line["response"]["body"]
    verbatim = body.text if isinstance(body, VerbatimJSON) else None
    if verbatim is not None:
        mark = f"\x00{uuid.uuid4().hex}"  # a string no JSON text of the line holds: its NUL is escaped in any string
        line = {**line, "response": {**line["response"], "body": mark}}
    text = json.dumps(line, ensure_ascii=False)
    if verbatim is not None:
        text = text.replace(json.dumps(mark), verbatim, 1)
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = json.dumps(line)
        if verbatim is not None:  # its non-ASCII characters, all inside its strings, as JSON's escapes
            text = text.replace(json.dumps(mark), _NON_ASCII.sub(lambda m: json.dumps(m[0])[1:-1], verbatim), 1)
    return text


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


class VerbatimJSON(dict):
    """A server's JSON answer holding a number past a double's range (a tool call's ``1e999``, which the server
    writes as the model did): its items (json.loads' inf), for the summary's usage, and its ``text``, which the
    output line holds as it is (json.dumps would write ``Infinity``, no JSON: a line no reader could parse)."""

    def __init__(self, items: dict, text: str):
        super().__init__(items)
        self.text = text


class ServedURLs(set):
    """:func:`served_urls`' answer: the urls a line may name, and ``listed``, those of them that serve this model,
    which a line naming another url is told to use."""

    def __init__(self, urls: set[str], listed: set[str]):
        super().__init__(urls)
        self.listed = listed


def served_urls(app) -> ServedURLs:
    """The app's POST routes under ``/v1`` without path parameters: what a batch line may name (not the runtime
    LoRA routes, NOT_IN_A_BATCH; a line may also name the score, rerank and classify routes' other names:
    :func:`_served`). An embedding server's are its embedding routes and /v1/score, /v1/rerank (the cosine of two
    embeddings, as vLLM's run_batch takes them): its generation and classification routes only answer 400, so a line
    naming one is refused listing the routes that embed. On a language model or a classifier, a line naming a route
    of another kind of model gets the app's own 400 saying so (vLLM's "the model does not support" line), but a
    refused url's message lists only the routes that serve the model: it listed a classifier's generation routes."""
    from retnet.serve.app import GENERATION_ROUTES
    from retnet.serve.classify import EMBEDDING_ROUTES

    urls = {route.path for route in app.routes if "POST" in (getattr(route, "methods", None) or ())
            and route.path.startswith("/v1/") and "{" not in route.path and route.path not in NOT_IN_A_BATCH}
    scoring = {"/v1/score", "/v1/rerank"}
    if app.state.settings.convert == "embed":
        urls &= {*EMBEDDING_ROUTES, *scoring}
        return ServedURLs(urls, urls)
    pooler = getattr(app.state.engine, "pooler", None)
    if pooler is not None:  # a classifier: /score and /rerank give a score only for one label
        return ServedURLs(urls, urls & {"/v1/classify", *(scoring if pooler.width == 1 else ())})
    return ServedURLs(urls, urls & set(GENERATION_ROUTES))


def _served(url: str, urls: set[str]) -> bool:
    """Whether a line may name ``url``: one of ``urls``, or another name the app serves a score, rerank or classify
    route under (``/score``; ``/rerank``, ``/v2/rerank``; ``/classify``: the app registers every name of a route
    with its ``/v1`` one). vLLM's run_batch takes any url ending in ``/score`` or ``/rerank`` and its own error lists
    ``/score, /rerank``: a vLLM batch file naming them was refused as "not served"; and a classifier's answer to a
    generation line says to use ``/classify``."""
    from retnet.serve.score import RERANK_ROUTES, SCORE_ROUTES

    other_names = {**dict.fromkeys(SCORE_ROUTES, "/v1/score"), **dict.fromkeys(RERANK_ROUTES, "/v1/rerank"),
                   "/classify": "/v1/classify"}
    return url in urls or other_names.get(url) in urls


def _request_body(body: dict) -> dict:
    """``client.post``'s keyword arguments for ``body``. httpx encodes ``json=`` strictly (no NaN, UTF-8): a NaN
    or Infinity, or a lone surrogate escape (``"\\ud83d"``), that json.loads took from the line raised in the client,
    a 500 "internal error". Such a body is sent as the line spelled it (escapes kept), so that the server answers
    it with its own 400 naming the field, as it does online."""
    try:
        json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
    except ValueError:  # UnicodeEncodeError is one too
        return {"content": json.dumps(body, ensure_ascii=True).encode(),
                "headers": {"Content-Type": "application/json"}}
    return {"json": body}


async def post(client, entry: BatchLine) -> tuple[int, Any]:
    """``entry``'s request through the app: (status, JSON body). The batch's own concurrency can outrun the
    server's queue when requests ask for several choices: a 429 is retried, and written only after
    ``RETRY_429_S`` seconds of them (a server that never frees its queue must not hang the batch)."""
    from retnet.serve.protocol import APIError

    delay, give_up = 0.02, time.monotonic() + RETRY_429_S
    sent = _request_body(entry.body)
    while True:
        try:
            response = await client.post(entry.url, **sent)
        except Exception as exc:  # a bug in the app: this line fails, the others run
            logger.exception("request on line %d failed", entry.line)
            return 500, APIError(500, f"internal error ({type(exc).__name__})", None, "internal_error").body()
        if response.status_code != 429 or time.monotonic() > give_up:
            break
        await asyncio.sleep(delay)
        delay = min(2 * delay, 1.0)
    huge = []  # numbers past a double's range the server wrote (a tool call's 1e999)

    def parse_float(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            huge.append(text)
        return value

    try:
        body = json.loads(response.text, parse_float=parse_float)
    except ValueError:
        return 500, APIError(500, f"the server answered {response.status_code} without a JSON body", None,
                             "internal_error").body()
    return response.status_code, VerbatimJSON(body, response.text) if huge and isinstance(body, dict) else body


async def run_batch(app, entries: list[BatchLine], out: IO[str], max_concurrency: int,
                    progress: bool = True) -> BatchSummary:
    """Run ``entries`` through ``app`` (its lifespan already entered and its engine ready), at most
    ``max_concurrency`` requests at once, writing one output line per entry to ``out`` in order."""
    import httpx
    from tqdm import tqdm

    settings = app.state.settings
    # The batch's owner is trusted: it passes the server's own key check rather than skipping it.
    headers = {"Authorization": f"Bearer {settings.api_keys[0]}"} if settings.api_keys else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    summary, writer = BatchSummary(requests=len(entries)), OrderedWriter(out)
    slots = asyncio.Semaphore(max_concurrency)
    started = time.perf_counter()
    bar = tqdm(total=len(entries), unit="req", desc="run_batch", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)

    def done(index: int, entry: BatchLine, status: int, body: Any) -> None:
        summary.statuses[status] = summary.statuses.get(status, 0) + 1
        if status != 200:
            summary.failed += 1
        elif isinstance(body, dict) and isinstance(body.get("usage"), dict):
            usage = body["usage"]  # chat/completions' names, or the Responses API's, or Anthropic's
            summary.prompt_tokens += int(usage["prompt_tokens"] or 0) if "prompt_tokens" in usage else sum(
                int(usage.get(name) or 0) for name in INPUT_COUNTS)
            summary.completion_tokens += int(usage.get("completion_tokens", usage.get("output_tokens")) or 0)
        writer.put(index, output_line(entry, status, body))
        elapsed = time.perf_counter() - started
        bar.set_postfix_str(f"{summary.completion_tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
        bar.update()

    # A line that failed (its output's write: the reader of `-o -` gone, a full disk; or anything else raised) ends
    # the run at once: raised only by gather after the last line was sent, it let every line of the file run to the
    # end for output nobody could read, the later answers held in the writer's memory.
    failed: list[Exception] = []

    async def run_one(client, index: int, entry: BatchLine, after: asyncio.Task | None = None) -> None:
        if after is not None:  # its session's previous turn: this turn takes its place only once that one ended
            await asyncio.wait([after])
            await slots.acquire()
        try:
            if not failed:
                done(index, entry, *await post(client, entry))
        except Exception as exc:
            failed.append(exc)
        finally:
            slots.release()

    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://run-batch", headers=headers,
                                     timeout=None) as client:
            tasks = []
            # The lines of one session (the body's session_id) run one after another, in the file's order: a session
            # serves one request at a time, so run together all but one were 409 session_busy, and the turns that
            # ran continued it in any order. A turn waiting for the one before it holds no place in flight.
            turns: dict[str, asyncio.Task] = {}
            try:
                for index, entry in enumerate(entries):
                    if entry.error is not None:
                        done(index, entry, entry.error.status, entry.error.body())
                        continue
                    session = entry.body.get("session_id")
                    after = turns.get(session) if isinstance(session, str) else None
                    if after is not None and not after.done():
                        task = asyncio.create_task(run_one(client, index, entry, after))
                    else:
                        await slots.acquire()  # bounded in flight: the engine batches these, the rest wait here
                        if failed:
                            break
                        task = asyncio.create_task(run_one(client, index, entry))
                    tasks.append(task)
                    if isinstance(session, str):
                        turns[session] = task
                for task in asyncio.as_completed(tasks):
                    await task
                    if failed:
                        break
            finally:
                for task in tasks:
                    task.cancel()  # the requests still running, when the run ends early (their engine slots freed)
                await asyncio.gather(*tasks, return_exceptions=True)
            if failed:
                raise failed[0]
    finally:
        bar.close()  # (left open, the command's error line went on the bar's, and the bar drew again below it)
    summary.seconds = time.perf_counter() - started
    return summary


def build_parser() -> argparse.ArgumentParser:
    from retnet.serve.__main__ import build_parser as build_serve_parser

    parser = build_serve_parser()
    # (the module docstring's first line, cut after its reST usage, left "offline batch inference." alone)
    parser.prog = PROG
    parser.description = ("Run a file of OpenAI batch requests (JSONL) through a RetNet model offline, as vLLM's "
                          "run_batch does, and write one result a line; every retnet-serve flag is accepted.")
    parser.add_argument("-i", "--input-file", required=True,
                        help="the requests, one JSON object a line (OpenAI's batch input format); - reads stdin")
    parser.add_argument("-o", "--output-file", required=True,
                        help="where the results go, one line per request in input order; - writes stdout")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="requests in flight at once (default: --max-running, the engine's batch)")
    return parser


def split_lines(text: str) -> list[str]:
    """JSONL's lines: split at "\\n" alone (a "\\r" before it dropped). Not str.splitlines(), which also splits at
    U+2028, U+2029 and U+0085, characters JSON lets a string hold unescaped (json.dumps(ensure_ascii=False)
    writes them so): one request would become two lines that are not JSON."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_input(path: str) -> list[str]:
    """The lines of ``path`` (``-``: stdin's bytes, UTF-8 as a file's: stdin's text decodes with the locale's
    encoding, and a Latin-1 locale ran "café" as "cafÃ©"). Bytes, not text: the file's own line ends, so that
    split_lines alone decides where a line ends. A byte-order mark (Windows tools write one) is skipped: it would
    make line 1 no JSON. A byte that is not UTF-8 is a ValueError naming its line (the codec's error gave its
    offset in the file)."""
    if path == "-" and sys.stdin is None:  # (`<&-`: Python's stdin is None, whose .read() was a traceback)
        raise OSError(errno.EBADF, "standard input is closed")
    if path == "-" and not hasattr(sys.stdin, "buffer"):
        # A text stream put in its place (IDLE's shell, a caller of main() that set an io.StringIO) has no bytes:
        # its text is encoded back, so that the rules below are the same. A byte its reader could not decode is
        # held as a lone surrogate (surrogateescape) and becomes that byte again; any other lone surrogate is made
        # bytes UTF-8 refuses. Both are then named by their line: read as text, they reached the requests.
        text = sys.stdin.read()
        try:
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = text.encode("utf-8", "surrogatepass")
    elif path == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as file:
            data = file.read()
    data = data.removeprefix(codecs.BOM_UTF8)  # (utf-8-sig's offsets would count from after it)
    try:
        return split_lines(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        number = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"line {number} is not UTF-8 (byte {data[exc.start]:#04x}, {exc.reason})") from None


def main(argv: list[str] | None = None) -> int:
    from retnet.extras import exits_on_ctrl_c, needs_extra

    # (a Ctrl-C in the batch itself: _run_command's own line, which says what was kept)
    with exits_on_ctrl_c(PROG), needs_extra(PROG, "serve"):
        return _run_command(argv)


def _run_command(argv: list[str] | None) -> int:
    from retnet.serve.__main__ import settings_from_args
    from retnet.serve.settings import StartupError, check_quantization_settings, resolve_model_source

    parser = build_parser()
    args = parser.parse_args(argv)
    import retnet

    # after the parse (--help and a bad flag answer without torch), before the settings' checks import torch and
    # transformers: it quiets torchao's import-time warnings
    retnet.register()
    settings = settings_from_args(args, PROG)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error(f"--max-concurrency must be at least 1; got {args.max_concurrency}")
    max_concurrency = args.max_concurrency or settings.max_running
    logging.basicConfig(level=settings.logging_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The lines go to the app in this process through httpx, which logs each request at INFO: one log line a line
    # of the file, breaking the progress bar (the summary and the output file already account for every line)
    # (--log-level debug or trace keeps them)
    if settings.logging_level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    # A batch keeps no session across runs, and RETNET_SESSION_DIR set for a live server beside it would have this
    # process sweep and write that server's directory (one server a directory).
    if settings.session_dir is not None:
        if args.session_dir is not None:
            logger.warning("--session-dir is ignored: a batch keeps no session on disk")
        settings = settings.model_copy(update={"session_dir": None})
    # Everything a bad argument can break is checked before the model loads (seconds to minutes).
    try:
        text_lines = _read_input(args.input_file)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"{PROG}: error: cannot read the input file {args.input_file!r}: {exc}\n")
    try:
        check_quantization_settings(settings)  # before a hub download
        settings = resolve_model_source(settings)  # a hub id: its snapshot, fetched before the input is served
    except StartupError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    if not Path(settings.model).is_dir():
        parser.exit(2, f"{PROG}: error: --model {settings.model!r} is not a directory (expected save_pretrained's output)\n")
    try:
        output = OutputFile(args.output_file)
    except OSError as exc:
        parser.exit(2, f"{PROG}: error: cannot write the output file {args.output_file!r}: {exc}\n")
    with BoundedInterrupt(output):
        return _run_to_the_end(settings, text_lines, output, max_concurrency, parser)


def _run_to_the_end(settings, text_lines: list[str], output: OutputFile, max_concurrency: int, parser) -> int:
    from retnet.extras import EXIT_INTERRUPTED

    try:
        status = asyncio.run(_run(settings, text_lines, output, max_concurrency, parser))
        output.close()
        return status
    except OutputError as exc:
        # One line, not a traceback; stdout pointed at /dev/null so that Python's own flush at exit does not fail
        # again (the text the failed write left in its buffer)
        if output.file is sys.stdout:
            to_devnull(sys.stdout)
        if isinstance(exc.error, BrokenPipeError):  # the reader went away (`-o - | head`)
            print(f"{PROG}: {BROKEN_PIPE}", file=sys.stderr)
        else:
            name = "to standard output" if output.path == "-" else f"the output file {output.path!r}"
            print(f"{PROG}: cannot write {name}: {exc.error.strerror or exc.error}; {exc.lost}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the lines written before it are kept, the others were not run to the end",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        output.close(quiet=True)


class BoundedInterrupt:
    """The block's Ctrl-C ends the process within :data:`INTERRUPTED_STOP_S`, whatever its timing. The first raises
    KeyboardInterrupt, as before (the requests cancelled, the engine stopped, the line saying what was kept); a
    second one, or that cleanup still running at the deadline, ends the process at once: the output flushed, a
    regular file cut back to its last complete line, status 130 (``os._exit``). A second Ctrl-C that cut asyncio's
    cleanup short left it undone: AnyIO's worker threads (FastAPI runs every request's API-key check there), not
    daemons, are only stopped by the event loop once its main task ends, and the interpreter waited for them at
    exit for good. Threads this block started that outlive an interrupted run end it so too, once the deadline passes.

    Installed only over Python's own handler or :func:`~retnet.extras.exits_on_ctrl_c`'s, in the main thread (a
    program's own handler, or SIGINT ignored in a background job, is left as it is)."""

    def __init__(self, output: OutputFile, stop_s: float | None = None):
        self.output, self.stop_s = output, INTERRUPTED_STOP_S if stop_s is None else stop_s
        self.previous = None
        self.interrupted, self.deadline = False, math.inf
        self.ended = threading.Event()  # the block is over: the watchdog has nothing to bound
        self.wake = threading.Event()  # the watchdog's: interrupted, or the block ended

    def __enter__(self) -> BoundedInterrupt:
        from retnet.extras import _record_sigint

        self.threads = set(threading.enumerate())
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            if current is _record_sigint or current is signal.default_int_handler:
                self.previous = current
                # Started now, not in the handler: a thread started there could wait on the lock that the code it
                # interrupted holds (threading's own, while the event loop starts a worker).
                threading.Thread(target=self._watch, name="retnet-run-batch-interrupt", daemon=True).start()
                signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self.interrupted:  # the interpreter would wait for these at exit: the watchdog bounds the wait
                current = threading.current_thread()
                for thread in threading.enumerate():
                    if thread not in self.threads and not thread.daemon and thread is not current:
                        thread.join()
        finally:
            self.ended.set()
            self.wake.set()
            if self.previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, self.previous)

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:
            self.stop_now("interrupted again")
        self.deadline, self.interrupted = time.monotonic() + self.stop_s, True
        self.wake.set()
        self.previous(signum, frame)  # (KeyboardInterrupt, exits_on_ctrl_c's record of the signal)

    def _watch(self) -> None:
        self.wake.wait()
        if not self.ended.is_set() and not self.ended.wait(max(0.0, self.deadline - time.monotonic())):
            self.stop_now(f"the interrupted run did not stop within {self.stop_s:g} s")

    def stop_now(self, why: str) -> None:
        """End the process with status 130, the output's complete lines kept."""
        from retnet.extras import EXIT_INTERRUPTED

        file = self.output.file
        # In a thread of its own, bounded: a flush can wait for good on the lock of a write the main thread is in
        # (a FIFO whose reader stopped reading), and from the handler, which interrupted that write, it raises.
        flushing = threading.Thread(target=_flush_all, args=(file,), daemon=True)
        flushing.start()
        flushing.join(1.0)
        kept = "what was written before it kept"  # (a pipe's last line may be cut short: nothing to take back)
        if file is not None and file is not sys.stdout:
            with contextlib.suppress(OSError, ValueError):
                if _cut_to_last_line(file.fileno(), self.output.path):
                    kept = "the complete lines written before it kept"
        with contextlib.suppress(OSError):
            os.write(2, f"\n{PROG}: {why}; stopped at once, {kept}\n".encode())
        os._exit(EXIT_INTERRUPTED)


def _flush_all(file: IO[str] | None) -> None:
    for stream in (file, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # (closed, a broken pipe, a reentrant call)
            if stream is not None:
                stream.flush()


def _cut_to_last_line(fd: int, path: str) -> bool:
    """Truncate the regular file ``fd`` (written, not read: ``path`` is opened to read it) after its last newline: a
    line whose write was cut short is no JSON. False where it is no regular file, or ``path`` is another one now."""
    written = os.fstat(fd)
    if not stat.S_ISREG(written.st_mode):
        return False
    reader = os.open(path, os.O_RDONLY)
    try:
        read = os.fstat(reader)
        if (read.st_dev, read.st_ino) != (written.st_dev, written.st_ino):  # (the path removed or replaced since)
            return False
        end = keep = read.st_size
        while end > 0:
            start = max(0, end - 65536)
            newline = os.pread(reader, end - start, start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = keep = start
    finally:
        os.close(reader)
    if keep < read.st_size:
        os.ftruncate(fd, keep)
    return True


class OutputFile:
    """``-o``: checked writable at once (a bad path exits 2 before the model loads), but a regular file is opened
    (truncated) only by :meth:`open`, once the engine is ready. Opened with "w" at start, a results file kept from an
    earlier run was emptied by a run that then stopped before writing a line: a --chat-template or
    --generation-config refused, a tokenizer that does not load, an engine that does not start. ``-`` is stdout; a
    path that is no regular file (a FIFO, /dev/stdout) is opened at once, as nothing of it can be lost (and a FIFO
    opened twice would give its reader an end of file between the two)."""

    def __init__(self, path: str):
        self.path, self.file = path, None
        if path == "-":
            if sys.stdout is None:  # (`>&-`: with no file here, open() made one named "-" and wrote the results there)
                raise OSError(errno.EBADF, "standard output is closed")
            self.file = sys.stdout
            return
        target = Path(path)
        existed = target.exists()
        if existed and not target.is_file():
            self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115  (closed by close())
            return
        if existed:  # the check: opened for writing as "w" will, truncating nothing (an append-only file fails)
            os.close(os.open(path, os.O_WRONLY))
            return
        created = Path(os.path.realpath(path))  # (a dangling link's target: what the check creates)
        with open(path, "a", encoding="utf-8"):
            pass
        created.unlink(missing_ok=True)  # gone again if the run stops before writing

    def open(self) -> IO[str]:
        if self.file is None:
            self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115  (closed by close())
        return self.file

    def close(self, quiet: bool = False) -> None:
        """Close the file (not stdout); an OSError of its last flush raises :class:`OutputError`, or with ``quiet``
        (the run already ending on an error: a failed write's text is still in the buffer) is dropped."""
        if self.file is None or self.file is sys.stdout or self.file.closed:
            return
        try:
            self.file.close()  # (the file is closed even when its flush fails)
        except OSError as exc:
            if not quiet:
                raise OutputError(exc, "its last lines may be lost") from exc


async def _run(settings, text_lines: list[str], output: OutputFile, max_concurrency: int, parser) -> int:
    from retnet.serve.app import create_app
    from retnet.serve.settings import StartupError

    try:
        app = create_app(settings)
    except StartupError as exc:  # --model, --generation-config, --chat-template: the message names the flag
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except (OSError, ValueError) as exc:  # the tokenizer did not load from --model
        parser.exit(2, f"{PROG}: error: cannot load {settings.model!r}: {exc}\n")
    engine = app.state.engine
    # The app's own lifespan: the engine starts here and is shut down (its thread joined) on the way out.
    async with app.router.lifespan_context(app):
        if not await asyncio.to_thread(engine.wait_ready, 600.0):
            print(f"{PROG}: the engine did not start: {engine.failure or 'timed out after 600 s'}", file=sys.stderr)
            return 1
        entries = parse_lines(text_lines, served_urls(app))
        try:
            out = output.open()
        except OSError as exc:  # removed or made read-only while the model loaded
            print(f"{PROG}: cannot write the output file {output.path!r}: {exc}", file=sys.stderr)
            return 2
        summary = await run_batch(app, entries, out, max_concurrency)
    print(summary.line(), file=sys.stderr)
    if engine.dead:  # lines after the failure were answered 503: the file was not processed
        print(f"{PROG}: {engine.dead}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
