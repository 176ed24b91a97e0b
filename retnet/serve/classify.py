"""Serving a classifier or reward model (a ``RetNetForSequenceClassification`` export) with vLLM's pooling API:
``POST /classify`` (``/v1/classify``) and ``POST /pooling``.

:class:`ClassifyEngine` owns the model on a thread of its own: the inputs of every request waiting are packed into
one row (``cu_seqlens``, one segment an input) of at most ``--prefill-token-budget`` tokens and scored by one
forward (an input longer than the budget runs alone); each input's score row reaches its request on the event
loop (``call_soon_threadsafe``). :class:`ClassifyServing` checks and tokenizes requests and shapes vLLM's
responses; ``/tokenize``, ``/detokenize`` and the model card are :class:`~retnet.serve.serving.OpenAIServing`'s.

A ``messages`` conversation is scored as the reward trainer scored it (``retnet-train --reward.enabled``): the
conversation before its last message rendered with the generation prompt, then the last message as the rest of
the rendered conversation (:func:`~retnet.tokenization.render_pair`, the trainer's own function), each
encoded on its own, then EOS. An ``input`` is scored as sent (vLLM's): nothing is appended to it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from retnet.serve.engine import _device, _dtype, _load_config
from retnet.serve.metrics import ServeMetrics
from retnet.serve.protocol import (
    APIError,
    ChatMessage,
    ModelCard,
    PromptType,
    RequestFields,
    Usage,
    _refuse_bool_number,
    random_id,
)
from retnet.serve.request_checks import TEMPLATE_CALL_ARGUMENTS, check_content_parts
from retnet.serve.sequence import EngineUnavailable, QueueFull
from retnet.serve.serving import OpenAIServing, _size
from retnet.serve.settings import ServeSettings
from retnet.serve.tools import template_message
from retnet.tokenization import render_pair

logger = logging.getLogger("retnet.serve")

POOLING_ROUTES = ("/classify", "/v1/classify", "/pooling")
# use_activation and vLLM's deprecated names of it (its get_use_activation reads softmax, then activation).
ACTIVATION_FIELDS = ("use_activation", "softmax", "activation")
# vLLM's chat-form options (its ClassificationChatRequest): they shape how `messages` are templated.
CHAT_OPTIONS = ("add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs")


# ----------------------------------------------------------------------------------------------------------
# Requests and responses (vLLM's ClassificationRequest / PoolingRequest and their responses)
# ----------------------------------------------------------------------------------------------------------
class ClassifyRequest(RequestFields):
    """``/classify``'s body: ``input`` (completions' ``prompt`` union) or ``messages`` (one conversation), not both.
    Unknown fields (vLLM's ``priority``, ``request_id``, ...) are accepted and ignored, as on every route; those
    of vLLM's that change the output are declared, so that they are read or refused by name."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("truncate_prompt_tokens", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        return _refuse_bool_number(value)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _positive_or_minus_one(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise PydanticCustomError("invalid_value", "must be >= 1 (the last tokens kept), or -1 (up to "
                                      "--max-prompt-tokens)")
        return value

    model: str | None = None
    input: PromptType | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # None: true for `input`, false for `messages` (whose template writes the special tokens), as completions/chat.
    add_special_tokens: bool | None = None
    # -1: vLLM's "up to the model's length", here --max-prompt-tokens.
    truncate_prompt_tokens: int | None = None
    # None: the route's default (/classify: true, /pooling: false); see ClassifyEngine.activate. softmax and
    # activation: vLLM's deprecated names of it, read as it (_asked_activation).
    use_activation: bool | None = None
    softmax: bool | None = None
    activation: bool | None = None
    # vLLM's chat-form options, with `messages` only: the template's own variables are passed to it; the
    # others would template something the reward trainer never scored (an opened assistant turn, a request's own
    # template), so only their defaults are accepted (ClassifyServing._check_chat_options).
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    user: str | None = None  # accepted, not read


