"""Text -> tokenizer -> packed token blocks, sharded deterministically across ranks.

Sources (``data.dataset``): ``stdlib`` (the running interpreter's standard-library ``*.py`` files, sorted:
the embedded corpus that needs no download), local files (``.txt/.md/.py/.rst`` one document per file,
``.json/.jsonl/.parquet/.csv`` one document per row's ``text_field``, a CSV cell as written: "007" or "NaN" is
that text, not a number), a ``save_to_disk`` directory or a hub dataset, all through HF ``datasets`` except
``stdlib``.

Non-streaming (the default): a held-out fraction of the documents is the validation split; a tokenizer is
loaded (``data.tokenizer``) or a byte-level BPE trained on the training documents; every document is encoded
with EOS appended and the concatenation cut into ``seq_len`` blocks, cached on disk as ``uint16``/``uint32``
arrays under a key hashing the data files, the tokenizer and the block size. Batches: step ``s`` takes the
next ``global_batch_size`` blocks of a per-epoch seeded permutation; rank ``r``'s micro-batch ``m`` is slice
``(m · world + r)`` of it, so the global batch is the same set of blocks for any world size and the data
position is one integer (blocks consumed) that a checkpoint stores and a resume restores.

Streaming (``data.streaming = true``, for sets too large to cache): the first ``val_documents`` rows are
the validation split (kept out of training wherever they occur), the rest is split by node
(``datasets.distributed.split_dataset_by_node``; local files by document) and packed on the fly; each rank's position is its place in
its stream (``datasets``' stream state, the documents read and the tokens not yet packed), from which a resume
continues without tokenizing what was read before (``retnet.train.streaming``). Streamed chat data is packed the same way, its flags in
lockstep with its tokens (:class:`~retnet.train.streaming.StreamingChatData`).

Chat data (``data.format = "chat"``, supervised fine-tuning): each row's ``messages_field`` is a conversation,
rendered with the tokenizer's chat template and encoded with a parallel ``uint8`` array of flags (which tokens
are targets, which EOS ends a conversation; ``retnet.train.chat``), packed, cached and batched alongside the
tokens (:class:`MaskedBlocks`). A set without that column but with TRL's ``prompt`` and ``completion`` ones is read
as prompt-completion rows, the completion's tokens the targets (``retnet.train.chat``). Which a set is follows from
its columns, so from the data its fingerprint covers: a prompt-completion set's token cache is never a messages
set's.

Packed rows hold several documents separated by EOS. With ``data.document_boundaries`` (the default) the
trainer flattens each micro-batch into one packed row and passes ``cu_seqlens`` with a segment starting at
every block start and every EOS, or every document's BOS for a tokenizer that opens documents with one
(:func:`packed_segments`), so the retention state never crosses a document
boundary; otherwise the state runs across EOS, as attention does in GPT-2-style packing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from retnet.tokenization import vocab_bound  # (re-exported: the launcher's callers import it here)
from retnet.train.chat import (
    BOUNDARY,
    COMPLETION,
    PROMPT,
    ROW_COLUMNS,
    SHAREGPT_COLUMN,
    TARGET,
    ChatEncoder,
    check_conversations,
    check_prompt_completions,
    messages_column,
    prompt_completion,
    render_default,
    target_count,
    without_spilled_targets,
)
from retnet.train.chat import template_identity as chat_template_identity
from retnet.train.checkpoint import _exchange, fsync_tree
from retnet.train.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSED_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4"}
# Bumped when the cached format changes, or what a cache holds under the same key, so old caches are not misread.
CACHE_VERSION = 2
# Bumped when the documents read from CSV files change (2: the text column as written, see _csv_options; 3: a
# first row with a field too many refused, where pandas shifted the columns): their caches alone are keyed by it, so
# the caches of other sources are kept. A well-formed file's documents, and so its blocks, are the same again.
CSV_READING = 3
# Bumped when the check of a hub set's CSV files (_check_hub_csv_files) judges a file otherwise: the passes it
# recorded in data.cache_dir are then not trusted, and the files are parsed again.
HUB_CSV_CHECK = 1
# A checkpoint's data fingerprint of local files: the digest of the token blocks it trained on (blocks_digest).
LOCAL_BLOCKS = "blocks-sha256:"
SPLIT_SEED = 20240601  # fixed: the held-out documents do not change with the training seed
# A cache temp directory untouched this long was left by a killed writer. Not less: another node may be writing
# one into the shared cache right now, and a large split is written only after all of it is encoded.
ABANDONED_TEMP_SECONDS = 24 * 3600
# The files whose presence marks a complete cache directory: a token or pair cache's meta.json (written last), a BPE's
# tokenizer.json (what a start checks for before training one)
CACHE_MARKERS = ("meta.json", "tokenizer.json")
# _atomic_dir's temp directories: .tmp-<cache>-<pid>-<8 hex>, -incomplete/-replaced for a cache it moved aside
TEMP_DIR_NAME = re.compile(r"\.tmp-.+-\d+-[0-9a-f]{8}(-incomplete|-replaced)?")


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "retnet" / "train"


def data_cache_dir(cfg: DataConfig, create: bool = True) -> Path:
    """``data.cache_dir`` (or the default), created unless ``create`` is false (``--print-config``'s check); a
    ConfigError naming it when it cannot be a directory, here, not as a FileExistsError from deep in the pipeline
    once the data has been read. Every rank checks it: they all read the caches written there."""
    cache_dir = Path(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else default_cache_dir()
    shown = repr(str(cache_dir)) + ("" if cfg.cache_dir else " (the default)")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigError(f"data.cache_dir {shown} is not a directory")
    if not create:
        if (problem := creation_problem(cache_dir)) is not None:
            raise ConfigError(f"data.cache_dir {shown} cannot be created: {problem}")
        return cache_dir
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"data.cache_dir {shown} cannot be created: {error}") from None
    return cache_dir


def creation_problem(path: Path) -> str | None:
    """Why ``mkdir -p path`` would fail, found without making it: a name in it longer than the file system takes
    (in mkdir's words), its nearest existing parent is a file, or a directory this process may not write into;
    None when it exists or can be made."""
    # (os.path's: no OSError on a name too long or a parent this process may not read)
    existing = next(p for p in (path, *path.absolute().parents) if os.path.exists(p))
    if existing is path:
        return None
    if not os.path.isdir(existing):  # (first, as mkdir: ENOTDIR before a name's length)
        return f"{str(existing)!r} is not a directory"
    try:
        limits = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (AttributeError, OSError, ValueError):  # (no pathconf on Windows, or no such limit here)
        limits = -1, -1
    # os.path.exists takes a name too long for a missing one: mkdir then refused it as ENAMETOOLONG
    new_names = path.absolute().relative_to(existing).parts
    if (0 < limits[1] <= len(os.fsencode(path))
            or any(0 < limits[0] < len(os.fsencode(name)) for name in new_names)):
        return str(OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path)))
    return None if os.access(existing, os.W_OK | os.X_OK) else f"{str(existing)!r} is not writable"


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library ``*.py`` files (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )


def _looks_like_path(spec: str) -> bool:
    """A hub name is ``owner/name`` without a data file's suffix (its name may hold dots:
    ``teknium/OpenHermes-2.5``); anything else that names a file is a path."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
        or spec.lower().endswith((*TEXT_SUFFIXES, *BUILDERS))
    )


def _kind(path: Path) -> str | None:
    """``text`` or the ``datasets`` builder of a data file, None for another file; ``.JSONL`` is ``.jsonl``."""
    suffix = path.suffix.lower()
    return "text" if suffix in TEXT_SUFFIXES else BUILDERS.get(suffix)


def local_files(spec: str) -> list[Path] | None:
    """The files a local ``data.dataset`` names (a file, a directory, a glob), None if it is no local path.

    Raises FileNotFoundError for something that looks like a path but does not exist."""
    path = Path(os.path.expanduser(spec))  # (os.path's: "~name" of no such user stays as written, no RuntimeError)
    if saved_dataset_dir(path):
        return [path]  # loaded whole by datasets.load_from_disk
    if path.is_file():
        files = [path]
    elif path.is_dir():
        # Hidden files and directories below it (.ipynb_checkpoints/, .git/, .github/, editor swap files) hold
        # copies of documents or files that are no data; the directory named may itself be hidden.
        visible = [p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        files = sorted(p for p in visible if _kind(p) is not None)
        # a compressed data file is skipped as any other file would be, and its rows lost unseen beside the others
        compressed = sorted(p for p in visible if p.suffix.lower() in COMPRESSED_SUFFIXES
                            and _kind(p.with_suffix("")) not in (None, "text"))
        if compressed:
            raise ConfigError(f"data.dataset: directory {spec!r} holds compressed data files ({len(compressed)}, e.g. "
                              f"{str(compressed[0])!r}), which are not read: decompress them, or name the files "
                              f"to read with a glob")
        if not files:
            raise FileNotFoundError(f"data.dataset: directory {spec!r} holds no "
                                    f"{sorted(TEXT_SUFFIXES | set(BUILDERS))} files")
    elif any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data.dataset: glob {spec!r} matches no files")
    elif _looks_like_path(spec):
        raise FileNotFoundError(f"data.dataset: no such file or directory: {spec!r}")
    else:
        return None
    kinds = {_kind(p) for p in files}
    if None in kinds:
        bad = next(p for p in files if _kind(p) is None)
        raise ConfigError(f"data.dataset: unsupported file type {bad.suffix!r} ({bad}); "
                          f"expected one of {sorted(TEXT_SUFFIXES | set(BUILDERS))}")
    if len(kinds) > 1:
        # A directory of data files often holds a README.md or a notes.txt too: name which files are of which kind
        groups = {kind: [p for p in files if _kind(p) == kind] for kind in sorted(kinds)}
        listed = "; ".join(f"{kind}: {len(group)} file(s), e.g. {str(group[0])!r}" for kind, group in groups.items())
        most = max(groups.values(), key=len)[0]
        hint = f", e.g. the glob {os.path.join(spec, '**', '*' + most.suffix)!r}" if path.is_dir() else ""
        raise ConfigError(f"data.dataset: {spec!r} mixes file kinds ({listed}); select one kind per run{hint}")
    if len(files) > 1 and kinds != {"text"}:
        _refuse_several_splits(spec, files)
    return files


# The words by which datasets' load_dataset(directory) tells a data file's split (datasets.data_files' patterns), kept
# to the layouts that name a split unmistakably: a hub shard (train-00000-of-00001.parquet, its old names with a hash
# after), a stem that is the word or ends in ".word" (train.jsonl, wiki.valid.jsonl), a folder of that name (train/).
# datasets' looser patterns (a word between separators: train_config.json, unit_test_cases.jsonl) name too many files
# a user means as one set.
_SPLIT_OF = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
             "val": "validation", "test": "test", "eval": "test", "evaluation": "test"}
# A file's own name may also be datasets' other words (train.jsonl beside testing.jsonl); a folder named "training"
# or "testing" holds a set of that topic as often as a split.
_FILE_SPLIT_OF = {**_SPLIT_OF, "training": "train", "testing": "test"}
_HUB_SHARD = re.compile(rf"({'|'.join(_FILE_SPLIT_OF)})-[0-9]+-of-[0-9]+(?:-[0-9a-f]+)?\.[^.]+")


def _split_layout(parts: tuple[str, ...]) -> tuple[str, list[tuple[str, ...]]] | None:
    """The split a data file's path (relative to the files' common folder) names unmistakably, with globs (relative,
    escaped) that may select that split's files alone; None for a file named otherwise."""
    name = parts[-1]
    suffix = Path(name).suffix
    dirs = tuple(glob.escape(d) for d in parts[:-1])
    shard = _HUB_SHARD.fullmatch(name)
    if shard:
        word = shard.group(1)
        return _FILE_SPLIT_OF[word], [(*dirs, f"{word}-*-of-*{suffix}"), ("**", f"{word}-*-of-*{suffix}")]
    stem = name[:-len(suffix)] if suffix else name
    word = stem.rsplit(".", 1)[-1]
    if word in _FILE_SPLIT_OF:
        pattern = glob.escape(word + suffix) if word == stem else f"*.{glob.escape(word + suffix)}"
        return _FILE_SPLIT_OF[word], [(*dirs, pattern), ("**", pattern)]
    depth = next((i for i, d in enumerate(parts[:-1]) if d in _SPLIT_OF), None)
    if depth is None:
        return None
    return _SPLIT_OF[parts[depth]], [(*dirs[:depth + 1], "**", "*" + glob.escape(suffix)),
                                     (*dirs[:depth + 1], "**", "*")]


