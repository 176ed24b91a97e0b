"""The benchmark scripts start as scripts (``python benchmarks/NAME.py``): run that way, their folder is
sys.path[0], where ``benchmarks/kernels.py`` would shadow HuggingFace's ``kernels`` package, which
transformers probes for on import. ``--help`` imports everything a run imports and measures nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.serve.warm_servers import run_python

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


def test_no_script_imports_transformers_before_retnet():
    """``import retnet`` quiets the warnings torchao logs when transformers imports it (one per CUDA extension a CPU
    build of torch cannot load, one per enum torch's pytree registers): a script whose top imports transformers or
    peft first printed them on every run, ``--help`` too. (Read from the source: the suite's runs share one
    interpreter, where only the first import could show them.)"""
    import ast

    late = {}
    for script in SCRIPTS:
        order = []
        for node in ast.parse(script.read_text()).body:
            if isinstance(node, ast.Import):
                order += [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                order.append(node.module.split(".")[0])
        first_retnet = order.index("retnet") if "retnet" in order else len(order)
        late[script.name] = sorted({name for name in order[:first_retnet]
                                    if name in ("transformers", "peft", "torchao")})
    assert not {name: found for name, found in late.items() if found}, late


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


def test_a_quick_decode_run_writes_only_to_an_output_given(tmp_path, monkeypatch, load_benchmark):
    # A quick run's figures are not the recorded ones: it once overwrote the committed full run's results.
    decode = load_benchmark("decode")
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


def test_the_kernel_benchmarks_fla_pass_times_nothing_without_fla(tmp_path, monkeypatch, load_benchmark):
    # gpu_check.sh's second pass (--providers triton,fla) once timed triton alone again when fla was missing:
    # up to 80 s of a 15-minute GPU session on what the first pass had measured.
    kernels = load_benchmark("kernels")
    monkeypatch.setattr(kernels, "_fla_op", lambda: None)
    out = tmp_path / "kernels.json"
    assert kernels.main(["--triton-on-cpu", "--providers", "triton,fla", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == [] and result["fla_available"] is False


GPU_CHECK = BENCHMARKS / "gpu_check.sh"


def _gpu_check_pytest_steps() -> list[list[str]]:
    """The arguments gpu_check.sh gives pytest in each of its test steps."""
    import shlex

    script = GPU_CHECK.read_text().replace("\\\n", " ")
    steps = [line.split('"${PYTEST[@]}"', 1)[1].split("2>&1")[0] for line in script.splitlines()
             if line.startswith("timeout") and '"${PYTEST[@]}"' in line]
    return [shlex.split(step) for step in steps]


def test_gpu_check_test_steps_collect_without_fla():
    # The GPU machine has no fla unless its wheels are carried: step 1's collection stopped at a test file that
    # imports from the conversion's tests (which skip themselves without fla), and the step ran no test at all.
    steps = _gpu_check_pytest_steps()
    assert len(steps) == 2
    # Both steps' collections in one interpreter (torch, transformers and triton imported once): the second
    # session reuses the test modules the first imported, and a module whose import failed is not kept, so a
    # collection error shows in each step it would stop. Each step's output ends with a line of its status.
    hide_fla = """
import json, sys
sys.modules["fla"] = None
import pytest
for args in json.loads(sys.argv[1]):
    status = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args])
    print(f"\\n<<step status>> {int(status)}", flush=True)
"""
    # (forked from the suite's warm interpreter, tests/serve/warm_servers.py, which has not imported fla either)
    process = run_python(["-c", hide_fla, json.dumps(steps)], dict(os.environ), timeout=300, cwd=BENCHMARKS.parent,
                         merged=True)
    assert process.returncode == 0, process.stdout[-3000:]
    outputs = process.stdout.split("<<step status>> ")
    assert len(outputs) == len(steps) + 1, process.stdout[-3000:]
    for args, before, after in zip(steps, outputs, outputs[1:]):
        assert after.split("\n", 1)[0] == "0", (args, before[-3000:])
        assert " collected" in before.strip().splitlines()[-1], before[-3000:]


FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*"
previous=""
for arg in "$@"; do
    if [ "$previous" = --out ]; then echo '{}' > "$arg"; fi
    previous=$arg
done
case "$*" in
    *benchmarks/decode.py*) echo '{}' > benchmarks/results/decode-cuda.json ;;
    *benchmarks/train.py*) echo '{}' > benchmarks/results/train-cuda.json ;;
esac
"""
FAKE_TORCHRUN = """#!/usr/bin/env bash
for arg in "$@"; do
    case $arg in --train.output_dir=*)
        dir=${arg#*=}
        mkdir -p "$dir/tokenizer" "$dir/checkpoints/step_00000100" "$dir/export"
        for file in config.json metrics.jsonl loss.png tokenizer/tokenizer.json tokenizer/tokenizer_config.json \\
                checkpoints/step_00000100/model.pt export/model.safetensors; do echo x > "$dir/$file"; done ;;
    esac
done
"""


