"""vLLM's beam search (``use_beam_search``, ``length_penalty``) and OpenAI's ``best_of``, on top of the engine's
request API.

Beam search runs as vLLM's does: each step submits every live beam (its prompt and the tokens chosen so far) as a
prompt of its own with ``max_tokens`` 1, asking for the ``2 * width`` likeliest next tokens as logprobs (the model's
own, before any sampling rule). Of every beam's candidates, those that are an EOS end a beam (kept among the
finished ones); the ``width`` others of the highest cumulative logprob go on, until ``max_tokens``. The finished and
the live beams are then ranked by ``cum_logprob / length ** length_penalty``, best first, ``length`` counted as
vLLM counts it: the prompt's tokens and the beam's, a final EOS not counted (transformers counts the generated
tokens alone).

A beam's prompt is its parent's and one token more, and the parent's step left the state after it (and the logits
that follow) in the prefix cache: each step feeds one token a beam, the engine prefilling the beams of a step as
one packed forward between two decode steps of the other requests, which run on meanwhile. The cache keeps a
search's states past its bounds, up to ``2 × --max-n`` (PrefixCache); with it off (``--prefix-cache-entries 0``), a
step prefills its beams whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from retnet.serve.protocol import STRUCTURED_OUTPUT_FIELDS, APIError, CompletionRequest, SamplingFields
from retnet.serve.sampling import SamplingParams
from retnet.serve.sequence import EngineFailure, QueueFull, RequestHandle, SeqOutput, TokenLogprob

if TYPE_CHECKING:
    from retnet.serve.metrics import ServeMetrics

logger = logging.getLogger("retnet.serve")

# The sampling rules a beam search does not run, each with the values that change nothing (vLLM ignores them under
# use_beam_search; ignored here they would change the output silently). temperature is not among them: the search
# scores the model's own logprobs whatever it is, as vLLM V1's does.
_NOT_WITH_BEAMS = {
    "top_p": (1.0,), "top_k": (-1, 0), "min_p": (0.0,), "repetition_penalty": (1.0,), "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,), "min_tokens": (0,), "logit_bias": (None, {}), "stop": (None, "", []),
    "stop_token_ids": (None, []), "bad_words": (None, []), "allowed_token_ids": (None,), "session_id": (None,),
}
_SEARCH_IDS = itertools.count(1)  # BeamSearch.search_id


def check_beam_search(request: SamplingFields, tool_grammar: bool = False) -> None:
    """``use_beam_search`` and ``length_penalty`` as this server runs them: a 400 naming the field otherwise.
    ``tool_grammar``: the request's tool calls hold its output to the tools' schemas (``tool_choice``)."""
    penalty = request.length_penalty
    if not request.use_beam_search:
        if penalty != 1.0:
            raise APIError(400, f"length_penalty: applies to beam search only (use_beam_search: true); got {penalty}",
                           "length_penalty", "unsupported_parameter")
        return
    for name, no_ops in _NOT_WITH_BEAMS.items():
        value = getattr(request, name)
        if value not in no_ops:
            why = ("a search's beams are not one continuation to save" if name == "session_id" else
                   "the search does not run it: its beams are the model's likeliest tokens, ranked by their logprobs")
            raise APIError(400, f"{name}: not with use_beam_search ({why}); got {value!r}", name,
                           "unsupported_parameter")
    held = [name for name in STRUCTURED_OUTPUT_FIELDS if getattr(request, name) is not None and not (
        name == "response_format" and isinstance(request.response_format, dict)
        and request.response_format.get("type") == "text")]
    if tool_grammar:
        held.append("tool_choice")
    if held:
        raise APIError(400, f"{held[0]}: not with use_beam_search (the beams are not held to a grammar)", held[0],
                       "unsupported_parameter")
    best_of = request.best_of
    if best_of is not None and best_of != request.n:
        raise APIError(400, f"best_of: not with use_beam_search (its width is n, {request.n}); got {best_of}",
                       "best_of", "unsupported_parameter")
    if isinstance(request, CompletionRequest) and request.max_tokens == 0:
        raise APIError(400, "max_tokens must be at least 1 with use_beam_search", "max_tokens")


def beam_score(cum_logprob: float, length: int, length_penalty: float) -> float:
    """vLLM's sort key of a finished beam: ``cum_logprob / length ** length_penalty``. Raises ArithmeticError where
    the power leaves the floats (a length_penalty of 400 or -400: see :func:`beam_rank`)."""
    return cum_logprob / (max(length, 1) ** length_penalty)


def beam_rank(cum_logprob: float, length: int, length_penalty: float) -> tuple[int, float]:
    """:func:`beam_score`'s order without computing ``length ** length_penalty``, which overflows (or underflows to
    a division by zero) for a large penalty of either sign: the search then failed with a 500 after it had run.
    The score's sign first, then its log magnitude, ``log|cum_logprob| - length_penalty * log(length)``, divided by
    ``|length_penalty|`` above 1 (the same order; the product overflowed at 1e308)."""
    if cum_logprob == 0:
        return 0, 0.0
    scale = max(abs(length_penalty), 1.0)
    magnitude = math.log(abs(cum_logprob)) / scale - length_penalty / scale * math.log(max(length, 1))
    return (1, magnitude) if cum_logprob > 0 else (-1, -magnitude)


@dataclass(slots=True)
class Beam:
    """One hypothesis: the tokens generated, their summed logprob, and each token's logprobs entry (None when
    the request asked for none)."""

    tokens: list[int]
    cum_logprob: float = 0.0
    entries: list[TokenLogprob] | None = None
    ended: bool = False  # its last token is an EOS

    def score(self, prompt_tokens: int, length_penalty: float) -> float:
        """Its rank among the beams after a prompt of ``prompt_tokens`` tokens (:func:`beam_score`)."""
        return beam_score(self.cum_logprob, prompt_tokens + len(self.tokens) - self.ended, length_penalty)

    def extended(self, step: TokenLogprob, choice: TokenLogprob, alternatives: int | None, ended: bool) -> Beam:
        """This beam followed by ``choice``, one of ``step``'s alternatives; its entry lists ``alternatives`` of them."""
        entries = None
        if self.entries is not None:
            entries = [*self.entries, TokenLogprob(choice.token_id, choice.token, choice.token_bytes, choice.logprob,
                                                   step.top[:alternatives])]
        return Beam([*self.tokens, choice.token_id], self.cum_logprob + choice.logprob, entries, ended)