def _refuse_several_splits(spec: str, files: list[Path]) -> None:
    """ConfigError when ``files`` (of a directory or glob) are named as the splits of a dataset are, of more than one
    split (a hub dataset downloaded as it is: ``train-00000-of-00001.parquet`` beside ``test-00000-of-00001.parquet``).
    Read as one set, its test and validation rows were trained on, unseen; load_dataset(directory) reads its train
    split. Plain-text files (a document each: ``test.md`` beside ``train.md``) are not judged."""
    root = os.path.commonpath([str(p) for p in files])
    found: dict[str, list[Path]] = {}
    globs: dict[str, list[str]] = {}  # globs that may select each split's files
    for path in files:
        layout = _split_layout(path.relative_to(root).parts)
        if layout is None:
            continue
        split, patterns = layout
        found.setdefault(split, []).append(path)
        for pattern in patterns:
            pattern = os.path.join(glob.escape(root), *pattern)
            if pattern not in globs.setdefault(split, []):
                globs[split].append(pattern)
    if len(found) <= 1:
        return
    order = [split for split in ("train", "validation", "test") if split in found]
    listed = "; ".join(f"{split}: {len(found[split])} file(s), e.g. {str(found[split][0])!r}" for split in order)
    first = order[0]
    # Only a glob checked to select that split's files, and none beside them, is suggested (a "*dev*" took devices.csv)
    wanted = set(found[first])
    hint = next((pattern for pattern in globs[first]
                 if {Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)} == wanted), None)
    name = (f"with a glob, e.g. {hint!r}," if hint else
            f"with globs given as data.mixture sources (no one glob selects the {first} files alone here),")
    raise ConfigError(f"data.dataset {spec!r} holds the files of several splits, as datasets names them ({listed}): "
                      f"read as one set, the rows of every split would be read together. Name one split's files "
                      f"{name} or give each as a data.mixture source to train on several")


def saved_dataset_dir(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (pre-tokenized or
    filtered data prepared once, e.g. on an offline cluster)."""
    # (os.path's: Path.is_dir raised OSError on a name longer than the OS takes)
    return os.path.isdir(path) and (os.path.isfile(path / "dataset_dict.json") or os.path.isfile(path / "state.json"))


def _hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def data_fingerprint(cfg: DataConfig, files: list[Path] | None, hub_fingerprint: str | None = None) -> str:
    """Changes when the files (path, size, mtime), the loaded hub dataset (``hub_fingerprint``), the
    selection/split settings or the way CSV files are read (:data:`CSV_READING`) change."""
    # local_files gives files of one kind; a save_to_disk directory's files are of none of them
    csv = bool(files) and _kind(files[0]) == "csv"
    if files is not None and len(files) == 1 and saved_dataset_dir(files[0]):
        files = sorted(p for p in files[0].rglob("*") if p.is_file())
    listing = (hub_fingerprint if files is None
               else [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    settings = {k: getattr(cfg, k) for k in ("dataset", "name", "split", "text_field", "streaming",
                                                 "max_documents", "val_fraction", "val_documents")}
    # The other mode's validation setting selects nothing here, and a resume may change it (data_changes ignores
    # it): it must find the same caches, not load a hub set again to rebuild them. Its default, not left out, so
    # the caches (and hub resumes) of runs that never set it keep their keys.
    unused = "val_fraction" if cfg.streaming else "val_documents"
    settings[unused] = next(f.default for f in dataclasses.fields(DataConfig) if f.name == unused)
    if csv:
        settings["csv_reading"] = CSV_READING
    if cfg.format == "chat":  # only then: the keys of text runs' caches stay as they were
        settings.update(format=cfg.format, messages_field=cfg.messages_field, text_field=None)
    return _hash(CACHE_VERSION, settings, listing)


# ----------------------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------------------
def _hf_dataset(cfg: DataConfig, files: list[Path] | None, cache_dir: Path, streaming: bool, world_size: int = 1,
                check_files: bool = True):
    import datasets

    if files is None:  # a hub name
        options = None
        try:
            builder = datasets.load_dataset_builder(cfg.dataset, cfg.name, cache_dir=str(cache_dir / "hf"))
            options = _hub_options(cfg, builder)
            loaded = datasets.load_dataset(cfg.dataset, cfg.name, split=cfg.split, streaming=streaming,
                                           cache_dir=str(cache_dir / "hf"), **options)
        except Exception as error:  # offline, unknown name, private ...
            if options and not streaming and check_files:
                # a CSV file pandas cannot parse (an unclosed quote, not UTF-8) fails the load as datasets' "An
                # error occurred while generating the dataset": the check names the file and line instead
                _check_hub_csv_files(cfg, builder, cache_dir)
            raise _hub_error(cfg, error) from None
        if options and not streaming and check_files:  # (load_hub: local rank 0's, the others wait for it)
            _check_hub_csv_files(cfg, builder, cache_dir)
        return loaded
    if cfg.name is not None:
        # a hub dataset's configuration: local data has none, and ignoring it would read what was not asked for
        raise ConfigError(f"data.name {cfg.name!r} names a configuration of a hub dataset; data.dataset "
                          f"{cfg.dataset!r} is local data, which has none: leave data.name unset")
    if saved_dataset_dir(files[0]):
        return _load_saved(cfg, files[0], streaming, world_size)
    if cfg.split != "train":
        raise ConfigError(f"data.split {cfg.split!r} picks a split of a hub dataset or of a save_to_disk "
                          f"DatasetDict; the files of data.dataset {cfg.dataset!r} are one set (its validation "
                          f"documents are held out by data.val_fraction, or data.val_documents when streaming): "
                          f"point data.dataset at the files of that split instead")
    kind = _kind(files[0])
    if cfg.format == "chat" and kind in ("text", "csv"):
        raise ConfigError(f"data.dataset {cfg.dataset!r} is {kind} files, which hold no conversations; data.format "
                          f"'chat' reads the data.messages_field {cfg.messages_field!r} of JSON/JSONL/Parquet rows, a "
                          f"save_to_disk directory or a hub dataset")
    # invalid UTF-8 becomes U+FFFD, as in the stdlib corpus, not an error that names no file; a byte order mark
    # (Windows editors write one) is no text of the document, as JSON and CSV readers drop it from their rows
    options = {"sample_by": "document", "encoding": "utf-8-sig", "encoding_errors": "replace"} if kind == "text" else {}
    field, key = _field(cfg)
    files = _files_with_rows(cfg.dataset, files, kind, _skipped_if_null(key, field), streaming)
    if cfg.format == "text" and kind in ("json", "parquet"):
        _check_later_files(files[1:], kind, cfg.text_field)
    if kind == "json" and not streaming:  # (streamed: a read of the whole set at every start, resumes included)
        # the columns each format reads as text or messages (preference.FIELDS, prompts.FIELD): a NaN there was read
        # as null and refused as a null value the file does not hold. A preference margin is a number its own check
        # refuses when non-finite, and GRPO's other columns go to the reward functions as read.
        read = {"text": (cfg.text_field,), "chat": (cfg.messages_field, *ROW_COLUMNS, PROMPT, COMPLETION),
                "preference": (PROMPT, "chosen", "rejected"), "unpaired": (PROMPT, COMPLETION),
                "prompts": (PROMPT,)}[cfg.format]
        _check_finite_json(cfg.dataset, files, read)
    with _reading(cfg.dataset, *_field(cfg)):
        if kind == "csv":  # the text column as written, not as pandas' type inference reads it
            options = _csv_options(files, cfg.text_field)
        elif kind == "parquet":
            options = _parquet_options(files)

        def load(options: dict[str, Any]):
            # data_files are glob patterns to datasets (fsspec): a path holding [, * or ? (a directory "data[v1]")
            # matched nothing, or other files, and the set was refused as holding no rows: each file escaped
            return datasets.load_dataset(kind, data_files=[glob.escape(str(p)) for p in files], split="train",
                                         streaming=streaming, cache_dir=str(cache_dir / "hf"), **options)

        try:
            loaded = load(options)
        except Exception:
            # CSV text: columns the run never reads refused the set (an id of numbers in one file and of words in
            # the next, or files with other columns beside the text), which its stream reads: read as a hub set's
            # CSV files are, its text column only (the same documents, so the same caches). Not a file pandas
            # cannot parse: read for one column, a row of a field too many passes (its error names the file).
            only_text = _csv_options(files, cfg.text_field, only_text=True) \
                if kind == "csv" and cfg.format == "text" else {}
            if not only_text or any(_csv_file_problem(path) is not None for path in files):
                raise
            loaded = load(only_text)
    if not streaming:
        # datasets keeps no row's file: the files it read, in order, let an error name a row's (column_values)
        loaded.retnet_files = files
    return loaded


def first_rows(dataset, count: int):
    """The first ``count`` rows of a loaded ``datasets.Dataset`` (all when it holds fewer), knowing its files as
    ``dataset`` does (:func:`column_values`)."""
    selected = dataset.select(range(min(count, len(dataset))))
    selected.retnet_files = getattr(dataset, "retnet_files", None)
    return selected


def _row_in_files(files: list[Path], row: int) -> tuple[Path, int] | None:
    """(file, row within it) of row ``row`` of the set datasets read from ``files`` in order, None where a file's
    rows are not known without parsing it (a JSON array, CSV)."""
    for path in files:
        kind = _kind(path)
        try:
            if kind == "parquet":
                import pyarrow.parquet as pq

                count = pq.read_metadata(path).num_rows
            elif kind == "json":
                count = 0
                with open(path, "rb") as handle:  # JSON Lines: a row a line, blank lines skipped as pyarrow does
                    for raw in handle:
                        line = raw.strip().removeprefix(b"\xef\xbb\xbf")
                        if line and not line.startswith(b"{"):  # a JSON array or pretty-printed object
                            return None
                        count += bool(line)
            elif kind == "text":
                count = 1  # a document per file
            else:
                return None
        except Exception:  # (pyarrow's errors among them) only the error being reported is lost
            return None
        if row < count:
            return path, row
        row -= count
    return None


def _skipped_if_null(key: str, field: str) -> tuple[str, ...] | None:
    """The columns a leading file with every row null in is skipped for (:func:`_files_with_rows`), given the
    setting ``key`` naming the column read, ``field``: a text file's documents, a chat file's conversations (also
    ShareGPT's ``conversations``, read in place of the default ``messages``). Their null rows are dropped anyway, so
    skipping such a file loses nothing; a preference or prompt file's null rows are refused, so it stays. A chat
    row's prompt and completion must be null (or absent) too: skipped, a file whose rows pair a null conversation
    with them would leave the set without its conversations' column, read as prompt-completion pairs without it."""
    if key == "data.text_field":
        return (field,)
    if key == "data.messages_field":
        return (field, SHAREGPT_COLUMN, PROMPT, COMPLETION) if field == "messages" else (field, PROMPT, COMPLETION)
    return None


def _files_with_rows(dataset: str, files: list[Path], kind: str,
                     text_field: str | tuple[str, ...] | None = None, streaming: bool = False) -> list[Path]:
    """``files`` without the Parquet or CSV files that hold nothing to read, which datasets does not skip as it
    skips an empty JSON file: it fails the whole set on one. A Parquet file is read in batches of its first row
    group's rows, 0 in the empty partition that pyarrow (pandas too) writes ("BatchSize must be greater than 0"; a
    file with rows after an empty first row group is read with :func:`_parquet_options`);
    an empty CSV file has no header for pandas ("No columns to parse from file"). Leading CSV files of a header
    alone are skipped too, not ``streaming``: read first, they type every column null. With ``text_field`` (text data),
    also the leading Parquet files whose column is of type null (pandas writes an all-None column so): the first
    file types the column, and every later file's text fails to cast to null. A later null file is cast to text
    (its rows dropped as empty documents) and stays, so that a stream's saved position, which counts files and
    their batches, means what it meant. A file that cannot be read at all stays: datasets' read names what is wrong
    with it. Leading JSON files whose ``text_field`` is null in every row are skipped as leading null Parquet files
    are (:func:`_without_leading_null_json`). ``text_field`` may be several columns (:func:`_skipped_if_null`: a
    chat file's conversations), a file being null when those of them it has are null in every row."""
    if kind == "json":
        return _without_leading_null_json(files, text_field) if text_field else files
    if kind not in ("parquet", "csv"):
        return files
    import warnings

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = (text_field,) if isinstance(text_field, str) else text_field or ()

    def rows_and_null_text(path: Path) -> tuple[bool, bool]:
        try:
            if kind == "parquet":
                metadata = pq.read_metadata(path)
                schema = metadata.schema.to_arrow_schema()
                present = [schema.field(index) for field in fields if (index := schema.get_field_index(field)) >= 0]
                return metadata.num_rows > 0, bool(present) and all(pa.types.is_null(f.type) for f in present)
            # A header alone (pandas' to_csv of an empty frame): read first, its columns of no values are typed
            # null, and every later file's text failed to cast to null. Not for a stream, which read such a file
            # (its values cast): skipped, the files after it would move in a saved stream state that counts them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (a first row of a field too many: refused by _csv_options)
                header_only = pd.read_csv(path, nrows=1, dtype=str, keep_default_na=False, index_col=False).empty
            return True, header_only and not streaming
        except pd.errors.EmptyDataError:
            return False, False
        except (OSError, ValueError, pa.ArrowException):
            pass
        return True, False

    kept, typed = [], False
    for path in files:
        has_rows, null_text = rows_and_null_text(path)
        if has_rows and (typed or not null_text):
            kept.append(path)
            typed = True
    if not kept:
        name = {"parquet": "Parquet", "csv": "CSV"}[kind]
        held = f"its {len(files)} {name} files hold" if len(files) > 1 else f"its {name} file holds"
        nulls = f" (or only nulls in {' or '.join(map(repr, fields))})" if fields and kind == "parquet" else ""
        raise ConfigError(f"data.dataset {dataset!r}: {held} no rows{nulls}")
    return kept


def _without_leading_null_json(files: list[Path], text_field: str | tuple[str, ...]) -> list[Path]:
    """``files`` without the JSON Lines files ahead of the first one with text whose ``text_field`` is null in every
    row (an export whose first partition's text was filtered out). datasets types its columns from the first rows it
    reads: ``null`` from such a file, and the first later file's text failed to cast to it ("Couldn't cast array of
    type string to null"), naming no file. Its rows are no documents (null ones are dropped), so nothing is lost.
    Empty files (which datasets skips) are kept and read past; the search ends at the first file with text, or that
    is no JSON Lines (a JSON array, a pretty-printed object): a null file after it stays (datasets casts it to text,
    as it does a later null Parquet file). A leading JSON array of null text is named instead, by the read's error
    (:func:`_null_first_file`). With several columns (a chat file's, :func:`_skipped_if_null`) a row is null when
    it has one of them and those it has are null."""
    fields = (text_field,) if isinstance(text_field, str) else text_field

    def all_null(path: Path) -> bool | None:
        """True: rows, each with ``text_field`` null; None: no rows; False: anything else."""
        rows = 0
        try:
            with open(path, "rb") as handle:
                for line in handle:
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    # a row without the field is no null: a file of other columns (the wrong data.text_field, a
                    # metadata file in the glob) stays, for datasets' read to refuse by name
                    present = [field for field in fields if isinstance(row, dict) and field in row]
                    if not present or any(row[field] is not None for field in present):
                        return False
                    rows += 1
        except (OSError, ValueError):  # datasets' own read names what is wrong with it
            return False
        return True if rows else None

    skipped = []
    for path in files:
        null = all_null(path)
        if null is False:
            break
        if null:
            skipped.append(path)
    else:
        return files  # no file has text: datasets reads them all as null, and the split finds no documents
    if skipped:
        logger.info("data: skipping %d leading JSON file(s) whose %s null in every row, e.g. %s", len(skipped),
                    f"{fields[0]!r} is" if len(fields) == 1 else f"columns {', '.join(map(repr, fields))} are",
                    skipped[0])
    dropped = set(skipped)
    return [path for path in files if path not in dropped]


def _parquet_options(files: list[Path]) -> dict[str, Any]:
    """Options of datasets' parquet builder for ``files`` (each with rows, :func:`_files_with_rows`). datasets reads a
    file in batches of its first row group's rows: a file whose first row group is empty (a writer that flushed
    before its first rows, a filtered append) but whose later ones hold rows failed the whole set with "BatchSize
    must be greater than 0". Such a set is read in batches of its largest row group, which keeps each of its row
    groups whole as the default does. Others get no option: their batches, which a stream's saved position counts,
    and their datasets cache stay as they were."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    largest, first_empty = 0, False
    for path in files:
        try:
            metadata = pq.read_metadata(path)
        except (OSError, pa.ArrowException):  # datasets' own read names what is wrong with it
            continue
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        first_empty = first_empty or (bool(sizes) and sizes[0] == 0)
        largest = max(largest, *sizes, 0)
    return {"batch_size": largest} if first_empty and largest else {}


def _check_later_files(files: list[Path], kind: str, text_field: str) -> None:
    """ConfigError naming the file whose ``text_field`` holds no text. datasets types a column from the first file
    and casts every later file to it: numbers or booleans there become strings ("5", "true") and train as
    documents, where the same values in the first file are refused (:func:`_check_texts`). A Parquet file's
    schema says its column's type; a JSON file is judged by its first row, after any blank lines (a JSON array
    file, whose first line is no row, is not)."""
    import pyarrow as pa

    for path in files:
        if kind == "parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(path)
            except (OSError, pa.ArrowException):  # datasets' own read names what is wrong with it
                continue
            index = schema.get_field_index(text_field)
            column = schema.field(index).type if index >= 0 else None
            # the types whose cast to a string succeeds (others fail in datasets' cast, naming them); bytes cast
            # when they are UTF-8, and fail otherwise naming no file
            if column is None or not any(check(column) for check in (
                    pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal,
                    pa.types.is_temporal, pa.types.is_binary, pa.types.is_large_binary,
                    pa.types.is_fixed_size_binary, _is_binary_view)):
                continue
            shown = f"{column} values"
        else:
            try:
                with open(path, "rb") as handle:
                    # pyarrow skips blank lines: a file's first row is its first line that holds anything
                    line = handle.readline(1 << 20)
                    while line and not line.strip():
                        line = handle.readline(1 << 20)
                    row = json.loads(line)
            except ValueError:  # an empty file, a JSON array or a row longer than the line read: datasets reads it
                continue
            value = row.get(text_field) if isinstance(row, dict) else None
            if value is None or isinstance(value, str):
                continue
            shown = f"{type(value).__name__} values ({value!r:.80})"
        raise ConfigError(f"data.text_field {text_field!r} of {str(path)!r} holds {shown}; expected text (str) in "
                          f"every file (datasets would cast them to strings)")


def _is_binary_view(column) -> bool:
    """pa.types.is_binary_view where pyarrow has it (>= 16; older ones have no such type)."""
    import pyarrow as pa

    check = getattr(pa.types, "is_binary_view", None)
    return check is not None and check(column)


# NaN, Infinity and -Infinity: what Python's json writes for non-finite floats by default, and no JSON value
_NON_FINITE = re.compile(rb"NaN|Infinity")
_NON_FINITE_SCAN_CHUNK = 64 << 20


def _check_finite_json(dataset: str, files: list[Path], columns: tuple[str, ...] | None) -> None:
    """ConfigError naming the file, the row and the column of the first NaN or Infinity (outside a string) in one
    of ``columns`` (None: any) of the JSON files. pyarrow refuses such a file, and datasets then reads it with
    pandas (or ujson), which read NaN as null: the row is dropped as a null document, or refused as a null prompt
    that names another cause. A column the run does not read keeps the row as before. A byte search finds the
    files that hold the words at all; only those are parsed (JSON Lines a line at a time)."""
    for path in files:
        with open(path, "rb") as handle:
            tail = b""
            while chunk := handle.read(_NON_FINITE_SCAN_CHUNK):
                if _NON_FINITE.search(tail + chunk[:16]) or _NON_FINITE.search(chunk):
                    break
                tail = chunk[-16:]
            else:
                continue
        if (where := _non_finite_row(path, columns)) is not None:
            raise ConfigError(f"data.dataset {dataset!r}: {str(path)!r}, {where}: not JSON (datasets would read it "
                              f"as null, or fail naming no file); write null, or the number as a string")


def _non_finite_row(path: Path, columns: tuple[str, ...] | None) -> str | None:
    """"line N: 'text' holds NaN" for the first JSON Lines row of ``path`` whose ``columns`` (None: any) hold a NaN or
    Infinity outside a string, or None. A JSON array file, whose lines are no rows, is parsed whole and its rows
    named by their index ("row N")."""
    def rows() -> Iterator[tuple[str, object]]:
        with open(path, "rb") as handle:
            array = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
        if array:
            if path.stat().st_size > _NULL_SCAN_BYTES:
                return
            with contextlib.suppress(ValueError):  # not JSON at all: datasets' read (and _malformed_file) name it
                values = json.loads(path.read_bytes().decode("utf-8-sig"), parse_constant=_NonFinite)
                yield from ((f"row {number}", row) for number, row in enumerate(values, start=1))
            return
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if _NON_FINITE.search(line):
                    with contextlib.suppress(ValueError):  # (UnicodeDecodeError among them) named by _malformed_file
                        yield f"line {number}", json.loads(line.removeprefix(b"\xef\xbb\xbf").decode("utf-8"),
                                                           parse_constant=_NonFinite)

    for where, row in rows():
        if not isinstance(row, dict):
            continue
        for name, value in row.items():
            if (columns is None or name in columns) and (found := _non_finite_in(value)) is not None:
                return f"{where}: {name!r} holds {found}"
    return None


# The keys of a message (and of its content parts) read as text: a NaN there is read as null and the row refused
# as holding None. Elsewhere in a message (a per-message "weight", a tool call's numeric argument) it stays a float
# and the row trains, as it did before this check.
_MESSAGE_TEXT_KEYS = frozenset({"role", "content", "from", "value", "type", "text", "name", "tool_call_id"})


def _non_finite_in(value) -> str | None:
    """The first NaN/Infinity constant (a :class:`_NonFinite`) within ``value``, in nested lists and in the keys of
    nested objects (messages, content parts) that are read as text."""
    if isinstance(value, _NonFinite):
        return value.constant
    if isinstance(value, dict):  # a message, a content part: only what is read as text
        nested = [item for key, item in value.items() if key in _MESSAGE_TEXT_KEYS]
    else:
        nested = value if isinstance(value, list) else ()
    return next((found for item in nested if (found := _non_finite_in(item)) is not None), None)


class _NonFinite:
    """Where json's parser met NaN, Infinity or -Infinity: kept apart from every JSON value."""

    def __init__(self, constant: str):
        self.constant = constant


# pandas.read_csv's default NA spellings as its documentation lists them (no public name holds them).
PANDAS_NA_SPELLINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
})


