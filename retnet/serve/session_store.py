"""Sessions on disk (``--session-dir``): each session's state in a file of its own, so that a session outlives a
restart and the in-memory :class:`~retnet.serve.state_cache.SessionStore` becomes a cache over the directory.

A RetNet session is one fixed-size state (a few MB whatever the history's length), so writing it after every turn
costs the same for the tenth turn as for the first. ``DIR/<session_id>.safetensors`` holds:

- tensors ``state.<layer>`` ``[1, H, K, V]`` fp32 and ``offsets`` ``[1]`` int64: the :class:`RetNetCache` row;
  ``seen`` ``[N]`` int64: the history's distinct token ids, which a repetition penalty counts: those fed, the
  pending one counted when the next turn feeds it (absent in the files written before they were kept; the files
  of the versions before the pending one was left out have it too, harmlessly: their next turn always feeds it);
- metadata: the format, the session id, the fingerprint of the model that computed the state (its config, weights,
  tokenizer, chat template and dtype: :func:`model_fingerprint`) and of its LoRA adapter (name and files' fingerprint), the tokens not
  yet fed (the last one sampled), the history's token count, the cache's ``seen_tokens`` and ``assistant_open``
  (the history ends inside an assistant message the next chat turn closes: ``Session.assistant_open``; absent in
  the files written before it was kept, read as false: their next turn is templated as it was then).

Writes run on one writer thread, started and stopped with the app's lifespan, off the event loop and off the
scheduler: a turn queues its session's new state and the writer writes it (temp file, fsync, ``os.replace``, the
directory fsynced). A session has at most one job queued, the latest (a newer state replaces one not yet written,
a DELETE replaces a write), and one thread does them all in turn, so an earlier state can never land after a later
one. A job replaced is never dropped: it is done when the job that replaced it is, with its outcome (a DELETE
replaced by a later turn's write is done once that write has replaced the file; a second DELETE shares the
first's job). A DELETE waits on an asyncio future the writer completes (``call_soon_threadsafe``), holding no
thread. The writer survives any error (logged and counted); should it stop anyway, every job pending is done with
an error. Reading a session back (a request for one not in memory) runs on a worker thread, while the request
holds the session busy, so nothing else writes it meanwhile; a state queued or being written is taken from the
queue, not from the file.

A write that fails (a full or read-only disk) leaves the session going on in memory, and the file it would have
replaced is removed, so that the session is never continued from an older turn; a file that cannot be removed
either is refused (409 ``session_lost``) until the session is deleted or written again. A file is never
continued under another model, chat template, dtype or adapter, nor when it does not hold a whole, consistent
state: 409 naming ``session_id`` (``session_model_changed``, ``session_corrupt``), the file kept (serve that model
again, or DELETE the session). A file that cannot be read now (EIO, too many open files, a permission) is 503
``session_unavailable``, to be retried; something else where the file goes (a directory, a FIFO) is 409
``session_not_a_file``, never read (a FIFO's open would wait for a writer forever) nor removed. Expiry
(``--session-ttl-s`` after the last turn was written, the file's modification time): at startup, every
``min(ttl, 60 s)`` on the writer thread, and when a request finds its session's file expired; only files named and tagged as session files (and the writer's own temp files) are ever
removed, and ``--session-dir`` may not be the model's or an adapter's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retnet.model import RetNetCache
from retnet.serve.metrics import ServeMetrics
from retnet.serve.protocol import SESSION_ID_PATTERN, APIError
from retnet.serve.settings import ServeSettings, StartupError, load_chat_template

logger = logging.getLogger("retnet.serve")

FORMAT = "retnet-session/1"
SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
SWEEP_EVERY_S = 60.0  # at most; a shorter TTL sweeps every TTL
# at least: a TTL of a microsecond had the writer list the directory back to back (a core's worth of CPU); a session
# found expired by a request is gone all the same
MIN_SWEEP_EVERY_S = 0.1
MAX_HEADER_BYTES = 1 << 20  # a session file's safetensors header is a few KB; a larger one is not ours
# What decides how text becomes tokens: their contents are hashed (a few MB at most).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json")
# tokenizer_config.json's fields that change no token id (lengths, padding sides, a path): a model directory
# rewritten with another model_max_length keeps its sessions. Its chat_template is hashed with the template files.
TOKENIZER_CONFIG_IGNORED = ("model_max_length", "padding_side", "truncation_side", "name_or_path", "_name_or_path",
                            "chat_template")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# The fingerprint's parts, each stored as metadata ``model.<part>``, and how a refusal names them.
MODEL_PARTS = {"config": "config.json", "weights": "weights", "tokenizer": "tokenizer",
               "chat_template": "chat template", "dtype": "dtype (--dtype, --quantization)"}
_ID = SESSION_ID_PATTERN.removeprefix("^").removesuffix("$")
_SESSION_ID = re.compile(_ID)
_SESSION_FILE = re.compile(_ID + re.escape(SUFFIX))
# The writer's temp files (``_write``): only those are removed as a crash's leftovers.
_TEMP_FILE = re.compile(rf"\.{_ID}\.[0-9a-f]{{12}}{re.escape(TEMP_SUFFIX)}")

# An adapter's identity in a file: its name and lora.files_fingerprint (None: the base model).
AdapterIdentity = tuple[str, list[int]] | None


def check_session_id(session_id: str) -> str:
    """``session_id`` if it can name a file: 1 to 128 letters, digits, ``_ . : -`` (the requests' own rule, so no
    id a request accepts is refused here); else 400 naming ``session_id``. With the suffix every such id is a
    plain file name inside the directory (``..`` is ``...safetensors``)."""
    if not _SESSION_ID.fullmatch(session_id):  # not match + $: that accepts a trailing newline
        raise APIError(400, f"session_id must be 1 to 128 letters, digits, '_', '.', ':' or '-' (it names the "
                       f"session's file); got {session_id[:80]!r}", "session_id", "invalid_session_id")
    return session_id


def model_fingerprint(model_dir: str | Path, config, chat_template: str | None = None,
                      dtype: str = "float32", content_format: str = "auto") -> dict[str, str]:
    """``{"config", "weights", "tokenizer", "chat_template", "dtype"}``: what a session's state depends on, of the
    model served from ``model_dir``. ``config``: a SHA-256 of its JSON file (``transformers_version`` left out),
    or of the loaded ``config`` when the directory has none; ``weights``: of each weights file's name, size and
    modification time (two ``stat``: any rewrite changes it, as ``lora.files_fingerprint``; a copy that keeps the
    times, ``cp -p``, keeps it); ``tokenizer``: of the tokenizer files' contents (tokenizer_config.json without
    :data:`TOKENIZER_CONFIG_IGNORED`); ``chat_template``: of ``chat_template`` (``--chat-template``'s) or else the
    directory's own (``chat_template.jinja`` / ``.json``, tokenizer_config.json's), and ``content_format``
    (``--chat-template-content-format``) unless ``auto``; ``dtype``: the weights' dtype as served (``float32``,
    ``bfloat16`` ...), as it is."""
    root = Path(model_dir)
    try:
        values = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        values = config.to_dict()
    for key in ("transformers_version", "_name_or_path"):
        values.pop(key, None)
    weights = []
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.index.json"):
        for path in sorted(root.glob(pattern)):
            stat = path.stat()
            weights.append((path.name, stat.st_size, stat.st_mtime_ns))
    tokenizer, inline_template = [], None
    for name in TOKENIZER_FILES:
        if not (root / name).is_file():
            continue
        data = (root / name).read_bytes()
        if name == "tokenizer_config.json":
            with contextlib.suppress(ValueError):  # not JSON: hashed as it is
                fields = json.loads(data)
                inline_template = fields.get("chat_template")
                data = json.dumps({k: v for k, v in fields.items() if k not in TOKENIZER_CONFIG_IGNORED},
                                  sort_keys=True).encode()
        tokenizer.append((name, hashlib.sha256(data).hexdigest()))
    if chat_template is not None:
        template = ["--chat-template", chat_template]
    else:
        template = [inline_template, *((root / name).read_text(errors="replace") if (root / name).is_file()
                                       else None for name in TEMPLATE_FILES)]
    # The form renders a history's messages as another text. Only a chosen one is hashed: auto's follows from the
    # template, already hashed, and the sessions saved before the setting existed keep their fingerprint.
    if content_format != "auto":
        template.append(["--chat-template-content-format", content_format])
    hashed = {part: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
              for part, value in (("config", values), ("weights", weights), ("tokenizer", tokenizer),
                                  ("chat_template", template))}
    return {**hashed, "dtype": dtype}


class SessionFileError(APIError):
    """A session's file that cannot continue on this server: 409 naming ``session_id``."""

    def __init__(self, session_id: str, why: str, code: str):
        super().__init__(409, f"session {session_id!r} {why}; DELETE /v1/sessions/{session_id} starts it anew",
                         "session_id", code)


