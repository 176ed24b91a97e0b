"""Suite-wide settings. Without a GPU the Triton kernels run under Triton's interpreter, which must be
chosen before triton is first imported (TRITON_INTERPRET=1); on a GPU they compile for real."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU every new shape would otherwise tune each kernel over its whole sweep (4-6 compiles), and the
# suite runs dozens of shapes: each kernel's default config instead (checked spill-free by
# test_aot_compile.py); test_recurrent.py tunes for real in a process of its own.
os.environ.setdefault("RETNET_AUTOTUNE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    # Each xdist worker (and each process it starts) computes on one thread: workers × threads = the cores
    # `make test` gives them, where two OpenMP pools on two cores would spin-wait on each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _interpreted_bf16_dots_in_fp32() -> None:
    """Make the interpreter's ``tl.dot`` right for bf16 operands, so bf16 kernels are tested here too.

    The interpreter holds bf16 as raw uint16 bits and its ``create_dot`` multiplies those bits (values near
    1e10; triton-lang/triton#11584, closed upstream as unsupported). Loads, stores and casts of bf16 are
    right. Widening a bf16 operand to fp32 is exact (the bits shifted up 16), and an fp32 matmul of
    bf16-valued operands is what the tensor cores compute for a bf16 dot: exact products, fp32 sums.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "widens_bf16", False):
        return
    original = builder.create_dot

    def widen(operand):
        if operand.dtype.scalar != tl.bfloat16:
            return operand
        bits = operand.data.view(np.uint16).astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot.widens_bf16 = True
    builder.create_dot = create_dot


def _interpreted_integers_unchecked() -> None:
    """Turn off the interpreter's check of every integer add, subtract and multiply for int32 overflow
    (``InterpreterOptions.sanitize_overflow``): a fifth of each interpreted kernel's time here, and a check that
    compiled kernels make only in debug builds. The suite's shapes keep every offset far below 2**31; the large-
    offset arithmetic is checked where it matters, in the compiled IR (test_aot_compile.py: int64 base offsets)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    import dataclasses

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow"):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _interpreted_bf16_dots_in_fp32()
    _interpreted_integers_unchecked()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF hub cache of this test's own (``HF_HUB_CACHE``, for subprocesses too) and ``publish(repo_id,
    directory, revision="main")``, which lays ``directory``'s files out as huggingface_hub caches a download
    (``models--org--name/refs/<revision>`` -> ``snapshots/<commit>/``) and returns the snapshot's path. With
    HF_HUB_OFFLINE=1 (the suite's) ``snapshot_download`` finds them there: the real hub-id code path, no network."""
    import hashlib
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hf-hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def publish(repo_id: str, directory, revision: str = "main"):
        commit = hashlib.sha1(f"{repo_id}@{revision}@{directory}".encode()).hexdigest()
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        snapshot = repo / "snapshots" / commit
        shutil.copytree(directory, snapshot)
        return snapshot

    return publish


@pytest.fixture
def load_benchmark(monkeypatch):
    """``load_benchmark(name)``: ``benchmarks/<name>.py`` as a module, imported as a test calls its functions. The
    script puts the repository root at sys.path[0] (where a script's own folder would be), so sys.path is this
    test's own copy."""
    import importlib.util
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "path", list(sys.path))
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", benchmarks / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def pytest_collection_modifyitems(config, items):
    """Files longest first, by their measured seconds (tests/file_durations.py: the longest-processing-time order for
    ``make test``'s xdist workers, which take it with ``--no-loadscope-reorder``); each file's own order is kept."""
    from tests.file_durations import UNKNOWN_PER_TEST, load

    seconds = load()
    counts: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        counts[path] = counts.get(path, 0) + 1

    def cost(item) -> float:
        path = item.nodeid.split("::", 1)[0]
        return seconds.get(path, UNKNOWN_PER_TEST * counts[path])

    items.sort(key=lambda item: -cost(item))  # stable