def _csv_options(files: list[Path], text_field: str, only_text: bool = False) -> dict[str, Any]:
    """Options of datasets' csv builder (``pandas.read_csv``'s) that read the ``text_field`` column as written.

    pandas infers each column's type from its cells: a text column of numbers ("007", "1e5") becomes int or
    float (7, 100000.0), changing the documents or refusing them as numbers, and its NA spellings ("", "NaN",
    "NA", "null" ...) become NaN. The text column gets ``str`` of each cell and no NA spellings, so an empty cell
    is an empty document (skipped, as every source skips them) and "NaN" is the text "NaN". The other columns
    keep pandas' defaults: ``keep_default_na=False`` turns them off for every column, so they are given back
    per column by name, from the header of each file (a file without a header row, empty, has no columns).

    ``only_text`` (text runs, which read nothing else): only that column, as a hub set's CSV files are read
    (:func:`_hub_options`); a file without it is refused naming it. Its other columns, never read, refused a set over what pandas
    inferred of them: an ``id`` of numbers in one file and of words in the next (``Failed to parse string``), or
    files whose other columns differ, which a stream of the same files reads."""
    import pandas as pd

    columns: set[str] = set()
    for path in files:
        try:
            header = pd.read_csv(path, nrows=0).columns
        except pd.errors.EmptyDataError:
            continue
        columns.update(header)
        if only_text and text_field not in header:
            # (the set's refusal, datasets' "columns do not match", named neither the file nor the column)
            raise ConfigError(f"data.text_field {text_field!r} is not a column of CSV file {str(path)!r}; its "
                              f"columns: {list(header)}")
        _check_first_csv_row(path)
    # pandas takes a first row of one field more than the header for an index column and shifts every column one
    # to the left (the text read from the next column, the first column's text lost): no column is an index
    options = {"converters": {text_field: str}, "keep_default_na": False, "index_col": False}
    if only_text:
        return {**options, "usecols": [text_field]}
    spellings = sorted(PANDAS_NA_SPELLINGS)
    return {**options, "na_values": {column: spellings for column in sorted(columns) if column != text_field}}


def _check_first_csv_row(path: Path) -> None:
    """A ConfigError naming ``path`` when its first row holds more fields than its header: pandas reads it with
    the extra fields dropped (``index_col=False``; a ParserWarning, not an error as a later such row is)."""
    import warnings

    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            pd.read_csv(path, nrows=1, index_col=False, dtype=str, keep_default_na=False)
        except pd.errors.ParserWarning:
            header = len(pd.read_csv(path, nrows=0).columns)
            raise ConfigError(f"data.dataset: CSV file {str(path)!r}, line 2 (its first row) holds more fields than "
                              f"its header's {header}; quote a field that holds a comma, or add the missing "
                              f"column names to the header") from None
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError):
            return  # datasets' own read of the file reports it


