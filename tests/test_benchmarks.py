"""The benchmark scripts start as scripts (``python benchmarks/NAME.py``): run that way, their folder is
sys.path[0], where ``benchmarks/kernels.py`` would shadow HuggingFace's ``kernels`` package, which
transformers probes for on import. ``--help`` imports everything a run imports and measures nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


# Every script run as ``python benchmarks/NAME.py ARGS`` would be, in one interpreter (torch and transformers
# imported once, not once a run): benchmarks/ is sys.path[0] when each starts, as it is for a script. Only the
# first imports transformers with it there, so each is also asked to have moved it away before its imports.
# argv: a JSON list of [script, [args...], [folders after sys.path[0], as PYTHONPATH puts them]]; prints, per run,
# [exit status, stdout, stderr, moved].
RUN_EACH = """
import contextlib, io, json, runpy, sys, traceback
runs = json.loads(sys.argv[1])
results = []
for script, args, python_path in runs:
    sys.path[0] = script.rsplit("/", 1)[0]  # python -c put "" (the current directory) there; each script moves it away
    sys.path[1:1] = python_path
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [script, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        code, err = 1, io.StringIO(traceback.format_exc())
    moved = sys.path[0] != script.rsplit("/", 1)[0]
    results.append([code, out.getvalue(), err.getvalue(), moved])
print(json.dumps(results))
"""
SCRIPTS = sorted(path for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_"))  # _x: helpers
REFUSED_PROVIDERS = ["--providers", "triton,flash"]
FLA_RUN = ["--triton-on-cpu", "--providers", "triton,fla"]  # (and --out)


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> dict:
    """Every script with ``--help``, kernels.py with an unknown provider, then kernels.py's GPU comparison interpreted
    with an fla stand-in on the path (the last run, the only one with that folder on sys.path, as PYTHONPATH would
    put it): ``{(name, *args): [status, stdout, stderr, moved its folder off the path]}``; the comparison's key
    without its ``--out``, its result with the JSON it wrote (None if none). TRITON_INTERPRET=1 for all (the
    suite's own on a CPU machine; the comparison needs it, ``--help`` computes nothing)."""
    stand_in = tmp_path_factory.mktemp("fla-stand-in")
    package = stand_in / "fla" / "ops" / "retention"
    package.mkdir(parents=True)
    (stand_in / "fla" / "__init__.py").write_text(FLA_STAND_IN)
    (stand_in / "fla" / "ops" / "__init__.py").write_text("")
    (package / "__init__.py").write_text(FLA_RETENTION)
    out = stand_in / "kernels.json"
    kernels = str(BENCHMARKS / "kernels.py")
    runs = [(str(script), ["--help"], []) for script in SCRIPTS] + [
        (kernels, REFUSED_PROVIDERS, []),
        (kernels, [*FLA_RUN, "--out", str(out)], [str(BENCHMARKS.parent), str(stand_in)]),
    ]
    done = subprocess.run([sys.executable, "-c", RUN_EACH, json.dumps(runs)], capture_output=True, text=True,
                          timeout=600, cwd=BENCHMARKS, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert len(results) == len(runs)
    results[-1].append(json.loads(out.read_text()) if out.exists() else None)
    keys = [(script.rsplit("/", 1)[1], *args) for script, args, _ in runs[:-1]] + [("kernels.py", *FLA_RUN)]
    return dict(zip(keys, results))


def test_every_benchmark_script_starts(started):
    helped = {name: result for (name, *args), result in started.items() if args == ["--help"]}
    assert sorted(helped) == [p.name for p in SCRIPTS]
    for script, (code, output, errors, moved_its_folder_off_the_path) in helped.items():
        assert code == 0 and "usage:" in output, (script, (output + errors)[-3000:])
        assert moved_its_folder_off_the_path, script


FLA_STAND_IN = '''
"""flash-linear-attention's ``chunk_retention`` as it documents itself (0.6.0): decays and scale fixed inside
the op, γ_h = 1 - 2^(-5-h) and K^-1/2, computed here by retnet's reference."""
__version__ = "stand-in"
'''
FLA_RETENTION = '''
import torch

from retnet.kernels import naive


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    g_gamma = (1 - 2.0 ** (-5.0 - torch.arange(q.shape[2], dtype=torch.float, device=q.device))).log()
    return naive.chunk_retention(q, k, v, g_gamma, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens)
'''


def test_kernel_benchmark_times_fla_only_on_the_retention_it_computes(started):
    """The GPU comparison's harness, interpreted on tiny shapes: an importable fla joins the timed providers,
    and its output is checked against the reference first, so a decay or scale convention that differs from
    the one our kernel is timed with shows as an error, not as a speed ratio."""
    code, _, stderr, _, result = started[("kernels.py", *FLA_RUN)]
    assert code == 0, stderr[-3000:]
    assert result["fla_available"] and result["fla_version"] == "stand-in"
    checked = {check["provider"]: check["max_rel_err_vs_reference"] for check in result["checks"]}
    assert set(checked) == {"triton", "fla"}
    assert max(checked.values()) < 1e-5, checked
    timed = {(row["provider"], row["mode"]) for row in result["rows"]}
    assert timed == {(name, mode) for name in ("triton", "fla") for mode in ("fwd", "fwd+bwd")}  # as chosen
    assert all(row["speedup_of_triton"] > 0 for row in result["rows"])


def test_kernel_benchmark_refuses_an_unknown_provider(started):
    code, _, stderr, _ = started[("kernels.py", *REFUSED_PROVIDERS)]
    assert code == 2
    assert "--providers" in stderr and "'triton,flash'" in stderr


def test_a_quick_decode_run_writes_only_to_an_output_given(tmp_path, monkeypatch):
    # A quick run's figures are not the recorded ones: it once overwrote the committed full run's results.
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repository first on it
    spec = importlib.util.spec_from_file_location("decode_benchmark", BENCHMARKS / "decode.py")
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    measured = {name: {"model": name, "ms_per_token": 1.0, "state_bytes": 1} for name in ("retnet", "llama")}
    monkeypatch.setattr(decode, "build_models", lambda device, dtype: [])
    monkeypatch.setattr(decode, "measure", lambda models, context, steps, device: measured)
    recorded = BENCHMARKS / "results" / "decode-cpu.json"
    before = recorded.read_bytes()
    monkeypatch.setattr(sys, "argv", ["decode.py", "--quick", "--device", "cpu"])
    decode.main()
    assert recorded.read_bytes() == before
    monkeypatch.setattr(sys, "argv", ["decode.py", "--quick", "--device", "cpu", "--output", str(tmp_path / "d.json")])
    decode.main()
    assert [row["model"] for row in json.loads((tmp_path / "d.json").read_text())["rows"]] == ["retnet", "llama"] * 2
