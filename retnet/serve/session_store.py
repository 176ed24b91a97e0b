"""Sessions on disk (``--session-dir``): each session's state in a file of its own, so that a session outlives a
restart and the in-memory :class:`~retnet.serve.state_cache.SessionStore` becomes a cache over the directory.

A RetNet session is one fixed-size state (a few MB whatever the history's length), so writing it after every turn
costs the same for the tenth turn as for the first. ``DIR/<session_id>.safetensors`` holds:

- tensors ``state.<layer>`` ``[1, H, K, V]`` fp32 and ``offsets`` ``[1]`` int64: the :class:`RetNetCache` row;
- metadata: the format, the session id, the fingerprint of the model that computed the state (its config, weights
  and tokenizer: :func:`model_fingerprint`) and of its LoRA adapter (name and files' fingerprint), the tokens not
  yet fed (the last one sampled), the history's token count and the cache's ``seen_tokens``.

Writes run on one writer thread, off the event loop and off the scheduler: a turn queues its session's new state
and the writer writes it (temp file, fsync, ``os.replace``, the directory fsynced). A session has at most one
write queued, the latest (a newer state replaces one not yet written), and one thread writes them all in turn, so
an earlier state can never land after a later one. A DELETE queues behind them the same way. Reading a session
back (a request for one not in memory) runs on a worker thread, while the request holds the session busy, so
nothing else writes it meanwhile; a state queued or being written is taken from the queue, not from the file.

A file is never continued under another model or adapter, nor when it cannot be read: 409 naming ``session_id``
(``session_model_changed``, ``session_corrupt``), the file kept (serve that model again, or DELETE the session).
Expiry (``--session-ttl-s`` after the last turn was written, the file's modification time): at startup, every
``min(ttl, 60 s)`` on the writer thread, and when a request finds its session's file expired.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
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
from retnet.serve.settings import ServeSettings, StartupError

logger = logging.getLogger("retnet.serve")

FORMAT = "retnet-session/1"
SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
SWEEP_EVERY_S = 60.0  # at most; a shorter TTL sweeps every TTL
# What decides how text becomes tokens: their contents are hashed (a few MB at most).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json")
_SESSION_ID = re.compile(SESSION_ID_PATTERN)

# An adapter's identity in a file: its name and lora.files_fingerprint (None: the base model).
AdapterIdentity = tuple[str, list[int]] | None


def check_session_id(session_id: str) -> str:
    """``session_id`` if it can name a file: 1 to 128 letters, digits, ``_ . : -`` (the requests' own rule, so no
    id a request accepts is refused here); else 400 naming ``session_id``. With the suffix every such id is a
    plain file name inside the directory (``..`` is ``...safetensors``)."""
    if not _SESSION_ID.match(session_id):
        raise APIError(400, f"session_id must be 1 to 128 letters, digits, '_', '.', ':' or '-' (it names the "
                       f"session's file); got {session_id[:80]!r}", "session_id", "invalid_session_id")
    return session_id


def model_fingerprint(model_dir: str | Path, config) -> dict[str, str]:
    """``{"config", "weights", "tokenizer"}``: a SHA-256 of each part of the model served from ``model_dir``, the
    three a session's state depends on. ``config``: its JSON file (``transformers_version`` left out), or the loaded
    ``config`` when the directory has none; ``weights``: each weights file's name, size and modification time (two
    ``stat``: any rewrite changes it, as ``lora.files_fingerprint``; a copy that keeps the times, ``cp -p``,
    keeps it); ``tokenizer``: the tokenizer files' contents."""
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
    tokenizer = [(name, hashlib.sha256((root / name).read_bytes()).hexdigest())
                 for name in TOKENIZER_FILES if (root / name).is_file()]
    return {part: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
            for part, value in (("config", values), ("weights", weights), ("tokenizer", tokenizer))}


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


@dataclass(slots=True, eq=False)
class _Job:
    state: SavedState | None  # None: delete the file
    # The state is already on disk, unchanged (a request on the session failed or was cancelled): only the file's
    # time moves, so that it expires with the session's last use; written whole if the file has gone.
    touch: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    existed: bool = False  # a delete's answer: there was a state to delete


