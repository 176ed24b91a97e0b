"""A model (or LoRA adapter) named as users name it elsewhere: a local directory, or a hub id ``org/name``.

vLLM, transformers and peft all take either; so do ``retnet-serve --model`` / ``--lora-modules``,
``retnet-train --model.init_from``, ``retnet-eval --model`` and ``retnet-convert-fla``. A hub id is fetched with
``huggingface_hub.snapshot_download`` into the HF cache (``HF_HUB_CACHE``, or ``cache_dir``) and served from
there; with ``HF_HUB_OFFLINE=1`` (or no network) a cached snapshot of it is used, and its absence is an error
that says both what was looked for and why the hub could not provide it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# transformers' folder of a tokenizer's named chat templates beside its default chat_template.jinja (a template
# dict's "tool_use", which apply_chat_template takes for a request with tools): its save_pretrained writes it.
CHAT_TEMPLATES = "additional_chat_templates/*.jinja"
# A tokenizer of any kind (a pretraining run's data.tokenizer): config.json too, where AutoTokenizer may find its
# class, and the chat templates.
TOKENIZER_FILES = ["config.json", "tokenizer*", "special_tokens_map.json", "*.model", "vocab.*", "merges.txt",
                   "added_tokens.json", "chat_template.*", CHAT_TEMPLATES]
# What a model directory holds: the tokenizer's files, the generation config and the weights (safetensors, or .bin
# for older checkpoints); not the other formats a hub repository may carry (GGUF, ONNX, ...).
MODEL_FILES = [*TOKENIZER_FILES, "generation_config.json", "*.safetensors", "*.safetensors.index.json", "*.bin",
               "*.bin.index.json"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
# Pickled weights, fetched only for a repository without safetensors: many carry both (gpt2: model.safetensors and
# pytorch_model.bin), and transformers loads the safetensors alone, so both would be twice the download and disk.
PICKLED_WEIGHTS = ["*.bin", "*.bin.index.json"]


def top_level_only(patterns: list[str]) -> list[str]:
    """The ignore patterns that keep ``patterns`` to a repository's top level: huggingface_hub's patterns let "*"
    cross "/", and "*.safetensors" alone would also fetch its subfolders (original/consolidated.safetensors,
    intermediate checkpoints), which from_pretrained never reads. Each pattern ignored under a folder, and as a
    folder ("tokenizer*" would take tokenizer_2/), rather than every file below one ("*/*"), which also dropped the
    named chat templates: served by hub id, a model rendered a request with tools with the default template where its
    directory gave the tool_use one."""
    return [f"*/{pattern}" for pattern in patterns] + [f"{pattern}/*" for pattern in patterns]


# huggingface_hub's repository id (its validate_repo_id): an optional namespace and a name, of ASCII word
# characters, '-' and '.', each starting and ending with a word character; anything else given (an absolute or
# relative path, '~', 'modèles/x', 'runs/x-') is a path only, so its absence is not reported as a failed download.
_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?:{_PART}/)?{_PART}$", re.ASCII)


class HubError(FileNotFoundError):
    """Neither a directory nor a repository the hub (or the HF cache, offline) could provide."""


def is_hub_id(source: str | os.PathLike) -> bool:
    text = str(source)
    # fullmatch: match's $ also matches before a final newline, which the hub refuses ("org/name\n")
    return (bool(_HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".")
            and not text.endswith(".git"))


def resolve_pretrained(source: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None,
                       allow_patterns: list[str] | None = None) -> Path:
    """The directory ``source`` names: itself when it exists (its caller says what is wrong with it, if
    anything), else the snapshot of the hub repository ``source`` at ``revision`` (default ``main``), downloaded
    or found in the cache. Raises :class:`HubError` saying both when it is neither."""
    if not str(source).strip():  # Path("") is ".", which exists: an unset variable would name the working directory
        raise HubError(f"{str(source)!r}: empty; give a directory or a hub id 'org/name'")
    try:
        path = Path(source).expanduser()
    except RuntimeError:  # "~name" of no such user, or no home directory: a bare RuntimeError, not the source's name
        path = Path(source)
    try:
        exists = path.exists()
    except OSError as error:  # Python < 3.12 raises what is not ENOENT: a name too long, an unreadable parent
        if not is_hub_id(source):
            raise HubError(f"{str(source)!r}: cannot be looked up as a directory "
                           f"({error.strerror or error}), nor is it a hub id 'org/name'") from None
        exists = None
    if exists:
        return path
    # A dangling link: named as such, not looked up on the hub (where 'model' would fail as a download).
    if exists is not None and path.is_symlink():
        raise HubError(f"{str(source)!r}: a symbolic link to {os.readlink(path)!r}, which does not exist")
    if not is_hub_id(source):
        raise HubError(f"{str(source)!r}: no such directory (nor a hub id 'org/name')")
    from huggingface_hub import snapshot_download

    patterns = allow_patterns if allow_patterns is not None else MODEL_FILES
    first = [p for p in patterns if p not in PICKLED_WEIGHTS] if "*.safetensors" in patterns else patterns
    try:
        snapshot = snapshot_download(str(source), revision=revision, cache_dir=cache_dir, allow_patterns=first,
                                     ignore_patterns=top_level_only(first))
        if first != patterns and not any(Path(snapshot).glob("*.safetensors")):
            snapshot = snapshot_download(str(source), revision=revision, cache_dir=cache_dir,
                                         allow_patterns=patterns, ignore_patterns=top_level_only(patterns))
    except Exception as exc:  # offline, unknown or gated repository, a revision that is not there, an HTTP error
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise HubError(f"{str(source)!r}: no such directory, and the hub could not provide it "
                       f"({type(exc).__name__}{': ' + reason if reason else ''})") from None
    # Offline, snapshot_download answers with whatever an earlier download cached of the repository: after a
    # data.tokenizer download (TOKENIZER_FILES, config.json among them) a model's snapshot held no weights, and its
    # loader said "no file named model.safetensors" in a cache folder, or "holds no tokenizer" of a model's export.
    if "*.safetensors" in patterns and not any(next(Path(snapshot).glob(p), None) for p in ("*.safetensors", "*.bin")):
        raise HubError(f"{str(source)!r}: the hub's snapshot of it ({snapshot}) holds no weights (*.safetensors or "
                       "*.bin at its top level): the repository has none there (GGUF or .pth alone, or weights in a "
                       "subfolder), or, offline (HF_HUB_OFFLINE, or no network), the snapshot holds only what an "
                       "earlier download fetched, which for a data.tokenizer is the tokenizer's files alone: "
                       "download the model once with network access")
    missing = _missing_shards(Path(snapshot)) if "*.safetensors" in patterns else []
    if missing:
        # (a download cut short, then read offline: transformers' FileNotFoundError named one blob path of the cache)
        raise HubError(f"{str(source)!r}: the hub's snapshot of it ({snapshot}) lacks {len(missing)} shard(s) its "
                       f"weights' index names ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): a "
                       "download cut short, or, offline, one that fetched only part of the repository: download "
                       "the model again with network access")
    return Path(snapshot)


def _missing_shards(snapshot: Path) -> list[str]:
    """The shard files the weights' index in ``snapshot`` names that are not there, as transformers reads it: a
    ``model.safetensors`` there is read instead of the index (and the .bin files only without safetensors)."""
    for whole, index in (("model.safetensors", "model.safetensors.index.json"),
                         ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (snapshot / whole).is_file():
            return []
        try:
            weight_map = json.loads((snapshot / index).read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError):  # no index (or one the loader refuses in its own words)
            continue
        if not isinstance(weight_map, dict):
            return []
        shards = {shard for shard in weight_map.values() if isinstance(shard, str)}
        return sorted(shard for shard in shards if not (snapshot / shard).is_file())
    return []


def holds_tokenizer(path: Path) -> bool:
    """Whether ``path`` holds a tokenizer's files of any kind (a fast one's, sentencepiece's, a vocabulary)."""
    return any(next(path.glob(pattern), None) for pattern in ("tokenizer*", "*.model", "vocab.*"))