@dataclass(slots=True)
class SavedState:
    """A session's state as it is written (a queued write) or read back."""

    cache: RetNetCache  # one row; never changed in place (a turn replaces the session's cache), so shared
    pending: list[int]
    tokens: int
    adapter: AdapterIdentity
    at: float  # wall-clock time of the turn: the file's modification time, from which --session-ttl-s counts
    # The history's distinct token ids (Session.seen), for a repetition penalty; None: a file written before they
    # were kept (its next turn penalises its own prompt only).
    seen: torch.Tensor | None = None
    assistant_open: bool = False  # Session.assistant_open (false in a file written before it was kept)
    answer_hidden: str = ""  # Session.answer_hidden


@dataclass(slots=True, eq=False)
class _Job:
    state: SavedState | None  # None: delete the file
    # The state is already on disk, unchanged (a request on the session failed or was cancelled): only the file's
    # time moves, so that it expires with the session's last use; written whole if the file has gone.
    touch: bool = False
    existed: bool = False  # a delete's answer: there was a state to delete (a file, or a write queued)
    # A delete's failure: the file is still there (a write's own failure is logged; the session goes on in memory).
    error: BaseException | None = None
    # The jobs this one replaced in the queue, done with it (and with its outcome): none is ever dropped undone.
    replaced: list[_Job] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = field(default_factory=list)