def next_beams(live: list[Beam], steps: list[TokenLogprob], width: int, eos_ids: frozenset[int],
               alternatives: int | None) -> tuple[list[Beam], list[Beam]]:
    """One step: ``steps[i]`` is beam i's next-token entry, its ``top`` the likeliest tokens best first. Returns the
    ``width`` beams that go on (the highest cumulative logprobs; ties in beam order, then the token's rank) and
    those each candidate EOS ends (vLLM keeps every one of them among the finished). A beam's candidates are its
    ``2 * width`` likeliest tokens, however many ``top`` lists (the request's logprobs may ask for more): an EOS
    further down ended a beam only when logprobs were asked for, and so changed the answer."""
    candidates, ended = [], []
    for order, (beam, step) in enumerate(zip(live, steps)):
        for rank, choice in enumerate(step.top[: 2 * width]):
            if choice.token_id in eos_ids:
                ended.append(beam.extended(step, choice, alternatives, ended=True))
            else:
                candidates.append((-(beam.cum_logprob + choice.logprob), order, rank, beam, step, choice))
    candidates.sort(key=lambda candidate: candidate[:3])
    return [beam.extended(step, choice, alternatives, ended=False)
            for *_, beam, step, choice in candidates[:width]], ended


def best_beams(beams: list[Beam], width: int, prompt_tokens: int, length_penalty: float) -> list[Beam]:
    """The ``width`` best of ``beams`` by :meth:`Beam.score`, best first (ties in their order)."""
    try:
        scores = [beam.score(prompt_tokens, length_penalty) for beam in beams]
    except ArithmeticError:
        scores = None
    if scores is None or not all(map(math.isfinite, scores)):
        # the same order, from logs (beam_rank): the formula's floats would not hold it
        scores = [beam_rank(beam.cum_logprob, prompt_tokens + len(beam.tokens) - beam.ended, length_penalty)
                  for beam in beams]
    order = sorted(range(len(beams)), key=lambda i: scores[i], reverse=True)
    return [beams[i] for i in order[:width]]


def beam_step_params(params: SamplingParams, width: int) -> SamplingParams:
    """A step's request: one token (greedy: the token sampled is never used) and the ``2 * width`` likeliest
    next tokens, at least as many as the request's logprobs list; under the request's cache salt, as each step
    starts from the last one's cached states."""
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=max(2 * width, params.logprobs or 0),
                          skip_special_tokens=params.skip_special_tokens,
                          spaces_between_special_tokens=params.spaces_between_special_tokens,
                          cache_salt=params.cache_salt, beam_step=True)


class BeamSearchHandle(RequestHandle):
    """A beam search's answer, as the engine's handle of a request of ``prompts × width`` choices: each choice's
    whole output arrives at once when the search ends (or an :class:`EngineFailure`, or ``abort`` for every
    choice when it was cancelled). Cancelling it cancels the step under way."""

    def __init__(self, loop: asyncio.AbstractEventLoop, num_choices: int):
        super().__init__(loop, num_choices)
        self.step: RequestHandle | None = None
        self.task: asyncio.Task | None = None  # the search (held here: the loop keeps only a weak reference)

    def cancel(self) -> None:
        super().cancel()
        if self.step is not None:
            self.step.cancel()


