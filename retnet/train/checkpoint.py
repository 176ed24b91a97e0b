"""Atomic checkpoints, verified loads, exact resume, and the ``save_pretrained`` export.

A checkpoint is a directory ``<output_dir>/checkpoints/step_00000100`` holding

    model.pt       the full (unsharded) model state dict
    optimizer.pt   the full optimizer state dict (FQN-keyed under FSDP2)
    trainer.pt     step, tokens trained on, per-rank data positions and RNG states (python, numpy, torch,
                   cuda), config, the losses, seconds and tokens of the steps since the last metrics record
                   (and the last step's learning rate and gradient norm, which that record reports),
                   whether this step's evaluation is still to run (a stop signal skipped it), the
                   fingerprint of the hub data trained on (a resume reads the same), the SHA-256 of the
                   tokenizer's vocabulary (a resume tokenizes with the same) and, under LoRA, the
                   modules its adapters wrap (``lora.target_modules`` resolved: a resume compares those)
    manifest.json  written last: step, layout and the sha256 and size of each file in the directory

That is the ``full`` layout. In the ``sharded`` one (``checkpoint.layout``, the default under FSDP2) ``model.pt``
and ``optimizer.pt`` are replaced by ``state/``, a torch distributed checkpoint: every rank writes and hashes its
own shard (no rank gathers the whole state), and it loads into any world size.

It is written into ``.tmp-step_…`` (each file fsynced), the manifest last, then renamed into place and the
parent directory fsynced. A crash at any point leaves either no ``step_*`` directory or a complete one; a
``step_*`` directory without a manifest, or whose files do not match it, is refused with the file named.
Saving a step that already has a checkpoint replaces it (the running process's state wins), swapped in with
one ``renameat2(RENAME_EXCHANGE)`` where the OS has it. ``.tmp-*`` directories left by a process that died
mid-save are removed by :func:`remove_stale_temp` when the next run starts (the checkpoint such a replacement
had moved aside put back in its place).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = ("model.pt", "optimizer.pt", "trainer.pt")  # the full layout's
SHARDED_STATE = "state"  # the sharded layout's torch.distributed.checkpoint directory
SHARDED_FILES = ("trainer.pt", f"{SHARDED_STATE}/.metadata")  # with the shards, which the manifest lists
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
SUPERSEDED_SUFFIX = "-old"  # _replace's name for the checkpoint it replaces, between its two renames


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or corrupt; the message names the directory and the file."""


def loading_mismatches(model, info: dict, config, new_head: str | None = None) -> str:
    """What ``from_pretrained(..., output_loading_info=True)`` left unmatched, for a refusal ("missing: a, b;
    unexpected: c"; "" when every weight matched): from_pretrained draws the weights a directory lacks at random and
    only reports them. A tied head is the embedding, not a weight of its own (older transformers list it as
    missing). ``new_head``: the prefix of a head the model draws anew (a classifier's ``score.`` over a causal LM's
    export, whose ``lm_head.weight`` it then drops)."""
    missing, unexpected = set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ()))
    if config.tie_word_embeddings:
        missing -= set(getattr(model, "_tied_weights_keys", None) or ())
    if new_head:
        missing = {key for key in missing if not key.startswith(new_head)}
        unexpected.discard("lm_head.weight")
    problems = {"missing": sorted(missing), "unexpected": sorted(unexpected),
                "mismatched": sorted(str(key) for key in info.get("mismatched_keys", ()))}
    return "; ".join(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for what, keys in problems.items() if keys)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, itself included: after a power loss a renamed directory
    can otherwise hold empty or truncated files, the rename having reached the disk before their data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _write_durable(path: Path, obj: Any) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Saved for every GPU the process saw; a resume on a machine with fewer (another world size) has only these.
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------------------
# Save, verify, find, load
# ----------------------------------------------------------------------------------------------------------
def new_temp_dir(root: Path, step: int) -> Path:
    """An empty ``.tmp-step_…`` directory under ``root`` that :func:`commit_checkpoint` turns into the checkpoint
    of ``step``; rank 0 makes it and every rank of a sharded save writes into it."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The manifest entries (sha256, size) of ``names``, relative to ``directory``: each rank of a sharded save
    hashes the shards it wrote, so rank 0 does not hash them all after them."""
    return {name: {"sha256": _sha256(directory / name), "bytes": (directory / name).stat().st_size}
            for name in names}


