"""The scheduler: continuous batching of RetNet decoding.

One thread owns the model. Each iteration it

1. admits waiting requests while slots are free (``max_running`` sequences at most); under
   ``--scheduling-policy priority`` in (priority, arrival) order, preempting running sequences of a worse priority
   when no slot is free. A preempted sequence keeps its fixed-size state (and its sampler, stop and stream
   state) and rejoins the batch where it stopped: nothing is recomputed, its output is the same;
2. prefills new prompts with the chunkwise form, in pieces of ``prefill_chunk_tokens`` and at most
   ``prefill_token_budget`` tokens per iteration, so a long prompt never stalls the running streams for long
   and its length is bounded by time, not memory (the state is O(1) in it). The prompts being prefilled
   advance together: each round packs one piece of each into a single row (``cu_seqlens``) and runs ONE
   forward, every piece continuing its own state. A prompt starts from the longest cached prefix state or
   from its session's saved state;
3. rebuilds the batch when sequences joined or left (their fp32 states stacked into one cache);
4. runs ONE batched recurrent step for every running sequence and samples each row with its own generator
   (with ``--speculative-config``, a packed step in which sequences also verify draft tokens found by prompt
   lookup or proposed by a draft model, see ``_speculative_step``).

Results go to each request's ``asyncio.Queue`` on the event loop (``call_soon_threadsafe``), so the loop never
waits on the model. A cancelled request (client gone) leaves the batch at the next iteration.

The request's records and what it gets back are :mod:`retnet.serve.sequence`'s; the LoRA adapters served, and
which are installed in the model (installs, retirement, ``--max-cpu-loras`` residency), are kept by
:class:`~retnet.serve.adapter_slots.AdapterSlots`, which the engine owns and calls between two forwards.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import gc
import itertools
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from retnet.model import RetNetCache
from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span
from retnet.model.quantization import quantize_model
from retnet.serve.adapter_slots import AdapterSlots
from retnet.serve.detokenize import MAX_WINDOW, IncrementalDetokenizer, StopStrings, unfinished_character
from retnet.serve.lora import LoraAdapter
from retnet.serve.metrics import ServeMetrics
from retnet.serve.sampling import RowSampler, SamplingParams, grammar_masks_of, prompt_logprobs, sample_step
from retnet.serve.sequence import (
    EngineFailure,
    EngineUnavailable,
    Group,
    ModelThread,
    QueueFull,
    RequestHandle,
    SeqOutput,
    Sequence,
    TokenLogprob,
    emit_all,
)
from retnet.serve.session_store import session_files
from retnet.serve.settings import ServeSettings, StartupError
from retnet.serve.speculative import VERIFY_MODE, DraftModel, accepted_drafts, propose_drafts
from retnet.serve.state_cache import PrefixCache, Session, SessionStore
from retnet.serve.structured import GrammarFailed
from retnet.tokenization import TokenBytes, vocab_bound

logger = logging.getLogger("retnet.serve")

# Prompts are prefilled with the chunkwise form: linear in the prompt, and the same pieces alone or batched.
PREFILL_MODE = "chunkwise"
# vLLM's floor for a logprob sent to a client: a token of probability 0 scores -inf, which JSON cannot carry (a
# response would fail to serialise, a stream would send -Infinity).
MIN_LOGPROB = -9999.0


class Engine(ModelThread):
    """Owns the model, the tokenizer's decoder, the state caches and the scheduler thread."""

    def __init__(self, settings: ServeSettings, tokenizer, metrics: ServeMetrics, model=None):
        self.settings = settings
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.token_bytes = TokenBytes(tokenizer)
        # Each token's text alone, by (skip_special_tokens, spaces_between_special_tokens): the detokenizers' shared
        # memo (IncrementalDetokenizer's ``texts``), at most a vocabulary's strings each.
        self.token_texts: dict[tuple[bool, bool], dict[int, str]] = {}
        # What _decode leaves out of the text: the tokenizer's own special tokens, which are more than the ones
        # transformers names (Llama 3's reserved and header tokens are special to the tokenizer alone).
        self.skipped_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        if self.backend is not None:
            self.skipped_ids |= {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        self.metrics = metrics
        self.model = model
        self.config = model.config if model is not None else _load_config(settings.model)
        self.vocab_size = int(self.config.vocab_size)
        self.piece_tokens = _piece_tokens(self.config, settings.prefill_chunk_tokens)
        self.tokenizer_bound = vocab_bound(tokenizer)  # see token_bound
        self.eos_ids = _eos_ids(settings.model, tokenizer, self.config)
        # vLLM's EOS proper (the tokenizer's): the other EOS ids (generation_config's, a chat model's end of turn)
        # are stop tokens there, each named as the stop_reason of a choice it ends
        self.primary_eos = getattr(tokenizer, "eos_token_id", None)
        if not isinstance(self.primary_eos, int):
            self.primary_eos = getattr(self.config, "eos_token_id", None)
        self.speculative = settings.speculative  # None: every step decodes one token a sequence
        self.drafter: DraftModel | None = None  # method draft_model's proposer, loaded with the model
        # A prompt's entry: one row of fp32 state and the [V] fp32 logits after it (see _awaits_shared_prefix).
        self.prefix_entry_bytes = RetNetCache.zeros(self.config, 1, device="meta").nbytes() + 4 * self.vocab_size
        # A beam search of a prompt keeps its last two steps' states, 2 × n: the widest one keeps them all, however
        # few states the bounds hold (PrefixCache).
        self.prefix_cache = PrefixCache(settings.prefix_cache_entries, settings.prefix_cache_bytes,
                                        settings.prefix_cache_min_tokens, 2 * settings.max_n,
                                        2 * settings.max_n * self.prefix_entry_bytes)
        self.prefix_cache_evictions_seen = 0  # of prefix_cache.evictions, counted in the metrics
        # --session-dir: a state is tied to the dtype its weights are served in (the model's own when given).
        dtype = str(next(model.parameters()).dtype) if model is not None else _dtype(settings, _device(settings))
        if settings.quantization != "none":  # a state made with quantized weights is another model's
            dtype = f"{dtype}+{settings.quantization}"
        _check_session_bytes(settings, self.config)
        self.sessions = SessionStore(settings.max_sessions, settings.session_bytes, settings.session_ttl_s,
                                     session_files(settings, self.config, metrics,
                                                   lambda slot: self.adapter_slots.identity(slot),
                                                   dtype.removeprefix("torch.")))
        self.cond = threading.Condition()
        # The LoRA adapters served and installed in the model; they share the scheduler's lock. The startup ones
        # are read and checked now: a bad one stops the server before it loads the model.
        self.adapter_slots = AdapterSlots(settings, metrics, self.cond, self.model, self.config,
                                          admitted_slots=self._active_adapters, waiting_slots=self._waiting_adapters,
                                          fail_waiting=self._fail_waiting, forget=self._forget_adapter)
        # In serving order: arrival, or under --scheduling-policy priority (priority, arrival). Guarded by cond.
        self.waiting: deque[Group] = deque()
        self.arrivals = itertools.count()  # Group.order; guarded by cond
        self.in_system = 0  # sequences admitted and not finished; guarded by cond
        self.beam_steps_in_system = 0  # of in_system, the beam searches' steps' (not counted in the metrics)
        self.accepting = True
        self.stopping = False
        self.ready = False
        # Set by the process entry (retnet-serve), not the app factory: freeze the heap once the model is loaded.
        self.freeze_heap_when_ready = False
        self.thread: threading.Thread | None = None
        # Owned by the scheduler thread:
        self.prefilling: list[Group] = []
        self.running: list[Sequence] = []
        self.joining: list[tuple[Sequence, RetNetCache]] = []
        # --scheduling-policy priority: the running sequences chosen to make room, leaving the batch at its next
        # rebuild; then, in rank order, the preempted ones with their rows' states, each copied out of the batch.
        # A sequence's whole context is that fixed-size state: it resumes where it stopped, nothing recomputed.
        self.preempting: list[Sequence] = []
        self.preempted: list[tuple[Sequence, RetNetCache]] = []  # changed under cond
        self.batch: RetNetCache | None = None
        self.device = torch.device("cpu")

    @property
    def token_bound(self) -> int:
        """One more than the largest id a prompt or a sampling rule may name: the tokenizer's, within the model's
        vocabulary. A vocabulary padded past the tokenizer has rows whose logits are -inf in every forward
        (_mask_padded_vocabulary): a prompt holding one would be scored -inf, and allowed_token_ids naming only such
        ids would leave nothing to sample."""
        return min(self.tokenizer_bound, self.vocab_size)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler (it loads the model) and, with --session-dir, the session files' writer."""
        self.sessions.start()
        self.thread = threading.Thread(target=self._run, name="retnet-scheduler", daemon=True)
        self.thread.start()

    def _in_flight(self) -> int:
        return self.in_system

    def _after_stop(self) -> None:
        self.sessions.close()  # --session-dir: the last turns' states written before the process goes

    # -- LoRA adapters (vLLM's /v1/load_lora_adapter; event-loop thread) -------------------------------------------
    @property
    def adapters(self) -> dict[str, LoraAdapter]:
        """The LoRA adapters served, by name, in the order they were loaded (:class:`AdapterSlots`)."""
        return self.adapter_slots.adapters

    @property
    def loading(self) -> set[str]:
        """Names of the adapters read and queued, not yet installed."""
        return self.adapter_slots.loading

    @property
    def linears(self) -> dict:
        """The base model's Linear layers, which adapters are checked against (none when no adapter can ever be
        served)."""
        return self.adapter_slots.linears

    def add_adapter(self, adapter: LoraAdapter) -> asyncio.Future:
        """Queue ``adapter`` (read and checked by :func:`~retnet.serve.lora.load_adapter`) to be installed by the
        scheduler between two forwards, under a new slot. The returned future is done once it is installed and
        served under its name (an adapter of that name served until then is retired, as :meth:`remove_adapter`
        does: its requests finish under it); it fails if the install does. Published on this event loop even if
        nobody awaits the future any more, so an adapter installed is always served or retired, never leaked.

        Raises EngineUnavailable.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self.cond:
            if not self.healthy:
                raise EngineUnavailable(self.unavailable())
            self.adapter_slots.queue_install(adapter, loop, done)
        return done

    def remove_adapter(self, name: str) -> LoraAdapter | None:
        """Stop serving adapter ``name`` (None: no such adapter); see :meth:`AdapterSlots.remove`."""
        return self.adapter_slots.remove(name)

    # -- the API the routes call (event-loop thread) -------------------------------------------------------------
    def submit(
        self, prompts: list[list[int]], params: SamplingParams, n: int = 1, session_id: str | None = None,
        prefix_hints: list[int | None] | None = None, session: Session | None = None,
        text_starts: list[int | None] | None = None, adapter: int = 0, priority: int = 0, leaves_pending: bool = False,
    ) -> RequestHandle:
        """Queue ``prompts`` (token ids) × ``n`` choices; outputs arrive on ``handle.queue``. ``session``:
        ``session_id``'s, already acquired by the caller (who releases it if this raises); otherwise it is
        acquired here. ``text_starts``: per prompt, the token its echoed text starts at (``Group.text_start``);
        it labels the prompt's logprobs. ``adapter``: the slot of a LoRA adapter served (``adapters[name].slot``;
        0: the base model), looked up by the caller right before this call, on the event loop (where adapters are
        unloaded), so that a request is accepted under a slot still served or not at all. ``priority``: under
        --scheduling-policy priority, lower is served earlier (ties in arrival order); under fcfs only 0 (ValueError).
        ``leaves_pending``: the prompt continues ``session`` without feeding its pending token first (a chat turn
        whose closer writes nothing of it: ``OpenAIServing._closer_leaves_out``); the session keeps it until the
        answer replaces it.

        With --session-dir a ``session_id`` needs its ``session``, acquired and restored from its file by the caller
        (``OpenAIServing._acquire_session``; reading the file is async): acquired here, a session on disk only would
        start anew and its next write replace the file (ValueError).

        Raises EngineUnavailable, QueueFull or SessionBusy.
        """
        if session is None and session_id is not None and self.sessions.files is not None:
            raise ValueError(f"session {session_id!r}: with --session-dir, submit() takes the session acquired and "
                             "restored by the caller (SessionStore.acquire, then restore), not its id alone")
        if priority and self.settings.scheduling_policy != "priority":
            raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled.")
        handle = RequestHandle(asyncio.get_running_loop(), len(prompts) * n)
        handle.prompt_tokens = sum(len(p) for p in prompts)
        with self.cond:
            # Checked under the lock: a request queued after a dying scheduler's _fail_all would never
            # be answered.
            if not self.healthy:
                raise EngineUnavailable(self.unavailable())
            if adapter and all(a.slot != adapter for a in self.adapters.values()):
                # A retired slot's matrices may be freed at any moment: its tokens would silently run as the base's.
                raise ValueError(f"LoRA slot {adapter} is not served (an adapter unloaded or replaced)")
            limit = self.settings.max_running + self.settings.max_queue
            if self.in_system + handle.num_choices > limit:
                raise QueueFull(f"{self.in_system} sequences in the server; the limit is {limit}")
            if session is None and session_id is not None:
                session = self.sessions.acquire(session_id)
            hints = prefix_hints or [None] * len(prompts)
            starts = text_starts or [None] * len(prompts)
            for i, prompt in enumerate(prompts):
                group = Group(handle, list(prompt), params, n, i * n, session_id, session, adapter, hints[i],
                              starts[i], priority, next(self.arrivals), leaves_pending=leaves_pending)
                # Under fcfs every priority is 0 and the orders grow: this is an append.
                bisect.insort(self.waiting, group, key=_group_rank)
            self.in_system += handle.num_choices
            if params.beam_step:
                self.beam_steps_in_system += handle.num_choices  # (the search counts itself: BeamSearch.metrics)
            else:
                self.metrics.submitted.inc(handle.num_choices)
                self.metrics.prompt_tokens.inc(handle.prompt_tokens)
            self.cond.notify_all()
        return handle

    # -- the scheduler thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._load()
            mark_ready(self)
            logger.info("engine ready on %s", self.device)
            with torch.inference_mode():
                while self._iteration():
                    pass
            self._fail_all("the server is shutting down", shutdown=True)
        except Exception as exc:  # the engine is dead: fail every request, /health turns 503
            logger.exception("engine failed")
            self.failure = f"{type(exc).__name__}: {exc}"
            self.metrics.engine_ready.set(0)
            self._fail_all(self.dead)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        from retnet.extras import transformers_bars_hidden

        self.device = _device(self.settings)
        if self.model is None:
            with transformers_bars_hidden():  # (a hub id is a local snapshot by now: no download bar is hidden)
                self.model = AutoModelForCausalLM.from_pretrained(
                    self.settings.model, dtype=getattr(torch, _dtype(self.settings, self.device)))
        self.model = self.model.to(self.device).eval()
        if self.speculative is not None and self.speculative.method == "draft_model":
            draft = self._load_draft(next(self.model.parameters()).dtype)
            self.drafter = DraftModel(draft, self.speculative,
                                      _piece_tokens(draft.config, self.settings.prefill_chunk_tokens),
                                      self.settings.prefill_token_budget)
        if self.settings.quantization != "none":  # on the device: torchao quantizes where the weight is
            quantize_model(self.model, self.settings.quantization)
        bound = vocab_bound(self.tokenizer)
        if bound < self.vocab_size:
            logger.info("the model's vocabulary has %d rows past the tokenizer's %d ids (padded): their logits are "
                        "masked", self.vocab_size - bound, bound)
            for model in (self.model, None if self.drafter is None else self.drafter.model):
                if model is not None:
                    _mask_padded_vocabulary(model, bound)
        self.adapter_slots.start(self.model, self.device)

    def _load_draft(self, dtype: torch.dtype):
        """The draft model (checked at startup by ``resolve_draft_model``), on the target's device in its dtype."""
        from transformers import AutoModelForCausalLM

        from retnet.extras import transformers_bars_hidden

        path = self.speculative.model
        with transformers_bars_hidden():
            draft = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        if int(draft.config.vocab_size) != self.vocab_size:  # an Engine made without create_app's check
            raise ValueError(f"--speculative-config's model {path!r} has a vocabulary of {draft.config.vocab_size} "
                             f"tokens, the target model one of {self.vocab_size}")
        logger.info("draft model %s (%d parameters) proposes up to %d tokens a step", path,
                    sum(p.numel() for p in draft.parameters()), self.speculative.num_speculative_tokens)
        return draft

    def _iteration(self) -> bool:
        with self.cond:
            while not (self.waiting or self.prefilling or self.running or self.joining or self.preempted
                       or self.stopping or self.adapter_slots.changes_pending()):
                self._free_idle_states()
                self.cond.wait(timeout=1.0)
            if self.stopping:
                return False
            self._drop_cancelled_waiting()
            # A running sequence that finished or was cancelled leaves the batch at this iteration's rebuild: its
            # slot is free now (counted, the next request would preempt for it, or under fcfs wait an iteration).
            busy = sum(not s.done for s in self.running) + len(self.joining) + sum(g.n for g in self.prefilling)
            active = self._active_adapters()
            max_loras = self.settings.max_loras  # None: no limit
            bounded = self.settings.max_cpu_loras is not None
            limit = self.settings.max_running
            # The best waiting request waits for its adapter (--max-loras, --max-cpu-loras): the preempted
            # sequences, whose adapters stay installed, still resume into free slots, or they could wait forever
            # for one that their own adapters keep out; no request behind it is admitted.
            blocked = False
            while self.waiting or self.preempted:
                if self.preempted and (blocked or not self.waiting
                                       or self.preempted[0][0].group.rank < self.waiting[0].rank):
                    # A preempted sequence is next in line: it rejoins the batch (its adapter stayed installed,
                    # counted in `active` all along), preempting in turn if its priority is the better.
                    seq = self.preempted[0][0]
                    if busy >= limit:
                        if blocked:
                            break  # ahead of it only because the best request cannot run: it preempts nobody
                        victims = self._victims(seq.group.priority, busy + 1 - limit, resuming=1)
                        if not victims:
                            break
                        self.preempting += victims
                        busy -= len(victims)
                    self.joining.append(self.preempted.pop(0))
                    busy += 1
                    continue
                if blocked:
                    break
                group = self.waiting[0]
                victims = []
                if busy + group.n > limit:
                    victims = self._victims(group.priority, busy + group.n - limit)
                    if not victims:
                        break
                slot = group.adapter
                if slot and slot not in active and max_loras is not None and len(active) >= max_loras:
                    blocked = True  # --max-loras: it waits (in order) until an adapter leaves the batch
                    continue
                if slot and bounded and not self.adapter_slots.loaded(slot, active):
                    if self.waiting and self.waiting[0].adapter != slot:
                        continue  # its adapter cannot be served (loaded failed its requests): the next one
                    blocked = True  # --max-cpu-loras: it waits (in order) while its adapter is read again, or a
                    continue  # place frees
                if slot:
                    active.add(slot)
                self.preempting += victims
                busy -= len(victims)
                group = self.waiting.popleft()
                # Prefill rounds share a token budget in this order: the better priority's pieces go first.
                bisect.insort(self.prefilling, group, key=_group_rank)
                busy += group.n
            self.metrics.queue_depth.set(self._queued())
            installs, freed, reread = self.adapter_slots.take_changes()
            if self.adapter_slots.rereading and not (self.prefilling or self.running or self.joining or installs
                                                     or freed or reread):
                # Only a request waiting for its adapter's read is left: sleep until the read ends (or a request
                # arrives) rather than spin on the waiting queue.
                self.cond.wait(timeout=0.1)
        if installs or freed or reread:
            self.adapter_slots.change(installs, freed, reread)
        self._prefill()
        self._rebuild_batch()
        self.metrics.running.set(len(self.running))
        self.metrics.prefilling.set(sum(g.n for g in self.prefilling))
        if self.running:
            self._decode_step()
        return True

    def _free_idle_states(self) -> None:
        """While waiting for work (each second): free the states of the beam searches that ended and of the sessions
        past --session-ttl-s, which were freed only by the next request's use of the prefix cache or sessions."""
        if self.prefix_cache.free_ended_searches():
            self._prefix_cache_metrics()
        if self.sessions.expire():
            self.metrics.sessions.set(len(self.sessions))

    def _fail_waiting(self, slot: int, failure: EngineFailure) -> None:
        """End every waiting request of adapter ``slot`` with ``failure``; the others go on."""
        with self.cond:
            failed = [g for g in self.waiting if g.adapter == slot]
            if not failed:
                return
            self.waiting = deque(g for g in self.waiting if g.adapter != slot)
            for group in failed:
                self._release_slots(group.n, group, self.metrics.failed)
                if group.session_id is not None:
                    self.sessions.release(group.session_id)  # left as it was
            self.metrics.queue_depth.set(self._queued())
        for handle in {id(g.handle): g.handle for g in failed}.values():
            handle.emit(failure)

    def _active_adapters(self) -> set[int]:
        """The LoRA adapters of the sequences running, joining, preempted or being prefilled (the base, 0, not
        counted). A preempted sequence's stays installed, as its state stays held: it resumes without a read."""
        slots = {g.adapter for g in self.prefilling} | {s.group.adapter for s in self.running}
        slots |= {s.group.adapter for s, _ in self.joining} | {s.group.adapter for s, _ in self.preempted}
        return slots - {0}

    def _queued(self) -> int:
        """Sequences waiting for a slot: the waiting requests' and the preempted ones (cond held)."""
        return sum(g.n for g in self.waiting) + len(self.preempted)

    def _victims(self, priority: int, count: int, resuming: int = 0) -> list[Sequence]:
        """Under --scheduling-policy priority, the ``count`` running sequences to preempt so that work of
        ``priority`` runs now: of a worse priority only, the worst first (among equals the latest arrived, and of a
        request's ``n`` choices the last: each choice is preempted on its own, as vLLM V1 runs each as a request of
        its own). None unless that many can go: a partial preemption would pause them for nothing. None either
        when the preempted sequences' states would then outnumber --max-running, so that preemption at most doubles
        the states held; ``resuming``: how many of those preempted are the work resuming, which leaves them."""
        if self.settings.scheduling_policy != "priority":
            return []
        if len(self.preempted) - resuming + len(self.preempting) + count > self.settings.max_running:
            return []
        leaving = set(self.preempting)
        worse = [s for s in self.running if s.finish_reason is None and not s.group.handle.cancelled
                 and s not in leaving and s.group.priority > priority]
        if len(worse) < count:
            return []
        return sorted(worse, key=lambda s: s.rank, reverse=True)[:count]

    def _waiting_adapters(self) -> set[int]:
        """The LoRA adapters the waiting requests name (the base, 0, among them)."""
        return {g.adapter for g in self.waiting}

    def _forget_adapter(self, slot: int) -> int:
        """Drop the prefix-cache entries and sessions made under LoRA ``slot``, freed; returns the sessions
        dropped."""
        self.prefix_cache.drop_adapter(slot)
        self._prefix_cache_metrics()
        dropped = self.sessions.drop_adapter(slot)
        self.metrics.sessions.set(len(self.sessions))
        return dropped

    def _prefix_cache_metrics(self) -> None:
        """The prefix cache's gauges, and the evictions since they were last read (the cache counts them)."""
        self.metrics.prefix_cache_entries.set(len(self.prefix_cache))
        self.metrics.prefix_cache_bytes.set(self.prefix_cache.nbytes)
        self.metrics.prefix_cache_evictions.inc(self.prefix_cache.evictions - self.prefix_cache_evictions_seen)
        self.prefix_cache_evictions_seen = self.prefix_cache.evictions

    def _drop_cancelled_waiting(self) -> None:
        kept = deque()
        for group in self.waiting:
            if group.handle.cancelled:
                self._finish_cancelled(group, group.choice_indices)
            else:
                kept.append(group)
        self.waiting = kept
        for seq, _ in self.preempted:
            if seq.group.handle.cancelled:
                seq.finish_reason = "abort"
                self._finish_cancelled(seq.group, [seq.index])
        if any(seq.finish_reason is not None for seq, _ in self.preempted):
            self.preempted = [(seq, state) for seq, state in self.preempted if seq.finish_reason is None]

    def _finish_cancelled(self, group: Group, indices: range | list[int]) -> None:
        """Choices ``indices`` of ``group`` were cancelled (their client left) before they finished: free their
        slots, leave the session as it was, and end them with ``abort``, so that a request still waiting on
        them (a non-streaming one that noticed its client leave) learns from the engine whether its work
        was cancelled or had finished first (see :meth:`_finished`). The choices of a request that failed
        (:meth:`_request_failed` cancels them) are counted as failed, as the request is."""
        self._release_slots(len(indices), group, self.metrics.failed if group.handle.failed else self.metrics.cancelled)
        if group.session_id is not None:
            self.sessions.release(group.session_id)
        group.handle.emit([SeqOutput(i, "", [], finish_reason="abort") for i in indices])

    def _sequence_failed(self, seq: Sequence, exc: Exception) -> None:
        """Something of ``seq``'s request's own raised at its step: the sequence ends (``abort``, so that the
        batch's rebuild drops it without releasing it again), its slot is free and its session left as it was."""
        seq.finish_reason = "abort"
        self._release_slots(1, seq.group, self.metrics.failed)
        if seq.group.session_id is not None:
            self.sessions.release(seq.group.session_id)
        self._request_failed(seq.group.handle, exc)

    def _request_failed(self, handle: RequestHandle, exc: Exception) -> None:
        """The request of ``handle`` fails alone (a 500; a 400 for a grammar that failed while generating), the
        engine goes on: a bug or a bad input of one request (its decoder, its grammar ...) must not take every
        request down with the engine. Its other choices are cancelled: they end at the next iteration, as when a
        client leaves."""
        handle.cancel()
        if isinstance(exc, GrammarFailed):  # the request's own grammar, not the server: a 400, no traceback logged
            logger.warning("a request failed: %s", exc)
            failure = EngineFailure(str(exc), 400, "invalid_grammar", exc.param)
        else:
            logger.error("a request failed; the engine goes on", exc_info=exc)
            failure = EngineFailure(f"the request failed: {type(exc).__name__}: {exc}", 500, "internal_error")
        if not handle.failed:
            handle.failed = True
            handle.emit(failure)

    def _release_slots(self, count: int, group: Group, ended) -> None:
        """``count`` of ``group``'s sequences ended: their places are free, and they are counted in ``ended`` (a
        counter of the metrics), but a beam search's step's, whose search counts itself (BeamSearch)."""
        with self.cond:
            self.in_system -= count
            if group.params.beam_step:
                self.beam_steps_in_system -= count
        if not group.params.beam_step:
            ended.inc(count)

    # -- prefill -----------------------------------------------------------------------------------------------
    def _prefill(self) -> None:
        """Feed prompts for up to ``prefill_token_budget`` tokens, in rounds: each round every prefilling group
        contributes its next piece, and the pieces run as ONE packed forward, so a burst of arrivals costs a
        forward per round between two decode steps, not one per prompt."""
        budget = self.settings.prefill_token_budget
        while True:
            pieces = self._next_pieces(budget)
            budget -= sum(end - group.pos for group, end in pieces)
            # Prompt logprobs need every position's logits; the packed forward keeps only each piece's last.
            packed = [(group, end) for group, end in pieces if not group.params.scores_prompt]
            for group, end in pieces:
                if group.params.scores_prompt:
                    self._prefill_piece(group, end)
            if len(packed) == 1:
                self._prefill_piece(*packed[0])
            elif packed:
                self._prefill_packed(packed)
            self._spawn_prefilled()
            if not pieces or budget <= 0:
                return

    def _next_pieces(self, budget: int) -> list[tuple[Group, int]]:
        """This round's ``(group, end)``: the next piece of each prefilling group, in arrival order, until the
        pieces reach ``budget`` tokens. Starts the groups it reaches and drops the cancelled ones."""
        pieces = []
        for group in list(self.prefilling):
            if budget <= 0:
                break
            if group.handle.cancelled:
                self.prefilling.remove(group)
                self._finish_cancelled(group, group.choice_indices)
                continue
            if not group.started:
                if self._awaits_shared_prefix(group):
                    continue
                self._start(group)
            if group.pos >= len(group.inputs):
                continue  # the whole prompt was cached: nothing to feed
            # Cut to the budget left: a whole piece past it would stall the running streams for up to
            # --prefill-chunk-tokens tokens whatever --prefill-token-budget says (512 under a budget of 10).
            end = min(group.pos + self.piece_tokens, len(group.inputs), group.pos + budget)
            if group.prefix_hint is not None and group.pos < group.prefix_hint < end:
                end = group.prefix_hint  # stop at the boundary worth caching
            pieces.append((group, end))
            budget -= end - group.pos
        return pieces

    def _awaits_shared_prefix(self, group: Group) -> bool:
        """Whether ``group`` should start later, from a prefix state another prefilling group is about to cache.

        Prompts of one burst often share a system prompt or are repeats. Started together they would each
        compute the shared part; one round later the first has cached it and the others start from its state.
        """
        if self.settings.prefix_cache_entries == 0 or group.params.scores_prompt:
            return False
        if self.prefix_entry_bytes > self.settings.prefix_cache_bytes:
            # The state waited for is never kept: each repeat would wait for the one before it, and a burst would be
            # prefilled one prompt after another instead of in one packed forward.
            return False
        if group.session is not None and group.session.cache is not None:
            return False  # it continues its session's state, not a cached prefix
        inputs = group.prompt_ids
        for other in self.prefilling:
            if not (other.started and other.cacheable and not other.params.scores_prompt
                    and other.adapter == group.adapter and other.params.cache_salt == group.params.cache_salt):
                continue
            hint = other.prefix_hint
            boundary = hint if hint is not None and other.pos < hint else len(other.inputs)
            if other.pos >= boundary or boundary < self.settings.prefix_cache_min_tokens or boundary > len(inputs):
                continue
            if inputs[0] == other.inputs[0] and inputs[:boundary] == other.inputs[:boundary]:
                return True
        return False

    def _spawn_prefilled(self) -> None:
        for group in list(self.prefilling):
            if group.started and group.pos >= len(group.inputs):
                # Removed only once spawned: if _spawn raises, _fail_all must still find the request.
                self._spawn(group)
                self.prefilling.remove(group)

    def _start(self, group: Group) -> None:
        group.started = True
        session = group.session
        if session is not None and session.cache is not None:
            group.cache = session.cache.clone()
            group.inputs = ([] if group.leaves_pending else session.pending) + group.prompt_ids
            group.prefix_hint = None
            group.cacheable = False
            group.continues = True
            group.handle.session_tokens = session.tokens
            self.metrics.session_resumes.inc()
            return
        group.inputs = group.prompt_ids
        # A prompt to score is run whole: a cached prefix would leave its positions without logits.
        if group.params.scores_prompt or self.settings.prefix_cache_entries == 0:
            return
        entry = self.prefix_cache.lookup(group.inputs, group.adapter, group.params.cache_salt,
                                         group.params.prefix_cache_tag)
        if entry is None:
            self.metrics.prefix_cache_misses.inc()
            return
        self.metrics.prefix_cache_hits.inc()
        self.metrics.prefix_cache_hit_tokens.inc(len(entry.tokens))
        group.cache = entry.cache.clone()
        group.pos = len(entry.tokens)
        group.handle.cached_tokens += group.pos
        if group.pos == len(group.inputs):
            group.last_logits = entry.logits

    def _prefill_piece(self, group: Group, end: int) -> None:
        """One group's piece ``inputs[pos:end]`` alone (a single piece, or a prompt that wants logprobs)."""
        piece = torch.tensor([group.inputs[group.pos : end]], dtype=torch.long, device=self.device)
        keep_all = group.params.scores_prompt
        with self.adapter_slots.applied([group.adapter], [end - group.pos]):
            out = self.model(input_ids=piece, cache=group.cache, use_cache=True,
                             retention_mode=PREFILL_MODE, logits_to_keep=0 if keep_all else 1, return_dict=True)
        self.metrics.prefill_batch.observe(1)
        group.cache = out.cache
        logits = out.logits[0].float().cpu()
        if keep_all:
            # The previous piece's last logits predict this piece's first token; logits[t] predicts pos+t+1.
            ids = group.inputs[group.pos + 1 : end]
            context = logits[: len(ids)]
            if group.last_logits is not None:
                ids = [group.inputs[group.pos], *ids]
                context = torch.cat([group.last_logits[None], context])
            group.prompt_lp.extend(self._lp_entries(context, ids, group.params.prompt_logprobs))
        self._piece_done(group, end, logits[-1])

    def _prefill_packed(self, pieces: list[tuple[Group, int]]) -> None:
        """Several groups' pieces as ONE forward: packed into a row (``cu_seqlens``), each continuing its own
        state (a zero one if it has none yet); only each piece's last logits are computed."""
        ids = [token for group, end in pieces for token in group.inputs[group.pos : end]]
        bounds = [0]
        for group, end in pieces:
            bounds.append(bounds[-1] + end - group.pos)
        cu_seqlens = torch.tensor(bounds, dtype=torch.long, device=self.device)
        if all(group.cache is None for group, _ in pieces):
            cache = RetNetCache(self.config.num_hidden_layers)  # the model starts every piece from zero
        else:
            cache = RetNetCache.concat([
                group.cache if group.cache is not None else RetNetCache.zeros(self.config, 1, self.device)
                for group, _ in pieces
            ])
        with self.adapter_slots.applied([group.adapter for group, _ in pieces],
                                        [end - group.pos for group, end in pieces]):
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device), cache=cache,
                             use_cache=True, retention_mode=PREFILL_MODE, cu_seqlens=cu_seqlens,
                             logits_to_keep=cu_seqlens[1:] - 1, return_dict=True)
        self.metrics.prefill_batch.observe(len(pieces))
        logits = out.logits[0].float().cpu()
        for (group, end), row, last in zip(pieces, out.cache.split(), logits):
            group.cache = row
            self._piece_done(group, end, last)

    def _piece_done(self, group: Group, end: int, last_logits: torch.Tensor) -> None:
        """``group``'s state now holds ``inputs[:end]``: advance it, and cache the state at a boundary."""
        keep_all = group.params.scores_prompt
        self.metrics.prefill_tokens.inc(end - group.pos)
        group.pos = end
        group.last_logits = last_logits
        at_boundary = end == group.prefix_hint or end == len(group.inputs)
        if group.cacheable and self.settings.prefix_cache_entries and not keep_all and at_boundary:
            self.prefix_cache.insert(group.inputs[:end], group.cache, group.last_logits, group.adapter,
                                     group.params.prefix_cache_tag, group.params.cache_salt)
            self._prefix_cache_metrics()

    def _lp_entries(self, logits: torch.Tensor, ids: list[int], k: int | None) -> list[TokenLogprob]:
        out = []
        for token, (value, rank, alts) in zip(ids, prompt_logprobs(logits, ids, k or 0)):
            out.append(self._logprob(token, value, alts, rank=rank))
        return out

    def _spawn(self, group: Group) -> None:
        """The prompt is in the state: sample each choice's first token and queue it to join the batch. Should
        something of this request's own raise meanwhile (its decoder, its grammar ...), it alone fails."""
        try:
            seqs, outputs = self._first_tokens(group)
        except Exception as exc:
            # Nothing of it was committed yet: its slots and session are released here, once.
            self._release_slots(group.n, group, self.metrics.failed)
            if group.session_id is not None:
                self.sessions.release(group.session_id)
            self._request_failed(group.handle, exc)
            group.cache = group.last_logits = None
            return
        for seq in seqs:
            if seq.finish_reason is None:
                self.joining.append((seq, group.cache))
            else:
                self._finished(seq, group.cache)
        # The joining entries hold the state until it is stacked into the batch; every sequence keeps its
        # group for as long as it runs, and must not keep a second copy of its state alive through it (nor,
        # for a packed prefill, the whole forward's states its row is a view of).
        group.cache = group.last_logits = None
        group.handle.emit(outputs)

    def _first_tokens(self, group: Group) -> tuple[list[Sequence], list[SeqOutput]]:
        """``group``'s choices, each with its first token sampled (none for a score-only prompt), not committed:
        neither joining the batch nor finished."""
        params = group.params
        ban = None
        if params.min_tokens:
            # EOS is masked with ignore_eos too, as vLLM does: min_tokens asks for that many tokens of text.
            ban = torch.tensor(sorted(t for t in params.stop_token_ids | self.eos_ids if t < self.vocab_size),
                               dtype=torch.long)
        blocked = self._blocked(params)
        # Where the text starts: the first token not skipped by decoding, unless a session's history precedes.
        start = None if group.continues else next(
            (i for i, token in enumerate(group.inputs) if token not in self.skipped_ids), len(group.inputs))
        context = self.detokenizer_context(group.inputs, params.skip_special_tokens)
        decode = self._decoder(params)
        texts = self.token_texts.setdefault((params.skip_special_tokens, params.spaces_between_special_tokens), {})
        seqs = []
        for j in range(group.n):
            # seed + j, j counted within this prompt's n (vLLM's rule): a prompt samples the same alone or
            # anywhere in a list of prompts.
            sampler = RowSampler(params, group.inputs, self.vocab_size, seed_offset=j, ban_ids=ban, blocked=blocked,
                                 grammar=params.grammar.matcher() if params.grammar is not None else None,
                                 history=group.session.seen if group.continues else None)
            seqs.append(Sequence(group, group.first_index + j, sampler,
                                 IncrementalDetokenizer(decode, **context, texts=texts),
                                 StopStrings(group.params.stop, group.params.include_stop_str_in_output),
                                 # Special tokens shown, even a prompt of them alone is text before it.
                                 at_start=start == len(group.inputs) and params.skip_special_tokens))
        # max_tokens 0 (a completion's echo): the prompt is scored, and saved in its session, but nothing sampled.
        score_only = group.params.max_tokens == 0
        if not score_only:
            logits = group.last_logits[None].expand(group.n, -1)
            sample = sample_step(logits, [s.sampler for s in seqs])
        prompt_lp = None
        if group.params.scores_prompt:
            # Entries for ``inputs``; a session's inputs start with its unfed tokens, which are not this
            # request's prompt: the echo (and prompt_logprobs) get the prompt's own, the first one scored after
            # the history.
            prompt_lp = [self._logprob(group.inputs[0], None), *group.prompt_lp]
            if start is not None:  # None: a session's history precedes, no token opens the text
                # A prompt echoed as its decoding shows its BOS, and the token after it keeps its space there.
                opens = start if group.text_start is None else group.text_start
                if opens < len(prompt_lp):
                    prompt_lp[opens] = self._at_start(prompt_lp[opens])
            prompt_lp = prompt_lp[len(group.inputs) - len(group.prompt_ids) :]
        outputs = []
        for i, seq in enumerate(seqs):
            if score_only:
                seq.finish_reason = "length"
                out = SeqOutput(seq.index, "", [], [] if group.params.logprobs is not None else None, "length")
            else:
                out = self._advance(seq, i, sample)
            out.prompt_logprobs = prompt_lp
            outputs.append(out)
        if not score_only and not group.params.beam_step:
            self.metrics.generation_tokens.inc(len(seqs))
        return seqs, outputs

    def _blocked(self, params: SamplingParams) -> torch.Tensor | None:
        """The ``[V]`` mask of the tokens no step may sample (outside ``allowed_token_ids``, and the bad words
        of one token), built once per prompt so that a step applies it in one batched write."""
        single = [ids[0] for ids in params.bad_words_ids if len(ids) == 1]
        if params.allowed_token_ids is None and not single:
            return None
        if params.allowed_token_ids is None:
            blocked = torch.zeros(self.vocab_size, dtype=torch.bool)
        else:
            blocked = torch.ones(self.vocab_size, dtype=torch.bool)
            blocked[torch.tensor(sorted(params.allowed_token_ids), dtype=torch.long)] = False
        if single:
            blocked[torch.tensor(single, dtype=torch.long)] = True
        return blocked

    # -- decode ------------------------------------------------------------------------------------------------
    def _rebuild_batch(self) -> None:
        # Aborts are marked first and the batch is chosen from finish_reason alone: ``cancelled`` flips on
        # the event loop at any moment, and a sequence kept by one look and aborted by the next would run
        # on and free its slot a second time.
        for seq in self.running:
            if seq.finish_reason is None and seq.group.handle.cancelled:
                seq.finish_reason = "abort"
                self._finish_cancelled(seq.group, [seq.index])
        keep = [i for i, s in enumerate(self.running) if s.finish_reason is None]
        for seq, _ in self.joining:
            if seq.finish_reason is None and seq.group.handle.cancelled:
                seq.finish_reason = "abort"
                self._finish_cancelled(seq.group, [seq.index])
        joining = [(s, c) for s, c in self.joining if s.finish_reason is None]
        leaving = set(self.preempting)
        self.preempting = []
        if leaving:
            keep = [i for i in keep if self.running[i] not in leaving]
        if len(keep) == len(self.running) and not joining:
            self.joining = []
            return
        # Views of the rows, copied once by concat (``select`` would first copy every row).
        rows = self.batch.split() if leaving or 0 < len(keep) < len(self.running) else None
        if leaving:
            with self.cond:
                for i, seq in enumerate(self.running):
                    if seq in leaving and seq.finish_reason is None:
                        # Its row alone copied: a view would keep the whole batch's states alive while it waits.
                        bisect.insort(self.preempted, (seq, rows[i].clone()), key=_preempted_rank)
                        if seq.draft_state is not None:  # likewise a view of the last draft step's states
                            seq.draft_state.cache = seq.draft_state.cache.clone()
                        self.metrics.preemptions.inc()
                self.metrics.queue_depth.set(self._queued())
        parts = []
        if keep:
            if len(keep) == len(self.running):
                parts.append(self.batch)
            else:
                parts.extend(rows[i] for i in keep)
        parts.extend(cache for _, cache in joining)
        self.running = [self.running[i] for i in keep] + [s for s, _ in joining]
        # Only now: should a copy above fail (a GPU out of memory), _fail_all still finds the joining requests.
        self.joining = []
        self.batch = RetNetCache.concat(parts) if parts else None

    def _decode_step(self) -> None:
        # The step's time includes proposing: a draft model's forwards are part of what a step costs.
        start = time.perf_counter()
        if self.speculative is not None:
            if self.drafter is not None:
                drafts = self.drafter.propose(self.running)
            else:
                drafts = propose_drafts(self.running, self.speculative)
            if any(drafts) or any(seq.lag > 1 for seq in self.running):
                self._speculative_step(drafts, start)
                return
        last = torch.tensor([[s.tokens[-1]] for s in self.running], dtype=torch.long, device=self.device)
        # Each layer's new state written over its old one, not allocated (~10% of a CPU step at batch 16, see
        # benchmarks/inplace_decode.py): the batch's tensors are the engine's alone. _rebuild_batch made them
        # (concat copies every row in), and all that leaves the batch is copied out (a preempted row's clone, a
        # session's select, a prefix entry's insert); only this forward writes in place (a speculative step keeps
        # the states from before it).
        batch = self.batch
        # Except after a speculative step that caught rows up: its batch is views of that forward's states, the
        # catch-up rows after them, which writes in place would keep alive; this step's new states let them go.
        batch.update_in_place = all(s is None or s.untyped_storage().nbytes() == s.nbytes for s in batch.states)
        try:
            with self.adapter_slots.applied([s.group.adapter for s in self.running]):
                out = self.model(input_ids=last, cache=batch, use_cache=True, retention_mode="recurrent",
                                 logits_to_keep=1, return_dict=True)
        finally:
            batch.update_in_place = False
        self.batch = out.cache
        samplers = [s.sampler for s in self.running]
        # On a GPU the forward is still running: the grammars' masks (CPU work, on the tokens so far) overlap it.
        masks = grammar_masks_of(samplers)
        logits = out.logits[:, -1].float().cpu()
        sample = sample_step(logits, samplers, masks)
        per_handle: dict[int, tuple[RequestHandle, list[SeqOutput]]] = {}
        for i, seq in enumerate(self.running):
            try:
                output = self._advance(seq, i, sample)
            except Exception as exc:
                self._sequence_failed(seq, exc)
                continue
            if seq.finish_reason is not None:
                self._finished(seq, None, row=i)
            handle = seq.group.handle
            per_handle.setdefault(id(handle), (handle, []))[1].append(output)
        self.metrics.generation_tokens.inc(sum(len(outputs) for _, outputs in per_handle.values()))
        emit_all(list(per_handle.values()))
        self.metrics.step.observe(time.perf_counter() - start)

    # -- n-gram speculative decoding (--speculative-config) ------------------------------------------------------
    def _speculative_step(self, drafts: list[list[int]], start: float) -> None:
        """One step of every running sequence, those with drafts verifying them: ONE packed forward feeds each row
        the tokens its state lacks (its last sampled token, or more, see ``Sequence.lag``) then its drafts
        (``cu_seqlens``, each continuing its own state, every position's logits kept). Position by position from
        the last token on, the rows still going are sampled exactly as a decode step samples them (the same
        ``sample_step``, masks and penalties over the tokens so far, one draw of the row's generator a token) and
        each token goes through ``_advance``; a row goes on to the next position while its token is its draft.
        The drafts being fixed tokens, accepting one iff the target's own sample equals it is rejection sampling
        with a one-hot proposal: the tokens are distributed, and for a seed drawn, exactly as without
        speculation.

        A row whose drafts were all taken (or that had none) keeps the forward's state. One that refused a draft
        needs the state after its last token and the drafts it took, which no forward computed: it keeps the
        state from before its drafts, and its next step feeds the tokens since (``lag``) followed by new drafts, in
        the same one forward as the other rows. A row that proposes drafts with more than its last token to feed
        is also fed those tokens alone, as a segment of its own continuing a copy of its state: a refusal then
        leaves it the state after them, not the one from before the step, so that a row refusing step after step
        never feeds more than k + 1 tokens before its drafts. So a step costs one forward whatever was refused;
        only a row that ends while behind runs its missing tokens now (a second, smaller forward), so that
        ``_finished`` finds every token but the last in its row's state, as after a decode step."""
        running = self.running
        feeds = [[*seq.tokens[-seq.lag :], *draft] for seq, draft in zip(running, drafts)]
        # Row i's first sample is read at its last token's position, ``opens[i]`` in the packed row.
        opens, offset = [], 0
        for seq, feed in zip(running, feeds):
            opens.append(offset + seq.lag - 1)
            offset += len(feed)
        slots = [seq.group.adapter for seq in running]
        # The rows catching up that draft: their catch-up alone, after every row's feed (``opens`` stay where they
        # are), each continuing a copy of its row's state; ``catch_up_row[i]``: that segment's row in the output.
        catching_up = [i for i, (seq, draft) in enumerate(zip(running, drafts)) if draft and seq.lag > 1]
        catch_up_row = {i: len(running) + j for j, i in enumerate(catching_up)}
        cache = self.batch
        if catching_up:
            cache = self.batch.select([*range(len(running)), *catching_up])
            self.batch = None  # the copy holds its rows: not three sets of states alive during the forward, but two
        # The forward replaces the cache's state tensors (never writes into them): these stay the states before it.
        before = RetNetCache(len(cache))
        before.states, before.offsets, before.seen_tokens = list(cache.states), cache.offsets, 0
        # (the catch-up segments' logits are never read: only the rows' own feeds, the first `offset` positions)
        out = self._packed_forward([*feeds, *(feeds[i][: running[i].lag] for i in catching_up)], cache,
                                   [*slots, *(slots[i] for i in catching_up)], keep_all=True,
                                   kept_positions=offset if catching_up else None)
        # As in a decode step, the first position's grammar masks overlap the forward on a GPU; the next ones
        # depend on the tokens sampled before them.
        masks = grammar_masks_of([seq.sampler for seq in running])
        # Read position by position, the rows still going only: the positions past a refused draft never leave
        # the device (all of them would be (k + 1) × the rows × the vocabulary each step).
        logits = out.logits[0]
        outputs: list[list[SeqOutput]] = [[] for _ in running]
        going = list(range(len(running)))
        failed: set[int] = set()  # rows whose request failed (see _sequence_failed): no catching up, no output
        for position in range(1 + max(len(draft) for draft in drafts)):
            rows = [i for i in going if position <= len(drafts[i])]
            if not rows:
                break
            samplers = [running[i].sampler for i in rows]
            if position:
                masks = grammar_masks_of(samplers)
            index = torch.tensor([opens[i] + position for i in rows], device=logits.device)
            sample = sample_step(logits.index_select(0, index).float().cpu(), samplers, masks)
            going = []
            for j, i in enumerate(rows):
                seq = running[i]
                try:
                    outputs[i].append(self._advance(seq, j, sample))
                except Exception as exc:
                    self._sequence_failed(seq, exc)
                    failed.add(i)
                    continue
                if (seq.finish_reason is None and position < len(drafts[i])
                        and sample.tokens[j] == drafts[i][position]):
                    going.append(i)
        self.batch = out.cache
        if catching_up:
            # The batch is the forward's first rows (views); the catch-up segments' rows after them stay in ``out``.
            with_catch_ups = RetNetCache(len(self.batch))
            with_catch_ups.states, with_catch_ups.offsets = list(self.batch.states), self.batch.offsets
            self.batch.states = [state[: len(running)] for state in self.batch.states]
            self.batch.offsets = self.batch.offsets[: len(running)]
        # The rows that refused a draft (or met a stop inside their drafts) go back to the state before their drafts.
        behind = [i for i in range(len(running)) if len(outputs[i]) - 1 < len(drafts[i]) and i not in failed]
        for i, seq in enumerate(running):
            if i not in behind:
                seq.lag = 1
            elif i in catch_up_row:  # its catch-up segment's state: every token before this step's
                seq.lag = len(outputs[i])
            else:  # the state from before the step
                seq.lag += len(outputs[i])
        from_before = [i for i in behind if i not in catch_up_row]
        if from_before:
            self._put_rows(from_before, before.select(from_before))
        from_catch_up = [i for i in behind if i in catch_up_row]
        if from_catch_up:
            self._put_rows(from_catch_up, with_catch_ups.select([catch_up_row[i] for i in from_catch_up]))
        # (A row back at its catch-up's state that refused its first draft holds every token but the last already.)
        ended = [i for i in behind if running[i].finish_reason is not None and running[i].lag > 1]
        if ended:
            caught_up = self._packed_forward([running[i].tokens[-running[i].lag : -1] for i in ended],
                                             self.batch.select(ended), [slots[i] for i in ended], keep_all=False)
            self._put_rows(ended, caught_up.cache)
        proposed = [i for i, draft in enumerate(drafts) if draft]
        self.metrics.spec_drafts.inc(len(proposed))
        self.metrics.spec_draft_tokens.inc(sum(len(drafts[i]) for i in proposed))
        self.metrics.spec_accepted_tokens.inc(sum(accepted_drafts(drafts[i], outputs[i]) for i in proposed))
        self.metrics.generation_tokens.inc(sum(len(row_outputs) for row_outputs in outputs))
        per_handle: dict[int, tuple[RequestHandle, list[SeqOutput]]] = {}
        for i, seq in enumerate(running):
            if i in failed:
                continue
            if seq.finish_reason is not None:
                self._finished(seq, None, row=i)
            handle = seq.group.handle
            per_handle.setdefault(id(handle), (handle, []))[1].append(_joined(outputs[i]))
        emit_all(list(per_handle.values()))
        self.metrics.step.observe(time.perf_counter() - start)

    def _put_rows(self, rows: list[int], states: RetNetCache) -> None:
        """Write ``states``' rows over rows ``rows`` of the batch (in place: the batch's tensors are the last
        forward's own)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer, state in enumerate(states.states):
            self.batch.states[layer].index_copy_(0, index, state)
        self.batch.offsets.index_copy_(0, index, states.offsets)

    def _packed_forward(self, feeds: list[list[int]], cache: RetNetCache, slots: list[int], keep_all: bool,
                        kept_positions: int | None = None):
        """``feeds`` (sequence i's tokens continue ``cache`` row i, under LoRA slot ``slots[i]``) as one packed
        recurrent forward: every position's logits (``keep_all``; the first ``kept_positions`` of them when given),
        else each sequence's last."""
        cu_seqlens = torch.tensor([0, *itertools.accumulate(len(feed) for feed in feeds)], dtype=torch.long,
                                  device=self.device)
        ids = torch.tensor([[token for feed in feeds for token in feed]], dtype=torch.long, device=self.device)
        if not keep_all:
            keep = cu_seqlens[1:] - 1
        else:
            keep = 0 if kept_positions is None else torch.arange(kept_positions, device=self.device)
        with self.adapter_slots.applied(slots, [len(feed) for feed in feeds]):
            return self.model(input_ids=ids, cache=cache, use_cache=True, retention_mode=VERIFY_MODE,
                              cu_seqlens=cu_seqlens, logits_to_keep=keep, return_dict=True)

    def _advance(self, seq: Sequence, row: int, sample) -> SeqOutput:
        """Record the token sampled for ``seq`` (row ``row`` of ``sample``) and apply the stopping rules. The caller
        counts the step's tokens in ``generation_tokens``, once a step (the counter takes a lock each call)."""
        if seq.sampler.grammar is not None:
            seq.sampler.grammar.check()  # its request fails alone (GrammarFailed), not end on a text it does not admit
        token = sample.tokens[row]
        seq.tokens.append(token)
        count = len(seq.tokens)
        now = time.perf_counter()
        if count == 1:
            # Time to first token is a request's (vLLM's, where each prompt is one): its n choices sample their
            # first tokens together, and observing each would weigh a request by its n.
            if not seq.group.params.beam_step and seq.index == seq.group.first_index:
                self.metrics.ttft.observe(now - seq.group.handle.arrival)
        else:
            self.metrics.itl.observe(now - seq.t_last)
        seq.t_last = now
        params = seq.group.params
        # vLLM's rule: no stop condition is checked on the first min_tokens tokens (their stop tokens were
        # masked, and a stop string wholly in their text does not end the choice, nor is it found later).
        checked = count > params.min_tokens
        stop_token = checked and ((token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids)
        # vLLM's detokenizer leaves a stop token's text out unless include_stop_str_in_output (EOS, a special
        # token, decodes to nothing either way).
        skip = stop_token and not params.include_stop_str_in_output
        text = "" if skip else seq.stops.push(seq.detok.push(token), search=checked)
        finish = None
        # A grammar that admits nothing more has its text complete (the masks let EOS through only there).
        if seq.stops.stopped or stop_token or (seq.sampler.grammar is not None and seq.sampler.grammar.ended):
            finish = "stop"
        elif count >= params.max_tokens:
            finish = "length"
        if finish is not None and not seq.stops.stopped:
            text += seq.stops.push(seq.detok.flush(), search=checked)
            text += "" if seq.stops.stopped else seq.stops.flush()
            finish = "stop" if seq.stops.stopped else finish
        seq.finish_reason = finish
        stop_reason = None
        if finish is not None:
            # A special token the output leaves out (a stop token's, or any with skip_special_tokens, as an EOS
            # with include_stop_str_in_output still is) is in the state, not in the text.
            unshown = skip or (params.skip_special_tokens and token in self.skipped_ids)
            seq.hidden_end = seq.stops.cut if seq.stops.stopped else self._decode_all([token]) if unshown else ""
            # vLLM's stop_reason: the stop string met (it wins over a stop token whose kept text holds it: vLLM's
            # detokenizer looks for stop strings after the token's check), else the stop token (stop_token_ids',
            # or an EOS id other than the tokenizer's: generation_config's, which vLLM adds to the stop tokens);
            # None for the tokenizer's EOS (vLLM checks it first, so also when stop_token_ids lists it), the length
            # and a grammar's end.
            if seq.stops.stopped:
                stop_reason = seq.stops.matched
            elif stop_token and not (token == self.primary_eos and not params.ignore_eos):
                stop_reason = token
        logprobs = None
        if params.logprobs is not None:
            logprobs = [self._logprob(token, sample.logprobs[row], sample.top[row] if sample.top else [],
                                      seq.at_start)]
        if seq.at_start and (token not in self.skipped_ids or not params.skip_special_tokens):
            seq.at_start = False
        return SeqOutput(seq.index, text, [token], logprobs, finish, stop_reason=stop_reason)

    def _finished(self, seq: Sequence, cache: RetNetCache | None, row: int | None = None) -> None:
        """A sequence ended normally: free its slot, save its session (state + the unfed last token), and keep
        the state after its answer in the prefix cache.

        ``cache``: its state, when it ended at its first token (still the prompt's state); otherwise ``row``
        of the batch, which the last decode step left holding every token but the one it sampled.

        A session changes here and only here: with every token of the response generated. A request whose
        client left after this is still saved (the response was complete, the client did not read it); one
        cancelled before ends in :meth:`_finish_cancelled` and leaves the session as it was, never half
        updated.
        """
        group = seq.group
        if group.session_id is not None:
            state = cache.clone() if cache is not None else self.batch.select([row])
            earlier = group.session.seen if group.continues else None
            # The tokens fed, not the last one sampled: the next turn feeds it (its inputs count it then), or a chat
            # turn leaves it out (OpenAIServing._closer_leaves_out), when the history must not count it either.
            seen = torch.tensor(group.inputs + seq.tokens[:-1], dtype=torch.long)
            seen = (seen if earlier is None else torch.cat([earlier, seen])).unique()
            self.sessions.release(group.session_id, state, seq.tokens[-1:],  # none if max_tokens was 0
                                  tokens=len(group.prompt_ids) + len(seq.tokens), seen=seen,
                                  hidden_end=seq.hidden_end)
            self.metrics.sessions.set(len(self.sessions))
        self._cache_answer(seq, cache, row)
        self._release_slots(1, group, self.metrics.finished.labels(seq.finish_reason))

    def _cache_answer(self, seq: Sequence, cache: RetNetCache | None, row: int | None) -> None:
        """Keep the state after ``seq``'s prompt and answer as a prefix entry, so that a continuation (a chat's
        next turn, a Responses ``previous_response_id``) prefills only its new tokens, as vLLM's automatic prefix
        caching covers generated tokens.

        However the choice ended (a stop token or string, its length, a grammar's end, after min_tokens), the
        state has absorbed ``inputs + tokens[:-1]``: each sampled token is fed by the next decode step, the last
        one never. The key is those tokens, not the text returned (a stop string's tokens are in the state), and
        the entry has no logits (none were computed after it): only a longer prompt starts from it.
        """
        group = seq.group
        # A session's continuation: its state holds history that is not in ``inputs``. A scored prompt: no
        # entry for its prompt either. One token or none: the state is the prompt's, cached with its logits.
        if (not self.settings.prefix_cache_answers or self.settings.prefix_cache_entries == 0 or not group.cacheable
                or group.params.scores_prompt or len(seq.tokens) < 2):
            return
        # A view of the row: the insert copies it only if the entry fits (``select`` would copy it first).
        state = cache if cache is not None else _row_view(self.batch, row)
        self.prefix_cache.insert(group.inputs + seq.tokens[:-1], state, None, group.adapter,
                                 salt=group.params.cache_salt)
        self._prefix_cache_metrics()

    # -- helpers -----------------------------------------------------------------------------------------------
    def unfinished_tail(self, ids: list[int]) -> int:
        """How many of the last tokens of ``ids`` hold a character they leave unfinished (a prompt sent as token
        ids may end inside one): the text of what follows them finishes it. 0 when the last character is whole,
        broken for good, or followed by a special token. The count reaches back to a token that starts on a
        character boundary (a byte-level token may end one character and begin the next)."""
        count = 0
        while True:
            pieces = []  # the last bytes before the tail, latest first: unfinished ones are at most 3
            for token in reversed(ids[max(0, len(ids) - count - 3) : len(ids) - count]):
                if token in self.skipped_ids:
                    break
                pieces.append(self.token_bytes(token))
            missing = len(unfinished_character(b"".join(reversed(pieces))))
            if not missing:
                return count
            for piece in pieces:
                count += 1
                missing -= len(piece)
                if missing <= 0:
                    break

    def detokenizer_context(self, ids: list[int], skip_special_tokens: bool) -> dict[str, Any]:
        """An IncrementalDetokenizer's ``context_ids`` and ``unfinished`` for an answer after the prompt ``ids``
        (the engine's sequences and the beam search's answers alike): :meth:`unfinished_tail`, and ``ids``, unless a
        special token the decoding drops (``skip_special_tokens``) ends a character the prompt leaves unfinished before
        it (:meth:`_closed_before_special`)."""
        return {"context_ids": self._closed_before_special(ids, skip_special_tokens),
                "unfinished": self.unfinished_tail(ids)}

    def _closed_before_special(self, ids: list[int], skip_special_tokens: bool) -> list[int]:
        """``ids``, unless a special
        token the decoding drops (``skip_special_tokens``) ends a character the prompt leaves unfinished before it.
        Shown, a special token ends that character (the echo has it as U+FFFD, as HF's decode with special tokens
        shown); dropped, the decoding would join its bytes to those after the token, the generated ones too: the
        character they make would take the place of the U+FFFD the prompt's text has (the generated bytes lost from
        the text), and SentencePiece's byte-fallback decoder would make a run of byte tokens holding it all U+FFFD. A
        token of one ASCII letter before the special token ends the character as the special token does; it adds
        the same text to both decodings the detokenizer subtracts, so the completion's text is unchanged by it."""
        letter = self.letter_token if skip_special_tokens else None
        if letter is None:
            return ids
        # Only the detokenizer's window is decoded (at most MAX_WINDOW tokens and the 3 of a character before them):
        # a special token or character further back is not in it, and a prompt of many tokens is not read through.
        low = max(0, len(ids) - MAX_WINDOW - 3)
        last = len(ids)
        while last > low and ids[last - 1] not in self.skipped_ids:
            last -= 1
        if last == low:
            return ids
        at, before = last - 1, b""  # the bytes before it, other special tokens passed over; 3 can be unfinished
        while at > low and len(before) < 3:
            at -= 1
            if ids[at] not in self.skipped_ids:
                before = self.token_bytes(ids[at]) + before
        if not unfinished_character(before):
            return ids
        return [*ids[: last - 1], letter, *ids[last - 1 :]]

    @functools.cached_property
    def letter_token(self) -> int | None:
        """A token of one ASCII letter (SentencePiece's ``▁a``, byte-level BPE's ``a``), not one of SentencePiece's
        byte tokens (its byte-fallback decoder would join it to the bytes after it); None if there is none."""
        for letter in "aeo":
            for piece in (letter, "\u2581" + letter, "\u0120" + letter):
                token = self.tokenizer.convert_tokens_to_ids(piece)
                if (isinstance(token, int) and token not in self.skipped_ids
                        and self.token_bytes(token).strip() == letter.encode()):
                    return token
        return None

    def _decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_all(self, ids: list[int]) -> str:
        """``ids``' text, special tokens' included."""
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _decoder(self, params: SamplingParams):
        """The ``ids -> text`` of a request's output, HF's ``decode`` with vLLM's ``skip_special_tokens`` (false:
        special tokens' text kept) and, for a slow tokenizer, ``spaces_between_special_tokens`` (a fast one has
        no such option, as in HF and vLLM)."""
        skip, spaces = params.skip_special_tokens, params.spaces_between_special_tokens
        if self.backend is not None:
            # The Rust decode itself, its option bound: a detokenizer calls it twice a token a stream, and a Python
            # wrapper between them would cost a frame each time.
            return functools.partial(self.backend.decode, skip_special_tokens=skip)
        if skip and spaces:  # HF's defaults
            return self._decode
        return lambda ids: self.tokenizer.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)

    def _logprob(self, token: int, value: float | None, alternatives=(), start: bool = False,
                 rank: int | None = None) -> TokenLogprob:
        """``start``: the token (and each alternative) would open the text."""
        if value is not None and value < MIN_LOGPROB:
            value = MIN_LOGPROB  # -inf (a token the model never writes) is no JSON number
        top = [self._logprob(t, v, start=start) for t, v in alternatives]
        if start:
            return TokenLogprob(token, self.token_bytes.label(token, True), self.token_bytes.start(token), value, top,
                                rank)
        return TokenLogprob(token, self.token_bytes.label(token), self.token_bytes(token), value, top, rank)

    def _at_start(self, entry: TokenLogprob) -> TokenLogprob:
        return self._logprob(entry.token_id, entry.logprob, [(t.token_id, t.logprob) for t in entry.top], True,
                             entry.rank)

    def _fail_all(self, message: str, shutdown: bool = False) -> None:
        """End every request in the engine with ``message``: the engine died (its sequences counted as failed), or
        (``shutdown``) it stopped with these left after the grace, which are cancelled and told the server is
        going, as a request refused then is (``unavailable``), not that the engine failed."""
        with self.cond:
            # (a beam search's steps fail or are cancelled with their search, which counts itself)
            (self.metrics.cancelled if shutdown else self.metrics.failed).inc(self.in_system - self.beam_steps_in_system)
            self.adapter_slots.fail_installs(message)
            groups = list(self.waiting) + list(self.prefilling)
            self.waiting.clear()
            handles = {id(g.handle): g.handle for g in groups}
            seqs = self.running + [s for s, _ in self.joining] + [s for s, _ in self.preempted]
            for seq in seqs:
                handles[id(seq.group.handle)] = seq.group.handle
            for group in groups:
                if group.session_id is not None:
                    self.sessions.release(group.session_id)
            for seq in seqs:
                if seq.group.session_id is not None and seq.finish_reason is None:
                    self.sessions.release(seq.group.session_id)
            self.prefilling, self.running, self.joining, self.batch = [], [], [], None
            self.preempting, self.preempted = [], []
            self.in_system = self.beam_steps_in_system = 0
        for handle in handles.values():
            handle.emit(EngineFailure(message, code="unavailable" if shutdown else "engine_failure"))
        self.metrics.running.set(0)
        self.metrics.queue_depth.set(0)
        self.metrics.prefilling.set(0)


def _mask_padded_vocabulary(model, bound: int) -> None:
    """The logits of ids ``bound`` and up set to -inf, in every forward of ``model``: a vocabulary padded past the
    tokenizer's ids (``retnet-train --model.vocab_size``, as nanoGPT pads GPT-2's 50257 to 50304) has rows no text
    holds, which vLLM trims from the logits. No request then samples, scores or lists an id the tokenizer cannot
    decode; the other ids' probabilities are those of the trimmed logits."""
    head = model.get_output_embeddings()
    if head is None:
        return

    def mask(module, args, logits: torch.Tensor) -> torch.Tensor:
        logits[..., bound:] = float("-inf")
        return logits

    head.register_forward_hook(mask)


def _piece_tokens(config, chunk_tokens: int) -> int:
    """The most tokens of a prompt one prefill forward feeds: ``--prefill-chunk-tokens``, and with xPos at most one
    packed frame (28 288 positions at ``xpos_scale_base`` 512): a packed forward refuses a longer sequence, and two
    long prompts prefilled in one round (or a draft model catching up on one) would take the engine down."""
    if getattr(config, "use_xpos", False):
        return min(chunk_tokens, xpos_span(config, XPOS_PACKED_MAX_GROWTH))
    return chunk_tokens


def _group_rank(group: Group) -> tuple[int, int]:
    return group.rank


def _preempted_rank(entry: tuple[Sequence, RetNetCache]) -> tuple[int, int, int]:
    return entry[0].rank


def _row_view(batch: RetNetCache, row: int) -> RetNetCache:
    """Row ``row`` of ``batch`` as views of its tensors (``split``'s row, without splitting every row)."""
    out = RetNetCache(len(batch))
    out.states = [s[row : row + 1] for s in batch.states]
    out.offsets = batch.offsets[row : row + 1]
    out.seen_tokens = batch.seen_tokens  # as select keeps it
    return out


def _joined(outputs: list[SeqOutput]) -> SeqOutput:
    """One step's outputs of a choice (several tokens when drafts were accepted) as one output."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    logprobs = None if first.logprobs is None else [entry for out in outputs for entry in out.logprobs]
    return SeqOutput(first.index, "".join(out.text for out in outputs), [t for out in outputs for t in out.token_ids],
                     logprobs, outputs[-1].finish_reason, stop_reason=outputs[-1].stop_reason)


def freeze_startup_heap() -> None:
    """Move every object alive now (the loaded model's, the tokenizer's, torch's and the libraries' heap) to the
    garbage collector's permanent generation, as vLLM does before serving. A full collection scans every tracked
    object, and a request's allocations trigger them: one request (n=8, 1024 tokens, top_logprobs 20) saw 6 of them,
    2.7 s with every thread stopped (every stream with them); with the heap frozen, 1.8 s. Garbage is collected
    first, so that it is not kept forever. Called by an engine whose process entry asked for it
    (``freeze_heap_when_ready``), right after its model loaded: not for every app a process makes (tests,
    run_batch), where freezing would pin each app's objects."""
    gc.collect()
    gc.freeze()


def mark_ready(engine: ModelThread) -> None:
    """An engine whose model has just loaded (either one: this and the pooling engine) turns ready, its heap frozen
    first where its process asked for it (``freeze_heap_when_ready``)."""
    if engine.freeze_heap_when_ready:
        freeze_startup_heap()
    engine.ready = True
    engine.metrics.engine_ready.set(1)


def _device(settings: ServeSettings) -> torch.device:
    """``--device``, ``auto`` being cuda when there is one."""
    requested = settings.device
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def _dtype(settings: ServeSettings, device: torch.device) -> str:
    """``--dtype`` on ``device``: ``auto`` is bfloat16 on CUDA, float32 elsewhere."""
    if settings.dtype != "auto":
        return settings.dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def _check_session_bytes(settings: ServeSettings, config) -> None:
    """Without --session-dir, a --session-bytes that cannot hold one session evicts every session as its turn
    ends: each continuation would silently start over without its history. A session holds its state and the
    distinct token ids of its history (int64, for the repetition penalty), at most one a vocabulary entry."""
    if settings.session_dir is not None or settings.max_sessions == 0:
        return
    state = RetNetCache.zeros(config, 1, device="meta").nbytes()
    history = 8 * int(config.vocab_size)
    if settings.session_bytes < state + history:
        raise StartupError(f"--session-bytes {settings.session_bytes} cannot hold one session: its state is {state} "
                           f"bytes ({config.num_hidden_layers} layers of {config.num_attention_heads} heads, "
                           f"{config.head_dim} x {config.value_head_dim} fp32) and the ids of the tokens it has seen "
                           f"up to {history} more; give at least {state + history}, or --max-sessions 0 to serve no "
                           "sessions")


def _load_config(model_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _eos_ids(model_dir: str, tokenizer, config) -> set[int]:
    ids: set[int] = set()

    def add(value):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config, "eos_token_id", None))
    add(getattr(tokenizer, "eos_token_id", None))
    if model_dir and (Path(model_dir) / "generation_config.json").exists():
        from transformers import GenerationConfig

        with contextlib.suppress(OSError, ValueError):
            add(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    return ids


__all__ = ["Engine"]