def test_gpu_check_leaves_what_run_brings_back(tmp_path):
    # `run` brings back at most 8 files from $OUT, none more than 2 folders down: gpu_check.sh once wrote some 20
    # there (a log and a JSON a step, and the training run's folder), and most would have stayed on the machine.
    import tarfile

    tree, fake_bin, out = tmp_path / "tree", tmp_path / "bin", tmp_path / "out"
    (tree / "benchmarks" / "results").mkdir(parents=True)
    (tree / "benchmarks" / "gpu_check.sh").write_text(GPU_CHECK.read_text())
    fake_bin.mkdir()
    for name, text in [("python", FAKE_PYTHON), ("torchrun", FAKE_TORCHRUN), ("nvidia-smi", "#!/bin/sh\necho H200\n")]:
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OUT": str(out), "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    brought = [path.relative_to(out) for path in out.rglob("*") if path.is_file()]
    assert len(brought) <= 8 and all(len(path.parts) <= 3 for path in brought), brought
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        packed = {name.removeprefix("gpu-check/") for name in archive.getnames()}
    for step in ["gpu.txt", "gpu-tests-bf16.txt", "gpu-kernels.txt", "kernels-cuda.json", "gpu-kernels-fla.txt",
                 "kernels-cuda-fla.json", "gpu-tests.txt", "gpu-train.txt", "train-gpu/metrics.jsonl",
                 "gpu-eval.txt", "gpu-decode.txt", "decode-cuda.json", "gpu-train-bench.txt", "train-cuda.json"]:
        assert step in packed, (step, sorted(packed))
    assert not any(name.startswith(("train-gpu/export", "train-gpu/checkpoints")) for name in packed)


