"""Atomic checkpoints, verified loads, exact resume, and the ``save_pretrained`` export.

A checkpoint is a directory ``<output_dir>/checkpoints/step_00000100`` holding

    model.pt       the full (unsharded) model state dict
    optimizer.pt   the full optimizer state dict (FQN-keyed under FSDP2)
    trainer.pt     step, per-rank data positions and RNG states (python, numpy, torch, cuda), config
    manifest.json  written last: step and the sha256 and size of each file above

It is written into ``.tmp-step_…`` (each file fsynced), the manifest last, then renamed into place and the
parent directory fsynced. A crash at any point leaves either no ``step_*`` directory or a complete one; a
``step_*`` directory without a manifest, or whose files do not match it, is refused with the file named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = ("model.pt", "optimizer.pt", "trainer.pt")
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or corrupt; the message names the directory and the file."""


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
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# Save, verify, find, load
# ----------------------------------------------------------------------------------------------------------
def save_checkpoint(root: Path, step: int, *, model: dict, optimizer: dict, trainer: dict, keep_last: int) -> Path:
    """Write a checkpoint atomically (rank 0 only) and keep the newest ``keep_last`` valid ones.

    A ``step_*`` directory already at this step that does not verify is moved aside to
    ``step_….corrupt-<time>`` (never overwritten or deleted)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    entries = {}
    for name, obj in (("model.pt", model), ("optimizer.pt", optimizer), ("trainer.pt", trainer)):
        _write_durable(tmp / name, obj)
        entries[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    manifest = {"format": FORMAT_VERSION, "step": step, "time": time.time(), "files": entries}
    with open(tmp / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():
        try:
            verify_checkpoint(final)
            shutil.rmtree(tmp)
            return final  # the same step is already saved and valid (e.g. a resumed run that had finished)
        except CheckpointError as error:
            aside = final.with_name(f"{final.name}.corrupt-{int(time.time())}")
            logger.warning("moving invalid checkpoint aside to %s: %s", aside, error)
            os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(root)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = list_checkpoints(root)
    for old in steps[:-keep_last]:
        shutil.rmtree(old)


def list_checkpoints(root: Path) -> list[Path]:
    """``step_*`` directories under ``root``, oldest first (not verified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a complete, uncorrupted checkpoint, or CheckpointError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: no {MANIFEST} (a crash while writing?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {str(manifest_path)!r} is unreadable: {error}") from None
    for name in FILES:
        file = path / name
        if name not in files:
            raise CheckpointError(f"checkpoint {str(path)!r}: {MANIFEST} lists no {name}")
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is missing {name}")
        if file.stat().st_size != files[name]["bytes"] or _sha256(file) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt: its size or sha256 does not match "
                                  f"{MANIFEST}")
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


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Verify and load a checkpoint: ``{"model", "optimizer", "trainer", "step"}`` on CPU."""
    manifest = verify_checkpoint(path)
    return {
        "model": torch.load(path / "model.pt", map_location="cpu", weights_only=True),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        # our own file: holds numpy/python RNG states, which weights_only refuses
        "trainer": torch.load(path / "trainer.pt", map_location="cpu", weights_only=False),
        "step": manifest["step"],
    }


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------
def export_pretrained(directory: Path, model_config, state_dict: dict, tokenizer) -> Path:
    """``save_pretrained`` the model (fp32, safetensors) and tokenizer into ``directory``, replacing it
    atomically, so ``AutoModelForCausalLM.from_pretrained(directory)`` and ``AutoTokenizer`` load it."""
    from retnet.model import RetNetForCausalLM

    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = RetNetForCausalLM(model_config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",) or not model_config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
    if directory.exists():
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


__all__ = [
    "CheckpointError", "export_pretrained", "find_resume_checkpoint", "list_checkpoints", "load_checkpoint",
    "rng_state", "save_checkpoint", "set_rng_state", "verify_checkpoint",
]
