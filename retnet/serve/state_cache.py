"""Reusable recurrent states: the prompt-prefix cache and resumable sessions.

A RetNet's whole context is one fixed-size state, so keeping the state after a prefix costs the same for
10 tokens or 100 000 — unlike a Transformer's KV cache. Two uses:

- :class:`PrefixCache`: an LRU of states keyed by the token prefix that produced them (a system prompt,
  the earlier turns of a chat, a repeated prompt, a prompt and the answer generated after it). A prompt that
  starts with a cached prefix is prefilled from that state: the prefix costs no compute.
- :class:`SessionStore`: a named conversation's state after its last request, so the next request sends
  only its new tokens. Bounded in count and bytes, expiring after a TTL; with ``--session-dir``, a cache over the
  session files (:mod:`retnet.serve.session_store`), which outlive a restart and the memory bounds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from retnet.model import RetNetCache

if TYPE_CHECKING:
    from collections.abc import Callable

    from retnet.serve.session_store import SessionFiles


def held_bytes(cache: RetNetCache | None, *tensors: torch.Tensor | None) -> int:
    """Bytes of ``cache`` plus ``tensors``: what keeping them costs (a prefix entry also holds the ``[V]``
    logits after it, which for a small model's state and a large vocabulary can be several times the state)."""
    held = 0 if cache is None else cache.nbytes()
    return held + sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(slots=True)
class PrefixEntry:
    tokens: tuple[int, ...]
    cache: RetNetCache  # one row, owned by the entry (never mutated; users clone it)
    # [V] next-token logits after the prefix (lets an exact repeat skip all compute); None after an answer, whose
    # last token was sampled, never fed.
    logits: torch.Tensor | None
    nbytes: int  # held_bytes(cache, logits)
    adapter: int = 0  # the LoRA adapter's slot the state was computed under (0: the base model)
    # The beam searches whose steps made it or started from it whole: search -> the last such step
    # (SamplingParams.prefix_cache_tag). Freed once none of them needs it any more (two steps on, or ended); None: an
    # ordinary request's, which only the LRU evicts.
    searches: dict[int, int] | None = None
    salt: str | None = None  # the cache_salt of the requests that made it (None: the shared, unsalted space)


def _key(tokens: tuple[int, ...], adapter: int, salt: str | None = None):
    """An entry's key: the base model's unsalted are the tokens themselves, others ``(slot, salt, tokens)``."""
    return tokens if adapter == 0 and salt is None else (adapter, salt, tokens)


class PrefixCache:
    """Longest-prefix lookup over at most ``max_entries`` states and ``max_bytes`` bytes (LRU eviction).

    The beam searches' states (their last two steps') are evicted after the others, and may take up to
    ``search_entries`` states and ``search_bytes`` bytes more than the bounds: a search's next step starts from its
    last step's states, and on a model whose states the bounds hold fewer of than the search makes (the default
    1 GiB holds 6 states of a 2.7B RetNet, a search of 8 beams makes 8 a step), every step evicted the states the
    next one needed, which then prefilled every beam whole.

    Used only from the scheduler thread.
    """

    def __init__(self, max_entries: int, max_bytes: int, min_tokens: int = 1, search_entries: int = 0,
                 search_bytes: int = 0):
        self.max_entries, self.max_bytes, self.min_tokens = max_entries, max_bytes, min_tokens
        self.search_entries, self.search_bytes = search_entries, search_bytes
        # Keyed by _key, least recently used first. A plain dict, not an OrderedDict: iterating an OrderedDict's
        # values looks each key up again, hashing it, and a tuple of token ids caches no hash, so every lookup
        # hashed every cached prefix whole (64 entries of 8k tokens: ~6 ms of the scheduler's time, the GIL held,
        # for each prompt that arrived). A dict keeps its keys' hashes; an entry used is moved to the end by hand.
        self.entries: dict[tuple, PrefixEntry] = {}
        self.nbytes = 0
        self.evictions = 0  # entries evicted to stay within the bounds (not those of an adapter unloaded)
        # Beam searches ended (end_search, from the event loop), whose steps' entries the scheduler thread frees.
        self.ended_searches: deque[int] = deque()
        # A running search's step whose older steps' entries were dropped (_drop_stale_steps): each beam's lookup and
        # insert of the step asked again, two passes over every entry each.
        self.dropped_before: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, tokens: list[int] | tuple[int, ...], adapter: int = 0,
               salt: str | None = None, tag: tuple[int, int] | None = None) -> PrefixEntry | None:
        """The entry of the longest cached prefix of ``tokens`` (the whole of it included) computed under LoRA
        ``adapter`` (0: the base model; a state depends on the weights that made it) for requests of cache
        ``salt`` (vLLM's cache_salt: a tenant's requests share prefixes only among themselves, so that another
        cannot tell from the timing or ``cached_tokens`` what they sent), or None. ``tag``: a beam search's step
        (search, step) looking up one of its beams: a search's entry of the whole beam is its own from now, as if
        it had inserted it (another search of the same prompt made it first, and its end must not free it)."""
        self.free_ended_searches()
        if tag is not None:  # a step that prefills nothing (another search's states) inserts nothing to drop them
            self._drop_stale_steps(tag)
        if not self.entries:
            return None
        tokens = tuple(tokens)
        best: PrefixEntry | None = None
        for entry in self.entries.values():
            n = len(entry.tokens)
            # The prefix's last token first: ``tokens[:n]`` copies n ids whatever it is compared with.
            if (entry.adapter == adapter and entry.salt == salt and n <= len(tokens)
                    and (best is None or n > len(best.tokens))
                    and (not n or tokens[n - 1] == entry.tokens[-1]) and tokens[:n] == entry.tokens):
                if n == len(tokens) and entry.logits is None:
                    continue  # an exact match is only useful with the logits that follow it
                best = entry
        if best is not None:
            self._touch(_key(best.tokens, adapter, salt))
            if tag is not None and best.searches is not None and len(best.tokens) == len(tokens):
                best.searches[tag[0]] = tag[1]
        return best

    def insert(self, tokens: list[int] | tuple[int, ...], cache: RetNetCache, logits: torch.Tensor | None,
               adapter: int = 0, tag: tuple[int, int] | None = None, salt: str | None = None) -> None:
        tokens = tuple(tokens)
        self.free_ended_searches()
        if self.max_entries == 0 or len(tokens) < self.min_tokens:
            return
        if tag is not None:
            self._drop_stale_steps(tag)
        key = _key(tokens, adapter, salt)
        old = self.entries.get(key)
        if old is not None:
            self._touch(key)
            # An ordinary request's too now (tag None): not freed with the beam searches' steps. Another search's, at
            # the same step (the same prompt): this one's too, freed once neither needs it (the other may move on,
            # or end, first).
            if tag is None:
                old.searches = None
            elif old.searches is not None:
                old.searches[tag[0]] = tag[1]
            grown = held_bytes(old.cache, logits)
            if old.logits is None and logits is not None and grown <= self.max_bytes:
                old.logits = logits.detach().clone()
                self.nbytes += grown - old.nbytes
                old.nbytes = grown
            # Also when a search's entry just became an ordinary one: it no longer counts in the searches' allowance,
            # and left unchecked, ordinary entries stayed past --prefix-cache-entries / --prefix-cache-bytes by up to
            # 2 × --max-n states after the search ended, until some later insert.
            self._evict()
            return
        nbytes = held_bytes(cache, logits)
        if nbytes > self.max_bytes + (0 if tag is None else self.search_bytes):
            return  # checked before cloning: an entry that cannot fit must not cost a copy of the state
        self.entries[key] = PrefixEntry(tokens, cache.clone(), None if logits is None else logits.detach().clone(),
                                        nbytes, adapter, None if tag is None else {tag[0]: tag[1]}, salt)
        self.nbytes += nbytes
        self._evict()

    def _touch(self, key: tuple) -> None:
        """Entry ``key`` made the most recently used (OrderedDict.move_to_end)."""
        self.entries[key] = self.entries.pop(key)

    def _drop_stale_steps(self, tag: tuple[int, int]) -> None:
        """Free the entries of beam search ``tag[0]`` two or more steps before step ``tag[1]``: a step starts from
        the states of the one before it, never from older ones. Kept, a search left ``n`` states a step, and one
        70-token search pushed every other prompt's entry out of the LRU."""
        search, step = tag
        if self.dropped_before.get(search) == step:  # done already for this step (a lookup and insert a beam)
            return
        self.dropped_before[search] = step
        self._release(lambda searches: {search} if searches.get(search, step) <= step - 2 else set())

    def end_search(self, search: int) -> None:
        """Beam search ``search`` has ended (answered, cancelled or failed): its last two steps' entries are freed at
        the cache's next use. No step of it starts from them again, and kept, every search left ``2n`` dead states
        in the LRU (ten searches of 3 beams filled 60 of its 64 entries, evicting the prompts of others). Safe from
        any thread: the scheduler thread frees them."""
        if self.max_entries:  # (a cache of none is never used, nor drained)
            self.ended_searches.append(search)

    def free_ended_searches(self) -> bool:
        """Free the states of the beam searches ended since the last use (:meth:`end_search`); whether any ended.
        Each lookup and insert calls it, and the scheduler while it waits for work: an idle server held an ended
        search's ``2n`` states, past the bounds, until the next request came."""
        if not self.ended_searches:
            return False
        ended = set()
        while self.ended_searches:
            ended.add(self.ended_searches.popleft())
        for search in ended:
            self.dropped_before.pop(search, None)
        self._release(lambda searches: ended.intersection(searches))
        return True

    def _release(self, released: Callable[[dict[int, int]], set[int]]) -> None:
        """Take the searches ``released(entry.searches)`` off each search's entry; free those no search needs any
        more (an entry two searches of one prompt made stays for the one still running)."""
        for entry in self.entries.values():
            if entry.searches is not None:
                for search in released(entry.searches):
                    del entry.searches[search]
        self._drop_where(lambda entry: entry.searches == {})

    def drop_adapter(self, adapter: int) -> None:
        """Free the entries computed under LoRA ``adapter`` (unloaded: no lookup can ask for its slot again)."""
        self._drop_where(lambda entry: entry.adapter == adapter)

    def _drop_where(self, doomed: Callable[[PrefixEntry], bool]) -> None:
        for key in [key for key, entry in self.entries.items() if doomed(entry)]:
            self.nbytes -= self.entries.pop(key).nbytes

    def _evict(self) -> None:
        # The least recently used ordinary entry first, then (past the searches' allowance) the least recently used
        # of all. An entry just inserted (or given its logits) is the most recently used and fits alone: it is
        # evicted only when it is an ordinary one that the searches' states leave no room for.
        while len(self.entries) > self.max_entries or self.nbytes > self.max_bytes:
            key = next((key for key, entry in self.entries.items() if entry.searches is None), None)
            if key is None:
                if (len(self.entries) <= self.max_entries + self.search_entries
                        and self.nbytes <= self.max_bytes + self.search_bytes):
                    return
                key = next(iter(self.entries))
            evicted = self.entries.pop(key)
            self.nbytes -= evicted.nbytes
            self.evictions += 1


