"""The pooling engine: one model thread that packs the inputs of every waiting request into one ``cu_seqlens``
forward and hands each input one pooled row. What a row is depends on the pooler:

- :class:`ScorePooler`: a classifier's or reward model's score head at each input's last token (``/classify``,
  ``/pooling`` of a ``RetNetForSequenceClassification`` export);
- :class:`EmbedPooler`: the backbone's final-norm hidden states, at each input's last token (LAST) or averaged over
  it (MEAN), in fp32 (``--convert embed``: ``/v1/embeddings``, ``/pooling``); the handler L2-normalizes them or
  not, as ``--pooler-config`` or the request says (:meth:`EmbedPooler.activate`).

:class:`PoolingEngine` owns the model on a thread of its own: the waiting inputs are packed into one row (one
segment an input) of at most ``--prefill-token-budget`` tokens (an input longer than the budget runs alone), taken
round-robin across the waiting requests so that a request of many inputs does not hold back those behind it (under
``--scheduling-policy priority`` the requests of the best priority first, round-robin among them); each input's row
reaches its request on the event loop (``call_soon_threadsafe``). With xPos an input longer than one packed frame
(:func:`~retnet.model.modeling_retnet.xpos_span` at ``XPOS_PACKED_MAX_GROWTH``) runs alone and unpacked, in the
model's own frames: packed, the model refuses it, and with it every input of its forward. The handlers are in
:mod:`retnet.serve.classify`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span
from retnet.model.quantization import quantize_model
from retnet.serve.engine import _device, _dtype, _load_config, mark_ready
from retnet.serve.metrics import ServeMetrics
from retnet.serve.protocol import APIError
from retnet.serve.sequence import EngineUnavailable, ModelThread, QueueFull
from retnet.serve.settings import ServeSettings, json_object_setting

logger = logging.getLogger("retnet.serve")

# Weights of the heads an embedding backbone leaves behind: an LM's (untied) lm_head, a classifier's score.
HEAD_PREFIXES = ("lm_head.", "score.")


# --pooler-config (settings.py reads it through parse_pooler_config).
POOLER_DEFAULTS: dict[str, Any] = {"pooling_type": "LAST", "normalize": True}
# The pooling types served. vLLM's others are not: a causal model's first token has read nothing else (CLS), and
# per-token (ALL) or step outputs are no one embedding of the input.
POOLING_TYPES = ("LAST", "MEAN")


def parse_pooler_config(value) -> dict[str, Any] | None:
    """``--pooler-config`` (JSON text or a dict) checked: ``pooling_type`` LAST or MEAN (any case), ``normalize`` a
    boolean. None (the defaults) for empty, ``none``, null, ``{}`` or fields all null: any of them means the
    defaults, so it is accepted without ``--convert embed`` too. Errors name the flag, the field and the value
    received."""
    where = "pooler_config (--pooler-config)"
    value = json_object_setting(value, where, tuple(POOLER_DEFAULTS))
    if value is None:
        return None
    out = {}
    if value.get("pooling_type") is not None:
        kind = value["pooling_type"]
        if not isinstance(kind, str) or kind.upper() not in POOLING_TYPES:
            raise ValueError(f"{where}: pooling_type must be one of {', '.join(POOLING_TYPES)} (a causal model's CLS "
                             f"token has read only itself); got {json.dumps(kind)}")
        out["pooling_type"] = kind.upper()
    if value.get("normalize") is not None:
        if not isinstance(value["normalize"], bool):
            raise ValueError(f"{where}: normalize must be true or false; got {json.dumps(value['normalize'])}")
        out["normalize"] = value["normalize"]
    return out or None


# ----------------------------------------------------------------------------------------------------------
# Poolers: what one forward of the packed row gives each input
# ----------------------------------------------------------------------------------------------------------
class Pooler(Protocol):
    kind: str  # what the served model is, for log lines and messages ("classifier", "embedding model")
    noun: str  # what a row is ("score", "embedding")
    width: int  # a row's length

    def load(self, path: str, dtype: torch.dtype) -> torch.nn.Module: ...

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module: ...

    # cu_seqlens None: ids hold one input, run unpacked (an xPos input longer than a packed frame).
    def __call__(self, model: torch.nn.Module, ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor: ...


class ScorePooler:
    """A classifier's or reward model's score rows ``[N, num_labels]``: the score head at each input's last token."""

    kind, noun = "classifier", "score"

    def __init__(self, config):
        self.config = config
        self.width = self.num_labels = int(config.num_labels)
        id2label = config.id2label or {}
        self.labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.num_labels)]

    def load(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def __call__(self, model, ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """``ids`` ``[1, T]`` packed by ``cu_seqlens`` ``[N + 1]`` (None: one input, unpacked): the score rows
        ``[N, num_labels]`` in fp32."""
        if cu_seqlens is None:
            # The mask makes the last token the scored one: without it transformers' rule would skip a final EOS
            # that is also the pad id.
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                         return_dict=True).logits.float()
        return model(input_ids=ids, cu_seqlens=cu_seqlens, use_cache=False, return_dict=True).logits.float()

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


class EmbedPooler:
    """Embeddings ``[N, hidden_size]`` of the backbone (``RetNetModel``): the final norm's output at each input's
    last token (``LAST``: under causal retention the one state that has read the whole input) or averaged over its
    tokens (``MEAN``), in fp32. The rows leave the engine unnormalized: a request may turn the L2 normalization
    (``normalize``, --pooler-config's default) off or on (vLLM's ``use_activation``), so the handler applies it
    (:meth:`activate`)."""

    kind, noun = "embedding model", "embedding"

    def __init__(self, config, pooling_type: Literal["LAST", "MEAN"] = "LAST", normalize: bool = True):
        self.width = int(config.hidden_size)
        self.pooling_type, self.normalize = pooling_type, normalize

    def load(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        """The backbone of ``path``'s export (a causal LM's or a classifier's: its ``model.*`` weights), refused
        when any of its weights is missing, a size does not match or an unknown weight is left over: a backbone
        that loads partly would embed with random layers and nothing would say so."""
        from transformers import AutoModel

        model, info = AutoModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
        left = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(HEAD_PREFIXES))
        problems = {"missing": sorted(info.get("missing_keys", ())), "mismatched":
                    sorted(str(k) for k in info.get("mismatched_keys", ())), "unexpected": left}
        wrong = {what: keys for what, keys in problems.items() if keys}
        if wrong:
            shown = "; ".join(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                              for what, keys in wrong.items())
            raise RuntimeError(f"the backbone of {path!r} did not load whole ({shown}); expected a RetNet export "
                               "(RetNetForCausalLM or RetNetForSequenceClassification) whose weights match its config")
        heads = sorted(k for k in info.get("unexpected_keys", ()) if k.startswith(HEAD_PREFIXES))
        if heads:  # transformers' load report lists them as unexpected: say why that is expected here
            logger.info("embedding with the backbone of %s: its head's weights (%s) are not used", path,
                        ", ".join(heads))
        return model

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        # A causal LM or a classifier given already loaded (tests): its backbone, as load() takes it.
        return model.base_model

    def __call__(self, model, ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """``ids`` ``[1, T]`` packed by ``cu_seqlens`` ``[N + 1]`` (None: one input, unpacked): the embeddings
        ``[N, hidden_size]`` in fp32, not normalized (:meth:`activate`)."""
        hidden = model(input_ids=ids, cu_seqlens=cu_seqlens, use_cache=False,
                       return_dict=True).last_hidden_state[0].float()  # [T, d]
        if cu_seqlens is None:
            return hidden[-1:] if self.pooling_type == "LAST" else hidden.mean(0, keepdim=True)
        if self.pooling_type == "LAST":
            rows = hidden[cu_seqlens[1:] - 1]
        else:  # each segment's sum over its own tokens, divided by its length
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            # output_size: the total is known (T), so CUDA need not sync to read it back from `lengths`.
            segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths,
                                              output_size=hidden.shape[0])
            rows = hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, segment, hidden)
            rows = rows / lengths[:, None].to(rows.dtype)
        return rows

    def activate(self, rows: torch.Tensor) -> torch.Tensor:
        """vLLM's embedding activation of rows ``[N, hidden_size]``: each L2-normalized (a zero row stays zero)."""
        return F.normalize(rows, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class PoolingInput:
    """One input waiting to be run: its token ids, its place among its request's inputs, and the future (of
    ``loop``) its row is set on."""

    ids: list[int]
    index: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True, eq=False)