def test_gpu_check_stand_ins_keep_the_venv_of_python3(tmp_path):
    # The GPU image documents its Python as a venv's python3: where no `python` is on PATH the script makes one.
    # A link to python3 from its own folder started the base interpreter, without the venv (pyvenv.cfg is looked
    # up beside the path a Python is started by), and so without torch.
    import shutil
    import venv

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    (env_dir / "bin" / "python").unlink()
    tools = tmp_path / "tools"  # what the stand-ins' lines run, and no python of the system's
    tools.mkdir()
    for tool in ("mktemp", "chmod", "sh", "cat"):
        (tools / tool).symlink_to(shutil.which(tool))
    text = GPU_CHECK.read_text()
    shims = text[text.index("SHIMS=$(mktemp -d)"):text.index('export PATH="$PATH:$SHIMS"\n')]
    script = shims + 'export PATH="$PATH:$SHIMS"\npython -c "import sys; print(sys.prefix)"\ncat "$SHIMS/torchrun"\n'
    done = subprocess.run([shutil.which("bash"), "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{env_dir / 'bin'}:{tools}", "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    prefix, *torchrun = done.stdout.splitlines()
    assert Path(prefix).resolve() == env_dir.resolve()
    assert "python -m torch.distributed.run" in "\n".join(torchrun)


def test_a_quick_kernels_run_writes_only_to_an_out_given(tmp_path, monkeypatch, load_benchmark):
    # The README's CPU table comes from a full run; a smoke run's four lengths once overwrote it.
    kernels = load_benchmark("kernels")
    monkeypatch.setattr(kernels, "run_cpu", lambda args: {"mode": "cpu-reference", "rows": [{"T": 256}]})
    recorded = BENCHMARKS / "results" / "kernels-cpu.json"
    before = recorded.read_bytes()
    assert kernels.main(["--quick"]) == 0
    assert recorded.read_bytes() == before
    assert kernels.main(["--quick", "--out", str(tmp_path / "k.json")]) == 0
    assert json.loads((tmp_path / "k.json").read_text())["quick"] is True


def test_a_quick_context_parallel_run_writes_only_to_an_output_given(tmp_path, monkeypatch, load_benchmark):
    context_parallel = load_benchmark("context_parallel")

    def launched(tokens, size, cores, repeats):
        return {"tokens": tokens, "size": size, "median_s": 1.0 / size, "activation_bytes_per_rank": 100 // size + 10,
                "grad_bytes": 10, "loss": 5.0, "cp_forward_bytes": 0, "cp_backward_bytes": 0,
                "piece_kv_bytes_per_layer": 0}

    monkeypatch.setattr(context_parallel, "launch", launched)
    monkeypatch.setattr(context_parallel, "summarize", lambda row: dict(row))
    recorded = BENCHMARKS / "results" / "context_parallel-cpu.json"
    before = recorded.read_bytes()
    monkeypatch.setattr(sys, "argv", ["context_parallel.py", "--quick", "--repeats", "1"])
    context_parallel.main()
    assert recorded.read_bytes() == before
    out = tmp_path / "cp.json"
    monkeypatch.setattr(sys, "argv", ["context_parallel.py", "--quick", "--repeats", "1", "--output", str(out)])
    context_parallel.main()
    assert [(row["tokens"], row["size"]) for row in json.loads(out.read_text())["rows"]] == \
        [(4096, 1), (4096, 2), (16384, 1), (16384, 2)]


def test_a_quick_lora_run_writes_only_to_an_output_given(tmp_path, monkeypatch, load_benchmark):
    # `lora.py --quick` (the micro model, 12 steps) once wrote over lora-cpu.json, the full run the README's table
    # of adapter costs quotes (both models, 40 steps).
    lora = load_benchmark("lora")
    # The script's results folder, moved under tmp_path: a failing run must not touch the recorded file.
    monkeypatch.setattr(lora, "__file__", str(tmp_path / "benchmarks" / "lora.py"))
    recorded = tmp_path / "benchmarks" / "results" / "lora-cpu.json"
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the script's 1 thread would outlive the test
    monkeypatch.setattr(lora, "measure", lambda name, batch, steps, rank: [
        {"model": name, "batch": batch, "mix": "no adapters", "ms_per_step": 1.0, "ratio_vs_no_adapters": 1.0}])
    monkeypatch.setattr(sys, "argv", ["lora.py", "--quick"])
    lora.main()
    assert not recorded.exists()
    out = tmp_path / "sub" / "lora.json"
    monkeypatch.setattr(sys, "argv", ["lora.py", "--quick", "--output", str(out)])
    lora.main()
    written = json.loads(out.read_text())
    assert written["steps"] == 12 and [(r["model"], r["batch"]) for r in written["rows"]] == [("micro", 1), ("micro", 32)]
    assert not recorded.exists()
    # A full run (no --quick) still writes the recorded file by default.
    monkeypatch.setattr(sys, "argv", ["lora.py", "--models", "micro", "--batches", "1"])
    lora.main()
    assert json.loads(recorded.read_text())["steps"] == 40


# An option given beside --quick (loss.py: --gpu) and the value the run must keep: --quick once overwrote them
# after parsing (`decode.py --quick --contexts 128` still ran 1024 too; `quantization.py --quick --train-steps 2`
# trained 30 steps).
GIVEN_BESIDE_QUICK = [
    ("assisted", ["--new-tokens", "7", "--lead", "5", "--prompts", "3", "--rounds", "2"],
     {"new_tokens": 7, "lead": 5, "prompts": 3, "rounds": 2}),
    ("context_parallel", ["--tokens", "256"], {"tokens": [256]}),
    ("decode", ["--contexts", "128", "--steps", "3"], {"contexts": [128], "steps": 3}),
    ("distill_draft", ["--target-steps", "5", "--draft-steps", "4", "--prompts", "2", "--max-tokens", "9"],
     {"target_steps": 5, "draft_steps": 4, "prompts": 2, "max_tokens": 9}),
    ("inplace_decode", ["--steps", "3"], {"steps": 3}),
    ("kernels", ["--max-ref-T", "16384", "--lengths", "2048", "--head-dims", "64"],
     {"max_ref_T": 16384, "lengths": [2048], "head_dims": [64]}),
    ("lora", ["--models", "h768", "--steps", "3"], {"models": ["h768"], "steps": 3}),
    ("quantization", ["--hidden", "64", "--train-steps", "2", "--train-seq-len", "32", "--eval-documents", "2",
                      "--steps", "3"],
     {"hidden": 64, "train_steps": 2, "train_seq_len": 32, "eval_documents": 2, "steps": 3}),
    ("speculative", ["--concurrency", "1", "8", "--rounds", "4", "--max-tokens", "64"],
     {"concurrency": [1, 8], "rounds": 4, "max_tokens": 64}),
    ("pooling", ["--inputs", "10", "--repeats", "1"], {"inputs": 10, "repeats": 1}),
    ("serve", ["--contexts", "4096", "--max-tokens", "16"], {"contexts": [4096], "max_tokens": 16}),
    ("tensor_parallel", ["--hidden", "256", "--seq", "128"], {"hidden": 256, "seq": 128, "layers": 2}),
    ("train", ["--steps", "4", "--tokens", "4096"], {"steps": 4, "tokens": 4096}),
    ("loss", ["--seq-len", "1024", "--vocab", "32768"], {"seq_len": 1024, "vocab": 32768, "hidden": 2048}),
]


def _preset_flag(name: str) -> str:
    return "--gpu" if name == "loss" else "--quick"


def test_every_script_with_a_preset_is_checked_for_the_options_given_beside_it():
    presets = {path.stem for path in SCRIPTS if "--quick" in path.read_text() or "--gpu" in path.read_text()}
    assert presets == {name for name, _, _ in GIVEN_BESIDE_QUICK}


@pytest.fixture
def with_repo_on_path(monkeypatch):
    # serve.py, imported rather than run, leaves sys.path as it is; the others put the repository first themselves.
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))