class SessionBusy(Exception):
    pass


@dataclass(slots=True)
class Session:
    """A conversation's state: ``cache`` has absorbed every token but ``pending`` (the last one sampled),
    which the next request feeds first."""

    cache: RetNetCache | None = None
    pending: list[int] = field(default_factory=list)
    tokens: int = 0  # tokens of history (prompt and generated), for the response and the README's claims
    # The distinct token ids of the history (sorted, int64): the earlier turns are in the state, not in the next
    # turn's prompt, yet a repetition penalty counts them as the whole conversation sent as a prompt would have.
    seen: torch.Tensor | None = None
    busy: bool = False
    adapter: int = 0  # the LoRA adapter's slot its state was computed under; a continuation must use the same
    # The history ends inside an assistant message (a chat turn's answer) that the chat template has not closed:
    # the next chat turn first writes what the template closes an assistant message with (EOS, ChatML's
    # ``<|im_end|>\n``), as the conversation sent whole has it there.
    assistant_open: bool = False
    # The request holding the session (busy) answers inside an assistant message: ``assistant_open`` once its turn
    # is saved. Reset by every acquire, so a request that says nothing (a completion) leaves no message open.
    answering_assistant: bool = False
    # With ``assistant_open``: the text the state holds past the answer's returned text (Sequence.hidden_end: the
    # EOS or <|im_end|> it stopped on, a stop string), which the closer may already begin with.
    answer_hidden: str = ""
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return held_bytes(self.cache, self.seen)