def _hub_options(cfg: DataConfig, builder) -> dict[str, Any]:
    """Options of a hub dataset's builder: for a repository of CSV files (datasets' ``csv`` builder), its text
    column read as written, like local CSV files (:func:`_csv_options`), and only that column. Its other
    columns' names are not known before its files are read, so they cannot keep pandas' NA spellings one by
    one as local files' do; unread, they cannot refuse the set over types either."""
    if builder.name != "csv" or cfg.format != "text":  # (a CSV cell holds no conversation: refused by row)
        return {}
    # (no column is an index: pandas would shift the columns of a file whose first row has a field too many)
    return {"usecols": [cfg.text_field], "converters": {cfg.text_field: str}, "keep_default_na": False,
            "index_col": False}


# A hub dataset's data file as datasets resolves it: hf://datasets/<repo id>@<commit>/<path in the repository>
_HUB_FILE = re.compile(r"hf://datasets/(?P<repo>[^@]+)@(?P<revision>[^/]+)/(?P<path>.+)")


def _check_hub_csv_files(cfg: DataConfig, builder, cache_dir: Path, streaming: bool = False) -> None:
    """A ConfigError naming the file and line when a CSV file of the hub dataset (``data.split``'s, as the HF hub
    cache holds it at the commit read) cannot be parsed (:func:`_csv_file_problem`). Read for its text column
    alone (``usecols``, :func:`_hub_options`), pandas takes a row with a field too many, an unquoted comma, and its
    text ends at that comma without an error, where a local file's read of every column refuses it. The options
    stay as they are (they are part of the set's fingerprint, which earlier runs' resumes are held to): the files
    are parsed again instead. A file not in the HF hub cache (a set read from the datasets cache alone, or
    streamed: ``streaming``, whose files are read over the network) is not; a stream's are named in a warning.

    A file that passed is recorded in ``cache_dir``/``hub-csv-checked`` (a marker per file, keyed by its blob's
    resolved path, size and mtime, the repository's read settings and :data:`HUB_CSV_CHECK`), so the next start
    does not parse it again; a file changed since, or read otherwise, is parsed again."""
    import warnings
    from urllib.parse import unquote

    import pandas as pd
    from huggingface_hub import try_to_load_from_cache

    # how the repository's files are written (a .tsv's sep, its README's csv settings), not what is read of them
    written = {key: value for key, value in getattr(builder.config, "pd_read_csv_kwargs", {}).items()
               if key not in ("usecols", "converters", "nrows", "chunksize", "index_col", "dtype")}
    data_files = getattr(builder.config, "data_files", None) or {}
    split = cfg.split.split("[")[0]  # (a slice of it, "train[:10%]", reads its files)
    urls = data_files[split] if split in data_files else [url for urls in data_files.values() for url in urls]
    unchecked = []
    for url in urls:
        found = _HUB_FILE.fullmatch(str(url))
        if found is None:
            continue
        repo = found["repo"]
        path = try_to_load_from_cache(found["repo"], found["path"], revision=unquote(found["revision"]),
                                      repo_type="dataset")
        if not isinstance(path, str):  # not cached (None), or cached as missing
            unchecked.append(found["path"])
            continue
        marker = _hub_csv_marker(cache_dir, Path(path), written)
        if marker is not None and marker.exists():
            continue
        with warnings.catch_warnings():
            # a first row of a field too many: read for one column, its text is cut too, without this warning
            warnings.filterwarnings("error", message="Length of header or names does not match",
                                    category=pd.errors.ParserWarning)
            try:
                problem = _csv_file_problem(Path(path), written)
            except pd.errors.ParserWarning:
                problem = "its first row holds more fields than its header"
            except (ValueError, TypeError):  # settings a chunked read takes no part of (skipfooter): as read
                problem = None
        if problem is not None:
            # (the advice on a row of a field too many: not for an unclosed quote or text that is not UTF-8)
            advice = (f". Read for data.text_field {cfg.text_field!r} alone, a row of a field too many passes with its "
                      f"text cut at the unquoted separator: quote the fields that hold one") if "fields" in problem else ""
            raise ConfigError(f"data.dataset {cfg.dataset!r}: its CSV file {found['path']!r} ({path}), {problem}"
                              f"{advice}")
        if marker is not None:
            _write_marker(marker, {"file": found["path"], "blob": str(Path(path).resolve())})
    if streaming and unchecked:
        # pandas gives no sign of such a row when reading one column, and a stream reads each file once, over the
        # network: parsing it twice would double what a set too large to download is streamed to avoid
        shown = ", ".join(repr(name) for name in unchecked[:3]) + (", ..." if len(unchecked) > 3 else "")
        logger.warning("data: %d CSV file(s) of the streamed hub dataset %r are not in the HF hub cache (%s) and are "
                       "not checked: a row with an unquoted separator is read with its text cut there, without an "
                       "error. Download the repository once (hf download %s --repo-type dataset) to have them "
                       "checked at the next start", len(unchecked), cfg.dataset, shown, repo)


def _hub_csv_marker(cache_dir: Path, path: Path, written: dict[str, Any]) -> Path | None:
    """Where a pass of :func:`_check_hub_csv_files` on ``path`` read with ``written`` is recorded, or None when the
    file cannot be stat'ed. The hub's snapshot entry is a link to a blob named by its content's hash: resolved,
    the path names the content; its size and mtime_ns catch a blob edited in place."""
    try:
        resolved = path.resolve()
        stat = resolved.stat()
    except OSError:
        return None
    key = _hash(HUB_CSV_CHECK, str(resolved), stat.st_size, stat.st_mtime_ns, written)
    return cache_dir / "hub-csv-checked" / key


