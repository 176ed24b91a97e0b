"""The Triton kernels compile for real GPUs, on this machine too: Triton's compiler and ptxas, not the
interpreter, for sm_90 (H100/H200) and sm_89 (L40/RTX 4090, 99 KiB of shared memory) in bf16 and fp32, and
sm_80 (A100) in bf16 (fp16 takes bf16's tiles, registers and shared memory; ``make aot`` compiles it all).

The interpreted tests check what the kernels compute; these check what only the real compiler sees:
that every launch lowers to PTX and assembles, that at least one config of each autotune sweep fits in
the GPU's shared memory (on sm_90, in three configs of each sweep; sm_89 compiles the default configs), that every launch (head dims 64 and 256, packed batches, initial and final
states) keeps a config free of register spills, and that the default config each kernel runs untuned
(``RETNET_AUTOTUNE=0``) is one of those. ``python -m retnet.kernels.aot`` prints the full table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from tests.launch import WITHOUT_RETNET_INIT, finished, start_logged, stop

pytestmark = pytest.mark.slow


# The compiles of this module (``python -m retnet.kernels.aot`` arguments), in one process (COMPILE_EACH below)
# started when the first test that needs one is set up; it compiles in a pool of a worker per core.
COMPILES = {
    "report": ["--arch", "90", "--dtypes", "bfloat16", "float32", "--head-dims", "64", "256",
               "--layouts", "packed", "--configs", "extremes"],
    # sm_89 (L40/RTX 4090) in its default configs, the report's other half: there a launch's best config is its
    # default one or better, and the default must fit without spills anyway (a third of the extremes' compiles)
    "ada": ["--arch", "89", "--dtypes", "bfloat16", "float32", "--head-dims", "64", "256", "--layouts", "packed",
            "--configs", "default"],
    # sm_80 (A100) takes sm_89's instruction path (mma.sync, cp.async) with more shared memory (163 KiB, not 99):
    # its default configs in bf16 only, for the suite's time (`make aot` compiles every config and dtype)
    "ampere": ["--arch", "80", "--dtypes", "bfloat16", "--head-dims", "64", "256", "--layouts", "packed",
               "--configs", "default"],
    # the padded layout, which the report skips
    "padded": ["--arch", "90", "--dtypes", "bfloat16", "--head-dims", "64", "--layouts", "padded",
               "--configs", "default"],
}


# Every kernel the launchers start: each must be in every report.
KERNELS = {
    "_chunk_state_fwd_kernel", "_chunk_output_fwd_kernel", "_chunk_state_bwd_kernel",
    "_chunk_dv_bwd_kernel", "_chunk_dqk_bwd_kernel", "_recurrent_fwd_kernel",
}


# The compiling process runs the COMPILES its tests use one after another (torch and Triton imported once, not
# once a report), each as ``python -m retnet.kernels.aot ARGS`` would: its own stdout and stderr and exit status,
# in the folder given. retnet.kernels is loaded without retnet/__init__.py, which imports transformers (~7 s of
# CPU) for nothing the compiler uses.
COMPILE_EACH = WITHOUT_RETNET_INIT + """
import contextlib, json, traceback
from retnet.kernels import aot
for args, logs in json.loads(sys.argv[1]):
    with open(logs + "/stdout", "w") as out, open(logs + "/stderr", "w") as err:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = aot.main(args)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
    with open(logs + "/returncode", "w") as status:
        status.write(str(code))
"""


@pytest.fixture(scope="module")
def compiling(request, tmp_path_factory):
    """``(process, folder)``: one process compiling the COMPILES that this session's selected tests use, started;
    each one's JSON report is ``folder/NAME.json``, its output and exit status in ``folder/NAME/``."""
    used = {name for item in request.session.items if getattr(item, "module", None) is request.module
            for name in COMPILES if name in item.fixturenames}
    if "report" in used:
        used.add("ada")
    root = tmp_path_factory.mktemp("aot")
    # The interpreter must be off in the compiling process (conftest.py turns it on for this one).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = []
    for name in [name for name in COMPILES if name in used]:
        (root / name).mkdir()
        jobs.append(([*COMPILES[name], "--json", str(root / f"{name}.json")], str(root / name)))
    process = start_logged([sys.executable, "-c", COMPILE_EACH, json.dumps(jobs)], root / "process", env=env)
    yield process, root
    stop(process)


def _finished(compiling, name: str) -> tuple[subprocess.CompletedProcess, list]:
    """NAME's compiles as ``python -m retnet.kernels.aot`` would have run them: exit status, stdout, stderr (the
    process's own, a traceback, where it ended before NAME's) and the JSON report."""
    process, root = compiling
    done = finished(process, timeout=900)
    logs, out = root / name, root / f"{name}.json"
    if (logs / "returncode").exists():
        done = subprocess.CompletedProcess(
            [sys.executable, "-m", "retnet.kernels.aot", *COMPILES[name]], int((logs / "returncode").read_text()),
            (logs / "stdout").read_text(), (logs / "stderr").read_text())
    elif done.returncode == 0:  # (ended without compiling NAME)
        done.returncode = -1
    return done, json.loads(out.read_text()) if out.exists() else []