class SessionStore:
    """Named sessions, at most ``max_sessions`` and ``max_bytes`` of state (idle LRU evicted), each expiring
    ``ttl_s`` after its last use. Used from the event loop (acquire) and the scheduler (release): locked.

    With ``files`` (``--session-dir``) every state a session is released with is also queued to its file, and a
    session not in memory is read back from it (:meth:`restore`): eviction and expiry here drop the copy in memory
    only."""

    def __init__(self, max_sessions: int, max_bytes: int, ttl_s: float, files: SessionFiles | None = None):
        self.max_sessions, self.max_bytes, self.ttl_s = max_sessions, max_bytes, ttl_s
        self.files = files
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.removing: dict[str, asyncio.Future] = {}  # the DELETEs under way (with files), by id; event loop only
        self.lock = threading.Lock()

    def __len__(self) -> int:
        # The sessions holding a saved state (the retnet_sessions gauge, what --max-sessions bounds): a first turn
        # under way holds none yet
        with self.lock:
            return self._held()

    def _held(self) -> int:
        return sum(1 for s in self.sessions.values() if s.cache is not None)

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(s.nbytes for s in self.sessions.values())

    def acquire(self, session_id: str) -> Session:
        """The session (a new empty one if unknown or expired), marked busy until :meth:`release`."""
        with self.lock:
            self._expire()
            session = self.sessions.get(session_id)
            if session is None:
                session = Session()
                self.sessions[session_id] = session
            elif session.busy:
                raise SessionBusy(session_id)
            session.busy = True
            session.answering_assistant = False
            session.last_used = time.monotonic()
            self.sessions.move_to_end(session_id)
            return session

    def release(self, session_id: str, cache: RetNetCache | None = None, pending: list[int] | None = None,
                tokens: int = 0, seen: torch.Tensor | None = None, hidden_end: str = "") -> None:
        """Unmark the session; with ``cache``, replace its state (a finished request), its history's token ids
        (``seen``, :attr:`Session.seen`) and whether it ends inside an assistant message (the request's
        :attr:`Session.answering_assistant`); without, keep the old one (a cancelled or failed request leaves the
        session as it was)."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                return
            session.busy = False
            session.last_used = time.monotonic()
            # Idle from now: last in line for eviction, as its TTL counts from now (the order of acquire alone
            # would put a long turn's session before one that finished earlier).
            self.sessions.move_to_end(session_id)
            if cache is not None:
                session.cache, session.pending, session.tokens = cache, list(pending or []), session.tokens + tokens
                session.seen, session.assistant_open = seen, session.answering_assistant
                session.answer_hidden = hidden_end if session.assistant_open else ""
            if self.files is not None and session.cache is not None:
                self.files.save(session_id, session.cache, session.pending, session.tokens, session.adapter,
                                changed=cache is not None, seen=session.seen, assistant_open=session.assistant_open,
                                answer_hidden=session.answer_hidden)
            if session.cache is None:
                del self.sessions[session_id]  # nothing to resume
            self._evict()

    async def restore(self, session_id: str, session: Session, adapters: dict, device: torch.device) -> None:
        """Fill ``session``, acquired and not in memory, from its file when it has one (read on a worker thread;
        nothing without ``files``). ``adapters``: the engine's, by name: the state continues under the slot of
        the adapter it was computed under. Raises SessionFileError (409) for a file that cannot continue here."""
        if self.files is None:
            return
        loaded = await asyncio.to_thread(self.files.load, session_id, adapters, device)
        if loaded is not None:
            state, session.adapter = loaded
            session.cache, session.pending, session.tokens = state.cache, state.pending, state.tokens
            session.seen, session.assistant_open = state.seen, state.assistant_open
            session.answer_hidden = state.answer_hidden

    async def remove(self, session_id: str) -> bool:
        """``DELETE /v1/sessions/{id}``: the session gone, in memory and (with ``files``) its file; whether it had a
        state anywhere. The file goes first (behind the session's queued writes, so none brings it back), the copy
        in memory only once it has gone, the session held busy meanwhile so that no request continues it (409
        ``session_busy``): a file that cannot be removed (500 ``session_delete_failed``) leaves the session as it
        was, in memory and on disk. A second DELETE meanwhile gets the first one's answer, and a DELETE whose
        client leaves is carried out all the same. Raises SessionBusy while a request holds the session."""
        if self.files is None:
            with self.lock:
                session = self.sessions.get(session_id)
                if session is not None and session.busy:
                    raise SessionBusy(session_id)
                return self.sessions.pop(session_id, None) is not None
        removing = self.removing.get(session_id)
        if removing is None:
            session = self.acquire(session_id)
            removing = asyncio.ensure_future(self._remove(session_id, session))
            self.removing[session_id] = removing

            def forget(task: asyncio.Future) -> None:
                self.removing.pop(session_id, None)
                if not task.cancelled():
                    task.exception()  # retrieved: with no DELETE left to answer, asyncio would log it

            removing.add_done_callback(forget)
        return await asyncio.shield(removing)

    async def _remove(self, session_id: str, session: Session) -> bool:
        try:
            existed = await self.files.remove(session_id)
        except BaseException:
            # Kept as it was: its state in memory is queued to its file again (written whole if the file may be
            # older than it), and one on disk only stays there.
            self.release(session_id)
            raise
        with self.lock:
            if self.sessions.get(session_id) is session:
                del self.sessions[session_id]
        return existed or session.cache is not None

    def start(self) -> None:
        """Sweep the session files and start their writer (the app's lifespan startup)."""
        if self.files is not None:
            self.files.start()

    def close(self) -> None:
        """Write the states still queued to their files (a restart then continues every session), then stop the
        writer (the app's lifespan shutdown)."""
        if self.files is not None:
            self.files.close()

    def delete(self, session_id: str) -> bool:
        """Drop the session's copy in memory (not its file: :meth:`remove`); False when busy or unknown."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None or session.busy:
                return False
            del self.sessions[session_id]
            return True

    def drop_adapter(self, adapter: int) -> int:
        """Delete the sessions whose state was computed under LoRA ``adapter`` (unloaded: they can never be
        continued), as expiry would; a busy one is left to its request. Returns how many were deleted."""
        with self.lock:
            keys = [k for k, s in self.sessions.items() if s.adapter == adapter and not s.busy]
            for key in keys:
                del self.sessions[key]
            return len(keys)

    def expire(self) -> bool:
        """Drop the sessions idle past the TTL (their copy in memory: a file stays until its own expiry); whether
        any was. The scheduler calls it while it waits for work: expired only when a session was acquired or
        released, an idle server held the expired states (and counted them in ``retnet_sessions``) until the next
        session request."""
        with self.lock:
            count = len(self.sessions)
            self._expire()
            return len(self.sessions) != count

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self.sessions.items() if not s.busy and now - s.last_used > self.ttl_s]:
            del self.sessions[key]

    def _evict(self) -> None:
        self._expire()
        # Only sessions holding a state count: a first turn under way holds none until it saves one. Counted, a
        # burst of first turns that never did (refused with 429, cancelled, failed) evicted the idle sessions of
        # others, their histories lost for states that never came.
        held = self._held()
        total = sum(s.nbytes for s in self.sessions.values())
        for key in list(self.sessions):
            if held <= self.max_sessions and total <= self.max_bytes:
                break
            session = self.sessions[key]
            if not session.busy:
                total -= session.nbytes
                held -= session.cache is not None
                del self.sessions[key]


__all__ = ["PrefixCache", "PrefixEntry", "Session", "SessionBusy", "SessionStore", "held_bytes"]
