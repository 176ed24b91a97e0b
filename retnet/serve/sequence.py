"""A request as the engine holds it and answers it (as vLLM's ``sequence.py`` and ``outputs.py``).

The routes' side: the :class:`RequestHandle` a request's outputs arrive on (:func:`emit_all` delivers them from
the scheduler thread), what arrives (:class:`SeqOutput` with its :class:`TokenLogprob` entries, or an
:class:`EngineFailure`), and the errors :meth:`~retnet.serve.engine.Engine.submit` raises. The scheduler's side:
its records of a request's prompt (:class:`Group`, while it waits and is prefilled) and of each choice
(:class:`Sequence`, while it decodes or, preempted, waits to decode again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from retnet.model import RetNetCache
from retnet.serve.detokenize import IncrementalDetokenizer, StopStrings
from retnet.serve.sampling import RowSampler, SamplingParams
from retnet.serve.speculative import DraftState, NgramIndex, PromptNgrams
from retnet.serve.state_cache import Session


class EngineUnavailable(Exception):
    """The engine is loading, stopping or dead."""


class QueueFull(Exception):
    """More sequences than ``max_running + max_queue`` would be in the server."""


class ModelThread:
    """The lifecycle both engines share (the generation :class:`~retnet.serve.engine.Engine` and the
    :class:`~retnet.serve.pooling.PoolingEngine`): one thread owns the model, ``healthy`` from its load until it dies
    or stops. A subclass sets ``cond``, ``accepting``, ``stopping``, ``ready``, ``failure``, ``thread`` and
    ``metrics``, and says what it has in flight."""

    # Why the model's thread died (``RuntimeError: ...``), None while it lives: the bare cause, which the commands
    # put in their own sentence (``--model DIR did not load: ...``); ``dead`` is the one form requests and /health
    # give (the commands stripped its prefix, and retnet-run-batch printed "did not start: engine failed: ...").
    failure: str | None = None

    @property
    def dead(self) -> str | None:
        """What a request the dead engine fails and /health say: ``engine failed: <failure>``; None while it lives."""
        return None if self.failure is None else f"engine failed: {self.failure}"

    def _in_flight(self) -> int:
        """Work admitted and not finished (read without the lock: a stale count only ends the wait a poll later)."""
        raise NotImplementedError

    def _after_stop(self) -> None:
        """Run once the model's thread has stopped."""

    @property
    def healthy(self) -> bool:
        # Not while a shutdown drains it either: it takes no new work then, and a load balancer must hear so.
        return self.ready and self.failure is None and not self.stopping and self.accepting

    def unavailable(self) -> str:
        """Why the engine takes no work now (``healthy`` is false): what the client's 503 says."""
        if self.dead is not None:
            return self.dead
        return "the server is shutting down" if self.stopping or not self.accepting else "the engine is not ready"

    def wait_ready(self, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready and self.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ready and self.failure is None

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop accepting work, let what is in flight finish for up to ``grace_s``, then stop the thread (which
        cancels or fails the rest)."""
        self.stop(grace_s)
        self._after_stop()
        self.metrics.engine_ready.set(0)

    def stop(self, grace_s: float = 0.0) -> None:
        """:meth:`shutdown` but for ``_after_stop``: the session writer stays open for the requests still
        answering (a refused one releases its session)."""
        with self.cond:
            self.accepting = False
        deadline = time.monotonic() + grace_s
        while self._in_flight() > 0 and time.monotonic() < deadline and self.failure is None:
            time.sleep(0.02)
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)


# ----------------------------------------------------------------------------------------------------------
# What the engine sends back
# ----------------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class TokenLogprob:
    """One token's logprob. ``token`` is its text, or a ``bytes:\\x..`` label when it holds part of a character;
    ``token_bytes`` are the bytes it stands for either way."""

    token_id: int
    token: str
    token_bytes: bytes
    logprob: float | None
    top: list[TokenLogprob] = field(default_factory=list)
    rank: int | None = None  # a prompt token's: 1 + the tokens more likely there (vLLM's prompt_logprobs)


@dataclass(slots=True)
class SeqOutput:
    """New output of one choice: text safe to show, the tokens sampled, and ``finish_reason`` (with
    ``stop_reason``) on the last."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    # The prompt's scores (SamplingParams.prompt_logprobs), one entry a prompt token, on each choice's first output.
    prompt_logprobs: list[TokenLogprob] | None = None
    # vLLM's CompletionOutput.stop_reason, on the last output: the stop string that ended the choice, or the
    # stop_token_ids token it sampled; None when it ended otherwise (its EOS, its length, a grammar's end, abort).
    stop_reason: int | str | None = None


@dataclass(slots=True)
class EngineFailure:
    """The request cannot be answered: the engine died (the default), or only this request failed (an evicted
    LoRA adapter that could not be read again), answered with ``status`` and ``code``."""

    message: str
    status: int = 503
    code: str = "engine_failure"
    param: str | None = None


class RequestHandle:
    """One API request: its prompts × n choices, and the queue their outputs arrive on."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None, num_choices: int):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.num_choices = num_choices
        self.arrival = time.perf_counter()
        self.cancelled = False
        self.failed = False  # an EngineFailure of its own was sent (Engine._request_failed): one is enough
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.session_tokens = 0

    def cancel(self) -> None:
        """Stop generating (the client left); the scheduler drops the sequences at its next iteration."""
        self.cancelled = True

    def emit(self, item) -> None:
        emit_all([(self, item)])


def emit_all(deliveries: list[tuple[RequestHandle, Any]]) -> None:
    """Queue each ``(handle, item)`` on its handle's event loop, with one wake-up per loop: every
    ``call_soon_threadsafe`` writes to the loop's self-pipe, which a decode step would otherwise do once per
    running request (~50 µs each on CPU)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
    for handle, item in deliveries:
        by_loop.setdefault(handle.loop, []).append((handle.queue, item))
    for loop, items in by_loop.items():
        # RuntimeError: the event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


# ----------------------------------------------------------------------------------------------------------
# Scheduler bookkeeping
# ----------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Group:
    """One prompt of a request and its ``n`` choices, while it waits and is prefilled."""

    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    first_index: int
    session_id: str | None = None
    session: Session | None = None
    adapter: int = 0  # the LoRA adapter's slot (LoraAdapter.slot); 0: the base model
    prefix_hint: int | None = None  # a token offset worth caching the state at (the chat's history)
    # The prompt token that opens its echoed text, where a SentencePiece decoder drops the token's leading space;
    # None: the first one decoding does not skip (the text was the client's, a BOS the tokenizer adds not in it).
    text_start: int | None = None
    priority: int = 0  # --scheduling-policy priority: lower is served earlier
    order: int = 0  # when it arrived, counted by the engine: breaks priority ties (perf_counter values may tie)
    leaves_pending: bool = False  # continues its session without feeding the session's pending token first
    inputs: list[int] = field(default_factory=list)  # tokens to feed from the starting state
    pos: int = 0
    cache: RetNetCache | None = None
    last_logits: torch.Tensor | None = None
    started: bool = False
    cacheable: bool = True  # False when the state continues a session: its tokens are not a prompt prefix
    continues: bool = False  # True when it continues its session's saved state
    prompt_lp: list[TokenLogprob] = field(default_factory=list)
    # --speculative-config ngram: the n-grams of ``inputs``, indexed once for its n choices (at the first to draft).
    ngrams: PromptNgrams | None = None

    @property
    def rank(self) -> tuple[int, int]:
        """Its place in line under --scheduling-policy priority: the lower, the sooner it is served."""
        return self.priority, self.order

    @property
    def choice_indices(self) -> range:
        """The response's choice indices this prompt's ``n`` choices take."""
        return range(self.first_index, self.first_index + self.n)


@dataclass(eq=False)
class Sequence:
    group: Group
    index: int
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stops: StopStrings
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    t_last: float = 0.0
    # Nothing but skipped tokens decoded before the next token: it opens the text, where a SentencePiece
    # decoder drops its leading space (TokenBytes.start).
    at_start: bool = False
    ngrams: NgramIndex | None = None  # --speculative-config: its prompt + tokens' n-grams (made at its first step)
    draft_state: DraftState | None = None  # a draft model's state of it (made at its first step with room for drafts)
    # The last ``lag`` tokens are not in its batch row's state yet: the next step feeds them. 1 (the token last
    # sampled) but after a speculative step that refused a draft, whose state is the one from before its drafts
    # (at most k + 1 tokens back: see Engine._speculative_step).
    lag: int = 1
    # The text of what it generated that its output leaves out at its end (the stop token's, the stop string and
    # what followed it in its token): held by a session's state all the same (see OpenAIServing._closing).
    hidden_end: str = ""

    @property
    def rank(self) -> tuple[int, int, int]:
        """Its group's rank, then its choice index: the preemption order of a request's ``n`` choices."""
        return self.group.priority, self.group.order, self.index

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.group.handle.cancelled