@dataclass
class BeamSearch:
    """The search of ``width`` beams after each of ``prompts``, one step a generated token. ``submit``: queue a
    step's prompts (``step_params``) with the engine, raising :class:`QueueFull` when the server is full (the step
    waits for places) and :class:`APIError` when it cannot take them at all (stopping);
    ``text``: a prompt's and its answer's tokens -> the answer's text (awaited: it may wait for the tokenizer). ``alternatives``: how many each returned
    token's logprobs entry lists (None: no logprobs)."""

    prompts: list[list[int]]
    width: int
    max_tokens: int
    length_penalty: float
    eos_ids: frozenset[int]  # empty with ignore_eos
    primary_eos: int | None  # the tokenizer's EOS: a choice it ends has no stop_reason (another EOS id is named)
    alternatives: int | None
    include_stop_str_in_output: bool
    step_params: SamplingParams
    submit: Callable[[list[list[int]], SamplingParams], RequestHandle]
    text: Callable[[list[int], list[int]], Awaitable[str]]
    # Tags its steps' prefix cache entries, of which the cache keeps the last two steps' (PrefixCache.insert).
    search_id: int = dataclasses.field(default_factory=lambda: next(_SEARCH_IDS))
    # Called with search_id once the search has ended and no step of it runs: its entries can go
    # (PrefixCache.end_search).
    ended: Callable[[int], None] | None = None
    # The metrics (the engine's) the search counts itself in, once, as an ordinary
    # request of ``prompts × width`` choices: the engine counts none of its steps, which were each a request of
    # every beam, their prompts and their one token counted again a step (an n=4 search of 5 tokens and a 9-token
    # prompt counted 17 sequences, 193 prompt tokens and 17 generated ones). None once counted.
    metrics: ServeMetrics | None = None

    def start(self, first: RequestHandle) -> BeamSearchHandle:
        """Run the search from its first step, ``first`` (each prompt alone, already submitted)."""
        result = BeamSearchHandle(asyncio.get_running_loop(), len(self.prompts) * self.width)
        result.prompt_tokens = first.prompt_tokens
        result.arrival = first.arrival
        if self.metrics is not None:
            self.metrics.submitted.inc(result.num_choices)
            self.metrics.prompt_tokens.inc(result.prompt_tokens)
        result.task = asyncio.ensure_future(self._run(result, first))
        return result

    def _answer(self, result: BeamSearchHandle, item: list[SeqOutput] | EngineFailure) -> None:
        """Send the search's one answer, and count how its choices ended (as the engine counts a request's)."""
        result.queue.put_nowait(item)
        metrics, self.metrics = self.metrics, None
        if metrics is None:
            return
        if isinstance(item, EngineFailure):
            # (the engine stopping cancels what it leaves, as it does a request's sequences)
            (metrics.cancelled if item.code == "unavailable" else metrics.failed).inc(result.num_choices)
        elif any(out.finish_reason == "abort" for out in item):
            metrics.cancelled.inc(result.num_choices)
        else:
            # every choice's first token arrives with the answer; observed once a prompt, as the engine observes
            # a prompt's n choices
            waited = time.perf_counter() - result.arrival
            for _ in self.prompts:
                metrics.ttft.observe(waited)
            for out in item:
                metrics.finished.labels(out.finish_reason).inc()
            metrics.generation_tokens.inc(sum(len(out.token_ids) for out in item))

    async def _run(self, result: BeamSearchHandle, first: RequestHandle) -> None:
        try:
            await self._search(result, first)
        except APIError as exc:
            self._answer(result, EngineFailure(exc.message, exc.status, exc.code or "beam_search_failed", exc.param))
        except Exception as exc:  # a bug of the search's own: its request fails, the server goes on
            logger.error("a beam search failed", exc_info=exc)
            self._answer(result, EngineFailure(f"the request failed: {type(exc).__name__}: {exc}", 500,
                                               "internal_error"))
        finally:
            if self.metrics is not None:  # ended unanswered (its task cancelled: the event loop closing)
                self.metrics.cancelled.inc(result.num_choices)
            if self.ended is not None:
                self.ended(self.search_id)

    async def _search(self, result: BeamSearchHandle, first: RequestHandle) -> None:
        steps = await self._outputs(result, first)
        if steps is None:
            return
        result.cached_tokens = first.cached_tokens
        prompt_logprobs = [out.prompt_logprobs for out in steps]
        keep = [] if self.alternatives is not None else None
        live = [[Beam([], 0.0, None if keep is None else [])] for _ in self.prompts]
        finished: list[list[Beam]] = [[] for _ in self.prompts]
        for count in range(1, self.max_tokens + 1):
            entries = iter(out.logprobs[0] for out in steps)
            for i, beams in enumerate(live):
                live[i], ended = next_beams(beams, [next(entries) for _ in beams], self.width, self.eos_ids,
                                            self.alternatives)
                # A finished beam's score never changes: only the best ``width`` of them can be returned.
                finished[i] = best_beams(finished[i] + ended, self.width, len(self.prompts[i]), self.length_penalty)
            if count == self.max_tokens or not any(live):
                break
            handle = await self._step(result, [prompt + beam.tokens for prompt, beams in zip(self.prompts, live)
                                               for beam in beams],
                                      dataclasses.replace(self.step_params, prefix_cache_tag=(self.search_id, count)))
            if handle is None:  # cancelled while it waited for places
                self._answer(result, [SeqOutput(i, "", [], finish_reason="abort") for i in range(result.num_choices)])
                return
            steps = await self._outputs(result, handle)
            if steps is None:
                return
        outputs = []
        for i, prompt in enumerate(self.prompts):
            ranked = best_beams(finished[i] + live[i], self.width, len(prompt), self.length_penalty)
            if len(ranked) < self.width:  # fewer tokens than beams: the answer would wait for choices never sent
                raise APIError(400, f"n: {self.width} beams found only {len(ranked)} distinct sequences", "n")
            for rank, beam in enumerate(ranked):
                outputs.append(await self._output(i * self.width + rank, prompt, beam, prompt_logprobs[i]))
        self._answer(result, outputs)

    async def _step(self, result: BeamSearchHandle, beams: list[list[int]], params: SamplingParams
                    ) -> RequestHandle | None:
        """A step's beams submitted, waiting while the server is full: the search was admitted on its first step, and
        between two steps it holds no places, which other requests may take (a 429 then came after the search had
        run, without Retry-After). None when the search is cancelled meanwhile."""
        delay = 0.005
        while not result.cancelled:
            try:
                return self.submit(beams, params)
            except QueueFull:
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.2)
        return None

    async def _outputs(self, result: BeamSearchHandle, handle: RequestHandle) -> list[SeqOutput] | None:
        """A step's one output per prompt; None when the search was cancelled (each choice then ends ``abort``)."""
        result.step = handle
        if result.cancelled:
            handle.cancel()
        outputs: list[SeqOutput | None] = [None] * handle.num_choices
        remaining = handle.num_choices
        while remaining:
            item = await handle.queue.get()
            if isinstance(item, EngineFailure):
                self._answer(result, item)
                return None
            for out in item:
                outputs[out.index] = out
                remaining -= out.finish_reason is not None
        if result.cancelled or any(out.finish_reason == "abort" for out in outputs):
            self._answer(result, [SeqOutput(i, "", [], finish_reason="abort") for i in range(result.num_choices)])
            return None
        return outputs

    async def _output(self, index: int, prompt: list[int], beam: Beam, prompt_logprobs) -> SeqOutput:
        """A returned beam as one whole output of choice ``index``. An EOS that ended it is in its tokens (and its
        logprobs), its text left out unless include_stop_str_in_output, as the engine answers a choice EOS ends."""
        shown = beam.tokens[:-1] if beam.ended and not self.include_stop_str_in_output else beam.tokens
        stop_reason = None
        if beam.ended and beam.tokens[-1] != self.primary_eos:
            stop_reason = beam.tokens[-1]
        return SeqOutput(index, await self.text(prompt, shown), beam.tokens, beam.entries,
                         "stop" if beam.ended else "length", prompt_logprobs, stop_reason)


def mean_logprob(seq: list[SeqOutput]) -> float:
    """A choice's mean logprob per token (OpenAI's best_of rank); 0 for a choice of no tokens."""
    values = [entry.logprob for out in seq for entry in out.logprobs or () if entry.logprob is not None]
    return sum(values) / len(values) if values else 0.0


def best_of_choices(outputs: list[list[SeqOutput]], n: int, best_of: int) -> list[list[SeqOutput]]:
    """Of each prompt's ``best_of`` candidates (``outputs``, prompt after prompt), the ``n`` with the highest
    :func:`mean_logprob`, best first (ties in candidate order); ``outputs`` as they are without candidates to
    choose from (``best_of`` at most ``n``)."""
    if best_of <= n:
        return outputs
    chosen = []
    for start in range(0, len(outputs), best_of):
        candidates = outputs[start : start + best_of]
        chosen.extend(sorted(candidates, key=lambda seq: -mean_logprob(seq))[:n])
    return chosen


__all__ = ["BeamSearch", "BeamSearchHandle", "beam_score", "beam_step_params", "best_of_choices",
           "check_beam_search", "mean_logprob"]