class WaitingRequest:
    """A request's inputs not yet run, in order, and its ``priority`` (lower is run sooner; always 0 under
    --scheduling-policy fcfs)."""

    inputs: deque[PoolingInput]
    priority: int = 0


class PoolingEngine(ModelThread):
    """Owns the model and the thread that runs it; :meth:`score` is what requests call."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics, model=None, pooler: Pooler | None = None):
        """``model``: a loaded model to serve instead of ``settings.model``'s (tests); ``pooler``: what a row is
        (default: ``--convert embed``'s embeddings as ``--pooler-config`` says, else the score head's)."""
        self.settings, self.metrics, self.model = settings, metrics, model
        self.config = model.config if model is not None else _load_config(settings.model)
        if pooler is None:
            embed = settings.convert == "embed"
            pooler = EmbedPooler(self.config, **settings.pooler) if embed else ScorePooler(self.config)
        self.pooler = pooler
        self.vocab_size = int(self.config.vocab_size)
        # The longest input a packed forward takes: with xPos one packed frame (the model refuses a longer packed
        # sequence, failing every input beside it); a longer one runs alone, unpacked, in the model's own frames.
        self.packed_tokens = (xpos_span(self.config, XPOS_PACKED_MAX_GROWTH) if getattr(self.config, "use_xpos", False)
                              else None)
        # What OpenAIServing's /tokenize, /detokenize and model card read of an engine: no LoRA adapter is served
        # here, and nothing is generated that could stop.
        self.adapters: dict = {}
        self.eos_ids: set[int] = set()
        self.cond = threading.Condition()
        # The waiting requests in turn: by priority, round-robin among equals (under fcfs all of them, every
        # priority being 0). Guarded by cond.
        self.waiting: deque[WaitingRequest] = deque()
        # The batch taken off `waiting` and not yet settled (the model's thread alone): failed too if the thread dies.
        self.running: list[PoolingInput] = []
        self.requests = 0  # requests being answered (queued or running); guarded by cond
        self.accepting, self.stopping, self.ready = True, False, False
        self.freeze_heap_when_ready = False  # as Engine's
        self.thread: threading.Thread | None = None
        self.device = torch.device("cpu")

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; it loads the model (``/health`` is 503 until then)."""
        self.thread = threading.Thread(target=self._run, name="retnet-pooling", daemon=True)
        self.thread.start()

    def _in_flight(self) -> int:
        return self.requests  # the rest fail with 503 once the thread stops

    # -- the API requests call (event-loop thread) ----------------------------------------------------------------
    async def score(self, inputs: list[list[int]], priority: int = 0) -> list[torch.Tensor]:
        """Each input's row, ``[pooler.width]`` fp32 on the CPU (a classifier's raw scores, an embedding).
        ``priority``: under --scheduling-policy priority, the inputs of lower values run first; under fcfs only 0
        (ValueError).

        Raises EngineUnavailable or QueueFull before anything is queued; APIError (500) when the forward that ran
        one of the inputs failed or gave it inf/NaN. Cancelled (the client left), the inputs not yet run are
        skipped."""
        if priority and self.settings.scheduling_policy != "priority":
            raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled.")
        loop = asyncio.get_running_loop()
        items = [PoolingInput(ids, index, loop.create_future(), loop) for index, ids in enumerate(inputs)]
        with self.cond:
            # Checked under the lock: a request queued after the thread's last look at the queue is never answered.
            if not self.healthy:
                raise EngineUnavailable(self.unavailable())
            limit = max(1, self.settings.max_queue)
            if self.requests >= limit:
                raise QueueFull(f"{self.requests} requests in the {self.pooler.kind}; the limit is {limit} "
                                "(--max-queue)")
            self.requests += 1
            if items:
                # Behind the requests of its priority, ahead of those of a worse one (under fcfs: an append).
                bisect.insort(self.waiting, WaitingRequest(deque(items), priority), key=_priority)
            self.metrics.queue_depth.set(self._queued())
            self.cond.notify_all()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:  # those still queued (another input failed, or the caller was cancelled) are skipped
                item.future.cancel()
            with self.cond:
                self.requests -= 1

    # -- the model's thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        kind = self.pooler.kind
        try:
            self._load()
            mark_ready(self)
            logger.info("%s ready on %s (rows of %d)", kind, self.device, self.pooler.width)
            with torch.inference_mode():
                while (batch := self._next_batch()) is not None:
                    self.running = batch
                    if batch:
                        self._forward(batch)
                    self.running = []
            self._fail_waiting(503, "the server is shutting down", "unavailable")
        except Exception as exc:  # the model did not load (or a bug): /health turns 503, requests are answered
            logger.exception("%s engine failed", kind)
            self.failure = f"{type(exc).__name__}: {exc}"
            self.metrics.engine_ready.set(0)
            # The batch in hand too: its requests wait on it, and nothing else would settle it. Those of its
            # futures already settled keep their results (_set_results skips them).
            failure = (503, self.dead, "engine_failure")
            self._settle(self.running, [failure] * len(self.running))
            self.running = []
            self._fail_waiting(*failure)

    def _load(self) -> None:
        from retnet.extras import transformers_bars_hidden

        self.device = _device(self.settings)
        if self.model is None:
            with transformers_bars_hidden():  # ("Loading weights", as the generation engine's load)
                self.model = self.pooler.load(self.settings.model, getattr(torch, _dtype(self.settings, self.device)))
        self.model = self.pooler.prepare(self.model).to(self.device).eval()
        if self.settings.quantization != "none":  # on the device: torchao quantizes where the weight is
            quantize_model(self.model, self.settings.quantization)

    def _queued(self) -> int:
        """Inputs waiting (cond held)."""
        return sum(len(request.inputs) for request in self.waiting)

    def _next_batch(self) -> list[PoolingInput] | None:
        """Waiting inputs whose tokens fit the budget together (an input over it alone, as one over an xPos packed
        frame: ``packed_tokens``), one from each waiting request in turn (each request's in its own order), so that
        a request of many inputs does not hold back the requests behind it: they are run within a forward or two.
        The turn goes on where the last batch stopped. Under --scheduling-policy priority the turn goes round the
        requests of the best priority until their inputs are all taken, then to the next priority's. None once the
        engine stops."""
        budget = self.settings.prefill_token_budget
        with self.cond:
            while not self.waiting and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            batch, tokens = [], 0
            while self.waiting:
                request = self.waiting.popleft()
                queue = request.inputs
                while queue and queue[0].future.cancelled():  # its request stopped waiting for it
                    queue.popleft()
                if not queue:
                    continue
                alone = self._unpacked(len(queue[0].ids))
                if batch and (alone or tokens + len(queue[0].ids) > budget):
                    self.waiting.appendleft(request)  # its turn comes first in the next batch
                    break
                item = queue.popleft()
                batch.append(item)
                tokens += len(item.ids)
                if queue:
                    # Its next turn: after the other requests of its priority, before any of a worse one (the
                    # queue is in priority order and it came first, so none is better).
                    bisect.insort(self.waiting, request, key=_priority)
                if alone:
                    break
            self.metrics.queue_depth.set(self._queued())
        return batch

    def _unpacked(self, tokens: int) -> bool:
        """Whether an input of ``tokens`` runs alone and unpacked: longer than an xPos packed frame."""
        return self.packed_tokens is not None and tokens > self.packed_tokens

    def _forward(self, batch: list[PoolingInput]) -> None:
        """Run ``batch`` packed into one row (an input over an xPos packed frame: alone, unpacked). A forward that
        raises, or that does not answer one row of ``pooler.width`` values per input, fails this batch's requests
        alone (500 ``forward_failed``); an input given inf or NaN fails its own request alone (500
        ``non_finite_score``: JSON cannot carry the value)."""
        lengths = [len(item.ids) for item in batch]
        kind, noun, width = self.pooler.kind, self.pooler.noun, self.pooler.width
        try:
            ids = torch.tensor([[token for item in batch for token in item.ids]], dtype=torch.long, device=self.device)
            cu_seqlens = (None if len(batch) == 1 and self._unpacked(lengths[0]) else
                          torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.long, device=self.device))
            rows = self.pooler(self.model, ids, cu_seqlens).cpu()
            # Checked here: an input without its row would never be answered, its request waiting forever.
            if tuple(rows.shape) != (len(batch), width):
                raise RuntimeError(f"it returned {noun}s of shape {tuple(rows.shape)} for {len(batch)} inputs of "
                                   f"width {width} (expected one row per input)")
            finite = torch.isfinite(rows).all(dim=-1).tolist()
        except Exception as exc:
            logger.exception("%s forward failed (%d inputs, %d tokens)", kind, len(batch), sum(lengths))
            message = f"the {kind}'s forward failed: {type(exc).__name__}: {exc}"
            self._settle(batch, [(500, message, "forward_failed")] * len(batch))
            return
        self.metrics.pooling_inputs.inc(len(batch))
        self.metrics.pooling_tokens.inc(sum(lengths))
        self.metrics.pooling_batch.observe(len(batch))
        if not all(finite):
            logger.warning("the %s gave %d of %d inputs an inf or NaN %s", kind, finite.count(False), len(batch), noun)
        self._settle(batch, [row if ok else (500, f"the model produced a non-finite {noun} (inf or NaN) for input "
                                             f"{item.index} of the request, which JSON cannot carry: a float16 "
                                             "overflow, say (try --dtype float32), or diverged weights",
                                             "non_finite_score")
                             for item, row, ok in zip(batch, rows, finite, strict=True)])

    def _fail_waiting(self, status: int, message: str, code: str) -> None:
        with self.cond:
            batch = [item for request in self.waiting for item in request.inputs]
            self.waiting.clear()
            self.metrics.queue_depth.set(0)
        self._settle(batch, [(status, message, code)] * len(batch))

    @staticmethod
    def _settle(batch: list[PoolingInput], outcomes: list[torch.Tensor | tuple[int, str, str]]) -> None:
        """Hand each input its outcome, on its event loop: its row, or a failure (status, message, code)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(item.loop, []).append((item.future, outcome))
        for loop, results in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for these any more
                loop.call_soon_threadsafe(_set_results, results)


def _priority(request: WaitingRequest) -> int:
    return request.priority


def _set_results(results: list[tuple[asyncio.Future, torch.Tensor | tuple[int, str, str]]]) -> None:
    for future, outcome in results:
        if future.done():  # cancelled (its request is gone), or settled before the engine failed
            continue
        if isinstance(outcome, tuple):  # one error a request: each raises its own
            status, message, code = outcome
            future.set_exception(APIError(status, message, None, code, type="server_error"))
        else:
            future.set_result(outcome)


__all__ = ["POOLER_DEFAULTS", "EmbedPooler", "Pooler", "PoolingEngine", "PoolingInput", "ScorePooler",
           "WaitingRequest", "parse_pooler_config"]