def _write_marker(marker: Path, record: dict[str, Any]) -> None:
    """Write ``marker`` whole or not at all (local rank 0 of several nodes may write the same one)."""
    tmp = marker.with_name(f".tmp-{marker.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record))
        os.replace(tmp, marker)
    except OSError as error:  # a cache that cannot be written: the file is parsed again at the next start
        logger.warning("data: could not record the check of %s in %s: %s", record.get("file"), marker.parent, error)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _no_text_column(dataset: str, text_field: str, error: Exception) -> ConfigError | None:
    """pandas' refusal of ``usecols`` (:func:`_hub_options`) as the setting it comes from."""
    cause = error.__cause__ or error
    if isinstance(cause, ValueError) and str(cause).startswith("Usecols do not match columns"):
        return ConfigError(f"data.text_field {text_field!r} is not a column of the CSV files of {dataset!r}")
    return None


def _hub_error(cfg: DataConfig, error: Exception) -> ConfigError:
    missing = _no_text_column(cfg.dataset, cfg.text_field, error)
    if missing is not None:
        return missing
    return ConfigError(f"data.dataset {cfg.dataset!r} is no local path and could not be loaded from the hub: "
                       f"{type(error).__name__}: {error}")


def _hub_stream(cfg: DataConfig, cache_dir: Path, check_files: bool = True):
    """(stream, fingerprint) of a hub dataset: ``load_dataset(streaming=True)`` is these two calls, and the
    builder tells what is streamed. An IterableDataset has no fingerprint; the builder's config id and hash
    cover its data files, resolved at the hub commit, as the fingerprint of a non-streamed load does.
    ``check_files`` (local rank 0): a CSV set's files in the HF hub cache are checked as a non-streamed set's are,
    the others named in a warning (:func:`_check_hub_csv_files`)."""
    import datasets

    try:
        repository = builder = datasets.load_dataset_builder(cfg.dataset, cfg.name, cache_dir=str(cache_dir / "hf"))
        options = _hub_options(cfg, builder)
        if options:
            builder = datasets.load_dataset_builder(cfg.dataset, cfg.name, cache_dir=str(cache_dir / "hf"),
                                                    **options)
        stream = builder.as_streaming_dataset(split=cfg.split)
    except Exception as error:
        raise _hub_error(cfg, error) from None
    if options and check_files:  # (the builder of the repository's own settings: how its files are written)
        _check_hub_csv_files(cfg, repository, cache_dir, streaming=True)
    return stream, _hash(builder.config_id, str(builder.config.version), builder.hash)


@contextlib.contextmanager
def _reading(dataset: str, text_field: str, key: str = "data.text_field") -> Iterator[None]:
    """Errors of ``datasets`` reading local files, as a ConfigError naming them. Its own errors name no file:
    a bare StopIteration when every file is empty, a CastError or DatasetGenerationError when a later file
    does not fit the columns and types it took from the first rows it read."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as error:
        missing = _no_text_column(dataset, text_field, error)
        if missing is not None:
            raise missing from error
        cause = error.__cause__ or error
        # "Couldn't cast array of type string to null" (JSON Lines, Parquet), "Couldn't write column 'prompt': its
        # type in this file is null" (a JSON array): a first file's all-null column, which the error does not name
        null = _null_first_file(dataset, text_field, key, cause) if _NULL_CAST.search(str(cause)) else None
        if null is not None:
            raise null from error
        # (a bare StopIteration, or "Instruction "train" corresponds to no data!" from a set read before)
        no_rows = isinstance(cause, StopIteration) or "corresponds to no data" in str(cause)
        empty = _no_rows_in_json(dataset) if no_rows else None
        if empty is not None:
            raise empty from error
        unparsed = isinstance(cause, UnicodeDecodeError) or _PARSE_ERROR.search(f"{type(cause).__name__}: {cause}")
        malformed = _malformed_file(dataset) if unparsed else None
        if malformed is not None:
            raise malformed from error
        detail = f"{type(cause).__name__}: {cause}" if str(cause) else f"{type(cause).__name__} (no rows in any file?)"
        what = {"data.text_field": "as text", "data.messages_field": "as conversations",
                "data.format 'prompts' column": "as prompts",
                "data.format 'unpaired' column": "with completion and label"}.get(key, "with chosen and rejected")
        raise ConfigError(f"data.dataset {dataset!r}: datasets could not read it ({detail}); local files need "
                          f"{key} {text_field!r} in every file, {what}, and the same columns") from error


def _no_rows_in_json(dataset: str) -> ConfigError | None:
    """ConfigError naming the local JSON or JSON Lines files of ``dataset`` when none of them holds a row (each is
    blank or an empty array): datasets stops at such a set with a bare StopIteration. None otherwise."""
    try:
        files = local_files(dataset)
    except Exception:  # (FileNotFoundError, ConfigError) only the error being reported is lost
        return None
    if not files or saved_dataset_dir(files[0]) or _kind(files[0]) != "json":
        return None
    for path in files:
        try:
            if path.stat().st_size > 1 << 20:  # more than blanks: rows, or no JSON, and another error
                return None
            text = path.read_text(encoding="utf-8-sig", errors="replace").strip()
            if text and json.loads(text) != []:
                return None
        except (OSError, ValueError):  # JSON Lines of several rows, or no JSON: not this error
            return None
    if len(files) == 1:
        return ConfigError(f"data.dataset {dataset!r}: its JSON file {str(files[0])!r} holds no rows")
    shown = ", ".join(repr(str(path)) for path in files[:5]) + (", ..." if len(files) > 5 else "")
    return ConfigError(f"data.dataset {dataset!r}: its {len(files)} JSON files hold no rows ({shown})")


def _malformed_file(dataset: str) -> ConfigError | None:
    """ConfigError naming the first of the local JSON or CSV files of ``dataset`` that cannot be parsed, with the
    line (and column) where it stops (a JSON Lines file: the first line that is no JSON object); None when every
    file parses (or the set is no local JSON or CSV). pyarrow's and pandas' own errors ("JSON parse error: Invalid
    value. in row 2", "Expected 2 fields in line 3, saw 3") do not name the file of a set of several, and datasets
    only logs it."""
    try:
        files = local_files(dataset)
    except Exception:  # (FileNotFoundError, ConfigError) only the error being reported is lost
        return None
    if not files or saved_dataset_dir(files[0]) or _kind(files[0]) not in ("json", "csv"):
        return None
    problem_of = _json_file_problem if _kind(files[0]) == "json" else _csv_file_problem
    scanned = 0
    for path in files:
        try:
            scanned += path.stat().st_size
            if scanned > _MALFORMED_SCAN_BYTES:  # an error path: not hours of parsing a large set again
                return None
            problem = problem_of(path)
        except OSError:
            return None
        if problem is not None:
            return ConfigError(f"data.dataset {dataset!r}: {str(path)!r}, {problem}")
    return None


def _csv_file_problem(path: Path, options: dict[str, Any] | None = None) -> str | None:
    """Why pandas cannot parse the CSV file ``path`` (its message names the line), or None. ``options``: how the
    file is written, ``read_csv``'s (a hub repository's ``sep``, ``quotechar`` ...)."""
    import pandas as pd

    read = {**(options or {}), "dtype": str, "keep_default_na": False, "index_col": False, "chunksize": 1 << 16}
    try:
        with pd.read_csv(path, **read) as chunks:
            for _ in chunks:  # (a chunk at a time: parsed, not held)
                pass
    except pd.errors.EmptyDataError:
        return None  # an empty file is skipped (_files_with_rows)
    except pd.errors.ParserError as error:
        # pandas' "EOF inside string starting at row N" counts records from the header's 0, not lines (a quoted
        # field spans lines): N was one line short at best
        if "EOF inside string" in str(error) and (line := _last_record_line(path, options or {})) is not None:
            return (f"not CSV: line {line} opens a quoted field that is never closed (close it, or double a quote "
                    f"meant inside a quoted field)")
        return f"not CSV: {str(error).strip()}"
    except UnicodeDecodeError as error:
        return f"not UTF-8 text ({error.reason}); CSV files are read as UTF-8: re-encode the file"
    return None


def _last_record_line(path: Path, options: dict[str, Any]) -> int | None:
    """The line where the last record of the CSV file ``path`` starts (where an unclosed quote that runs to the end of
    the file opened), as Python's ``csv`` reads it with ``options``' separator and quote; None if it cannot say."""
    import csv

    if options.get("comment"):  # (pandas drops comment lines that csv would count as records)
        return None
    next_start, last = 1, None
    # (the open field runs to the end of the file: past csv's 128 KiB field limit in all but a small one)
    limit = csv.field_size_limit(2**31 - 1)
    try:
        with open(path, newline="", encoding=options.get("encoding") or "utf-8") as file:
            reader = csv.reader(file, delimiter=options.get("sep") or options.get("delimiter") or ",",
                                quotechar=options.get("quotechar") or '"', escapechar=options.get("escapechar"),
                                doublequote=options.get("doublequote", True),
                                skipinitialspace=bool(options.get("skipinitialspace")))
            for _ in reader:
                last, next_start = next_start, reader.line_num + 1
    except (csv.Error, TypeError, UnicodeDecodeError, LookupError, OSError):  # (a regex separator, not one character)
        return None
    finally:
        csv.field_size_limit(limit)
    return last


def _json_file_problem(path: Path) -> str | None:
    """Where and why ``path`` is neither a JSON array of rows nor JSON Lines of objects, or None."""
    with open(path, "rb") as handle:
        whole = handle.read(_NULL_SCAN_BYTES + 1)
    array = whole.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    if array and len(whole) > _NULL_SCAN_BYTES:
        return None  # too large to parse again here; its lines are no rows to judge one by one
    if len(whole) <= _NULL_SCAN_BYTES:
        try:  # one JSON value (an array of rows, a pretty-printed object), else JSON Lines: told by the lines below
            json.loads(whole.decode("utf-8-sig"))
            return None
        except UnicodeDecodeError as error:
            if array:
                return f"byte {error.start}: not UTF-8 text ({error.reason}); JSON files are read as UTF-8"
        except json.JSONDecodeError as error:
            if array and error.msg != "Extra data":
                return f"line {error.lineno}, column {error.colno}: not JSON ({error.msg})"
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
            if not line.strip():
                continue  # pyarrow skips blank lines
            try:
                # without its line end: a line cut short stops at its end, not at "column 1" of a line after it
                row = json.loads(line.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as error:
                return (f"line {number}: not UTF-8 text ({error.reason}); JSON files are read as UTF-8: re-encode "
                        f"the file (e.g. iconv -f latin1 -t utf-8)")
            except json.JSONDecodeError as error:
                return (f"line {number}, column {error.colno}: not JSON ({error.msg}); JSON Lines files hold one "
                        f"JSON object a line")
            if not isinstance(row, dict):
                return (f"line {number}: holds {type(row).__name__} {row!r:.60}, not a JSON object; JSON Lines "
                        f"files hold one object (a row) a line")
    return None


# datasets' errors for a column typed null by the first file: "Couldn't cast array of type string to null" (JSON Lines,
# Parquet), "Couldn't write column 'prompt': its type in this file is null" (a JSON array)
_NULL_CAST = re.compile(r"Couldn't cast array of type\s.*\sto\s+null\b|its type in this file is null", re.DOTALL)
# pyarrow's and pandas' errors for a file that is no JSON or CSV (datasets tries pandas after pyarrow on JSON)
_PARSE_ERROR = re.compile(r"JSON parse error|Trailing data|Expected object or value|Unexpected character|"
                          r"ParserError|Error tokenizing data")
# Past this, a JSON array file is not parsed to tell its null columns (the error is left as datasets words it)
_NULL_SCAN_BYTES = 64 << 20
# Past this many bytes of JSON or CSV files, a read error is not traced to its file and line (_malformed_file)
_MALFORMED_SCAN_BYTES = 1 << 30


def _column_nulls(path: Path, kind: str, wanted: set[str] | None = None) -> dict[str, bool]:
    """{column: whether it is null in every row} of a JSON (JSON Lines or a JSON array of rows) or Parquet file;
    empty for a file without rows or that cannot be read (datasets' own read names what is wrong with it). JSON Lines
    are read a line at a time, and the read stops once every column seen (or, with ``wanted``, one of those) holds a
    value: this runs on an error path, over files as large as a data set's."""
    try:
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            metadata = pq.read_metadata(path)
            schema = metadata.schema.to_arrow_schema()
            return {field.name: pa.types.is_null(field.type) for field in schema} if metadata.num_rows else {}
        with open(path, "rb") as handle:
            head = handle.read(64).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
            handle.seek(0)
            if head.startswith(b"["):
                if path.stat().st_size > _NULL_SCAN_BYTES:
                    return {}
                rows = json.loads(handle.read().decode("utf-8-sig"))
            else:
                rows = (json.loads(line) for line in handle if line.strip())
            nulls: dict[str, bool] = {}
            for row in rows if not isinstance(rows, dict) else ():
                for column, value in _leaves(row) if isinstance(row, dict) else ():
                    nulls[column] = nulls.get(column, True) and value is None
                if wanted is not None and any(_holds_values(nulls, column) for column in wanted):
                    break
                if wanted is None and nulls and not any(nulls.values()):
                    break
            return nulls
    except Exception:  # (pyarrow's errors among them) only the error being reported is lost
        return {}


def _leaves(value, path: str = ""):
    """(path, value) of each leaf of a JSON row: ``messages[].name`` for a key of the dicts in a list (datasets types
    nested fields from the first file too: a name null throughout it fails the same way)."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and value:
        for item in value:
            yield from _leaves(item, f"{path}[]")
    else:
        yield path, value


def _holds_values(nulls: dict[str, bool], column: str) -> bool:
    """Whether a file of these :func:`_column_nulls` holds a value at ``column`` or inside it (a list of dicts where
    the first file has null)."""
    return any(not null and (path == column or path.startswith((f"{column}.", f"{column}[")))
               for path, null in nulls.items())


def _top_level(nulls: dict[str, bool]) -> set[str]:
    return {re.split(r"[.\[]", path, maxsplit=1)[0] for path in nulls}


def _null_first_file(dataset: str, text_field: str, key: str, cause: Exception) -> ConfigError | None:
    """ConfigError naming the first file, whose column is null in every row, and the later file with values in it
    that ``cause`` (datasets' "Couldn't cast array of type string to null", naming neither) comes from; None when the
    local files of ``dataset`` hold no such column. datasets types each column from the first file it reads: null
    from such a file, and the later values fail to cast to it, streamed or not. Leading JSON Lines and Parquet files
    of null text or null conversations are skipped before the read (:func:`_files_with_rows`), and so here: their
    rows would be dropped anyway. The others are named, not skipped: a prompt, completion or preference column's
    null rows are refused anyway, and a JSON array's rows are known only by parsing the whole file (a stream reads
    them, its nulls included, without this error)."""
    try:
        files = local_files(dataset)
        if not files or saved_dataset_dir(files[0]) or _kind(files[0]) not in ("json", "parquet"):
            return None
        kind = _kind(files[0])
        # the files datasets read (text data's leading all-null ones skipped)
        files = _files_with_rows(dataset, files, kind, _skipped_if_null(key, text_field))
    except Exception:  # (FileNotFoundError, ConfigError) only the error being reported is lost
        return None
    # datasets types the columns from the first file with rows (it skips empty ones): its all-null columns
    first, null = next(((path, nulls) for path in files if (nulls := _column_nulls(path, kind))), (None, {}))
    columns = [column for column, is_null in null.items() if is_null]
    for path in files[files.index(first) + 1:] if columns else []:
        nulls = _column_nulls(path, kind, set(columns))
        if nulls and _top_level(nulls) != _top_level(null):
            return None  # other columns (datasets' "column names don't match"): not this error's cause to name
        column = next((column for column in columns if _holds_values(nulls, column)), None)
        if column is None:
            continue
        what = ("its rows hold no documents: leave the file out of data.dataset" if column == text_field
                and key == "data.text_field" else f"fill in its {column!r} or leave the file out of data.dataset")
        return ConfigError(
            f"data.dataset {dataset!r}: {column!r} is null in every row of {str(first)!r}, and {str(path)!r} "
            f"after it holds values in it: datasets types each column from the first file it reads and cannot read "
            f"the later values as null ({type(cause).__name__}: {' '.join(str(cause).split())[:300]}); {what}")
    return None


def _load_saved(cfg: DataConfig, path: Path, streaming: bool, world_size: int = 1):
    """A ``save_to_disk`` directory: a Dataset, or a DatasetDict from which ``data.split`` is taken."""
    import datasets

    splits = _saved_splits(path)
    if splits is not None:
        # Only data.split's directory is loaded: datasets' load of the whole DatasetDict failed on any empty split
        # (a filtered "test" left with no rows) with a bare IndexError, whichever split the run asked for
        if cfg.split not in splits:
            raise ConfigError(f"data.split {cfg.split!r} is not a split of {str(path)!r}; splits: {sorted(splits)}")
        path = path / cfg.split
    if _saved_without_rows(path):  # datasets fails on it with a bare IndexError
        which = f"its split {cfg.split!r}" if splits is not None else "it"
        raise ConfigError(f"data.dataset {cfg.dataset!r}: {which} holds no rows (a save_to_disk of an empty Dataset)")
    with _reading(cfg.dataset, *_field(cfg)):
        loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.split not in loaded:
            raise ConfigError(f"data.split {cfg.split!r} is not a split of {str(path)!r}; splits: {sorted(loaded)}")
        loaded = loaded[cfg.split]
    elif splits is None and cfg.split not in ("train", str(loaded.split)):
        # One Dataset is one set, as local files are: another data.split was ignored, and the run trained on all of
        # it (the split it was saved as, Dataset.split, names it as well as the default)
        raise ConfigError(f"data.split {cfg.split!r} picks a split of a hub dataset or of a save_to_disk "
                          f"DatasetDict; {str(path)!r} is one saved Dataset (its validation documents are held out "
                          f"by data.val_fraction, or data.val_documents when streaming): leave data.split unset, or "
                          f"point data.dataset at a directory of that split")
    # One shard per rank: split_dataset_by_node gives each a whole one. Not one per CPU: ranks on machines with
    # other counts would read overlapping parts, and a resume elsewhere would skip blocks of other documents.
    return loaded.to_iterable_dataset(num_shards=min(len(loaded), world_size)) if streaming else loaded


def _saved_splits(path: Path) -> list[str] | None:
    """The splits a ``DatasetDict.save_to_disk`` directory lists (each saved in a directory of its name), None for a
    saved Dataset or a list that cannot be read (datasets' own load then says what is wrong)."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(splits, list) or not all(isinstance(s, str) and (path / s / "state.json").is_file()
                                               for s in splits):
        return None
    return splits


def _saved_without_rows(path: Path) -> bool:
    """Whether the saved Dataset in ``path`` has no data file (``save_to_disk`` of an empty Dataset writes none)."""
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))["_data_files"] == []
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _field(cfg: DataConfig) -> tuple[str, str]:
    """(the column read, its setting's name): ``data.text_field``, ``data.messages_field`` for chat, TRL's prompt
    column for preference pairs and GRPO prompts."""
    if cfg.format in ("preference", "unpaired", "prompts"):
        return "prompt", f"data.format {cfg.format!r} column"
    return (cfg.messages_field, "data.messages_field") if cfg.format == "chat" else (cfg.text_field, "data.text_field")


def _check_text_field(cfg: DataConfig, columns: list[str] | None) -> None:
    field, key = _field(cfg)
    if columns is not None and field not in columns:
        raise ConfigError(f"{key} {field!r} is not a column of {cfg.dataset!r}; columns: {columns}"
                          f" (of local files: those datasets found in the first rows it read)")


def _check_texts(dataset: str, text_field: str, texts: list) -> None:
    """ConfigError naming the field for a value that is no string: the tokenizer would take a number for a
    TypeError without a name, and a list of two strings for a pair of sequences, silently."""
    bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"data.text_field {text_field!r} of {dataset!r} holds {type(bad).__name__} values "
                          f"({bad!r:.80}); expected text (str)")