@pytest.mark.parametrize("name, given, kept", GIVEN_BESIDE_QUICK, ids=[case[0] for case in GIVEN_BESIDE_QUICK])
def test_an_option_given_beside_quick_keeps_its_value(name, given, kept, load_benchmark, with_repo_on_path):
    script = load_benchmark(name)
    preset = _preset_flag(name)
    args = script.build_parser().parse_args([preset, *given])
    assert {dest: getattr(args, dest) for dest in kept} == kept
    # Left out, the preset still sizes them; the full run's values otherwise differ from it.
    quick, full = script.build_parser().parse_args([preset]), script.build_parser().parse_args([])
    sized = [dest for dest in kept if getattr(full, dest) is not None]  # serve.py's --max-tokens: per mode
    assert sized and all(getattr(quick, dest) != getattr(full, dest) for dest in sized)


def _results_untouched(tmp_path, module, monkeypatch):
    """``module``'s results folder, moved under tmp_path (through its ``__file__`` and ``REPO``): a run that writes
    there on the old code must not overwrite a recorded file."""
    monkeypatch.setattr(module, "__file__", str(tmp_path / "repo" / "benchmarks" / "script.py"))
    if hasattr(module, "REPO"):
        monkeypatch.setattr(module, "REPO", tmp_path / "repo")
    results = tmp_path / "repo" / "benchmarks" / "results"
    results.mkdir(parents=True)
    return results


def test_a_quick_train_run_writes_only_to_an_out_given(tmp_path, monkeypatch, load_benchmark):
    # benchmarks/results/train-cpu.json, which the README's training table quotes, was rewritten by every run.
    train = load_benchmark("train")
    results = _results_untouched(tmp_path, train, monkeypatch)
    monkeypatch.setattr(train, "measure", lambda preset, seq_len, batch, steps, device, peak: [
        {"model": name, "tokens_per_s": 1.0, "params": 1, "mfu": None} for name in ("retnet", "llama")])
    monkeypatch.setattr(sys, "argv", ["train.py", "--quick", "--presets", "tiny", "--seq-lens", "512",
                                      "--device", "cpu"])
    train.main()
    assert not any(results.iterdir())
    out = tmp_path / "t.json"
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--out", str(out)])
    train.main()
    assert json.loads(out.read_text())["steps"] == 2 and not any(results.iterdir())
    # gpu_check.sh's run (no --quick, no --out) still writes the recorded file's place.
    monkeypatch.setattr(sys, "argv", ["train.py", "--steps", "3", "--presets", "tiny", "--seq-lens", "512",
                                      "--device", "cpu"])
    train.main()
    assert json.loads((results / "train-cpu.json").read_text())["steps"] == 3