class PoolingRequest(ClassifyRequest):
    """``/pooling``'s body: ``/classify``'s, and vLLM's ``encoding_format`` (``base64``: the float32 bytes)."""

    encoding_format: Literal["float", "base64"] = "float"


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("classify"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassifyData]
    usage: Usage


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | str


class PoolingResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("pool"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[PoolingData]
    usage: Usage


# ----------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class PoolingInput:
    """One input waiting to be scored: its token ids, its place among its request's inputs, and the future (of
    ``loop``) its score row is set on."""

    ids: list[int]
    index: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class ClassifyEngine:
    """Owns the classifier and the thread that runs it; :meth:`score` is what requests call."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics, model=None):
        """``model``: a loaded classifier to serve instead of ``settings.model``'s (tests)."""
        self.settings, self.metrics, self.model = settings, metrics, model
        self.config = model.config if model is not None else _load_config(settings.model)
        self.vocab_size = int(self.config.vocab_size)
        self.num_labels = int(self.config.num_labels)
        id2label = self.config.id2label or {}
        self.labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.num_labels)]
        # What OpenAIServing's /tokenize, /detokenize and model card read of an engine: no LoRA adapter is served
        # here, and nothing is generated that could stop.
        self.adapters: dict = {}
        self.eos_ids: set[int] = set()
        self.cond = threading.Condition()
        self.waiting: deque[PoolingInput] = deque()  # guarded by cond
        # The batch taken off `waiting` and not yet settled (the model's thread alone): failed too if the thread dies.
        self.running: list[PoolingInput] = []
        self.requests = 0  # requests being answered (queued or running); guarded by cond
        self.accepting, self.stopping, self.ready = True, False, False
        self.dead: str | None = None
        self.thread: threading.Thread | None = None
        self.device = torch.device("cpu")

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; it loads the model (``/health`` is 503 until then)."""
        self.thread = threading.Thread(target=self._run, name="retnet-classifier", daemon=True)
        self.thread.start()

    @property
    def healthy(self) -> bool:
        return self.ready and self.dead is None and not self.stopping

    def wait_ready(self, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready and self.dead is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ready and self.dead is None

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop accepting requests, give those being answered up to ``grace_s``, then fail the rest (503)."""
        with self.cond:
            self.accepting = False
        deadline = time.monotonic() + grace_s
        while self.requests > 0 and time.monotonic() < deadline and self.dead is None:
            time.sleep(0.02)
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.metrics.engine_ready.set(0)

    # -- the API requests call (event-loop thread) ----------------------------------------------------------------
    async def score(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Each input's score row, ``[num_labels]`` fp32 on the CPU: the score head's raw output at its last token.

        Raises EngineUnavailable or QueueFull before anything is queued; APIError (500) when the forward that ran
        one of the inputs failed or scored it inf/NaN. Cancelled (the client left), the inputs not yet run are
        skipped."""
        loop = asyncio.get_running_loop()
        items = [PoolingInput(ids, index, loop.create_future(), loop) for index, ids in enumerate(inputs)]
        with self.cond:
            # Checked under the lock: a request queued after the thread's last look at the queue is never answered.
            if not self.healthy or not self.accepting:
                raise EngineUnavailable(self.dead or "the engine is not ready")
            limit = max(1, self.settings.max_queue)
            if self.requests >= limit:
                raise QueueFull(f"{self.requests} requests in the classifier; the limit is {limit} (--max-queue)")
            self.requests += 1
            self.waiting.extend(items)
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify_all()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:  # those still queued (another input failed, or the caller was cancelled) are skipped
                item.future.cancel()
            with self.cond:
                self.requests -= 1

    def activate(self, rows: torch.Tensor) -> torch.Tensor:
        """vLLM's classification activation of score rows ``[N, num_labels]``: the config's ``problem_type`` as
        transformers' losses read it (regression: none; multi-label: sigmoid per label), else softmax over the
        labels when there are several and sigmoid for a single one (a reward model's probability)."""
        problem = getattr(self.config, "problem_type", None)
        if problem == "regression":
            return rows
        if problem == "multi_label_classification" or rows.shape[-1] == 1:
            return torch.sigmoid(rows)
        return torch.softmax(rows, dim=-1)

    # -- the model's thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._load()
            self.ready = True
            self.metrics.engine_ready.set(1)
            logger.info("classifier ready on %s (%d labels)", self.device, self.num_labels)
            with torch.inference_mode():
                while (batch := self._next_batch()) is not None:
                    self.running = batch
                    if batch:
                        self._forward(batch)
                    self.running = []
            self._fail_waiting(503, "the server is shutting down", "unavailable")
        except Exception as exc:  # the model did not load (or a bug): /health turns 503, requests are answered
            logger.exception("classifier engine failed")
            self.dead = f"engine failed: {type(exc).__name__}: {exc}"
            self.metrics.engine_ready.set(0)
            # The batch in hand too: its requests wait on it, and nothing else would settle it. Those of its
            # futures already settled keep their results (_set_results skips them).
            failure = (503, self.dead, "engine_failure")
            self._settle(self.running, [failure] * len(self.running))
            self.running = []
            self._fail_waiting(*failure)

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification

        self.device = _device(self.settings)
        if self.model is None:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.settings.model, dtype=getattr(torch, _dtype(self.settings, self.device)))
        self.model = self.model.to(self.device).eval()

    def _next_batch(self) -> list[PoolingInput] | None:
        """The waiting inputs, in arrival order, whose tokens fit the budget together (an input over it alone);
        None once the engine stops."""
        budget = self.settings.prefill_token_budget
        with self.cond:
            while not self.waiting and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            batch, tokens = [], 0
            while self.waiting:
                item = self.waiting[0]
                if item.future.cancelled():  # its request stopped waiting for it
                    self.waiting.popleft()
                    continue
                if batch and tokens + len(item.ids) > budget:
                    break
                batch.append(self.waiting.popleft())
                tokens += len(item.ids)
            self.metrics.queue_depth.set(len(self.waiting))
        return batch

    def _forward(self, batch: list[PoolingInput]) -> None:
        """Score ``batch`` packed into one row. A forward that raises, or that does not answer one row of
        ``num_labels`` scores per input, fails this batch's requests alone (500 ``forward_failed``); an input
        scored inf or NaN fails its own request alone (500 ``non_finite_score``: JSON cannot carry the value)."""
        lengths = [len(item.ids) for item in batch]
        try:
            ids = torch.tensor([[token for item in batch for token in item.ids]], dtype=torch.long, device=self.device)
            cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.long, device=self.device)
            rows = self.model(input_ids=ids, cu_seqlens=cu_seqlens, use_cache=False).logits.float().cpu()
            # Checked here: an input without its row would never be answered, its request waiting forever.
            if tuple(rows.shape) != (len(batch), self.num_labels):
                raise RuntimeError(f"it returned scores of shape {tuple(rows.shape)} for {len(batch)} inputs of "
                                   f"{self.num_labels} labels (expected one row per input)")
            finite = torch.isfinite(rows).all(dim=-1).tolist()
        except Exception as exc:
            logger.exception("classifier forward failed (%d inputs, %d tokens)", len(batch), sum(lengths))
            message = f"the classifier's forward failed: {type(exc).__name__}: {exc}"
            self._settle(batch, [(500, message, "forward_failed")] * len(batch))
            return
        self.metrics.pooling_inputs.inc(len(batch))
        self.metrics.pooling_tokens.inc(sum(lengths))
        self.metrics.pooling_batch.observe(len(batch))
        if not all(finite):
            logger.warning("the classifier scored %d of %d inputs inf or NaN", finite.count(False), len(batch))
        self._settle(batch, [row if ok else (500, f"the model produced a non-finite score (inf or NaN) for input "
                                             f"{item.index} of the request, which JSON cannot carry: a float16 "
                                             "overflow, say (try --dtype float32), or diverged weights",
                                             "non_finite_score")
                             for item, row, ok in zip(batch, rows, finite, strict=True)])

    def _fail_waiting(self, status: int, message: str, code: str) -> None:
        with self.cond:
            batch = list(self.waiting)
            self.waiting.clear()
            self.metrics.queue_depth.set(0)
        self._settle(batch, [(status, message, code)] * len(batch))

    @staticmethod
    def _settle(batch: list[PoolingInput], outcomes: list[torch.Tensor | tuple[int, str, str]]) -> None:
        """Hand each input its outcome, on its event loop: its score row, or a failure (status, message, code)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(item.loop, []).append((item.future, outcome))
        for loop, results in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for these any more
                loop.call_soon_threadsafe(_set_results, results)


def _set_results(results: list[tuple[asyncio.Future, torch.Tensor | tuple[int, str, str]]]) -> None:
    for future, outcome in results:
        if future.done():  # cancelled (its request is gone), or settled before the engine failed
            continue
        if isinstance(outcome, tuple):  # one error a request: each raises its own
            status, message, code = outcome
            future.set_exception(APIError(status, message, None, code, type="server_error"))
        else:
            future.set_result(outcome)


# ----------------------------------------------------------------------------------------------------------
# The handlers
# ----------------------------------------------------------------------------------------------------------
class ClassifyServing(OpenAIServing):
    """``/classify`` and ``/pooling`` over a :class:`ClassifyEngine`; the model card, ``/tokenize`` and
    ``/detokenize`` are :class:`OpenAIServing`'s (its generation handlers are not routed in this mode)."""

    engine: ClassifyEngine

    def __init__(self, settings: ServeSettings, engine: ClassifyEngine, tokenizer, metrics: ServeMetrics,
                 chat_template: str | None = None):
        """``chat_template``: ``--chat-template``'s, used for ``messages`` instead of the tokenizer's."""
        super().__init__(settings, engine, tokenizer, metrics, None, chat_template)

    def _card(self, adapter=None) -> ModelCard:
        # Nothing is generated: a request spans its input alone.
        limit = self.settings.max_prompt_tokens
        return ModelCard(id=self.model_name, root=self.settings.model, created=self.created, max_model_len=limit,
                         max_prompt_tokens=limit, max_completion_tokens=0)

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """vLLM's ``/classify``: per input the label of the highest score, and the scores after the activation
        (``use_activation``, default true; false: the raw scores)."""
        activation = _asked_activation(request)
        rows, usage = await self._score(request)
        if activation is not False:
            rows = self.engine.activate(rows)
        data = [ClassifyData(index=i, label=self.engine.labels[int(row.argmax())], probs=row.tolist(),
                             num_classes=len(row)) for i, row in enumerate(rows)]
        return ClassifyResponse(model=self.model_name, data=data, usage=usage)

    async def pooling(self, request: PoolingRequest) -> PoolingResponse:
        """vLLM's ``/pooling``: per input the score head's output, raw unless ``use_activation`` is true (the
        default is false here: a reward model's reward is its raw score, as the trainer's loss reads it)."""
        activation = _asked_activation(request)
        rows, usage = await self._score(request)
        if activation:
            rows = self.engine.activate(rows)
        if request.encoding_format == "base64":  # vLLM's: the float32 values' bytes, little-endian
            values = [base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode() for row in rows.numpy()]
        else:
            values = rows.tolist()
        return PoolingResponse(model=self.model_name, data=[PoolingData(index=i, data=v) for i, v in enumerate(values)],
                               usage=usage)

    async def _score(self, request: ClassifyRequest) -> tuple[torch.Tensor, Usage]:
        """The score rows ``[N, num_labels]`` of the request's inputs, and its usage."""
        self._check_model(request.model)
        if request.input is not None and request.messages is not None:
            raise APIError(400, "send input (texts or token ids) or messages (one conversation), not both", "messages")
        if request.input is None and request.messages is None:
            raise APIError(400, "the request needs input (texts or token ids) or messages (one conversation)", "input",
                           "missing")
        truncate = request.truncate_prompt_tokens
        if truncate is not None and truncate > self.settings.max_prompt_tokens:
            raise APIError(400, f"truncate_prompt_tokens must be <= {self.settings.max_prompt_tokens} (the most "
                           f"tokens this server scores in one input), or -1; got {truncate}", "truncate_prompt_tokens",
                           "invalid_value")
        _check_chat_options(request)
        if request.messages is not None:
            check_content_parts(request)
            size = _size([m.text() for m in request.messages])
        else:
            self._check_input_count(request.input)
            size = _size(request.input)
        inputs = await self._tokenizing(size, self._input_ids, request)
        try:
            rows = await self.engine.score(inputs)
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is busy ({exc}); retry later", None, "queue_full",
                           type="rate_limit_error", headers={"Retry-After": str(self.settings.retry_after_s)}) from exc
        except EngineUnavailable as exc:
            self.metrics.rejected.labels("unavailable").inc()
            raise APIError(503, f"the server cannot take requests now: {exc}", None, "unavailable",
                           type="server_error", headers={"Retry-After": str(self.settings.retry_after_s)}) from exc
        self.metrics.model_requests.labels(model_name=self.model_name).inc()
        tokens = sum(len(ids) for ids in inputs)
        return torch.stack(rows), Usage(prompt_tokens=tokens, total_tokens=tokens)

    def _check_input_count(self, value) -> None:
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return  # one input
        if not value:
            raise APIError(400, "input must not be empty", "input", "empty_input")
        if len(value) > self.settings.max_pooling_inputs:
            raise APIError(400, f"at most {self.settings.max_pooling_inputs} inputs per request (--max-pooling-inputs); "
                           f"got {len(value)}", "input", "too_many_inputs")

    def _input_ids(self, request: ClassifyRequest) -> list[list[int]]:
        """Each input's token ids, checked (takes the tokenizer's lock)."""
        truncate = request.truncate_prompt_tokens
        if truncate == -1:  # vLLM's: cut to the model's length (max_model_len), here --max-prompt-tokens
            truncate = self.settings.max_prompt_tokens
        if request.messages is not None:
            return [self._checked(self._conversation_ids(request), "messages", truncate)]
        value = request.input
        add_special = request.add_special_tokens is not False
        if isinstance(value, str):
            return [self._checked(self._encode(value, add_special), "input", truncate)]
        if isinstance(value[0], int):
            return [self._checked(list(value), "input", truncate)]
        return [self._checked(self._encode(item, add_special) if isinstance(item, str) else list(item), "input",
                              truncate, index) for index, item in enumerate(value)]

    def _checked(self, ids: list[int], param: str, truncate: int | None, index: int | None = None) -> list[int]:
        """``ids`` cut to their last ``truncate`` tokens (vLLM's truncate_prompt_tokens), refused when empty, over
        --max-prompt-tokens or outside the vocabulary; ``index``: the input's place in a list, for the message."""
        where = param if index is None else f"{param}[{index}]"
        if truncate is not None:
            ids = ids[-truncate:]
        if not ids:
            raise APIError(400, f"{where} has no tokens to score (an empty text?)", param, "empty_input")
        if len(ids) > self.settings.max_prompt_tokens:
            raise APIError(400, f"{where} has {len(ids)} tokens; this server accepts at most "
                           f"{self.settings.max_prompt_tokens} (truncate_prompt_tokens keeps the last ones)", param,
                           "context_length_exceeded")
        bad = next((t for t in ids if t >= self.engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{where}: token id {bad} is out of the vocabulary (size {self.engine.vocab_size})",
                           param, "invalid_token_id")
        return ids

    def _conversation_ids(self, request: ClassifyRequest) -> list[int]:
        """The tokens the reward trainer scores for ``messages`` (see the module's docstring): a conversation that
        ends with an assistant message after others is the pair (its history, that message); any other is rendered
        whole, no generation prompt. EOS follows, as in training. ``chat_template_kwargs`` reach the template."""
        messages = [template_message(m) for m in request.messages]
        # _check_chat_options refused their other values: the templating's own arguments are render_pair's.
        variables = {name: value for name, value in (request.chat_template_kwargs or {}).items()
                     if name not in ("add_generation_prompt", "continue_final_message")}
        render = functools.partial(self.tokenizer.apply_chat_template, tokenize=False,
                                   chat_template=self.chat_template, **variables)
        try:
            with self.tokenizer_lock:
                if len(messages) > 1 and messages[-1]["role"] == "assistant":
                    pieces = render_pair(messages[:-1], [messages[-1:]], render)
                else:
                    pieces = [render(messages, add_generation_prompt=False)]
                # Encoded apart, as the trainer does: a token across the prompt's end would differ from its.
                ids = self.tokenizer.encode(pieces[0], add_special_tokens=bool(request.add_special_tokens))
                for piece in pieces[1:]:
                    ids += self.tokenizer.encode(piece, add_special_tokens=False)
        except Exception as exc:  # a template that rejects these messages (roles out of order, ...)
            raise APIError(400, f"messages: the chat template cannot render the conversation: {exc}",
                           "messages") from exc
        eos = self.tokenizer.eos_token_id
        return ids if eos is None else [*ids, eos]


def _asked_activation(request: ClassifyRequest) -> bool | None:
    """The request's ``use_activation``, or vLLM's deprecated ``softmax`` / ``activation`` spelling of it (None:
    the route's default). Given together they must agree: a 400 names the one that does not."""
    given = [(name, value) for name in ACTIVATION_FIELDS if (value := getattr(request, name)) is not None]
    for name, value in given[1:]:
        if value != given[0][1]:
            first, first_value = given[0]
            raise APIError(400, f"{name} ({json.dumps(value)}) contradicts {first} ({json.dumps(first_value)}): "
                           "softmax and activation are vLLM's deprecated names of use_activation; send one",
                           name, "invalid_value")
    return given[0][1] if given else None


def _check_chat_options(request: ClassifyRequest) -> None:
    """vLLM's chat-form options: with ``messages`` only; ``chat_template_kwargs`` are the template's variables;
    ``add_generation_prompt``, ``continue_final_message`` (in ``chat_template_kwargs`` too, where vLLM reads them
    as well) and ``chat_template`` only at their defaults, as they would score other tokens than the reward
    trainer did (see the module's docstring) or run a client's Jinja on the server."""
    if request.messages is None:
        given = next((name for name in CHAT_OPTIONS if getattr(request, name) is not None), None)
        if given is not None:
            raise APIError(400, f"{given} applies to messages (one conversation) only; this request sends input",
                           given, "invalid_value")
        return
    if request.chat_template is not None:
        raise APIError(400, "chat_template: a template sent with the request is not supported (the server uses "
                       "the model's, or the one it was started with: --chat-template)", "chat_template",
                       "unsupported_parameter")
    variables = request.chat_template_kwargs or {}
    reserved = sorted(TEMPLATE_CALL_ARGUMENTS & set(variables))
    if reserved:
        raise APIError(400, f"chat_template_kwargs: {reserved[0]!r} is not a template variable but an argument of "
                       "the templating", "chat_template_kwargs", "invalid_value")
    for name in ("add_generation_prompt", "continue_final_message"):
        value = variables.get(name, getattr(request, name))
        if value:  # as a template reads it
            where = name if name not in variables else f"chat_template_kwargs.{name}"
            raise APIError(400, f"{where}: not supported (only false or null is accepted; got {json.dumps(value)}): "
                           "a conversation is scored as the reward trainer scored it, up to its last message and "
                           "EOS", where, "unsupported_parameter")


__all__ = ["POOLING_ROUTES", "ClassifyEngine", "ClassifyRequest", "ClassifyResponse", "ClassifyServing",
           "PoolingRequest", "PoolingResponse"]