def is_document(value) -> bool:
    """Whether a row's value is a document (or, for chat, a conversation): not None, empty, or text of whitespace
    alone, which would train nothing but its EOS (and a run of them, EOS after EOS)."""
    return bool(value) and not (isinstance(value, str) and value.isspace())


def load_documents(cfg: DataConfig, files: list[Path] | None, cache_dir: Path, loaded=None) -> list[str]:
    """All documents (non-streaming), in a deterministic order, at most ``max_documents``; from ``loaded``
    (the ``datasets.Dataset`` already loaded) when given."""
    limit = cfg.max_documents or None
    if cfg.dataset == "stdlib":
        # empty files (many __init__.py) dropped as the other sources drop empty rows: each would be a lone EOS
        return [t for p in stdlib_files()[:limit] if is_document(t := p.read_text(encoding="utf-8", errors="replace"))]
    dataset = loaded if loaded is not None else _hf_dataset(cfg, files, cache_dir, streaming=False)
    _check_text_field(cfg, dataset.column_names)
    if limit:
        dataset = first_rows(dataset, limit)
    texts = column_values(dataset, cfg.text_field, cfg.dataset, "data.text_field")
    _check_texts(cfg.dataset, cfg.text_field, texts)
    documents = [t for t in texts if is_document(t)]
    if len(documents) < len(texts):
        # rows without the field (a JSON row with other keys), null, empty or of whitespace are no documents; said,
        # so a set whose rows spell the field otherwise does not lose them unseen
        logger.info("data: %d of %d rows of %s hold no text in data.text_field %r (missing, null, empty or "
                    "whitespace): left out", len(texts) - len(documents), len(texts), cfg.dataset, cfg.text_field)
    return documents


def load_conversations(cfg: DataConfig, files: list[Path] | None, cache_dir: Path,
                       loaded=None) -> list[tuple[int, list[dict[str, Any]]]]:
    """``data.format = "chat"``: every non-empty conversation (a list of role/content messages) with its row index,
    in row order, of at most ``max_documents`` rows; a row that holds no such list is refused naming its index.
    A set with TRL's prompt and completion columns instead gives its rows with a non-empty completion
    (:func:`~retnet.train.chat.check_prompt_completions`)."""
    dataset = loaded if loaded is not None else _hf_dataset(cfg, files, cache_dir, streaming=False)
    # TRL's ShareGPT column stands in for a missing default one
    field = messages_column(cfg.messages_field, dataset.column_names)
    pairs = prompt_completion(cfg.messages_field, dataset.column_names)
    if pairs:
        logger.info("data: %s has no %r column but %r and %r: reading prompt-completion rows", cfg.dataset, field,
                    PROMPT, COMPLETION)
    else:
        _check_text_field(dataclasses.replace(cfg, messages_field=field), dataset.column_names)
    if cfg.max_documents:
        dataset = first_rows(dataset, cfg.max_documents)
    # (the conversations' own column is not read twice)
    columns = {name: column_values(dataset, name, cfg.dataset) for name in ROW_COLUMNS
               if name in dataset.column_names and name != field}
    if pairs:
        return check_prompt_completions(cfg.dataset, column_values(dataset, PROMPT, cfg.dataset),
                                        column_values(dataset, COMPLETION, cfg.dataset), columns=columns)
    return indexed_conversations(cfg.dataset, field, column_values(dataset, field, cfg.dataset, "data.messages_field"),
                                 columns=columns)


def column_values(dataset, name: str, source: str, key: str = "column") -> list:
    """Column ``name`` of a loaded ``datasets.Dataset`` as a list, read once. pyarrow's JSON reader takes a file's
    bytes into string columns unchecked, so a file that is not UTF-8 (Latin-1, a spreadsheet's export) fails only
    here, with a UnicodeDecodeError that names neither the file nor the row: a ConfigError naming ``key`` (the
    setting that named the column), the dataset and the row instead."""
    values: list = []
    try:
        for value in dataset[name]:
            values.append(value)
    except UnicodeDecodeError as error:
        row, files = len(values), getattr(dataset, "retnet_files", None)
        # a row of several files is named in its own: its index in the set counts the rows of every file before
        found = _row_in_files(files, row) if files and len(files) > 1 else None
        if found is not None:
            where = f"{str(found[0])!r}, row {found[1]} (row {row} of {source!r})"
        else:  # a directory or glob of one file is named by that file, which is what to re-encode
            where = f"{str(files[0]) if files and len(files) == 1 else source!r}, row {row}"
        raise ConfigError(f"{key} {name!r} of {where}: not UTF-8 text ({error.reason}: byte "
                          f"{error.object[error.start:error.start + 1]!r}); JSON files are read as UTF-8: re-encode "
                          f"the file (e.g. iconv -f latin1 -t utf-8)") from None
    return values


def indexed_conversations(dataset: str, field: str, values: list, first_row: int = 0,
                          columns: dict[str, list] | None = None) -> list[tuple[int, list[dict[str, Any]]]]:
    """(row index, conversation) of the non-empty rows of ``values``, the first at ``first_row``; a row that
    holds no conversation is refused naming its index (:func:`~retnet.train.chat.check_conversations`).
    ``columns``: the rows' ``tools`` / ``chat_template_kwargs`` (TRL's), for their template."""
    conversations = check_conversations(dataset, field, values, first_row, columns=columns)
    # the rows it kept: it drops None and [] and refuses any other row that is no non-empty list
    rows = [first_row + i for i, value in enumerate(values) if value]
    return list(zip(rows, conversations, strict=True))


def chat_blocks(encoder: ChatEncoder, conversations: list[tuple[int, list[dict[str, Any]]]],
                seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, seq_len]`` blocks of the (row, conversation) pairs packed back to back, and their flags without a
    conversation's targets past its first block (:func:`~retnet.train.chat.without_spilled_targets`)."""
    tokens, flags = encoder.encode([c for _, c in conversations], rows=[r for r, _ in conversations])
    return _blocks(tokens, seq_len), without_spilled_targets(_blocks(flags, seq_len))


def split_documents(docs: list, val_fraction: float, *, dataset: str = "",
                    max_documents: int = 0) -> tuple[list, list]:
    """(train, val): a seeded random ``val_fraction`` of the documents (or conversations; at least one) is held out.
    ``dataset`` and ``max_documents`` (the limit they were read with) are named when there are too few."""
    if len(docs) < 2:
        which = f"data.dataset {dataset!r}" if dataset else "data.dataset"
        if max_documents:  # the limit, not the data, may be what left too few
            raise ConfigError(f"{which} with data.max_documents {max_documents} gives {len(docs)} non-empty "
                              f"document(s); need at least 2 (one for validation): raise data.max_documents")
        raise ConfigError(f"{which} has {len(docs)} document(s); need at least 2 (one for validation). A "
                          f"{'/'.join(sorted(TEXT_SUFFIXES))} file is one document: split a single one into several, "
                          f"or give JSONL/CSV/Parquet rows")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
    n_val = max(1, round(val_fraction * len(docs)))
    val_ids = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------
def resolve_tokenizer_dir(path: str | Path, download: bool = True) -> Path | None:
    """The directory of tokenizer ``path``: itself, or a hub id's snapshot (None for one not on disk when
    ``download`` is false: ``--print-config``'s check). FileNotFoundError or ConfigError when it is no directory."""
    from retnet.model.hub import TOKENIZER_FILES, HubError, is_hub_id, resolve_pretrained

    local = Path(os.path.expanduser(path))
    if not os.path.exists(local) and is_hub_id(path):  # (os.path's: no OSError on an over-long name)
        if not download:
            return None
        try:  # every rank reads the one HF cache (huggingface_hub locks a download); a resume reads the run's copy
            local = resolve_pretrained(path, allow_patterns=TOKENIZER_FILES)
        except HubError as error:
            raise ConfigError(f"data.tokenizer {error}") from None
    if not local.exists():
        raise FileNotFoundError(f"data.tokenizer: no such tokenizer directory: {str(path)!r}")
    # A file (its tokenizer.json) would go to the hub as a model name: retries offline, then some other error.
    if not local.is_dir():
        raise ConfigError(f"data.tokenizer {str(path)!r} is not a directory; give the directory that holds its "
                          f"tokenizer.json (a save_pretrained directory)")
    return local