class SessionFiles:
    """The session files of one directory, written by one thread (see the module's docstring)."""

    def __init__(self, directory: str | Path, model: dict[str, str], ttl_s: float, metrics: ServeMetrics,
                 state_shape: tuple[int, int, int, int], num_layers: int,
                 adapter_identity: Callable[[int], AdapterIdentity], vocab_size: int, retry_after_s: int = 1):
        """``model``: :func:`model_fingerprint`; ``state_shape``: one layer's ``[1, H, K, V]``; ``adapter_identity``:
        the name and files' fingerprint of the adapter of a LoRA slot (None: no longer known); ``vocab_size``: a
        pending token id must be below it. The directory is created and checked writable (OSError otherwise);
        :meth:`start` sweeps it and starts the writer."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Checked with a file of the writer's own temp-file pattern, so that a crash right here leaves nothing
        # the sweep does not remove.
        probe = self.directory / f".probe.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
        self.model, self.ttl_s, self.metrics = model, ttl_s, metrics
        self.state_shape, self.num_layers, self.vocab_size = state_shape, num_layers, vocab_size
        self.adapter_identity, self.retry_after_s = adapter_identity, retry_after_s
        self.cond = threading.Condition()  # an RLock: _finish is called with it held and without
        self.queued: dict[str, _Job] = {}  # by session id, oldest first; guarded by cond
        self.writing: tuple[str, _Job] | None = None  # the job the writer is doing; guarded by cond
        # Sessions whose file holds an older state than their last turn (its write failed and the file could not
        # be removed either): never continued from it. Guarded by cond.
        self.lost: set[str] = set()
        self.closed = False  # no job is taken any more (closing, or the writer stopped)
        self.thread: threading.Thread | None = None

    def path(self, session_id: str) -> Path:
        return self.directory / (check_session_id(session_id) + SUFFIX)

    def start(self) -> None:
        """Remove the expired and leftover files, then start the writer (the app's lifespan startup)."""
        if self.thread is not None:
            return
        try:
            self._sweep()
        except Exception:  # the writer sweeps again, and each write says what is wrong
            self.metrics.session_sweep_failures.inc()
            logger.exception("--session-dir %s could not be swept at startup", self.directory)
        self.thread = threading.Thread(target=self._run, name="retnet-session-writer", daemon=True)
        self.thread.start()

    # -- called from the scheduler and the event loop ----------------------------------------------------------
    def save(self, session_id: str, cache: RetNetCache, pending: list[int], tokens: int, adapter: int,
             changed: bool = True, seen: torch.Tensor | None = None, assistant_open: bool = False,
             answer_hidden: str = "") -> None:
        """Queue the session's state (``changed`` false: the one already written, only its time moves).
        ``adapter``: the LoRA slot it was computed under (0: the base model); ``seen``: its history's distinct
        token ids; ``assistant_open``, ``answer_hidden``: :attr:`Session.assistant_open`, its answer's hidden end."""
        identity = self.adapter_identity(adapter) if adapter else None
        if adapter and identity is None:
            return  # its adapter is gone: the state can never be continued (its file, if any, is refused)
        state = SavedState(cache, list(pending), tokens, identity, time.time(), seen, assistant_open, answer_hidden)
        with self.cond:
            if self.closed:  # the server is stopping (or the writer died): said, as a failed write is
                self.metrics.session_write_failures.inc()
                logger.warning("session %r: its state is not written to --session-dir: the writer has stopped",
                               session_id)
                return
            queued = self.queued.get(session_id)
            if not changed and queued is not None and queued.state is not None:
                queued.state.at = state.at  # the state queued is this one: written with the later time
                return
            # After a DELETE queued, the file is written whole: a touch would keep the file the DELETE removes.
            self._queue(session_id, _Job(state, touch=not changed and queued is None))

    def delete(self, session_id: str) -> _Job:
        """Queue the removal of the session's file (behind its writes: none brings it back); the job is done
        once it is gone (:meth:`remove` awaits it). A second DELETE shares the job queued."""
        self.path(session_id)
        with self.cond:
            queued = self.queued.get(session_id)
            if queued is not None and queued.state is None:
                return queued
            job = _Job(None, existed=queued is not None)
            if self.closed:
                self._finish(job, RuntimeError("the session writer has stopped"))
            else:
                self._queue(session_id, job)
        return job

    async def remove(self, session_id: str) -> bool:
        """Remove the session's file, behind its queued writes: whether the session had a state here. Awaits
        the writer without holding a thread. Raises 500 ``session_delete_failed`` when the file is still there."""
        job = self.delete(session_id)
        await self._wait(job)
        if isinstance(job.error, _NotAFile):  # retried, it fails the same way
            raise self._not_a_file(session_id, self.path(session_id), job.error.mode)
        if job.error is not None:
            why = getattr(job.error, "strerror", None) or str(job.error)
            raise APIError(500, f"session {session_id!r}: its file in --session-dir could not be removed ({why}); "
                           "the session is kept as it was. Retry the DELETE", "session_id", "session_delete_failed")
        return job.existed

    async def _wait(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        with self.cond:
            if job.done.is_set():
                return
            future = loop.create_future()
            job.waiters.append((loop, future))
        await future

    def _queue(self, session_id: str, job: _Job) -> None:
        """Queue ``job`` in the place of the session's job queued, which is done with it (called with cond)."""
        old = self.queued.get(session_id)
        if old is not None:
            job.replaced += [old, *old.replaced]
            old.replaced = []
        self.queued[session_id] = job  # an id already queued keeps its place: a busy session does not starve
        self.cond.notify_all()

    def _finish(self, job: _Job, error: BaseException | None = None, existed: bool = False) -> None:
        """Mark ``job`` and the jobs it replaced done: ``error``, the file that could not be removed; ``existed``,
        a file was there before."""
        with self.cond:
            for each in (job, *job.replaced):
                each.error, each.existed = error, each.existed or existed
                each.done.set()
                for loop, future in each.waiters:
                    with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits any more
                        loop.call_soon_threadsafe(_resolve, future)
                each.waiters.clear()
            job.replaced = []
            self.cond.notify_all()

    # -- called on a worker thread ----------------------------------------------------------------------------
    def load(self, session_id: str, adapters: dict, device: torch.device) -> tuple[SavedState, int] | None:
        """The session's state and the LoRA slot (0: the base model) it continues under here, or None when it has
        none (never saved, deleted, expired: an expired file is removed). ``adapters``: the engine's, by name.

        Raises :class:`SessionFileError` (409) for a file of another model or adapter, one that cannot be read
        whole or does not fit, or one older than the session's last turn; 503 when the file cannot be read now.
        Called while the request holds the session (busy), so no write of it can be queued meanwhile.
        """
        with self.cond:
            job = self.queued.get(session_id)
            if job is None and self.writing is not None and self.writing[0] == session_id:
                job = self.writing[1]
        if job is not None:  # not on disk yet (or being replaced): the queued state is the latest
            if job.state is None:
                return None
            state = job.state
        else:
            state = self._read(session_id, device)
            if state is None:
                return None
        try:
            slot = self._adapter_slot(session_id, state.adapter, adapters)
        except SessionFileError as exc:
            self.metrics.session_load_failures.labels(exc.code).inc()
            raise
        self.metrics.session_loads.inc()
        return state, slot

    def _read(self, session_id: str, device: torch.device) -> SavedState | None:
        path = self.path(session_id)
        try:
            # Opened, then its type checked on the open file: a FIFO put there between a stat and a read would
            # hold the read for good.
            with _open_regular(path) as file:
                mtime = os.fstat(file.fileno()).st_mtime
                if time.time() - mtime > self.ttl_s and _is_session_file(path):
                    self._remove_expired(session_id, path)
                    return None
                with self.cond:
                    lost = session_id in self.lost
                if lost:
                    raise self._refused(session_id, "lost its last turns: they could not be written to "
                                        "--session-dir and are no longer in memory, and the older file could not be "
                                        "removed", "session_lost")
                data = file.read()
        except FileNotFoundError:
            return None
        except _NotAFile as exc:
            self.metrics.session_load_failures.labels("session_not_a_file").inc()
            raise self._not_a_file(session_id, path, exc.mode) from None
        except OSError as exc:  # EIO, EMFILE, a permission: the file may be whole, so it is not called corrupt
            self.metrics.session_load_failures.labels("session_unavailable").inc()
            logger.warning("session %r: its file in --session-dir could not be read: %s", session_id, exc)
            raise APIError(503, f"session {session_id!r}: its file in --session-dir could not be read now "
                           f"({exc.strerror or exc}); retry later", "session_id", "session_unavailable",
                           headers={"Retry-After": str(self.retry_after_s)}) from exc
        try:
            meta, tensors = _parse(data)
            if meta.get("session_id") != session_id:  # a case-insensitive filesystem gives two ids one file
                raise ValueError(f"it holds session {meta.get('session_id')!r}")
        except Exception as exc:  # struct, JSON, safetensors' own errors: all mean the file is not whole
            raise self._refused(session_id, f"has a file in --session-dir that is not a whole session file ({exc})",
                                "session_corrupt") from exc
        changed = [label for part, label in MODEL_PARTS.items() if meta.get(f"model.{part}") != self.model[part]]
        if changed:
            verb = "differ" if len(changed) > 1 or changed == [MODEL_PARTS["weights"]] else "differs"  # "its dtype differs"
            raise self._refused(session_id, f"was saved by another model: its {' and '.join(changed)} {verb} from "
                                "this server's --model (a state is never continued on other weights); serve that "
                                "model to continue it", "session_model_changed")
        try:
            state = self._state(meta, tensors, mtime)
        except Exception as exc:
            raise self._refused(session_id, f"has a file in --session-dir that does not fit this model ({exc})",
                                "session_corrupt") from exc
        state.cache.to(device)
        return state

    def _remove_expired(self, session_id: str, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # it stays expired: the session starts anew all the same
            logger.warning("session %r: its expired file in --session-dir could not be removed: %s", session_id, exc)
            return
        with self.cond:
            self.lost.discard(session_id)

    def _state(self, meta: dict[str, str], tensors: dict[str, torch.Tensor], mtime: float) -> SavedState:
        """The state of a file of this model, checked whole: a state the engine would run for every sequence of
        its batch must hold nothing that can fail it (a token id out of the vocabulary, a NaN, a negative
        position)."""
        cache = RetNetCache(self.num_layers)
        for i in range(self.num_layers):
            state = tensors[f"state.{i}"]
            if tuple(state.shape) != self.state_shape or state.dtype != torch.float32:
                raise ValueError(f"state.{i} is {state.dtype} {tuple(state.shape)}, not float32 {self.state_shape}")
            if not bool(torch.isfinite(state).all()):
                raise ValueError(f"state.{i} holds values that are not finite")
            cache.states[i] = state
        cache.offsets = tensors["offsets"]
        if tuple(cache.offsets.shape) != (1,) or cache.offsets.dtype != torch.int64:
            raise ValueError(f"offsets is {cache.offsets.dtype} {tuple(cache.offsets.shape)}, not int64 (1,)")
        tokens, seen_tokens = int(meta["tokens"]), int(meta["seen_tokens"])
        offset = int(cache.offsets[0])
        # The history's tokens are those the state absorbed (its position, offsets) and those still pending.
        if not 0 <= offset <= tokens or seen_tokens < 0:
            raise ValueError(f"tokens {tokens}, offsets {offset} and seen_tokens {seen_tokens} must be >= 0 with "
                             "offsets <= tokens")
        cache.seen_tokens = seen_tokens
        pending, adapter = json.loads(meta["pending"]), json.loads(meta["adapter"])
        # At most the last token sampled (Engine._finished), a token id of this vocabulary.
        if not (isinstance(pending, list) and len(pending) <= 1
                and all(type(t) is int and 0 <= t < self.vocab_size for t in pending)):
            raise ValueError(f"pending is {meta['pending'][:80]!r}, not at most one token id below the vocabulary "
                             f"size {self.vocab_size}")
        if adapter is not None:
            adapter = (str(adapter[0]), [int(v) for v in adapter[1]])
        seen = tensors.get("seen")
        if seen is not None and (seen.dim() != 1 or seen.dtype != torch.int64 or (
                seen.numel() and not (int(seen.min()) >= 0 and int(seen.max()) < self.vocab_size))):
            raise ValueError(f"seen is {seen.dtype} {tuple(seen.shape)}, not int64 token ids below the vocabulary "
                             f"size {self.vocab_size}")
        # Absent from the files of the versions before it: their sessions continue as they did then.
        assistant_open = json.loads(meta.get("assistant_open", "false"))
        if type(assistant_open) is not bool:
            raise ValueError(f"assistant_open is {meta['assistant_open'][:80]!r}, not true or false")
        answer_hidden = json.loads(meta.get("answer_hidden", '""'))
        if not isinstance(answer_hidden, str):
            raise ValueError(f"answer_hidden is {meta['answer_hidden'][:80]!r}, not a JSON string")
        return SavedState(cache, pending, tokens, adapter, mtime, seen, assistant_open, answer_hidden)

    def _adapter_slot(self, session_id: str, identity: AdapterIdentity, adapters: dict) -> int:
        """The slot here of the adapter the state was computed under (0: the base model)."""
        if identity is None:
            return 0
        name, fingerprint = identity
        adapter = adapters.get(name)
        if adapter is None:
            raise SessionFileError(session_id, f"was started with the LoRA adapter {name!r}, which this server does "
                                   "not serve; serve it (the same files) to continue it", "session_model_changed")
        if list(adapter.fingerprint) != fingerprint:
            raise SessionFileError(session_id, f"was started with the LoRA adapter {name!r}, whose files have "
                                   "changed since (size or modification time of adapter_config.json / "
                                   "adapter_model.safetensors)", "session_model_changed")
        return adapter.slot

    def _not_a_file(self, session_id: str, path: Path, mode: int) -> APIError:
        """409 ``session_not_a_file``: a directory, a FIFO, a device where the session's file goes. Not 503 "retry
        later" (a directory answered so, forever), nor read (a FIFO's read waited for a writer forever, the session
        held busy); and not removed by a DELETE either, which only ever removes a file: the operator's to move."""
        logger.warning("session %r: %s in --session-dir is %s", session_id, path, _kind(mode))
        return APIError(409, f"session {session_id!r}: {str(path)!r}, where its file goes in --session-dir, is "
                        f"{_kind(mode)}, not a session file; move it away to use this session id", "session_id",
                        "session_not_a_file")

    def _refused(self, session_id: str, why: str, code: str) -> SessionFileError:
        self.metrics.session_load_failures.labels(code).inc()
        logger.warning("session %r not loaded from --session-dir: %s", session_id, why)
        return SessionFileError(session_id, why, code)

    # -- the writer thread ------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is done (written, or failed); False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.queued and self.writing is None, timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued, then stop the writer (the app's lifespan shutdown)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
        else:  # never started: nothing will do what is queued
            self._fail_pending()

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # only a BaseException gets here with jobs pending: none is left waiting forever
            self._fail_pending()

    def _loop(self) -> None:
        sweep_every = min(max(self.ttl_s, MIN_SWEEP_EVERY_S), SWEEP_EVERY_S)
        next_sweep = time.monotonic() + sweep_every
        while True:
            with self.cond:
                while not self.queued and not self.closed and time.monotonic() < next_sweep:
                    self.cond.wait(next_sweep - time.monotonic())
                if not self.queued and self.closed:
                    return
                if self.queued:
                    session_id = next(iter(self.queued))
                    self.writing = (session_id, self.queued.pop(session_id))
                current = self.writing
            if current is None:
                try:
                    self._sweep()
                except Exception as exc:  # the directory removed or unreadable: the writer goes on all the same
                    self.metrics.session_sweep_failures.inc()
                    logger.warning("--session-dir %s could not be swept: %s", self.directory, exc)
                next_sweep = time.monotonic() + sweep_every
                continue
            # Left as it is only by a BaseException, which ends the writer: the job fails with the others pending.
            error, existed = RuntimeError("the session writer has stopped"), False
            try:
                existed, error = self._do(*current)
            except Exception as exc:  # a bug: the job fails, the writer goes on
                logger.exception("session %r: its job on --session-dir failed", current[0])
                error = exc
            finally:
                with self.cond:
                    self.writing = None
                    self._finish(current[1], error, existed)

    def _fail_pending(self) -> None:
        with self.cond:
            self.closed = True
            jobs = [*self.queued.values(), *([self.writing[1]] if self.writing is not None else [])]
            self.queued.clear()
            self.writing = None
            if jobs:
                logger.error("the --session-dir writer stopped with %d jobs pending; they fail", len(jobs))
            for job in jobs:
                self._finish(job, RuntimeError("the session writer has stopped"))

    def _do(self, session_id: str, job: _Job) -> tuple[bool, BaseException | None]:
        """Do ``job``: whether a file was there before, and the error that left an old file in place."""
        path = self.path(session_id)
        if job.state is None:
            try:
                # A file past --session-ttl-s not swept yet is a session gone all the same (DELETE: 404): removed, not counted
                found = os.lstat(path)
                # Only a file (or a link, removed as one) goes: unlink would take a FIFO or a socket too
                if not (stat.S_ISREG(found.st_mode) or stat.S_ISLNK(found.st_mode)):
                    raise _NotAFile(found.st_mode)
                live = time.time() - path.stat().st_mtime <= self.ttl_s
                path.unlink()
            except FileNotFoundError:
                existed = False
            except OSError as exc:
                logger.error("session %r: its file in --session-dir could not be removed: %s", session_id, exc)
                if any(replaced.state is not None for replaced in job.replaced):
                    with self.cond:  # a newer state than the file's was queued, and is no longer
                        self.lost.add(session_id)
                return True, exc
            else:
                existed = live
            with self.cond:
                self.lost.discard(session_id)
            return existed, None
        existed = path.exists()
        with self.cond:
            whole = not job.touch or not existed or session_id in self.lost
        try:
            if whole:
                self._write(path, session_id, job.state)
            else:
                os.utime(path, (job.state.at, job.state.at))
        except Exception as exc:  # a full or read-only disk: the session goes on in memory
            self.metrics.session_write_failures.inc()
            logger.error("session %r: its file in --session-dir could not be %s: %s", session_id,
                         "written" if whole else "touched", exc)
            if not whole:
                return existed, None  # the file holds this state; only its time did not move
            # The file holds an older turn: removed, so that an eviction or a restart never continues from it.
            try:
                path.unlink(missing_ok=True)
            except OSError as removal:
                logger.error("session %r: its older file in --session-dir could not be removed either (%s): it is "
                             "refused until the session is written again or deleted", session_id, removal)
                with self.cond:
                    self.lost.add(session_id)
                return existed, removal
            with self.cond:
                self.lost.discard(session_id)
            return existed, None
        if whole:
            self.metrics.session_writes.inc()
        with self.cond:
            self.lost.discard(session_id)
        return existed, None

    def _write(self, path: Path, session_id: str, state: SavedState) -> None:
        from safetensors.torch import save

        cache = state.cache
        tensors = {f"state.{i}": s.detach().to("cpu").contiguous() for i, s in enumerate(cache.states)}
        tensors["offsets"] = cache.offsets.detach().to("cpu").contiguous()
        if state.seen is not None:
            tensors["seen"] = state.seen.contiguous()
        metadata = {"format": FORMAT, "session_id": session_id,
                    **{f"model.{part}": value for part, value in self.model.items()},
                    "adapter": json.dumps(state.adapter), "pending": json.dumps(state.pending),
                    "tokens": str(state.tokens), "seen_tokens": str(cache.seen_tokens),
                    "assistant_open": json.dumps(state.assistant_open),
                    "answer_hidden": json.dumps(state.answer_hidden)}
        data = save(tensors, metadata)
        self.directory.mkdir(parents=True, exist_ok=True)  # removed by hand (rm -rf DIR): made again
        temp = self.directory / f".{session_id}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.utime(temp, (state.at, state.at))
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        with contextlib.suppress(OSError):  # the rename itself survives a crash once the directory is synced
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _sweep(self) -> None:
        """Remove the expired session files and the temp files a crash left (only this server's writer makes
        them, and the sweep runs on its thread). Nothing else in the directory is touched: a file is removed only
        when its name is a session id's or the writer's temp name, and a session file only when its header says
        it is one."""
        cutoff = time.time() - self.ttl_s
        for path in self.directory.iterdir():
            with contextlib.suppress(OSError):
                if _TEMP_FILE.fullmatch(path.name) or (_SESSION_FILE.fullmatch(path.name)
                                                       and path.stat().st_mtime < cutoff and _is_session_file(path)):
                    path.unlink()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():  # cancelled: its DELETE went away
        future.set_result(None)


class _NotAFile(OSError):
    """What is at a session file's path is no regular file (``mode``: its ``st_mode``)."""

    def __init__(self, mode: int):
        super().__init__(f"{_kind(mode)}, not a regular file")
        self.mode = mode


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(path: Path):
    """``path`` opened for reading, if it is a regular file (else :class:`_NotAFile`). Opened without blocking:
    a FIFO's open waits for a writer, forever, which held the sweep, and with it the server's startup (or the
    writer thread, and every write after it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotAFile(mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_session_file(path: Path) -> bool:
    """Whether ``path``'s safetensors header carries this format's tag (reads the header only)."""
    try:
        with _open_regular(path) as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (size,) = struct.unpack("<Q", head)
            if size > MAX_HEADER_BYTES:
                return False
            meta = json.loads(f.read(size)).get("__metadata__")
    # unreadable, not JSON, not an object; nested too deep for the parser (a header of a few KB of "[[[..."), which
    # would otherwise abort the whole sweep and fail the request on that id with a 500 instead of a 409
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _parse(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors; raises on anything else (a truncated or foreign file)."""
    from safetensors.torch import load

    (size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, load(data)


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def session_files(settings: ServeSettings, config, metrics: ServeMetrics,
                  adapter_identity: Callable[[int], AdapterIdentity], dtype: str) -> SessionFiles | None:
    """The session files of ``--session-dir`` for the model of ``config`` served in ``dtype`` (``float32`` ...);
    None without it (or with sessions off). Raises StartupError (``retnet-serve`` exits 2) for a directory that is
    (or is inside) the model's or an adapter's, or that cannot be created or written."""
    if settings.session_dir is None or settings.max_sessions == 0:
        return None
    directory = Path(settings.session_dir).resolve()
    # The sweep only ever removes session files, but a directory of other files is still no place for them.
    owners = [("--model's directory", settings.model)]
    owners += [(f"the directory of the LoRA adapter {module.name!r}", module.path) for module in settings.lora]
    # The draft model's too (resolved to its directory by now): a session "model" was written over, or DELETEd as,
    # its model.safetensors, as --model's would be.
    spec = settings.speculative
    if spec is not None and spec.model is not None:
        owners.append(("--speculative-config's draft model directory", spec.model))
    for what, owner in owners:
        if _inside(directory, Path(owner).expanduser().resolve()):
            raise StartupError(f"--session-dir {settings.session_dir!r} is {what} {owner!r} or inside it; give "
                               "the sessions a directory of their own")
    shape = (1, config.num_attention_heads, config.head_dim, config.value_head_dim)
    model = model_fingerprint(settings.model, config, load_chat_template(settings.chat_template), dtype,
                              settings.chat_template_content_format)
    try:
        return SessionFiles(directory, model, settings.session_ttl_s, metrics, shape, config.num_hidden_layers,
                            adapter_identity, int(config.vocab_size), settings.retry_after_s)
    except OSError as exc:  # not a directory, not writable, a read-only filesystem
        raise StartupError(f"--session-dir {settings.session_dir!r} cannot be written: {exc.strerror or exc}") \
            from None


__all__ = ["SavedState", "SessionFileError", "SessionFiles", "check_session_id", "model_fingerprint",
           "session_files"]