def save_checkpoint(root: Path, step: int, *, model: dict, optimizer: dict, trainer: dict, keep_last: int) -> Path:
    """Write a full-layout checkpoint atomically (rank 0 only) and keep the newest ``keep_last`` valid ones."""
    tmp = new_temp_dir(root, step)
    try:
        _write_durable(tmp / "model.pt", model)
        _write_durable(tmp / "optimizer.pt", optimizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not stay full of our half-written copy
        raise
    return commit_checkpoint(root, step, tmp, trainer=trainer, keep_last=keep_last)


def commit_checkpoint(root: Path, step: int, tmp: Path, *, trainer: dict, keep_last: int, layout: str = "full",
                      hashed: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``trainer.pt`` and the manifest of every file in ``tmp`` (those in ``hashed`` were hashed by the
    ranks that wrote them), rename it into place and keep the newest ``keep_last`` valid checkpoints (rank 0).

    A valid ``step_*`` directory already at this step is replaced by the new one (a run resumed from an older
    checkpoint has diverged from it). One that does not verify is moved aside to ``step_….corrupt-<time>``
    (never overwritten or deleted)."""
    final = root / step_dir_name(step)
    try:
        _write_durable(tmp / "trainer.pt", trainer)
        names = sorted(str(path.relative_to(tmp)) for path in tmp.rglob("*") if path.is_file())
        hashed = hashed or {}
        unseen = sorted(set(hashed) - set(names))
        if unseen:
            raise CheckpointError(
                f"checkpoint {str(final)!r}: shards written by other ranks are not here ({', '.join(unseen[:3])}"
                f"{' ...' if len(unseen) > 3 else ''}): with several nodes train.output_dir must be on a "
                f"filesystem they share")
        entries = {**file_entries(tmp, [name for name in names if name not in hashed]), **hashed}
        required = FILES if layout == "full" else SHARDED_FILES
        if any(name not in entries for name in required):
            raise CheckpointError(f"checkpoint {str(final)!r}: the {layout} layout needs {', '.join(required)}; "
                                  f"written: {', '.join(names)}")
        fsync_tree(tmp)  # the shards of other ranks too: a rename that reaches the disk before them loses them
        manifest = {"format": FORMAT_VERSION, "step": step, "time": time.time(), "layout": layout,
                    "files": dict(sorted(entries.items()))}
        with open(tmp / MANIFEST, "w") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        try:
            verify_checkpoint(final)
        except CheckpointError as error:
            aside = _unused(final.with_name(f"{final.name}.corrupt-{int(time.time())}"))
            logger.warning("moving invalid checkpoint aside to %s: %s", aside, error)
            os.rename(final, aside)
    if final.exists():
        _replace(tmp, final)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _checked[final.absolute()] = (_identity(final), True)  # hashed above, as it was written
    _prune(root, keep_last, step)
    return final


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this kernel or filesystem cannot swap
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace(new: Path, final: Path) -> None:
    """Put the complete checkpoint ``new`` at ``final``, which holds a valid one. With an atomic swap there is
    never a moment without a valid ``final``; without one (macOS, NFS) there is a short gap between two renames,
    and a crash inside it leaves the valid one under its ``…-old`` name, which ``remove_stale_temp`` puts back
    at the next start, never a half-written ``step_*``."""
    if not _exchange(new, final):
        old = final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}{SUPERSEDED_SUFFIX}")
        os.rename(final, old)
        os.rename(new, final)
        new = old
    try:
        shutil.rmtree(new)  # now the superseded checkpoint, under a .tmp- name
    except OSError as error:  # the new one is in place; remove_stale_temp removes this at the next start
        logger.warning("could not remove the superseded checkpoint %s: %s", new, error)


def remove_stale_temp(root: Path) -> list[Path]:
    """Remove the ``.tmp-*`` directories under ``root``: call it before this process saves anything, so every
    one of them belongs to a process that died mid-save (a preemption loop would otherwise fill the disk)."""
    if not root.is_dir():
        return []
    for path in sorted(root.glob(f"{TMP_PREFIX}step_*{SUPERSEDED_SUFFIX}")):
        # _replace's process died between its two renames: this valid checkpoint had been moved aside and its
        # replacement not yet put in, so its step has none; removed, it took with it the checkpoint a resume
        # needs (with checkpoint.keep_last 1, the only one)
        final = root / path.name[len(TMP_PREFIX):].split("-", 1)[0]
        if STEP_DIR.match(final.name) and path.is_dir() and not final.exists():
            try:
                os.rename(path, final)
            except FileNotFoundError:  # another start on this output_dir put it back first
                continue
            _fsync_dir(root)
            logger.warning("restored checkpoint %s, moved aside by a save of the same step that was interrupted",
                           final)
    stale = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def remove_stale_export(directory: Path) -> list[Path]:
    """Remove the ``.tmp-<name>-*`` and ``.old-<name>-*`` siblings of the export ``directory`` that
    :func:`export_pretrained` leaves when its process dies: call it before this process exports anything.
    When ``directory`` itself is missing (a death between the two renames), an ``.old-`` one is the last
    complete export and is renamed back instead of removed."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        return []
    old = sorted(p for p in directory.parent.glob(f".old-{directory.name}-*") if p.is_dir())
    if old and not directory.exists():
        os.rename(old.pop(), directory)
    stale = [*directory.parent.glob(f".tmp-{directory.name}-*"), *old]
    stale = [p for p in stale if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def retire_export(directory: Path, aside: str | None = None) -> Path | None:
    """Take the export an earlier run left at ``directory`` out of the way, so that no reader takes it for the
    export of the run now training (which writes its own when it finishes): removed, or with ``aside`` renamed to
    that sibling name (kept, as the checkpoints it was exported from are). Returns the path it was or now is, or
    None when there was none. Checkpoints are never touched."""
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return None
    if aside is None:
        if directory.is_symlink() or not directory.is_dir():  # the link, not what it points to
            directory.unlink()
        else:
            shutil.rmtree(directory)
        _fsync_dir(directory.parent)
        return directory
    moved = _unused(directory.with_name(aside))
    os.rename(directory, moved)
    _fsync_dir(directory.parent)
    return moved


def _unused(path: Path) -> Path:
    """``path``, or ``path-1``, ``path-2`` ... when it is taken: names stamped to the second collide when two runs
    set the same step aside within one, and a rename onto a directory fails ("Directory not empty") or replaces a
    file."""
    candidate, number = path, 0
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


LOCK_FILE = ".lock"  # in train.output_dir: held (flock) by the rank 0 of the run writing there
_held_locks: dict[Path, int] = {}


def lock_output_dir(directory: Path) -> None:
    """Hold ``directory``'s lock for this process (rank 0), or CheckpointError when another live process holds
    it. A torchrun killed with SIGKILL leaves its ranks training on: relaunched, the two runs pruned each other's
    checkpoints (the relaunch died on a file gone from the one it picked, or both went on writing one directory).
    The kernel drops the lock with the process, so a killed run never leaves it behind. Held again by the same
    process it is a no-op (runs one after another in one process); a filesystem without locks is not checked."""
    try:
        import fcntl
    except ImportError:  # Windows
        return
    key = Path(directory).absolute()
    if key in _held_locks:
        return
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        logger.debug("no lock on %s: %s", key, error)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise CheckpointError(
            f"train.output_dir {str(key)!r} is in use by another training run that is still running"
            f"{f' ({holder})' if holder else ''}: wait for it or stop it (a torchrun killed with SIGKILL leaves "
            f"its ranks running), or give another train.output_dir") from None
    except OSError as error:  # (a Lustre mounted without flock, some FUSE filesystems)
        os.close(fd)
        logger.debug("no lock on %s: %s", key, error)
        return
    import socket

    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held_locks[key] = fd


def unlock_output_dir(directory: Path) -> None:
    fd = _held_locks.pop(Path(directory).absolute(), None)
    if fd is not None:
        os.close(fd)  # (the file stays: removing it would race a run that opened it meanwhile)


def supersede_after(root: Path, step: int) -> list[Path]:
    """Move ``step_*`` checkpoints newer than ``step`` aside to ``step_….abandoned-<time>``: a run resumed
    explicitly from ``step`` replaces their trajectory, and left in place they would be what ``resume=auto``
    picks next and what ``keep_last`` pruning keeps. Moved, not deleted: the explicit path may be a mistake."""
    moved = []
    stamp = int(time.time())
    for path in list_checkpoints(root):
        if int(STEP_DIR.match(path.name).group(1)) > step:
            aside = _unused(path.with_name(f"{path.name}.abandoned-{stamp}"))
            os.rename(path, aside)
            moved.append(aside)
    if moved:
        _fsync_dir(root)
    return moved


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Keep the newest ``keep_last`` valid checkpoints up to ``step``, the one just saved, and remove those older
    than them. An invalid one is not counted (it would push out a valid one that a resume needs); it stays
    until it falls behind the ones kept. A newer ``step_*`` can only be one that ``resume=auto`` skipped as
    invalid: it stays until this run reaches its step and moves it aside."""
    kept = 0
    for path in reversed(list_checkpoints(root)):
        if int(STEP_DIR.match(path.name).group(1)) > step:
            continue
        if kept >= keep_last:
            try:
                shutil.rmtree(path)
            except OSError as error:
                # The new checkpoint is committed: a run must not die of an old one it could not delete (a busy
                # .nfs file, a permission). It stays behind those kept and the next save tries again.
                logger.warning("could not remove old checkpoint %s (checkpoint.keep_last=%d): %s; the next save "
                               "tries again", path, keep_last, error)
            _checked.pop(path.absolute(), None)
        elif _is_valid(path):
            kept += 1


# Whether each checkpoint verified, with the identity of its files when it was checked: pruning at every save
# asks it of every kept checkpoint, and must not hash again tens of GB that this process wrote or verified. A
# file replaced or written to since has another identity (inode, size or mtime) and is verified again.
_checked: dict[Path, tuple[tuple, bool]] = {}


def _identity(path: Path) -> tuple:
    """(inode, size, mtime) of the manifest and each file it lists; () when one is missing or it is unreadable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        names = sorted(manifest["files"])
    except (OSError, ValueError, TypeError, KeyError):
        return ()
    stats = []
    for name in (MANIFEST, *names):
        try:
            stat = (path / name).stat()
        except OSError:
            return ()
        stats.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(stats)


def _is_valid(path: Path) -> bool:
    """``verify_checkpoint`` as a bool, answered from ``_checked`` while the files are unchanged."""
    identity = _identity(path)
    known = _checked.get(path.absolute())
    if identity and known is not None and known[0] == identity:
        return known[1]
    try:
        verify_checkpoint(path)
        valid = True
    except CheckpointError as error:
        logger.warning("not counting an invalid checkpoint towards checkpoint.keep_last: %s", error)
        valid = False
    _checked[path.absolute()] = (identity, valid)
    return valid


def list_checkpoints(root: Path) -> list[Path]:
    """``step_*`` directories under ``root``, oldest first (not verified)."""
    if not os.path.isdir(root):  # (os.path's: no OSError on a name longer than the OS takes)
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a complete, uncorrupted checkpoint, or CheckpointError naming what is wrong."""
    try:
        return _verify(Path(path))
    except OSError as error:
        # A file this process may not read (another user's 0600 files on a shared filesystem) or an I/O error: a
        # checkpoint that cannot be loaded, as a corrupt one, named with the error (it raised out of resume=auto's
        # choice and out of keep_last's pruning, after the new checkpoint was committed)
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {error}") from None


def _verify(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: no {MANIFEST} (a crash while writing?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as error:
        raise CheckpointError(f"checkpoint {str(manifest_path)!r} is unreadable: {error}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or type(manifest.get("step")) is not int:
        raise CheckpointError(f"checkpoint {str(manifest_path)!r} is malformed: not an object with an integer "
                              f"'step' and a 'files' object")
    # resume=auto and keep_last go by the name: a copy put by hand under a higher step_N would be resumed from at
    # every relaunch, going back to its own step each time
    named = STEP_DIR.match(path.name)
    if named and int(named.group(1)) != manifest["step"]:
        raise CheckpointError(f"checkpoint {str(path)!r} holds step {manifest['step']} ({MANIFEST}), not step "
                              f"{int(named.group(1))} as its name says (copied or renamed by hand?): rename it "
                              f"{step_dir_name(manifest['step'])}")
    layout = manifest.get("layout", "full")  # absent: written before the sharded layout
    if layout not in ("full", "sharded"):
        raise CheckpointError(f"checkpoint {str(manifest_path)!r} is malformed: unknown layout {layout!r}")
    for name in FILES if layout == "full" else SHARDED_FILES:
        if name not in files:
            raise CheckpointError(f"checkpoint {str(path)!r}: {MANIFEST} lists no {name}")
    for name, entry in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"checkpoint {str(manifest_path)!r} is malformed: it lists {name!r}, not a "
                                  f"path inside the checkpoint")
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"checkpoint {str(manifest_path)!r} is malformed: the entry of {name} is not "
                                  f"{{'sha256': str, 'bytes': int}}")
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is missing {name}")
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt: its size or sha256 does not match "
                                  f"{MANIFEST}")
    _checked[path.absolute()] = (_identity(path), True)
    return manifest


def find_resume_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; invalid newer ones are skipped with a warning. None when there
    are none; CheckpointError when checkpoints exist but none verifies (nothing is overwritten)."""
    candidates = list_checkpoints(root)
    errors = []
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
            for error in errors:
                logger.warning("skipping invalid checkpoint: %s", error)
            return path
        except CheckpointError as error:
            errors.append(str(error))
    if errors:
        raise CheckpointError("no valid checkpoint to resume from in " f"{str(root)!r}: " + "; ".join(errors))
    return None


def verified_identity(path: Path) -> tuple:
    """What :func:`note_verified` takes in another process: the identity of files this process verified, or
    () when it has not verified them as they are now."""
    identity, known = _identity(path), _checked.get(Path(path).absolute())
    return identity if identity and known == (identity, True) else ()


def note_verified(path: Path, identity: tuple) -> bool:
    """Take another process's verification of ``path`` (its :func:`verified_identity`) when the files here are
    those it hashed (same inode, size and mtime): ranks that share a filesystem then do not each hash tens of
    GB that rank 0 just verified. Files that differ here are verified again when loaded."""
    if identity and _identity(path) == tuple(identity):
        _checked[Path(path).absolute()] = (tuple(identity), True)
        return True
    return False


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Verify and load a checkpoint: ``{"model", "optimizer", "trainer", "step", "layout"}`` on CPU, the
    model and optimizer as full state dicts.

    Of the full layout the tensors are memory-mapped from their files (copy-on-write), not read into this
    process: the ranks of a node then share one copy in the page cache, where each holding its own full copy
    (model and Adam state: 12 bytes a parameter) would take 8 × 80 GB for a 6.7B model on 8 GPUs. Of the
    sharded layout this process reads every shard (for tools and exports; a training run loads its own shards
    with :func:`load_sharded_state`)."""
    path = Path(path)
    manifest = _verified_manifest(path)
    layout = manifest.get("layout", "full")
    if layout == "full":
        model, optimizer = _load_mapped(path / "model.pt"), _load_mapped(path / "optimizer.pt")
    else:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner, _load_state_dict

        # What torch's own dcp_to_torch_save does (the public load only fills the keys it is given): the planner
        # fills an empty dict with everything saved.
        state: dict[str, Any] = {}
        _load_state_dict(state, storage_reader=FileSystemReader(path / SHARDED_STATE),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        model, optimizer = state["model"], state["optimizer"]
    return {"model": model, "optimizer": optimizer, "trainer": _load_trainer(path), "step": manifest["step"],
            "layout": layout}


def _load_mapped(file: Path) -> Any:
    """``torch.load`` of our tensors file, memory-mapped copy-on-write: MAP_PRIVATE whatever the process-wide
    default (``torch.serialization.set_default_mmap_options``, which another library or tool may have set to
    MAP_SHARED: training on from the tensors would then write into the checkpoint, and its hashes)."""
    import mmap

    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: torch maps privately there and has no option to change
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    with torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def load_checkpoint_trainer(path: Path) -> dict[str, Any]:
    """Verify a checkpoint and load only its ``trainer.pt`` (step, data positions, RNG states ...)."""
    _verified_manifest(Path(path))
    return _load_trainer(Path(path))


def _verified_manifest(path: Path) -> dict[str, Any]:
    if verified_identity(path):
        # This process verified these very files (choosing the checkpoint to resume, or writing it), or rank 0
        # did (note_verified): hashing tens of GB again would only delay the resume.
        return json.loads((path / MANIFEST).read_text())
    return verify_checkpoint(path)


def _load_trainer(path: Path) -> dict[str, Any]:
    # our own file: holds numpy/python RNG states, which weights_only refuses
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)


def checkpoint_layout(path: Path) -> str:
    """``full`` or ``sharded``, from the manifest of a checkpoint verified before."""
    return json.loads((Path(path) / MANIFEST).read_text()).get("layout", "full")


def saved_model_shapes(path: Path) -> dict[str, list[int]]:
    """The shape of every model tensor a checkpoint holds, read without loading any (a sharded one's metadata,
    a full one's memory-mapped file)."""
    path = Path(path)
    if checkpoint_layout(path) == "full":
        model = _load_mapped(path / "model.pt")
        return {key: list(value.shape) for key, value in model.items()}
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(path / SHARDED_STATE).read_metadata()
    return {key.removeprefix("model."): list(entry.size) for key, entry in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}


def save_sharded_state(directory: Path, model_state: dict, optim_state: dict, *, rank: int,
                       distributed: bool) -> dict[str, dict[str, Any]]:
    """Every rank writes its shard of the (sharded) model and optimizer state dicts into ``directory/state``
    (a collective); returns the manifest entries of the files this rank wrote, hashed here."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    state_dir = directory / SHARDED_STATE
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process: meant
        dcp_save({"model": model_state, "optimizer": optim_state}, storage_writer=FileSystemWriter(state_dir),
                 no_dist=not distributed)
    # torch names each rank's shard files __<rank>_<n>.distcp; files of other names rank 0 hashes at commit
    mine = sorted(f"{SHARDED_STATE}/{file.name}" for file in state_dir.glob(f"__{rank}_*.distcp"))
    return file_entries(directory, mine)


def load_sharded_state(path: Path, model_state: dict, optim_state: dict, *, distributed: bool) -> None:
    """Read a sharded checkpoint's model and optimizer state into these state dicts, in place (a collective):
    each rank reads the parts of the tensors it holds, whatever the world size that wrote them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp_load({"model": model_state, "optimizer": optim_state},
                 storage_reader=FileSystemReader(Path(path) / SHARDED_STATE), no_dist=not distributed)


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------
def export_pretrained(directory: Path, model_config, state_dict: dict, tokenizer, base_dir: Path | None = None) -> Path:
    """``save_pretrained`` the model (fp32, safetensors) and tokenizer into ``directory``, replacing it
    atomically, so ``AutoModelForCausalLM.from_pretrained(directory)`` and ``AutoTokenizer`` load it. ``base_dir``:
    the pretrained directory the run fine-tuned (``model.init_from``), whose generation config it keeps
    (:func:`prepare_export`)."""
    from retnet.model import RetNetForCausalLM

    model = RetNetForCausalLM(model_config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",) or not model_config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    prepare_export(model, tokenizer, base_dir)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return replace_directory(Path(directory), write)


def _token_ids(value) -> list[int]:
    """A generation config's ``eos_token_id`` (None, an int or a list of them) as a list."""
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(i) for i in value]


def prepare_export(model, tokenizer, base_dir: Path | None = None) -> None:
    """The generation config an exported model saves (changed in place on ``model``).

    A fine-tune's starts from its base's ``generation_config.json`` (``base_dir``, the ``model.init_from``
    directory, or a distilled student's teacher), when it has one: the sampling defaults the server and ``generate`` read (temperature, top_p,
    top_k, max_new_tokens ...) and its stop ids (a chat model's end-of-turn token, which GRPO's sampling stopped on
    too) are the base's. Then, from the tokenizer: ``eos_token_id`` the stop ids with the tokenizer's EOS among
    them (put first when the base's did not list it; an int when it is the only one), ``pad_token_id`` the
    tokenizer's pad (the base's kept when the tokenizer has none), and, when the config names no
    ``bos_token_id``, the tokenizer's BOS or, without one, its EOS: training starts every document after an EOS,
    and ``generate()`` without input ids starts from ``bos_token_id``."""
    from transformers import GenerationConfig

    from_base = base_dir is not None and (Path(base_dir) / "generation_config.json").is_file()
    if from_base:
        model.generation_config = GenerationConfig.from_pretrained(str(base_dir), local_files_only=True)
    generation = model.generation_config
    stops = _token_ids(generation.eos_token_id)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in stops:
        stops.insert(0, eos)
    generation.eos_token_id = (stops[0] if len(stops) == 1 else stops) if stops else None
    if tokenizer.pad_token_id is not None or not from_base:
        generation.pad_token_id = tokenizer.pad_token_id
    if generation.bos_token_id is None:
        generation.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if from_base:
        # save_pretrained refuses a config changed since it was loaded that does not validate strictly (a
        # temperature without do_sample: what vLLM and retnet-serve read as a sampling default all the same). The
        # base's own settings are saved back as they were, with only the token ids above set: as transformers
        # saves back an unchanged published config, warning.
        generation._original_object_hash = hash(generation)


def replace_directory(directory: Path, write) -> Path:
    """``write(tmp)`` into a sibling ``.tmp-`` directory, then swap it in for ``directory``: a crash never leaves
    a half-written ``directory`` (its leftovers are what :func:`remove_stale_export` removes)."""
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        # a resume loads output_dir/tokenizer: a crash of the machine must not leave it renamed in but empty
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not stay full of the half-written copy
        raise
    old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
    if directory.exists():
        os.rename(directory, old)
    os.rename(tmp, directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


__all__ = [
    "CheckpointError", "checkpoint_layout", "commit_checkpoint", "export_pretrained", "file_entries",
    "find_resume_checkpoint", "fsync_tree", "list_checkpoints", "load_checkpoint", "load_checkpoint_trainer",
    "load_sharded_state", "lock_output_dir", "new_temp_dir", "note_verified", "prepare_export", "remove_stale_export",
    "remove_stale_temp", "replace_directory", "retire_export", "rng_state", "save_checkpoint",
    "save_sharded_state", "saved_model_shapes", "set_rng_state",
    "supersede_after", "unlock_output_dir", "verified_identity", "verify_checkpoint",
]