@pytest.fixture(scope="module")
def report(compiling):
    """sm_90's extremes and sm_89's defaults, one report (the first failed process's output, if one failed)."""
    parts = [_finished(compiling, name) for name in ("report", "ada")]
    failed = [done for done, _ in parts if done.returncode != 0]
    return (failed or [parts[0][0]])[0], [result for _, results in parts for result in results]


@pytest.fixture(scope="module")
def ampere(compiling):
    return _finished(compiling, "ampere")


@pytest.fixture(scope="module")
def padded(compiling):
    return _finished(compiling, "padded")


def test_every_launch_compiles(report):
    done, results = report
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    failed = [f"sm_{r['arch']} {r['launch']} w{r['num_warps']}s{r['num_stages']}: {r['error']}"
              for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    kernels = {r["launch"].split()[0] for r in results}
    assert kernels == KERNELS
    assert {r["arch"] for r in results} == {89, 90}


# Spilled bytes per thread tolerated in a launch's best config: none for 16-bit inputs; a few for fp32
# (3xTF32, the accuracy path, not the fast one), where some launches keep 16 bytes at any tile width
# on sm_80 (`make aot`), and in the two configs compiled here on sm_90 (hundreds, before its tiles were
# narrowed).
SPILL_ALLOWANCE = {"*fp32": 64}


def test_every_launch_has_a_config_that_fits_without_spills(report):
    _, results = report
    assert results
    best = defaultdict(lambda: float("inf"))
    for r in results:
        if r["ok"] and r["fits"]:
            key = (r["arch"], r["launch"])
            best[key] = min(best[key], r["spill_bytes"])
    bad = [
        f"sm_{arch}: {launch}: {spilled} bytes"
        for (arch, launch), spilled in best.items()
        if spilled > SPILL_ALLOWANCE.get(launch.split()[1], 0)
    ]
    assert not bad, "best config spills registers (or none fits in shared memory):\n" + "\n".join(bad)
    assert {launch for _, launch in best} == {r["launch"] for r in results}


def test_the_untuned_default_config_fits_without_spills_everywhere(report):
    """With ``RETNET_AUTOTUNE=0`` (and before tuning has anything to choose from) each kernel launches its
    default config: on every arch, dtype and head dim it must compile, fit and not spill."""
    from retnet.kernels import chunk, recurrent

    _, results = report
    defaults = {}
    for module in (chunk, recurrent):
        for name in dir(module):
            config = getattr(getattr(module, name), "default_config", None)
            if config is not None:
                defaults[name] = (config.num_warps, config.num_stages)
    assert len(defaults) == 6
    checked, bad = set(), []
    for r in results:
        kernel, dtype = r["launch"].split()[:2]
        if (r["num_warps"], r["num_stages"]) != defaults[kernel]:
            continue
        checked.add((r["arch"], r["launch"]))
        if not (r["ok"] and r["fits"]) or r["spill_bytes"] > SPILL_ALLOWANCE.get(dtype, 0):
            bad.append(f"sm_{r['arch']}: {r['launch']}: ok={r['ok']} fits={r['fits']} spill={r['spill_bytes']}")
    assert not bad, "\n".join(bad)
    assert checked == {(r["arch"], r["launch"]) for r in results}


def test_bf16_chunk_kernels_use_hopper_tensor_cores(report):
    """On sm_90 each bf16 chunk kernel has a clean config whose dots became wgmma (warpgroup MMA), not the
    older mma.sync path or FMA: without it, it could not compete with FlashAttention or fla on an H100."""
    _, results = report
    wgmma = defaultdict(bool)
    for r in results:
        if r["arch"] == 90 and r["launch"].split()[1] == "*bf16/*fp32" and "chunk" in r["launch"]:
            wgmma[r["launch"]] |= r["fits"] and r["spill_bytes"] == 0 and "wgmma" in r["matmul"]
    # state fwd (with and without final state), output, state bwd, dv, dq/dk; at each head dim
    assert len({launch.split()[0] for launch in wgmma}) == 5 and len(wgmma) == 12
    assert all(wgmma.values()), [launch for launch, ok in wgmma.items() if not ok]


def test_packed_launches_offset_data_tensors_in_64_bits(report):
    """Every base offset into q, k, v, o, the states and the gradients is int64 in the compiled IR (a 32-bit
    one wraps past 2^31 elements: B=8, T=128k, H=32, K=128; only a GPU with such a tensor would show it)."""
    _, results = report
    narrow = [f"sm_{r['arch']} {r['launch']}: {line}" for r in results for line in r["narrow_offsets"]]
    assert not narrow, "\n".join(narrow)


def test_padded_launches_offset_data_tensors_in_64_bits(padded):
    """The same for the padded layout (batch row offsets ``b · T · H · K``), which the report above skips."""
    done, results = padded
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert {r["launch"].split()[0] for r in results} == KERNELS
    narrow = [f"{r['launch']}: {line}" for r in results for line in r["narrow_offsets"]]
    assert not narrow, "\n".join(narrow)


def test_every_launch_compiles_and_fits_without_spills_on_ampere_in_its_default_config(ampere):
    done, results = ampere
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert {r["launch"].split()[0] for r in results} == KERNELS
    assert {r["arch"] for r in results} == {80}
    bad = [f"{r['launch']}: ok={r['ok']} fits={r['fits']} spill={r['spill_bytes']} {r['error'] or ''}"
           for r in results if not (r["ok"] and r["fits"]) or r["spill_bytes"]]
    assert not bad, "\n".join(bad)