def test_a_loss_run_writes_only_to_an_out_given(tmp_path, monkeypatch, load_benchmark):
    # benchmarks/results/loss-cpu.json records a --seq-len 1024 --vocab 32768 run: any other run overwrote it.
    loss = load_benchmark("loss")
    results = _results_untouched(tmp_path, loss, monkeypatch)
    children = []

    def child(command, **kwargs):
        children.append(command)
        run = {"variant": "x", "loss": 1.0, "seconds": [1.0], "peak_bytes": 1}
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(run) + "\n")

    monkeypatch.setattr(loss.subprocess, "run", child)
    monkeypatch.setattr(sys, "argv", ["loss.py", "--seq-len", "64", "--vocab", "128", "--device", "cpu"])
    loss.main()
    assert not any(results.iterdir())
    out = tmp_path / "l.json"
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--out", str(out)])
    loss.main()
    assert json.loads(out.read_text())["shape"]["seq_len"] == 64 and not any(results.iterdir())
    assert all("--seq-len=64" in command for command in children)


class _FakePacked:
    forwards = 0

    def __init__(self, model_dir, budget, requests):
        import torch

        self.engine = SimpleNamespace(device=torch.device("cpu"))

    def __call__(self, inputs):
        import torch

        self.forwards += 1
        return torch.ones(len(inputs), 4)

    def close(self):
        pass


def test_a_quick_pooling_run_writes_only_to_an_out_given(tmp_path, monkeypatch, load_benchmark):
    # pooling-cpu.json, the README's pooling table, was rewritten by every run, --quick or not.
    import torch

    pooling = load_benchmark("pooling")
    results = _results_untouched(tmp_path, pooling, monkeypatch)
    monkeypatch.setattr(pooling, "build_model", lambda out, hidden, layers, vocab: (
        SimpleNamespace(pad_token_id=0), 1000))
    monkeypatch.setattr(pooling, "make_inputs", lambda tokenizer, count, low, high: [[1] * low] * count)
    monkeypatch.setattr(pooling, "Packed", _FakePacked)
    import transformers  # (pooling.main imports AutoModel from it when it runs, after retnet's import)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(pooling, "one_by_one", lambda model, inputs: torch.ones(len(inputs), 4))
    monkeypatch.setattr(pooling, "padded", lambda model, groups, pad: torch.ones(sum(map(len, groups)), 4))
    monkeypatch.setattr(sys, "argv", ["pooling.py", "--quick", "--repeats", "1"])
    pooling.main()
    assert not any(results.iterdir())
    out = tmp_path / "p.json"
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--out", str(out)])
    pooling.main()
    written = json.loads(out.read_text())
    assert written["quick"] is True and written["inputs"] == 64 and written["repeats"] == 1
    assert not any(results.iterdir())


def test_a_quick_serve_run_writes_only_to_an_out_given(tmp_path, monkeypatch, load_benchmark, with_repo_on_path):
    # serve-cpu.json (the README's serving table), and --engine-only's and --structured's files, were rewritten
    # by every run.
    serve = load_benchmark("serve")
    results = _results_untouched(tmp_path, serve, monkeypatch)
    monkeypatch.setattr(serve, "build_models", lambda tmp, hidden, layers, vocab: (tmp, None, {"retnet": 1}))
    monkeypatch.setattr(serve, "free_port", lambda: 0)
    monkeypatch.setattr(serve, "Server", lambda cmd, port: SimpleNamespace(stop=lambda: None))

    async def load(server, concurrency, prompt, max_tokens, extra=None):
        return {"concurrency": concurrency, "tokens_per_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 1.0,
                "itl_p50_ms": 1.0, "itl_p99_ms": 1.0, "peak_rss_mb": 1.0}

    monkeypatch.setattr(serve, "load", load)
    monkeypatch.setattr(serve, "engine_steps", lambda report, *args: report.update(engine={"rows": []}))
    for mode in ([], ["--engine-only"], ["--structured"]):
        run = ["serve.py", "--quick", "--concurrency", "1", *mode]
        monkeypatch.setattr(sys, "argv", run)
        serve.main()
        assert not any(results.iterdir()), mode
        out = tmp_path / f"s{len(mode)}{mode and mode[0]}.json"
        monkeypatch.setattr(sys, "argv", [*run, "--out", str(out)])
        serve.main()
        assert json.loads(out.read_text())["quick"] is True and not any(results.iterdir()), mode