def load_tokenizer(path: str | Path):
    """A transformers tokenizer from a local directory, or a hub id's snapshot; it must have an EOS token."""
    from transformers import AutoTokenizer

    local = resolve_tokenizer_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.tokenizer {str(path)!r} could not be loaded as a tokenizer: "
                          f"{type(error).__name__}: {str(error).strip()[:300]}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"data.tokenizer {str(path)!r} has no EOS token; documents are separated by EOS")
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    return _hash(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id)


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` then rename tmp to ``final``; a concurrent writer of the same content may win."""
    # not the pid alone: the writers are local rank 0 of every node, and containers often give them equal pids
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        # the next run trusts a cache by its presence: it must not be renamed in before its data is on disk
        fsync_tree(tmp)
        # Another node's rank may have written the same cache first, whole (only complete ones are renamed in). One
        # without the file that marks a complete cache, which every reader checks for (a copy cut short, files
        # removed by hand), was kept, and every start failed to read it: replaced.
        if not _renamed_in(tmp, final) and not _holds_markers_of(final, tmp):
            _replace_incomplete(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write must not leave its half in the cache


def _renamed_in(tmp: Path, final: Path) -> bool:
    """Rename ``tmp`` to ``final``; False where ``final`` is a directory already (another writer's)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        return False
    return True


def _holds_markers_of(directory: Path, reference: Path) -> bool:
    """Whether ``directory`` holds each of :data:`CACHE_MARKERS` that ``reference`` (a complete cache) holds."""
    return all((directory / name).exists() for name in CACHE_MARKERS if (reference / name).exists())


def _replace_incomplete(tmp: Path, final: Path) -> None:
    """Put the complete cache ``tmp`` in place of the incomplete ``final``."""
    logger.warning("data: replacing the incomplete cache %s (without the file that marks a complete one)", final)
    aside = final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}-replaced")
    # One atomic swap where the OS has it: ``final`` is never missing for another node's ranks reading it, and a
    # complete cache another writer swapped in meanwhile is what comes out.
    try:
        swapped = _exchange(tmp, final)
    except FileNotFoundError:  # the incomplete one was moved or removed meanwhile: the renames below
        swapped = False
    if swapped:
        if _holds_markers_of(tmp, final):  # another writer's, which its ranks may have open: left to the sweep
            os.rename(tmp, aside)
        return
    with contextlib.suppress(FileNotFoundError):  # another writer moved it first
        os.rename(final, aside)
    _renamed_in(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_abandoned_temp_dirs(cache_dir: Path) -> None:
    """Delete the temp directories of cache writers that were killed (``_atomic_dir`` cleans up after any
    failure it sees, not after SIGKILL or a lost node); recent ones may belong to a writer still running."""
    now = time.time()
    # every cache writer's (tokens-, tokenizer-, preferences-, KTO's unpaired- ...: a list of prefixes missed new
    # ones), by the name _atomic_dir gives them, not another program's .tmp-* in a shared folder
    for tmp in cache_dir.glob(".tmp-*"):
        try:
            if not TEMP_DIR_NAME.fullmatch(tmp.name) or not tmp.is_dir():
                continue
            touched = max([tmp.stat().st_mtime, *(p.stat().st_mtime for p in tmp.iterdir())])
        except OSError:  # its writer renamed or removed it meanwhile
            continue
        if now - touched > ABANDONED_TEMP_SECONDS:
            logger.info("data: removing abandoned cache temp directory %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def load_hub(cfg: DataConfig, cache_dir: Path, local_rank: int, barrier: Callable[[], None]):
    """The hub dataset (non-streaming), loaded by every rank: its fingerprint, which follows the revision of
    its data files, is part of every cache key, so an updated dataset is not served the old one's tokens.
    Local rank 0 downloads it first; the others then load it from the HF cache."""
    loaded = _hf_dataset(cfg, None, cache_dir, streaming=False) if local_rank == 0 else None
    barrier()
    if loaded is None:
        loaded = _hf_dataset(cfg, None, cache_dir, streaming=False, check_files=False)  # (checked by local rank 0)
    # datasets' private attribute: the public API exposes no identity of the loaded data
    return loaded, getattr(loaded, "_fingerprint", None)


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int):
    """A byte-level BPE (``retnet.tokenization``) trained on the first ``max_chars`` characters of ``texts``."""
    from retnet.tokenization import train_byte_level_bpe

    sample, total = [], 0
    for text in texts:
        sample.append(text[: max_chars - total])
        total += len(sample[-1])
        if total >= max_chars:
            break
    return train_byte_level_bpe(sample, vocab_size=vocab_size)


# ----------------------------------------------------------------------------------------------------------
# Packed blocks
# ----------------------------------------------------------------------------------------------------------
def model_vocab_size(tokenizer, vocab_size: int | None) -> int:
    """The embedding rows of a new model over ``tokenizer``: ``vocab_size`` (``model.vocab_size``) when given,
    padded past the tokenizer's ids as nanoGPT pads GPT-2's 50257 to 50304 (a multiple of 64 runs faster; the data
    never produces the extra rows' ids), else the tokenizer's :func:`vocab_bound`. A size below that bound would
    leave ids without a row: refused, naming both."""
    bound = vocab_bound(tokenizer)
    if vocab_size is None:
        return bound
    if vocab_size < bound:
        raise ConfigError(f"model.vocab_size must be >= {bound}, the ids the tokenizer produces (0..{bound - 1}); "
                          f"got {vocab_size}")
    return vocab_size


def tokenizer_mismatch(tokenizer, config) -> str | None:
    """Why ``tokenizer`` cannot be the one a model of ``config`` was trained with, or None: ids past its
    embedding (an opaque device assert on CUDA), or another EOS (every document would start from a state the
    model never started from). ``eos_token_id`` may be a list, generate's form."""
    if vocab_bound(tokenizer) > config.vocab_size:
        return (f"its tokenizer produces ids up to {vocab_bound(tokenizer) - 1}, beyond the model's vocab_size "
                f"{config.vocab_size}")
    trained = config.eos_token_id
    if trained is not None and tokenizer.eos_token_id not in (trained if isinstance(trained, list) else [trained]):
        return (f"its tokenizer's EOS is id {tokenizer.eos_token_id} ({tokenizer.eos_token!r}), the model was "
                f"trained with EOS id {trained} (config.json eos_token_id): the tokenizer is not the one the model "
                f"was trained with")
    return None


def document_encoder(tokenizer):
    """A copy of ``tokenizer``'s backend that encodes whole documents, and the text of its special tokens as
    text: a document quoting ``<|endoftext|>`` would otherwise hold an EOS, which ends the document there (a
    packed segment starts). Truncation and padding saved in a ``tokenizer.json`` (a tokenizer prepared for a
    classifier) would cut every document to ``max_length`` and fill the short ones with pad tokens."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend


def document_prefix(tokenizer) -> list[int]:
    """The ids ``tokenizer``'s post-processor puts before a text (Llama's and Mistral's BOS, ``"<s> $A"``), which a
    plain-text document then starts with, as ``tokenizer(text)``, generate's prompts and ``/v1/completions`` start
    with them (and HF's run_clm and TRL encode pretraining text); [] for the byte-level BPE a run trains. A token
    equal to the EOS is left out (GPT-2's ``add_bos_token``, BOS == EOS): the EOS closing the previous document
    already opens the next one (:func:`packed_segments` starts a segment at every EOS; with a prefix, at its BOS). Probed on text, not "", as
    :func:`~retnet.train.chat.appends_eos` is; ``special_tokens_mask`` marks the post-processor's tokens only (and
    pads, which a left padding saved in a tokenizer.json puts first: left out by their attention mask)."""
    encoding = tokenizer.backend_tokenizer.encode("a", add_special_tokens=True)
    prefix = []
    for token, special, attended in zip(encoding.ids, encoding.special_tokens_mask, encoding.attention_mask):
        if not attended:
            continue
        if not special:
            break
        if token != tokenizer.eos_token_id:
            prefix.append(token)
    return prefix


def encode_documents(tokenizer, texts: list[str], batch: int = 512) -> np.ndarray:
    """Every document as ``[*document_prefix(tokenizer), *ids, EOS]``, concatenated; uint16 when every id fits. The
    byte-level BPE a run trains has no prefix: its ids followed by EOS."""
    dtype = np.uint16 if vocab_bound(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = tokenizer.eos_token_id
    prefix = document_prefix(tokenizer)
    backend = document_encoder(tokenizer)
    pieces = []
    for start in range(0, len(texts), batch):
        for encoding in backend.encode_batch(texts[start:start + batch], add_special_tokens=False):
            pieces.append(np.asarray([*prefix, *encoding.ids, eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def packed_segments(blocks: torch.Tensor, start_token_id: int, flags: torch.Tensor | None = None,
                    eos_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for ``[B, T]`` packed blocks as one varlen row ``[1, B·T]``.

    A segment starts at every block start and at every ``start_token_id``: the EOS, which then opens the next
    document (like a BOS), or the BOS of a tokenizer whose documents open with one (:func:`document_prefix`), so
    the last token of a document still learns to predict EOS while its state stays behind. The label of
    each block's first token is -100, because in the flattened row it would be predicted from the previous
    block; the loss then averages over exactly the B·(T−1) targets of the unflattened batch.

    ``eos_token_id`` (with a BOS ``start_token_id``): a BOS starts a segment only right after it, where documents
    start (a tokenizer whose BOS is no special token encodes the text ``<s>`` inside a document as the BOS).

    ``flags`` ``[B, T]`` (chat data, ``retnet.train.chat``): segments start at the conversations' closing EOS
    (``BOUNDARY``) instead of every EOS, and only the ``TARGET`` tokens keep their labels."""
    batch, length = blocks.shape
    starts = blocks == start_token_id if flags is None else (flags & BOUNDARY) != 0
    if flags is None and eos_token_id is not None and eos_token_id != start_token_id:
        starts[:, 1:] &= blocks[:, :-1] == eos_token_id
    starts[:, 0] = True
    bounds = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([bounds, bounds.new_tensor([batch * length])]).to(torch.int32)
    labels = blocks.clone() if flags is None else masked_labels(blocks, flags)
    labels[:, 0] = -100
    return {"input_ids": blocks.reshape(1, -1), "labels": labels.reshape(1, -1), "cu_seqlens": cu_seqlens}


def masked_labels(blocks: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """``blocks`` with -100 wherever ``flags`` does not mark a ``TARGET``."""
    return torch.where((flags & TARGET) != 0, blocks, torch.full_like(blocks, -100))


class MaskedBlocks(NamedTuple):
    """A micro-batch of chat data: ``tokens`` ``[B, T]`` int64 and their ``flags`` ``[B, T]`` uint8."""

    tokens: torch.Tensor
    flags: torch.Tensor


def masked_micro_batches(next_block: Callable[[], tuple[np.ndarray, np.ndarray]], micro_batch: int,
                         accum: int) -> list[MaskedBlocks]:
    """``accum`` micro-batches of ``micro_batch`` (tokens, flags) blocks each, taken from ``next_block``."""
    batches = []
    for _ in range(accum):
        tokens, flags = zip(*(next_block() for _ in range(micro_batch)), strict=True)
        batches.append(MaskedBlocks(torch.from_numpy(np.stack(tokens)), torch.from_numpy(np.stack(flags))))
    return batches


def _blocks(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(tokens) // seq_len
    return tokens[: n * seq_len].reshape(n, seq_len)


def _require_targets(split: str, flags: np.ndarray, dataset: str = "", held_out_by: str = "") -> None:
    """ConfigError when no block of a chat split holds a target after its first token: a split that teaches
    nothing, or whose validation loss is 0/0. ``dataset`` and ``held_out_by`` (the setting that sizes the validation
    split) are named when given."""
    if not np.any(np.asarray(flags)[:, 1:] & TARGET):
        # a small validation split may hold only unanswered conversations of a set that has answered ones
        larger = f"raise {held_out_by}, " if held_out_by and split == "validation" else ""
        raise ConfigError(f"{f'data.dataset {dataset!r}' if dataset else 'data'}: the {split} split's blocks hold no "
                          f"target tokens (assistant messages' tokens after the first of a block): nothing to learn or "
                          f"measure; {larger}use more conversations with assistant messages, or "
                          f"data.assistant_only_loss=false")


class PackedData:
    """Fixed-length blocks of a cached token array; this rank's micro-batches for each step.

    With ``train_flags``/``val_flags`` (chat data: the blocks' ``uint8`` flags, the same shapes) the batches are
    :class:`MaskedBlocks`, and each step sets ``step_targets``: the labels that count in the whole global batch
    (every rank's micro-batches), which every rank computes alike from the array it holds."""

    step_targets_per_rank = False  # step_targets is the global batch's count already

    def __init__(self, train: np.ndarray, val: np.ndarray, tokenizer, *, seed: int, micro_batch: int,
                 global_batch: int, rank: int, world_size: int, train_flags: np.ndarray | None = None,
                 val_flags: np.ndarray | None = None, dataset: str = ""):
        if len(train) == 0:
            raise ConfigError("data: the training split is shorter than one block of data.seq_len tokens; "
                              "use more data or a shorter data.seq_len")
        if len(val) == 0:
            raise ConfigError("data: the validation split is shorter than one block of data.seq_len tokens; "
                              "raise data.val_fraction or lower data.seq_len")
        self.train, self.val, self.tokenizer = train, val, tokenizer
        self.train_flags, self.val_flags = train_flags, val_flags
        for name, flags in (("training", train_flags), ("validation", val_flags)):
            if flags is not None:
                _require_targets(name, flags, dataset, "data.val_fraction")
        self.step_targets: int | None = None
        self.seed, self.micro_batch, self.global_batch = seed, micro_batch, global_batch
        self.rank, self.world_size = rank, world_size
        self.consumed = 0  # global blocks consumed: the data position
        self.hub_fingerprint: str | None = None  # of a hub dataset: a checkpoint keeps it for its resume
        self._perm_epoch, self._perm = -1, None

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    @property
    def masked(self) -> bool:
        """Chat data: batches are :class:`MaskedBlocks`, and the loss counts only their targets."""
        return self.train_flags is not None

    @property
    def train_tokens(self) -> int:
        return self.train.size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
            self._perm_epoch = epoch
        return self._perm

    def block_rows(self, start: int, count: int) -> np.ndarray:
        """The rows of ``train`` that blocks ``start .. start + count`` of the data stream are (each epoch its
        own permutation of them); a data mixture reads a source's blocks through it."""
        out = []
        for position in range(start, start + count):
            epoch, index = divmod(position, len(self.train))
            out.append(self._permutation(epoch)[index])
        return np.asarray(out)

    def micro_batches(self, accum: int) -> list[torch.Tensor]:
        """This rank's ``accum`` micro-batches ``[micro_batch, seq_len]`` (int64) of the next step."""
        ids = self.block_rows(self.consumed, self.global_batch)
        self.consumed += self.global_batch
        if self.masked:
            self.step_targets = target_count(self.train_flags[ids])
        out = []
        for m in range(accum):
            lo = (m * self.world_size + self.rank) * self.micro_batch
            rows = self.train[ids[lo:lo + self.micro_batch]]
            out.append(torch.from_numpy(rows.astype(np.int64)))
            if self.masked:
                flags = self.train_flags[ids[lo:lo + self.micro_batch]]
                out[-1] = MaskedBlocks(out[-1], torch.from_numpy(np.ascontiguousarray(flags)))
        return out

    def val_batches(self, max_blocks: int) -> list[torch.Tensor]:
        """This rank's share of ``max_blocks`` validation blocks (rounded down to a multiple of
        the world size, so every rank runs the same number of forwards), in micro-batches. The set, and so the
        validation loss, depends on the world size only through that rounding: not at all when the number of
        blocks chosen (``max_blocks``, or every candidate block when there are fewer) is a multiple of it."""
        # Chat data: only blocks with targets, or a sample of blocks without any would measure nothing (0/0).
        candidates = np.arange(len(self.val)) if self.val_flags is None else \
            np.flatnonzero(np.any(np.asarray(self.val_flags)[:, 1:] & TARGET, axis=1))
        total = min(max_blocks, len(candidates))
        total = max(total - total % self.world_size, self.world_size)
        # evenly spaced over the split, so a few long documents do not make up the whole sample
        chosen = candidates[np.linspace(0, len(candidates) - 1, total).round().astype(np.int64)]
        mine = chosen[self.rank::self.world_size]
        rows = [mine[i:i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]
        batches = [torch.from_numpy(self.val[r].astype(np.int64)) for r in rows]
        if self.val_flags is not None:
            batches = [MaskedBlocks(batch, torch.from_numpy(np.ascontiguousarray(self.val_flags[r])))
                       for batch, r in zip(batches, rows)]
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "packed", "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "packed":
            raise ValueError(f"data state of kind {state.get('kind')!r} cannot resume a non-streaming run")
        self.consumed = int(state["consumed"])


def build_data(cfg: DataConfig, *, vocab_size: int, seed: int, micro_batch: int, global_batch: int, rank: int,
               local_rank: int, world_size: int, tokenizer_dir: Path | None, barrier: Callable[[], None],
               hub_fingerprint: str | dict[str, str | None] | None = None):
    """The training data for this rank. Local rank 0 of each node prepares the caches (tokenizer, token
    arrays), the others wait at ``barrier`` and then read them. ``tokenizer_dir`` overrides
    ``cfg.tokenizer`` (a resumed run reuses the tokenizer it saved). ``hub_fingerprint``: that of the hub data
    a resumed run's checkpoint was trained on (the data's ``hub_fingerprint``), so the resume reads the same
    data or is refused, and finds its caches without loading the set. A ``data.mixture`` is built source by
    source through this function (:func:`~retnet.train.mixture.build_mixture`; ``hub_fingerprint`` then maps
    each source's label to its own)."""
    if cfg.mixture:
        from retnet.train.mixture import build_mixture

        return build_mixture(cfg, vocab_size=vocab_size, seed=seed, micro_batch=micro_batch,
                             global_batch=global_batch, rank=rank, local_rank=local_rank, world_size=world_size,
                             tokenizer_dir=tokenizer_dir, barrier=barrier, hub_fingerprint=hub_fingerprint)
    if cfg.format == "preference":  # DPO pairs (retnet.train.preference), not blocks
        from retnet.train.preference import build_preference_data

        return build_preference_data(cfg, seed=seed, micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                                     local_rank=local_rank, world_size=world_size, tokenizer_dir=tokenizer_dir,
                                     barrier=barrier, hub_fingerprint=hub_fingerprint)
    if cfg.format == "unpaired":  # KTO's labelled completions (retnet.train.kto), as DPO pairs
        from retnet.train.kto import build_kto_data

        return build_kto_data(cfg, seed=seed, micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                              local_rank=local_rank, world_size=world_size, tokenizer_dir=tokenizer_dir,
                              barrier=barrier, hub_fingerprint=hub_fingerprint)
    if cfg.format == "prompts":  # GRPO prompts (retnet.train.grpo), sampled from at each step
        from retnet.train.grpo import build_grpo_data

        return build_grpo_data(cfg, seed=seed, micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                               local_rank=local_rank, world_size=world_size, tokenizer_dir=tokenizer_dir,
                               barrier=barrier, hub_fingerprint=hub_fingerprint)
    cache_dir = data_cache_dir(cfg)
    if local_rank == 0:
        _remove_abandoned_temp_dirs(cache_dir)
    files = stdlib_files()[: cfg.max_documents or None] if cfg.dataset == "stdlib" else local_files(cfg.dataset)
    expected, loaded, stream = hub_fingerprint, None, None
    if cfg.streaming:
        if cfg.dataset == "stdlib":
            raise ConfigError("data.streaming is for large local/hub datasets; the stdlib corpus is not streamed")
        if files is None:
            stream, hub_fingerprint = _hub_stream(cfg, cache_dir, check_files=local_rank == 0)
        else:
            stream, hub_fingerprint = _hf_dataset(cfg, files, cache_dir, streaming=True, world_size=world_size), None
    elif files is None and expected is None:
        loaded, hub_fingerprint = load_hub(cfg, cache_dir, local_rank, barrier)
    # A resume knows what it was trained on: with its caches present, it needs no copy of the hub set (offline,
    # the HF cache cleared), and the set is loaded below only to rebuild them.
    if files is None and expected is not None and hub_fingerprint != expected:
        raise _hub_changed(cfg)
    fingerprint = data_fingerprint(cfg, files, hub_fingerprint)
    source = tokenizer_dir or (Path(cfg.tokenizer).expanduser() if cfg.tokenizer else None)
    if cfg.streaming:
        from retnet.train.streaming import build_streaming

        data = build_streaming(cfg, stream, cache_dir, fingerprint, source, vocab_size=vocab_size,
                                micro_batch=micro_batch, rank=rank, local_rank=local_rank,
                                world_size=world_size, barrier=barrier,
                                # (a save_to_disk directory is cut into equal shards, one a rank: _load_saved)
                                local_files=files is not None and not saved_dataset_dir(files[0]))
        data.hub_fingerprint = hub_fingerprint
        return data

    chat = cfg.format == "chat"

    def documents() -> tuple[list, list]:
        """(train, val) documents, or conversations for chat."""
        nonlocal loaded
        logger.info("data: reading %s", cfg.dataset)
        if files is None and loaded is None:
            loaded = _hf_dataset(cfg, None, cache_dir, streaming=False)
            if getattr(loaded, "_fingerprint", None) != hub_fingerprint:
                raise _hub_changed(cfg)
        read = load_conversations if chat else load_documents
        return split_documents(read(cfg, files, cache_dir, loaded), cfg.val_fraction, dataset=cfg.dataset,
                               max_documents=cfg.max_documents)

    tokenizer_cache = cache_dir / f"tokenizer-{_hash(fingerprint, vocab_size, cfg.tokenizer_train_chars)}"
    tokenizer = load_tokenizer(source) if source is not None else None
    split: tuple[list[str], list[str]] | None = None
    if tokenizer is None:
        if local_rank == 0 and not (tokenizer_cache / "tokenizer.json").exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            split = documents()
            logger.info("data: training a %d-token byte-level BPE on the training split", vocab_size)
            # chat: on the conversations as the BPE's template (the default) renders them, tags and all
            texts = (render_default(c) for _, c in split[0]) if chat else split[0]
            trained = train_tokenizer(texts, vocab_size, cfg.tokenizer_train_chars)
            _atomic_dir(tokenizer_cache, lambda tmp: trained.save_pretrained(tmp))
        barrier()
        tokenizer = load_tokenizer(tokenizer_cache)
        if rank == 0 and len(tokenizer) < vocab_size:
            # the data held fewer merges than asked for: the model's vocabulary is the tokenizer's, smaller than
            # model.vocab_size (which config.json still records), said rather than left to the parameter count
            logger.info("data: the training split gave the byte-level BPE %d tokens, fewer than model.vocab_size "
                        "%d: the model's vocabulary is %d", len(tokenizer), vocab_size, len(tokenizer))
    # Keyed by the tokenizer itself, not where it came from: a resumed run loads the copy saved in its
    # output_dir, and must find the tokens its first run cached (not tokenize the whole dataset again).
    key = _hash(fingerprint, tokenizer_fingerprint(tokenizer), cfg.seq_len)
    prefix = [] if chat else document_prefix(tokenizer)
    if prefix:  # documents open with the tokenizer's BOS: a cache of before holds them without it (others' keys stay)
        key = _hash(key, {"document_prefix": prefix})
    if chat:  # what renders the conversations and which tokens are targets (text keys stay as they were)
        key = _hash(key, chat_template_identity(tokenizer), cfg.assistant_only_loss)
    token_cache = cache_dir / f"tokens-{key}"

    if local_rank == 0 and not (token_cache / "meta.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        if split is None:
            split = documents()
        train_docs, val_docs = split
        logger.info("data: tokenizing %d + %d documents", len(train_docs), len(val_docs))

        def write(tmp: Path) -> None:
            encoder = ChatEncoder(tokenizer, cfg.assistant_only_loss, cfg.dataset) if chat else None
            written = {}
            for name, docs in (("train", train_docs), ("val", val_docs)):
                counted = {}
                if encoder is None:
                    ids = encode_documents(tokenizer, docs)
                    blocks, counted = _blocks(ids, cfg.seq_len), {"tokens": len(ids)}  # (a split short of a block)
                else:
                    blocks, flags = chat_blocks(encoder, docs, cfg.seq_len)
                    flags.tofile(tmp / f"{name}.flags.bin")
                    written[f"{name}_flags"] = flags
                blocks.tofile(tmp / f"{name}.bin")
                written[name] = blocks
                (tmp / f"{name}.json").write_text(json.dumps({"rows": len(blocks), "dtype": str(blocks.dtype),
                                                              **counted}))
            # meta.json last: its presence marks a complete cache
            (tmp / "meta.json").write_text(json.dumps({"seq_len": cfg.seq_len, "dataset": cfg.dataset,
                                                      "documents": [len(train_docs), len(val_docs)],
                                                      "blocks_sha256": blocks_digest(written),
                                                      **({"format": "chat"} if chat else {})}))

        _atomic_dir(token_cache, write)
    barrier()
    arrays = {}
    meta = json.loads((token_cache / "meta.json").read_text())
    for index, name in enumerate(("train", "val")):
        info = json.loads((token_cache / f"{name}.json").read_text())
        if not info["rows"]:  # before PackedData's own refusal, which knows neither the data nor its size
            _too_short(cfg, name, meta["documents"][index], info.get("tokens"))
        shape = (info["rows"], cfg.seq_len)
        arrays[name] = (np.memmap(token_cache / f"{name}.bin", dtype=info["dtype"], mode="r", shape=shape)
                        if info["rows"] else np.zeros(shape, dtype=info["dtype"]))
        if chat:
            arrays[f"{name}_flags"] = (np.memmap(token_cache / f"{name}.flags.bin", dtype=np.uint8, mode="r",
                                                 shape=shape) if info["rows"] else np.zeros(shape, dtype=np.uint8))
    logger.info("data: %d train blocks, %d val blocks of %d tokens (cache %s)", len(arrays["train"]),
                len(arrays["val"]), cfg.seq_len, token_cache)
    data = PackedData(arrays["train"], arrays["val"], tokenizer, seed=seed, micro_batch=micro_batch,
                      global_batch=global_batch, rank=rank, world_size=world_size,
                      train_flags=arrays.get("train_flags"), val_flags=arrays.get("val_flags"), dataset=cfg.dataset)
    data.hub_fingerprint = hub_fingerprint
    if files is not None:
        # Local files (and the stdlib corpus, which another interpreter changes) have no revision a checkpoint can
        # name: it keeps the digest of the blocks it trained on instead. Their cache key follows the files' sizes
        # and mtimes, so an edited, added or removed document makes a new cache, silently other blocks under the
        # same data position (and a new validation split, which may hold documents trained on); a copy with new
        # mtimes makes the same blocks again and resumes. A cache written before the digest existed holds none.
        digest = meta.get("blocks_sha256")
        if isinstance(expected, str) and expected.startswith(LOCAL_BLOCKS):
            digest = digest or blocks_digest(arrays)
            if LOCAL_BLOCKS + digest != expected:
                raise _local_changed(cfg, meta.get("documents"))
        data.hub_fingerprint = LOCAL_BLOCKS + digest if digest else None
    return data


def _too_short(cfg: DataConfig, split: str, documents: int, tokens: int | None) -> None:
    """ConfigError for a split that fills no block of ``data.seq_len`` tokens, naming the data and the sizes."""
    held = f"{documents} documents" + (f", {tokens} tokens" if tokens is not None else "")
    which, advice = (("training", "use more data or a shorter data.seq_len") if split == "train" else
                     ("validation", "raise data.val_fraction or lower data.seq_len"))
    raise ConfigError(f"data.dataset {cfg.dataset!r}: the {which} split ({held}) is shorter than one block of "
                      f"data.seq_len ({cfg.seq_len}) tokens; {advice}")


def blocks_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of a token cache's blocks (and chat flags), split by split."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        for start in range(0, len(array), 1 << 16):  # rows of a memmap, not the whole array copied at once
            digest.update(np.ascontiguousarray(array[start:start + (1 << 16)]))
    return digest.hexdigest()


def _local_changed(cfg: DataConfig, documents: list[int] | None) -> ConfigError:
    now = f" (now {documents[0]} training and {documents[1]} validation documents)" if documents else ""
    why = ("this interpreter's standard library is not the one it was trained on" if cfg.dataset == "stdlib" else
           "its files changed since (documents added, removed or edited), or this version tokenizes them otherwise "
           "(chat: answers opening with whitespace are encoded apart from their prompt since 2026-12-05, and the "
           "default template closes each message with EOS; plain text: documents start with the BOS a tokenizer's "
           "post-processor puts before a text since 2026-12-06)")
    return ConfigError(
        f"data.dataset {cfg.dataset!r} now gives other token blocks than the checkpoint was trained on: {why}{now}. "
        f"The checkpoint's data position would point into other blocks, and documents held out for validation could "
        f"now be trained on. Restore {'that Python' if cfg.dataset == 'stdlib' else 'those files'}, or start a new "
        f"run in another train.output_dir")


def _hub_changed(cfg: DataConfig) -> ConfigError:
    return ConfigError(
        f"data.dataset {cfg.dataset!r} now holds other data than the checkpoint was trained on (a new revision on "
        f"the hub?){'' if cfg.streaming else ', and the token cache of that data is gone'}: the checkpoint's data "
        f"position would point into other blocks. Restore that data (or data.cache_dir), or start a new run in "
        f"another train.output_dir")


__all__ = ["LOCAL_BLOCKS", "MaskedBlocks", "PackedData", "blocks_digest", "build_data",
           "chat_blocks", "column_values", "creation_problem", "data_cache_dir", "document_encoder",
           "encode_documents", "first_rows", "indexed_conversations", "load_conversations",
           "load_hub", "load_tokenizer", "local_files", "masked_labels", "resolve_tokenizer_dir", "split_documents",
           "stdlib_files", "train_tokenizer", "vocab_bound"]
