"""The LoRA adapters an engine serves, and which of them are installed in its model.

Each adapter served has a name (what requests ask for) and a slot (what the model's wrapped Linear layers key its
matrices by, and what :class:`~retnet.serve.lora.LoraSlots` routes a forward's rows to). :class:`AdapterSlots`
keeps both and changes them only where it is safe to:

- on the event loop (vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``): an adapter read is queued
  under a new slot, and published under its name once the scheduler installed it; an adapter unloaded or
  replaced is retired, its requests finishing under it;
- on the scheduler thread, between two forwards: the queued adapters are installed, and the retired slots no
  request uses any more are freed (their matrices, prefix-cache entries and sessions dropped);
- with ``--max-cpu-loras``, the installed adapters are a bounded set, least recently admitted first: a request
  naming an evicted adapter waits while a worker thread reads it again from its directory, and the read
  adapter takes the place of the least recently used idle one.

The engine owns one, shares its condition variable (the scheduler's lock) with it, and tells it which slots its
sequences use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from retnet.serve.lora import (
    LoraAdapter,
    LoraChanged,
    LoraSlots,
    install,
    install_adapter,
    linear_modules,
    load_adapter,
    meta_model,
    read_again,
    uninstall_adapter,
)
from retnet.serve.metrics import ServeMetrics
from retnet.serve.sequence import EngineFailure, EngineUnavailable
from retnet.serve.settings import ServeSettings

logger = logging.getLogger("retnet.serve")


class AdapterSlots:
    """The adapters served by name and slot, the installs queued, the slots retiring, and (``--max-cpu-loras``)
    the slots installed and those being read again.

    ``cond``: the engine's condition variable, which guards everything here but ``adapters`` and ``loading``
    (event loop only). The engine's side, called under it: ``admitted_slots()``, the slots of the sequences
    admitted (prefilling, joining, running or preempted, whose adapters stay installed while their states wait;
    the base, 0, not counted); ``waiting_slots()``, those of the requests waiting; ``fail_waiting(slot,
    failure)``, end the waiting requests of a slot that cannot be served; ``forget(slot)``, drop the prefix-cache
    entries and sessions made under a freed slot (returns the sessions dropped).
    """

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics, cond: threading.Condition, model, config, *,
                 admitted_slots: Callable[[], set[int]], waiting_slots: Callable[[], set[int]],
                 fail_waiting: Callable[[int, EngineFailure], None], forget: Callable[[int], int]):
        """``model``: the model when given (its Linear layers are read for their shapes), else None: ``config``'s
        are built on the meta device."""
        self.settings = settings
        self.metrics = metrics
        self.cond = cond
        self.admitted_slots = admitted_slots
        self.waiting_slots = waiting_slots
        self.fail_waiting = fail_waiting
        self.forget = forget
        self.model = None  # set by start(), once the engine loaded it
        self.device = torch.device("cpu")
        # The base model's Linear layers (shapes only are read), which adapters are checked against; none when no
        # adapter can ever be served.
        self.linears = {}
        if settings.lora or settings.allow_runtime_lora_updating:
            self.linears = linear_modules(model if model is not None else meta_model(config))
        # LoRA adapters served, by name, in the order they were loaded. Changed on the event loop only (the routes
        # that read it run there too), and replaced whole rather than changed in place, so that a reader on another
        # thread iterates a consistent dict. The startup ones are read and checked now (a bad one stops the server
        # before it loads the model) and take slots 1..n.
        self.adapters: dict[str, LoraAdapter] = {}
        for adapter in self._read_adapters():
            adapter.slot = len(self.adapters) + 1
            self.adapters[adapter.name] = adapter
        self.next_slot = len(self.adapters) + 1  # monotonic: an unloaded adapter's slot is never given again
        self.loading: set[str] = set()  # names of adapters read and queued, not yet installed (event loop)
        self.lora: LoraSlots | None = None
        metrics.lora_adapters.set(len(self.adapters))
        # Adapters to install at the scheduler's next iteration, between two forwards, each with the event loop and
        # future to publish it on: (adapter, loop, future); guarded by cond.
        self.installs: list[tuple[LoraAdapter, asyncio.AbstractEventLoop, asyncio.Future]] = []
        # Slots no longer served (unloaded or replaced), with the adapter they held, whose matrices are freed once
        # no request accepted under them is left; guarded by cond.
        self.retiring: dict[int, LoraAdapter] = {}
        # The adapters whose matrices are installed in the model, by slot, least recently admitted first: with
        # --max-cpu-loras, the others are read again when a request needs them (loaded), evicting the first idle
        # one once the read succeeded (_reinstall). ``rereading``: the slots being read on a worker thread, each
        # counting on a free place or an idle adapter (_has_room); ``reread``: their results, (adapter, the adapter
        # read or the error), for the scheduler to install. Guarded by cond.
        self.resident: OrderedDict[int, LoraAdapter] = OrderedDict()
        self.rereading: set[int] = set()
        self.reread: list[tuple[LoraAdapter, LoraAdapter | Exception]] = []

    def _read_adapters(self) -> list[LoraAdapter]:
        """Every --lora-modules adapter, read and checked; past the first --max-cpu-loras, only its name, path and
        fingerprint are kept (it is read again when a request names it)."""
        adapters = []
        for module in self.settings.lora:
            adapter = load_adapter(module, self.linears, self.settings.max_lora_rank)
            if self.settings.max_cpu_loras is not None and len(adapters) >= self.settings.max_cpu_loras:
                adapter.weights.clear()
                adapter.magnitudes.clear()
            adapters.append(adapter)
        return adapters

    def start(self, model, device: torch.device) -> None:
        """Install the startup adapters (the first --max-cpu-loras of them) in ``model``, loaded on ``device``."""
        self.model, self.device = model, device
        if self.adapters:
            adapters = list(self.adapters.values())[: self.settings.max_cpu_loras]  # None: all of them
            self.lora = install(self.model, adapters, self.device, next(self.model.parameters()).dtype)
            for adapter in adapters:
                adapter.weights.clear()  # the installed copies (on the GPU, in the model's dtype) are the ones used
                self.resident[adapter.slot] = adapter
            self.metrics.lora_adapters_loaded.set(len(self.resident))

    def applied(self, slots: list[int], counts: list[int] | None = None):
        """The context to run a forward in whose rows (or packed sequences of ``counts`` tokens) run under LoRA
        ``slots`` (see LoraSlots.tokens); nothing to set without adapters."""
        if self.lora is None:
            return contextlib.nullcontext()
        return self.lora.tokens(slots, counts)

    # -- LoRA adapters at runtime (vLLM's /v1/load_lora_adapter; event-loop thread) ----------------------------------
    def queue_install(self, adapter: LoraAdapter, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        """Give ``adapter`` a new slot and queue it for the scheduler to install, then publish on ``loop``
        (resolving ``done``); see :meth:`~retnet.serve.engine.Engine.add_adapter`."""
        with self.cond:
            adapter.slot = self.next_slot
            self.next_slot += 1
            self.loading.add(adapter.name)
            self.installs.append((adapter, loop, done))
            self.cond.notify_all()

    def identity(self, slot: int) -> tuple[str, list[int]] | None:
        """The name and files' fingerprint of the adapter of ``slot``, served or retiring (None: freed), which a
        session saved under it is tied to (--session-dir). Called from any thread: ``adapters`` is replaced
        whole and both dicts are copied in one step under the GIL, so no lock is needed."""
        for adapter in [*self.adapters.values(), *self.retiring.values()]:
            if adapter.slot == slot:
                return adapter.name, list(adapter.fingerprint)
        return None

    def remove(self, name: str) -> LoraAdapter | None:
        """Stop serving adapter ``name`` (None: no such adapter): requests from now on cannot name it; those
        already accepted under it (waiting or running) finish under it, and its matrices, prefix-cache entries and
        sessions are dropped once the last has left."""
        adapter = self.adapters.get(name)
        if adapter is None:
            return None
        # One step for the scheduler (loaded, _reinstall): the slot is served or retiring, never neither.
        with self.cond:
            self.adapters = {n: a for n, a in self.adapters.items() if n != name}
            self._retire(adapter)
        self.metrics.lora_adapters.set(len(self.adapters))
        return adapter

    def _retire(self, adapter: LoraAdapter) -> None:
        with self.cond:
            self.retiring[adapter.slot] = adapter
            self.cond.notify_all()

    def _publish(self, adapter: LoraAdapter, done: asyncio.Future) -> None:
        """On the event loop, once the scheduler installed ``adapter``: serve it under its name."""
        self.loading.discard(adapter.name)
        with self.cond:  # as in remove: the replaced slot is served or retiring, never neither
            replaced = self.adapters.get(adapter.name)
            self.adapters = {**self.adapters, adapter.name: adapter}  # a replaced adapter keeps its place
            if replaced is not None:
                self._retire(replaced)
        self.metrics.lora_adapters.set(len(self.adapters))
        if not done.done():
            done.set_result(adapter)

    def _install_failed(self, adapter: LoraAdapter, done: asyncio.Future, exc: BaseException) -> None:
        self.loading.discard(adapter.name)
        if not done.done():
            done.set_exception(exc)

    def fail_installs(self, message: str) -> None:
        """The engine is dead or stopping: fail the installs queued (EngineUnavailable). Under cond."""
        installs, self.installs = self.installs, []
        for adapter, loop, done in installs:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._install_failed, adapter, done, EngineUnavailable(message))

    # -- the scheduler thread ---------------------------------------------------------------------------------------
    def changes_pending(self) -> bool:
        """Whether the scheduler has adapters to install or free (it wakes for them). Under cond."""
        return bool(self.installs or self.retiring or self.reread)

    def take_changes(self):
        """``(installs, freed, reread)`` for :meth:`change`: the installs queued, the retiring slots no request
        uses any more, and the adapters read again; taken out of this object's queues. Under cond."""
        installs, self.installs = self.installs, []
        freed = self._unused_retired() if self.retiring else []
        reread, self.reread = self.reread, []
        return installs, freed, reread

    def _unused_retired(self) -> list[tuple[int, str]]:
        """The retiring ``(slot, name)`` no request is left under (waiting, prefilling, running or joining),
        taken out of ``retiring``; called under cond."""
        used = self.admitted_slots() | self.waiting_slots()
        freed = [(slot, adapter.name) for slot, adapter in self.retiring.items() if slot not in used]
        for slot, _ in freed:
            del self.retiring[slot]
        return freed

    def change(self, installs: list[tuple[LoraAdapter, asyncio.AbstractEventLoop, asyncio.Future]],
               freed: list[tuple[int, str]],
               reread: list[tuple[LoraAdapter, LoraAdapter | Exception]] = ()) -> None:
        """Install the adapters read again (--max-cpu-loras) and those queued, and free the retired slots unused:
        between two forwards, on the thread that runs them, so no forward sees a module half wrapped or an adapter
        half installed."""
        dtype = next(self.model.parameters()).dtype
        for adapter, result in reread:
            self._reinstall(adapter, result, dtype)
        for adapter, loop, done in installs:
            # --max-cpu-loras counts it: it takes an idle adapter's place, or, every place in use, is served as
            # an evicted one (read again from its directory when a request needs it).
            kept = self._make_room()
            try:
                if kept:
                    self._install(adapter, dtype)
            except Exception as exc:  # out of device memory: the adapter is not served, everything else goes on
                logger.exception("LoRA adapter %r could not be installed", adapter.name)
                with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
                    loop.call_soon_threadsafe(self._install_failed, adapter, done, exc)
                continue
            adapter.weights.clear()
            if kept:
                logger.info("LoRA adapter %r loaded from %s (slot %d)", adapter.name, adapter.path, adapter.slot)
            else:
                adapter.magnitudes.clear()
                logger.info("LoRA adapter %r registered from %s (slot %d), not kept loaded: the %d loaded adapters "
                            "(--max-cpu-loras) are all in use", adapter.name, adapter.path, adapter.slot,
                            len(self.resident))
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._publish, adapter, done)
        for slot, name in freed:
            uninstall_adapter(self.model, slot)
            with self.cond:
                self.resident.pop(slot, None)
            self.metrics.lora_adapters_loaded.set(len(self.resident))
            dropped = self.forget(slot)
            logger.info("LoRA adapter %r unloaded (slot %d; %d sessions dropped)", name, slot, dropped)

    def _install(self, adapter: LoraAdapter, dtype: torch.dtype) -> None:
        """Install ``adapter`` under its slot (its matrices read), as the most recently used."""
        if self.lora is None:  # the first adapter of a server started without: forwards set slots from now
            self.lora = LoraSlots(self.device)
        install_adapter(self.model, self.lora, adapter, dtype)
        with self.cond:
            self.resident[adapter.slot] = adapter
        self.metrics.lora_adapters_loaded.set(len(self.resident))

    # -- --max-cpu-loras: evicted adapters read again on demand (scheduler thread) ----------------------------------
    def loaded(self, slot: int, active: set[int]) -> bool:
        """Whether adapter ``slot`` is installed, so that a request of it may be admitted; if not, its read is
        started (once) on a worker thread when a place is free or an idle adapter can be evicted for it. ``active``:
        the slots of the sequences admitted. Under cond."""
        if slot in self.resident:
            self.resident.move_to_end(slot)
            return True
        if slot in self.rereading:
            return False
        adapter = next((a for a in self.adapters.values() if a.slot == slot), None) or self.retiring.get(slot)
        if adapter is None:  # freed: cannot happen while a request of it waits (_unused_retired); not served wrong
            self.fail_waiting(slot, EngineFailure(f"LoRA slot {slot} is not served any more", 500,
                                                  "lora_reload_failed", "model"))
            return False
        if not self._has_room(active):
            return False  # every loaded adapter is in use: it waits until a request leaves
        # Nothing is evicted yet: only a read that succeeds takes an idle adapter's place (_reinstall).
        self.rereading.add(slot)
        threading.Thread(target=self._read_again, args=(adapter,), name=f"retnet-lora-read-{slot}",
                         daemon=True).start()
        return False

    def _has_room(self, active: set[int]) -> bool:
        """Whether a place is free under --max-cpu-loras or an idle adapter (none of ``active``) could give one;
        the reads in flight each count for one, so that they do not all count on the same idle adapter."""
        bound = self.settings.max_cpu_loras
        if bound is None or len(self.resident) + len(self.rereading) < bound:
            return True
        return sum(slot not in active for slot in self.resident) > len(self.rereading)

    def _make_room(self, active: set[int] | None = None) -> bool:
        """Whether another adapter may be installed under --max-cpu-loras, evicting the least recently used idle
        one if need be. Idle: no sequence admitted uses it (``active``; None: those running now); of those, one no
        waiting request names goes first, though a waiting one's may go too: requests are admitted in order, so
        the head of the queue keeping a place for a request behind it would wait forever."""
        bound = self.settings.max_cpu_loras
        with self.cond:
            if bound is None or len(self.resident) < bound:
                return True
            busy = self.admitted_slots() if active is None else active
            idle = [slot for slot in self.resident if slot not in busy]
            if not idle:
                return False
            wanted = self.waiting_slots()
            victim = next((slot for slot in idle if slot not in wanted), idle[0])
            adapter = self.resident.pop(victim)
        uninstall_adapter(self.model, victim)
        adapter.magnitudes.clear()  # read again with its matrices; its slot keeps its cache entries and sessions
        self.metrics.lora_evictions.inc()
        self.metrics.lora_adapters_loaded.set(len(self.resident))
        logger.info("LoRA adapter %r evicted (slot %d; --max-cpu-loras %d)", adapter.name, victim, bound)
        return True

    def _read_again(self, adapter: LoraAdapter) -> None:
        """On a worker thread: read an evicted adapter's files (checked to be those first read) for the scheduler
        to install, neither it nor the event loop waiting on the disk."""
        try:
            result: LoraAdapter | Exception = read_again(adapter, self.linears, self.settings.max_lora_rank)
        except Exception as exc:  # a directory gone, a file truncated or changed: only its requests fail
            result = exc
        with self.cond:
            self.reread.append((adapter, result))
            self.cond.notify_all()

    def _reinstall(self, adapter: LoraAdapter, result: LoraAdapter | Exception, dtype: torch.dtype) -> None:
        """Install an adapter read again under its own slot, or fail the requests waiting for it."""
        slot = adapter.slot
        with self.cond:
            self.rereading.discard(slot)
            served = slot in self.retiring or any(a.slot == slot for a in self.adapters.values())
        if not served:
            return  # freed while it was read: no request is left for it
        if isinstance(result, LoraAdapter):
            if not self._make_room():  # evicts only now that the read succeeded
                logger.info("LoRA adapter %r read again, but every loaded adapter is in use: read again when "
                            "asked", adapter.name)
                return
            try:
                self._install(result, dtype)
            except Exception as exc:  # out of device memory
                logger.exception("LoRA adapter %r could not be installed again", adapter.name)
                result = exc
            else:
                result.weights.clear()
                with self.cond:
                    self.resident[slot] = adapter  # the adapter served, not the copy read
                self.metrics.lora_reloads.labels("ok").inc()
                logger.info("LoRA adapter %r read again from %s (slot %d)", adapter.name, adapter.directory, slot)
                return
        changed = isinstance(result, LoraChanged)
        self.metrics.lora_reloads.labels("changed" if changed else "failed").inc()
        logger.error("LoRA adapter %r (slot %d) could not be loaded again; its waiting requests fail: %s",
                     adapter.name, slot, result)
        message = str(result) if isinstance(result, ValueError) else \
            f"LoRA adapter {adapter.name!r} could not be loaded again: {type(result).__name__}: {result}"
        self.fail_waiting(slot, EngineFailure(message, 500, "lora_adapter_changed" if changed
                                              else "lora_reload_failed", "model"))