def training_output(path: Path) -> str | None:
    """What ``path`` is when it is something retnet-train wrote other than a model, said with the directory to give
    instead: a run's ``train.output_dir`` (its config.json is the run's configuration, no model's: loaders refused
    it as "not a RetNet: model_type None"), one of its ``checkpoints/step_*`` (for resuming) or a LoRA run's
    adapter; None for anything else (a model, or something its loader describes itself)."""
    if _holds_model_config(path):
        return None
    export = path / "export"
    if (export / "config.json").is_file() or (path / "checkpoints").is_dir():
        which = (f"did you mean {str(export)!r}, the run's export?" if (export / "config.json").is_file() else
                 f"its export, {str(export)!r}, is not written yet: the run writes it when it finishes")
        return f"a training run's train.output_dir, not a model ({which})"
    if any((path / name).is_file() for name in ("trainer.pt", "model.pt")) or (
            path.name.startswith("step_") and path.parent.name == "checkpoints"):
        where = (repr(str(path.parent.parent / "export")) if path.parent.name == "checkpoints" else
                 "train.output_dir/export")
        return f"a training checkpoint (retnet-train's checkpoints/step_*, for resuming), not a model: give the run's export, {where}"
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        # A LoRA run exports the merged model with its adapter inside it (export/adapter).
        parent = path.resolve().parent
        merged = (f": the merged model a LoRA run exports is beside it, {str(parent)!r}"
                  if path.name == "adapter" or _holds_model_config(parent) else "")
        return f"a peft adapter (adapter_config.json), not a model{merged}"
    return None


def _holds_model_config(directory: Path) -> bool:
    """Whether ``directory`` holds a model's config.json (it names a ``model_type``), not a training run's."""
    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON
        return False
    return isinstance(raw, dict) and "model_type" in raw


__all__ = [
    "ADAPTER_FILES",
    "CHAT_TEMPLATES",
    "MODEL_FILES",
    "PICKLED_WEIGHTS",
    "TOKENIZER_FILES",
    "HubError",
    "holds_tokenizer",
    "is_hub_id",
    "resolve_pretrained",
    "top_level_only",
    "training_output",
]