class SessionFiles:
    """The session files of one directory, written by one thread (see the module's docstring)."""

    def __init__(self, directory: str | Path, model: dict[str, str], ttl_s: float, metrics: ServeMetrics,
                 state_shape: tuple[int, int, int, int], num_layers: int,
                 adapter_identity: Callable[[int], AdapterIdentity]):
        """``model``: :func:`model_fingerprint`; ``state_shape``: one layer's ``[1, H, K, V]``; ``adapter_identity``:
        the name and files' fingerprint of the adapter of a LoRA slot (None: no longer known)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model, self.ttl_s, self.metrics = model, ttl_s, metrics
        self.state_shape, self.num_layers = state_shape, num_layers
        self.adapter_identity = adapter_identity
        self.cond = threading.Condition()
        self.queued: dict[str, _Job] = {}  # by session id, oldest first; guarded by cond
        self.writing: tuple[str, _Job] | None = None  # the job the writer is doing; guarded by cond
        self.closed = False
        self._sweep()
        self.thread = threading.Thread(target=self._run, name="retnet-session-writer", daemon=True)
        self.thread.start()

    def path(self, session_id: str) -> Path:
        return self.directory / (check_session_id(session_id) + SUFFIX)

    # -- called from the scheduler and the event loop ----------------------------------------------------------
    def save(self, session_id: str, cache: RetNetCache, pending: list[int], tokens: int, adapter: int,
             changed: bool = True) -> None:
        """Queue the session's state (``changed`` false: the one already written, only its time moves).
        ``adapter``: the LoRA slot it was computed under (0: the base model)."""
        identity = self.adapter_identity(adapter) if adapter else None
        if adapter and identity is None:
            return  # its adapter is gone: the state can never be continued (its file, if any, is refused)
        state = SavedState(cache, list(pending), tokens, identity, time.time())
        with self.cond:
            queued = self.queued.get(session_id)
            if not changed and queued is not None and queued.state is not None:
                queued.state.at = state.at  # the state queued is this one: written with the later time
                return
            self.queued[session_id] = _Job(state, touch=not changed)
            self.cond.notify_all()

    def delete(self, session_id: str) -> _Job:
        """Queue the removal of the session's file (behind its writes: none brings it back); wait for ``done``,
        then ``existed`` says whether the session had a state here."""
        self.path(session_id)
        with self.cond:
            replaced = self.queued.pop(session_id, None)
            job = _Job(None, existed=replaced is not None and replaced.state is not None)
            self.queued[session_id] = job
            self.cond.notify_all()
        return job

    # -- called on a worker thread ----------------------------------------------------------------------------
    def load(self, session_id: str, adapters: dict, device: torch.device) -> tuple[SavedState, int] | None:
        """The session's state and the LoRA slot (0: the base model) it continues under here, or None when it has
        none (never saved, deleted, expired: an expired file is removed). ``adapters``: the engine's, by name.

        Raises :class:`SessionFileError` for a file of another model or adapter, or one that cannot be read.
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
            mtime = path.stat().st_mtime
            if time.time() - mtime > self.ttl_s:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                return None
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._refused(session_id, f"could not be read from --session-dir ({exc.strerror})",
                                "session_corrupt") from exc
        try:
            meta, tensors = _parse(data)
            if meta.get("session_id") != session_id:  # a case-insensitive filesystem gives two ids one file
                raise ValueError(f"it holds session {meta.get('session_id')!r}")
        except Exception as exc:  # struct, JSON, safetensors' own errors: all mean the file is not whole
            raise self._refused(session_id, f"has a file in --session-dir that is not a whole session file ({exc})",
                                "session_corrupt") from exc
        changed = [part for part in ("config", "weights", "tokenizer") if meta.get(f"model.{part}") != self.model[part]]
        if changed:
            raise self._refused(session_id, f"was saved by another model: its {' and '.join(changed)} differ from "
                                "this server's --model (a state is never continued on other weights); serve that "
                                "model to continue it", "session_model_changed")
        try:
            state = self._state(meta, tensors, mtime)
        except Exception as exc:
            raise self._refused(session_id, f"has a file in --session-dir that does not fit this model ({exc})",
                                "session_corrupt") from exc
        state.cache.to(device)
        return state

    def _state(self, meta: dict[str, str], tensors: dict[str, torch.Tensor], mtime: float) -> SavedState:
        cache = RetNetCache(self.num_layers)
        for i in range(self.num_layers):
            state = tensors[f"state.{i}"]
            if tuple(state.shape) != self.state_shape or state.dtype != torch.float32:
                raise ValueError(f"state.{i} is {state.dtype} {tuple(state.shape)}, not float32 {self.state_shape}")
            cache.states[i] = state
        cache.offsets = tensors["offsets"]
        if tuple(cache.offsets.shape) != (1,) or cache.offsets.dtype != torch.int64:
            raise ValueError(f"offsets is {cache.offsets.dtype} {tuple(cache.offsets.shape)}, not int64 (1,)")
        cache.seen_tokens = int(meta["seen_tokens"])
        pending, adapter = json.loads(meta["pending"]), json.loads(meta["adapter"])
        if not (isinstance(pending, list) and all(isinstance(t, int) for t in pending)):
            raise ValueError(f"pending is {meta['pending']!r}, not a list of token ids")
        if adapter is not None:
            adapter = (str(adapter[0]), [int(v) for v in adapter[1]])
        return SavedState(cache, pending, int(meta["tokens"]), adapter, mtime)

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

    def _refused(self, session_id: str, why: str, code: str) -> SessionFileError:
        self.metrics.session_load_failures.labels(code).inc()
        logger.warning("session %r not loaded from --session-dir: %s", session_id, why)
        return SessionFileError(session_id, why, code)

    # -- the writer thread ------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is on disk; False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.queued and self.writing is None, timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued, then stop the writer."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def _run(self) -> None:
        sweep_every = min(self.ttl_s, SWEEP_EVERY_S)
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
                self._sweep()
                next_sweep = time.monotonic() + sweep_every
                continue
            try:
                self._do(*current)
            except Exception:  # a full disk, a permission: the session goes on in memory
                if current[1].state is not None:
                    self.metrics.session_write_failures.inc()
                logger.exception("session %r: its file in --session-dir could not be %s", current[0],
                                 "removed" if current[1].state is None else "written")
            finally:
                with self.cond:
                    self.writing = None
                    self.cond.notify_all()
                current[1].done.set()

    def _do(self, session_id: str, job: _Job) -> None:
        path = self.path(session_id)
        if job.state is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                job.existed = True
        elif job.touch and path.exists():
            os.utime(path, (job.state.at, job.state.at))
        else:
            self._write(path, session_id, job.state)
            self.metrics.session_writes.inc()

    def _write(self, path: Path, session_id: str, state: SavedState) -> None:
        from safetensors.torch import save

        cache = state.cache
        tensors = {f"state.{i}": s.detach().to("cpu").contiguous() for i, s in enumerate(cache.states)}
        tensors["offsets"] = cache.offsets.detach().to("cpu").contiguous()
        metadata = {"format": FORMAT, "session_id": session_id,
                    **{f"model.{part}": value for part, value in self.model.items()},
                    "adapter": json.dumps(state.adapter), "pending": json.dumps(state.pending),
                    "tokens": str(state.tokens), "seen_tokens": str(cache.seen_tokens)}
        data = save(tensors, metadata)
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
        """Remove the expired files and the temporary ones a crash left (only this server's writer makes them)."""
        cutoff = time.time() - self.ttl_s
        for path in self.directory.iterdir():
            with contextlib.suppress(OSError):
                if (path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)) or \
                        (path.name.endswith(SUFFIX) and path.stat().st_mtime < cutoff):
                    path.unlink()


def _parse(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors; raises on anything else (a truncated or foreign file)."""
    from safetensors.torch import load

    (size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, load(data)


def session_files(settings: ServeSettings, config, metrics: ServeMetrics,
                  adapter_identity: Callable[[int], AdapterIdentity]) -> SessionFiles | None:
    """The session files of ``--session-dir`` for the model of ``config``; None without it (or with sessions off)."""
    if settings.session_dir is None or settings.max_sessions == 0:
        return None
    shape = (1, config.num_attention_heads, config.head_dim, config.value_head_dim)
    model = model_fingerprint(settings.model, config)
    try:
        return SessionFiles(settings.session_dir, model, settings.session_ttl_s, metrics, shape,
                            config.num_hidden_layers, adapter_identity)
    except OSError as exc:  # not a directory, not writable
        raise StartupError(f"--session-dir {settings.session_dir!r}: {exc.strerror or exc}") from None


__all__ = ["SavedState", "SessionFileError", "SessionFiles", "check_session_id", "model_fingerprint",
           "session_files"]
