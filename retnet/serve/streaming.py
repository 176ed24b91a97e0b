"""An engine request's outputs as the HTTP side takes them: collected whole, or streamed as SSE (``data: {json}``
events ending ``data: [DONE]``); either way a client that leaves cancels the work, and a request the engine could
not answer becomes an :class:`~retnet.serve.protocol.APIError`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from retnet.serve.protocol import APIError
from retnet.serve.sequence import EngineFailure, RequestHandle, SeqOutput

logger = logging.getLogger("retnet.serve")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.5
T = TypeVar("T")


# Characters that JSON leaves raw but str.splitlines() breaks a line at: clients that read an SSE stream line by
# line with it (httpx's iter_lines, which the demo client uses; requests' with decode_unicode) would cut an event
# whose text holds one, and fail on half a JSON document. Escaped, the JSON reads back the same.
_LINE_BREAKERS = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def sse(data: dict | str, event: str | None = None) -> str:
    """One SSE event carrying ``data`` (a dict as compact JSON, a string as it is); ``event``: its ``event:`` line
    (the Anthropic and Responses streams name their events; OpenAI's chat and completion streams do not)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in _LINE_BREAKERS:
        if char in payload:
            payload = payload.replace(char, escaped)
    return f"data: {payload}\n\n" if event is None else f"event: {event}\ndata: {payload}\n\n"


async def stream_outputs(handle: RequestHandle) -> AsyncIterator[SeqOutput]:
    """``handle``'s outputs as they arrive, until every choice has finished; an engine failure raises."""
    remaining = handle.num_choices
    while remaining:
        item = await handle.queue.get()
        if isinstance(item, EngineFailure):
            raise _failure_error(item)
        for out in item:
            if out.finish_reason is not None:
                remaining -= 1
            yield out


async def collect_outputs(handle: RequestHandle, raw: Request) -> list[list[SeqOutput]]:
    """All outputs per choice. A client that goes away meanwhile cancels the work, and the engine's answer
    decides the outcome: 499 if it cancelled a choice (its session left as it was), the whole response if
    every choice had already finished (its session saved, whether or not anyone reads the response)."""
    per_choice: list[list[SeqOutput]] = [[] for _ in range(handle.num_choices)]
    remaining = handle.num_choices
    checked = time.monotonic()
    gone = False
    try:
        while remaining:
            try:
                item = await asyncio.wait_for(handle.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            if isinstance(item, EngineFailure):
                raise _failure_error(item)
            for out in item or ():
                per_choice[out.index].append(out)
                remaining -= out.finish_reason is not None
            # Checked by the clock, not only when the queue is idle: a running request gets outputs
            # every decode step, and a long one would otherwise run to max_tokens for nobody.
            if remaining and not gone and time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await raw.is_disconnected():
                    # Not a 499 yet: the engine may have finished (and saved the session) already, its
                    # last outputs still on their way. Every choice ends either way (abort or finished).
                    gone = True
                    handle.cancel()
    finally:
        if remaining:
            handle.cancel()
    if any(seq and seq[-1].finish_reason == "abort" for seq in per_choice):
        raise APIError(499, "client closed the request", None, "client_closed")
    return per_choice


async def unless_disconnected(work: Awaitable[T], raw: Request) -> T:
    """``work``'s result, unless its client goes away first: then the work is cancelled (a pooling request's inputs
    not yet run are skipped, its place in the queue freed) and the answer is 499. The server does not cancel a
    handler whose client hung up: without this the inputs would be run for nobody."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await raw.is_disconnected():
                raise APIError(499, "client closed the request", None, "client_closed")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its cleanup (the queue's count) done before the answer leaves
        if not task.cancelled():
            task.exception()  # retrieved: a failure after the client left is nobody's to report


async def until_failure(events: AsyncIterator[str], handle: RequestHandle) -> AsyncIterator[str | APIError]:
    """``events``, then the :class:`APIError` that ended them, if one did, for the stream to send in its API's error
    event: the engine's failure mid-stream, or the 500 a whole answer gets for a bug of ours while they are built (the
    headers are sent: a cut connection would be all the client saw), logged, and the request cancelled (its choices
    may still be running)."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield exc
    except Exception as exc:
        logger.exception("unhandled error in a stream")
        handle.cancel()
        yield APIError(500, f"internal error ({type(exc).__name__})", None, "internal_error")


def sse_response(chunks: AsyncIterator[str], handle: RequestHandle) -> StreamingResponse:
    """The SSE response of ``chunks`` (events already), ending ``data: [DONE]``; an engine failure mid-stream is
    sent as an error event before it, and so is a bug while the chunks are built (the 500 a whole answer gets)."""
    async def body() -> AsyncIterator[str]:
        async for chunk in until_failure(chunks, handle):
            yield sse(chunk.body()) if isinstance(chunk, APIError) else chunk  # (an error event, then the end)
        response.finished = True  # every choice has ended (or was cancelled above): nothing left to cancel
        yield sse("[DONE]")

    response = EngineStreamingResponse(body(), handle, media_type="text/event-stream", headers=SSE_HEADERS)
    return response


class EngineStreamingResponse(StreamingResponse):
    """An SSE response that cancels its request unless the whole body was sent. The body generator's own
    ``finally`` is not enough: a client gone before (or while) the headers are sent fails the response
    before the body is ever started, and a generator never started runs no ``finally``; the request
    would then generate to ``max_tokens`` for nobody, holding its slot."""

    def __init__(self, content: AsyncIterator[str], handle: RequestHandle, **kwargs):
        super().__init__(content, **kwargs)
        self.handle = handle
        self.finished = False  # set by the body once every choice has ended

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Also when __call__ returned: before ASGI 2.4 a disconnect ends the response without an error.
            if not self.finished:  # the client left (or the server is cancelling us): free the slot
                self.handle.cancel()
            # Close the body now (not when collected), so the generators under it end here.
            with contextlib.suppress(RuntimeError):
                await self.body_iterator.aclose()


def event_stream(events: AsyncIterator[str], handle: RequestHandle) -> EngineStreamingResponse:
    """SSE of ``events`` (the Responses API's and Anthropic's Messages'); the engine's work is cancelled unless the
    whole stream was sent (the chat stream's rule: a client that leaves frees its slot)."""

    async def body():
        async for event in events:
            yield event
        response.finished = True

    response = EngineStreamingResponse(body(), handle, media_type="text/event-stream", headers=SSE_HEADERS)
    return response


def _failure_error(failure: EngineFailure) -> APIError:
    """The error a request the engine could not answer gets: 503 when the engine died, else the failure's own
    (an evicted LoRA adapter that could not be read again: 500; a grammar that failed while generating: 400, an
    invalid_request_error as every 4xx)."""
    return APIError(failure.status, failure.message, failure.param, failure.code)
