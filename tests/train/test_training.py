"""End-to-end runs: real processes (``torchrun`` and scripts calling ``main``), checkpoints, resume,
signals, bad input, and the tiny preset learning on the embedded stdlib corpus."""

import hashlib
import io
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.checkpoint import list_checkpoints, verify_checkpoint

from .conftest import micro_args, wait_while_running


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_second_run_in_the_process_logs_to_the_current_stderr(micro, tmp_path, monkeypatch):
    """``main`` again after the first run's stderr was replaced and closed (capsys, a notebook cell with
    redirected output): the records reach the stderr of the second run, not a "Logging error" about the
    closed one, and the second run adds no second handler."""
    root = logging.getLogger("retnet")
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process: the first run adds the handler
    monkeypatch.setattr(root, "propagate", root.propagate)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    assert main(micro(tmp_path / "first", train__steps=1)) == 0
    assert "parameters" in first.getvalue()
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    assert main(micro(tmp_path / "second", train__steps=1)) == 0
    err = second.getvalue()
    assert "Logging error" not in err
    assert err.count("optimizer: AdamW") == 1  # a start-up record, once
    assert len(root.handlers) == 1


# ----------------------------------------------------------------------------------------------------------
# Bad input (in-process: main() returns the exit status and prints the error)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("--data.dataset={tmp}/missing/docs.jsonl", "missing/docs.jsonl"),
    ("--data.tokenizer={tmp}/no-tokenizer", "no-tokenizer"),
    ("--optim.betas=0.9", "optim.betas"),
    ("--train.steps=many", "train.steps"),
    ("--data.dataset=nobody/no-such-dataset", "could not be loaded from the hub"),
])
def test_bad_input_is_a_clear_error(override, message, micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*micro(out), override.format(tmp=tmp_path)]) == EXIT_CONFIG
    assert message in capsys.readouterr().err
    assert not list_checkpoints(out / "checkpoints")


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(micro, tmp_path, capsys, read_metrics):
    """An absurd learning rate (after a checkpoint at step 2) blows the weights up to inf: the run stops with
    exit status 3 and a message naming the last good checkpoint, which still verifies; nothing is exported."""
    from retnet.train.__main__ import EXIT_NONFINITE

    out = tmp_path / "run"
    assert main(micro(out, checkpoint__interval=2, train__steps=2)) == 0
    before = _tree_digest(out / "checkpoints")
    status = main(micro(out, checkpoint__interval=2, train__steps=40, optim__lr=1e30, optim__min_lr=1e30,
                        optim__grad_clip=0, train__resume="auto"))
    err = capsys.readouterr().err
    assert status == EXIT_NONFINITE, err
    assert "loss is" in err and "step_00000002" in err
    assert _tree_digest(out / "checkpoints") == before
    assert verify_checkpoint(out / "checkpoints" / "step_00000002")["step"] == 2
    assert not (out / "export").exists()


def test_nonfinite_gradient_stops_before_the_update(micro, tmp_path, monkeypatch, capsys):
    """A finite loss whose gradients are NaN must not reach AdamW: the step would turn every weight into NaN
    and the checkpoint of that step would be saved with them. The run stops with exit status 3 instead."""
    from retnet.train.__main__ import EXIT_NONFINITE
    from retnet.train.trainer import Trainer

    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    loss = Trainer._loss
    monkeypatch.setattr(Trainer, "_loss", lambda self, blocks: NanGradient.apply(loss(self, blocks))
                        if self.step == 1 else loss(self, blocks))
    out = tmp_path / "run"
    assert main(micro(out, checkpoint__interval=1, train__steps=4)) == EXIT_NONFINITE
    assert "gradient norm is nan" in (err := capsys.readouterr().err) and "step_00000001;" in err
    for ckpt in list_checkpoints(out / "checkpoints"):
        state = torch.load(ckpt / "model.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt.name


def test_print_config_shows_the_resolved_values_and_trains_nothing(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert main(["--config", "tiny", "--print-config", "--optim.lr=1e-3", f"--train.output_dir={out}"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["optim"]["lr"] == 1e-3 and resolved["model"]["preset"] == "tiny"
    assert resolved["train"]["steps"] == 600  # from the preset file
    assert not out.exists()


def test_corrupt_checkpoint_is_refused_and_skipped(micro, tmp_path, capsys, read_metrics):
    out = tmp_path / "run"
    assert main(micro(out, checkpoint__interval=2, train__steps=4)) == 0
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    with open(ckpts[-1] / "model.pt", "r+b") as handle:  # flip bytes in the newest checkpoint
        handle.seek(200)
        handle.write(b"\xff\xfe\xfd\xfc")
    before = _tree_digest(out / "checkpoints")

    # An explicitly named corrupt checkpoint: a clear error naming the file, nothing written.
    assert main(micro(out, checkpoint__interval=2, train__steps=6, train__resume=ckpts[-1])) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "step_00000004/model.pt" in err and "corrupt" in err
    assert _tree_digest(out / "checkpoints") == before

    # 'none' with checkpoints present refuses to start over them.
    assert main(micro(out, train__resume="none")) == EXIT_CONFIG
    assert "already holds checkpoints" in capsys.readouterr().err

    # auto: skips the corrupt one, resumes from step 2; the corrupt directory is moved aside, not overwritten.
    assert main(micro(out, checkpoint__interval=2, train__steps=6)) == 0
    assert "step_00000004/model.pt" in capsys.readouterr().err
    aside = list((out / "checkpoints").glob("step_00000004.corrupt-*"))
    assert len(aside) == 1 and _tree_digest(aside[0])["model.pt"] == before["step_00000004/model.pt"]
    assert verify_checkpoint(out / "checkpoints" / "step_00000006")["step"] == 6
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]

    # Every checkpoint corrupt: an error naming them, nothing changed.
    for ckpt in list_checkpoints(out / "checkpoints"):
        (ckpt / "manifest.json").unlink()
    before = _tree_digest(out / "checkpoints")
    assert main(micro(out, train__steps=8)) == EXIT_CONFIG
    assert "no valid checkpoint" in capsys.readouterr().err
    assert _tree_digest(out / "checkpoints") == before


def test_activation_checkpointing_follows_the_same_losses(micro, tmp_path, read_metrics):
    """Recomputing each layer in the backward (packed varlen batches included) changes memory, not results."""
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    assert main(micro(plain, train__steps=3)) == 0
    assert main(micro(recomputed, train__steps=3, train__activation_checkpointing=True)) == 0
    a = [r["loss"] for r in read_metrics(plain)]
    assert [r["loss"] for r in read_metrics(recomputed)] == pytest.approx(a, rel=1e-6)
    assert len(a) == 3 and a[0] != a[-1]


def test_triton_kernels_train_the_packed_documents(micro, tmp_path, monkeypatch, read_metrics):
    """The GPU training path, interpreted on CPU: chunkwise retention on the Triton kernels, forward and
    backward, fed packed rows with ``cu_seqlens`` at every document start; the losses follow those of the
    PyTorch reference path."""
    from retnet.kernels import chunk

    varlen_launches = []
    forward = chunk.chunk_retention_fwd

    def spy(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens, chunks=None):
        varlen_launches.append(cu_seqlens is not None and len(cu_seqlens) > 2)
        return forward(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens, chunks)

    monkeypatch.setattr(chunk, "chunk_retention_fwd", spy)
    # one micro-batch of 2 blocks a step (a packed row of two segments at least: a varlen launch however the documents
    # fall) and one validation micro-batch at each evaluation (it runs the forward kernels only; 4 cost half of the
    # test): each interpreted micro-batch costs seconds, each layer its own launches (one layer: half of them; the
    # kernels' backward still feeds every gradient of the layer's projections)
    common = dict(train__steps=2, train__global_batch_size=2, train__eval_blocks=2, model__num_hidden_layers=1,
                  model__extra__retention_mode="chunkwise")
    monkeypatch.setenv("RETNET_KERNELS", "torch")
    assert main(micro(tmp_path / "reference", **common)) == 0
    assert not varlen_launches
    monkeypatch.setenv("RETNET_KERNELS", "triton")
    assert main(micro(tmp_path / "triton", **common)) == 0
    assert varlen_launches and all(varlen_launches)  # several documents per row, every launch, every step
    reference = [r["loss"] for r in read_metrics(tmp_path / "reference")]
    assert [r["loss"] for r in read_metrics(tmp_path / "triton")] == pytest.approx(reference, rel=1e-5)
    assert len(reference) == 2 and reference[0] != reference[-1]
    assert [r["val_loss"] for r in read_metrics(tmp_path / "triton", "val")] == pytest.approx(
        [r["val_loss"] for r in read_metrics(tmp_path / "reference", "val")], rel=1e-5)


@pytest.fixture(scope="module")
def exported_run(corpus, tokenizer_dir, cache_dir, tmp_path_factory):
    """A 4-step run, evaluated every 2 steps and exported, that two tests read: ``(output directory, the calls of
    the fused loss it made)``."""
    from retnet.model import modeling_retnet

    calls = []
    fused = modeling_retnet.linear_cross_entropy
    out = tmp_path_factory.mktemp("exported") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_retnet, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
        assert main(micro_args(corpus, tokenizer_dir, cache_dir, out, train__steps=4, checkpoint__export=True,
                               train__eval_interval=2)) == 0
    return out, len(calls)


def test_train_export_and_checkpoint_contents(exported_run, read_metrics):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = exported_run
    assert [r["step"] for r in read_metrics(out, "val")] == [0, 2, 4]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "config.json").exists()
    state = torch.load(out / "checkpoints" / "step_00000004" / "trainer.pt", weights_only=False)
    assert state["step"] == 4 and state["ranks"][0]["data"] == {"kind": "packed", "consumed": 16}
    assert set(state["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    tokenizer = AutoTokenizer.from_pretrained(out / "export")
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5


def test_tokens_per_second_leave_out_evaluation_and_checkpoint_time(micro, tmp_path, monkeypatch, read_metrics):
    """A slow evaluation and a slow checkpoint between two records must not lower the next record's
    tokens/s (and MFU): they are not training throughput. The clock jumps 1000 s inside each of them, so the
    check does not depend on how fast this machine runs a step."""
    from retnet.train.trainer import Trainer

    clock, skipped = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + skipped[0])
    evaluate, save = Trainer.evaluate, Trainer.save

    def slow(method):
        def wrapper(self):
            result = method(self)
            if self.step:  # not the evaluation before the first step
                skipped[0] += 1000.0
            return result
        return wrapper

    monkeypatch.setattr(Trainer, "evaluate", slow(evaluate))
    monkeypatch.setattr(Trainer, "save", slow(save))
    out = tmp_path / "run"
    assert main(micro(out, train__steps=4, train__eval_interval=2, checkpoint__interval=3)) == 0
    assert skipped[0] >= 2000.0  # the eval after step 2 and the save after step 3 (and the final ones)
    records = read_metrics(out)
    tokens_per_step = 4 * 32
    seconds = {r["step"]: tokens_per_step / r["tokens_per_s"] for r in records}
    assert sorted(seconds) == [1, 2, 3, 4]
    assert all(s < 100 for s in seconds.values()), seconds  # steps 3 and 4 follow the slow eval and save


def test_streaming_jsonl_trains_and_resumes(micro, tmp_path, read_metrics):
    out = tmp_path / "run"
    args = micro(out, data__streaming=True, data__val_documents=10, checkpoint__interval=2)
    assert main([*args, "--train.steps=3"]) == 0
    state = torch.load(out / "checkpoints" / "step_00000003" / "trainer.pt", weights_only=False)
    data = state["ranks"][0]["data"]
    assert data["kind"] == "streaming" and data["position"] == 12 and data["documents"] > 0 and data["seen"]
    assert data["stream"]["epoch"] == data["epoch"] == 0 and data["buffer"].ndim == 1
    assert main([*args, "--train.steps=5"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------------------------------
# Processes: kill/resume, SIGTERM, DDP, FSDP2
# ----------------------------------------------------------------------------------------------------------
HOLD_AFTER_STEP = """
import sys, threading
from retnet.train.__main__ import main
from retnet.train.trainer import Trainer

hold, step = int(sys.argv[1]), Trainer.train_step

def train_step(self):
    loss = step(self)
    if self.step == hold:
        threading.Event().wait()  # until the test's SIGKILL, however late it comes
    return loss

Trainer.train_step = train_step
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigkill_then_resume_replays_the_same_losses(micro, tmp_path, run_here, read_metrics):
    """The killed run is a process of its own; the reference and the resume need none (in this process). The killed
    run holds after step 7 (its checkpoints of steps 3 and 6 written): the SIGKILL, sent once a checkpoint is
    complete, lands before the run ends however slowly this process gets to send it (the run left after its first
    checkpoint takes a few seconds: a loaded machine can keep this process from sending it that long)."""
    import subprocess

    from .conftest import REPO, train_env

    # 8 steps: the killed run holds after step 7, so it never ends; the resume replays steps 4-8 or 7-8
    common = dict(train__steps=8, checkpoint__interval=3, model__dropout=0.1)  # dropout: RNG state matters
    reference = tmp_path / "reference"
    done = run_here(micro(reference, **common))
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    script = tmp_path / "hold_after_step.py"
    script.write_text(HOLD_AFTER_STEP)
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(script), "7", *micro(out, **common)], cwd=REPO,
                                   env=train_env(), stdout=log, stderr=log)
    wait_while_running(lambda: any((p / "manifest.json").exists() for p in list_checkpoints(out / "checkpoints")), process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    resumed_from = max(int(p.name[5:]) for p in list_checkpoints(out / "checkpoints"))
    assert resumed_from in (3, 6)

    done = run_here(micro(out, **common))  # --train.resume=auto is the default
    assert done.returncode == 0, done.stderr
    assert f"at step {resumed_from}" in done.stderr
    expected = [(r["step"], r["loss"]) for r in read_metrics(reference)]
    got = [(r["step"], r["loss"]) for r in read_metrics(out)]
    assert got == expected  # bit-for-bit on CPU, before and after the resume


@pytest.mark.slow
def test_torch_compile_matches_eager(micro, tmp_path, run_here, read_metrics):
    """``train.compile`` (per-layer torch.compile, inductor on CPU) trains the packed varlen batches and
    follows the eager run's losses. Both in this process: only the run's own modules are compiled."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    # (one layer, two steps: inductor's compile of the layer's forward and backward is what takes the time)
    common = dict(train__steps=2, data__seq_len=128, model__hidden_size=128, model__num_attention_heads=4,
                  model__num_hidden_layers=1, model__chunk_size=64, train__global_batch_size=8,
                  train__micro_batch_size=8)
    assert run_here(micro(eager, **common)).returncode == 0
    # dynamo warns once a process and reuses the layers' compiled code: as a fresh process would trace them
    torch._dynamo.reset()
    torch._dynamo.utils.warn_once_cache.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = run_here(micro(compiled, **common, train__compile=True))
    assert done.returncode == 0, done.stderr[-3000:]
    # dynamo traces the layers without complaint (it warned at a functools.cache the reference ops called once)
    assert not [str(w.message) for w in caught if "Dynamo" in str(w.message)]
    a = [r["loss"] for r in read_metrics(eager)]
    b = [r["loss"] for r in read_metrics(compiled)]
    assert len(a) == len(b) == 2
    assert b == pytest.approx(a, rel=1e-4)


# One torchrun launch of 2 ranks (each start imports torch and transformers: ~10 s of CPU a rank) checks two things
# in turn: the ranks waiting in the barrier for rank 0 longer than the process group's timeout, then a run whose
# SIGTERM reaches rank 1 alone
TWO_RANKS = """
import datetime, os, signal, sys, time
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.distributed.constants import default_pg_timeout
from retnet.train.__main__ import main
from retnet.train.distributed import barrier, init_distributed
from retnet.train.trainer import Trainer

rank, _, _, _ = init_distributed("cpu")  # main's own call keeps this process group
# The training group's timeout (10 min for NCCL, 30 for gloo) cut short once both ranks are in the group: while they
# start, a rank that imported torch seconds after the other (a loaded machine) would miss a short one
c10d._set_pg_timeout(datetime.timedelta(seconds=3))
barrier()
if rank == 0:
    time.sleep(5)  # tokenizing the dataset, downloading it, writing a checkpoint or the export
barrier()
dist.all_reduce(torch.ones(1))  # the training collectives still run on the default group
os.write(1, f"rank {rank} waited\\n".encode())  # one write: the ranks share torchrun's stdout, print() interleaves
c10d._set_pg_timeout(default_pg_timeout)  # the run's collectives: the timeout a launch gives them

step = Trainer.train_step

def train_step(self):
    loss = step(self)
    if self.rank == 1 and self.step == 2:  # after this step's all-reduce, before the loop checks for a stop
        os.kill(os.getpid(), signal.SIGTERM)
    return loss

Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def two_rank_launch(corpus, tokenizer_dir, cache_dir, tmp_path_factory):
    """The finished ``TWO_RANKS`` launch: ``(its return code, its output, the run's output directory)``."""
    import subprocess

    tmp_path = tmp_path_factory.mktemp("two-ranks")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
               *micro_args(corpus, tokenizer_dir, cache_dir, out, train__steps=50)]
    log = tmp_path / "log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=repo, env=env, stdout=handle, stderr=handle)
    try:
        process.wait(timeout=600)  # a hang's bound: two ranks starting on a loaded CI machine take minutes
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun passes it on to its workers and kills them after a grace period
        process.wait(timeout=120)
        pytest.fail("the ranks hung (in the wait for rank 0, or did not stop together):\n" + log.read_text()[-3000:])
    return process.returncode, log.read_text(), out


@pytest.mark.slow
def test_ranks_wait_for_rank_0_longer_than_the_process_group_timeout(two_rank_launch):
    """Local rank 0 prepares the data caches (hours for a large set) and rank 0 writes checkpoints and the export
    while the other ranks wait in a barrier: that wait must not end in the process group's timeout."""
    returncode, log, _ = two_rank_launch
    assert all(f"rank {r} waited" in log for r in range(2)), log[-3000:]
    assert returncode == 0, log[-3000:]


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(two_rank_launch, read_metrics):
    """A SIGTERM that reaches one rank between the step's all-reduce and the loop's check must not let that
    rank leave the loop alone (the others would wait in the next step's collectives for ever): every rank
    stops at the step they agree on, saves and exits 0."""
    returncode, log, out = two_rank_launch
    assert returncode == 0, log[-3000:]
    (checkpoint,) = list_checkpoints(out / "checkpoints")
    step = verify_checkpoint(checkpoint)["step"]
    assert 2 <= step < 50 and read_metrics(out)[-1]["step"] == step


# ----------------------------------------------------------------------------------------------------------
# The tiny preset on the embedded corpus
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_preset_learns_on_stdlib_and_exports(tmp_path, run_here, read_metrics):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    # The tiny preset, shortened: fewer steps, shorter blocks, the first 40 stdlib files (4 of them the validation
    # split; ~4000 training blocks, more than the 640 it trains on). 40 steps take the validation loss from uniform
    # (8.3 nats) to ~6.2.
    done = run_here(["--config", "tiny", f"--train.output_dir={out}", f"--data.cache_dir={tmp_path / 'cache'}",
                "--data.max_documents=40", "--data.val_fraction=0.1", "--data.seq_len=64",
                "--data.tokenizer_train_chars=150000", "--train.steps=40", "--train.eval_interval=40",
                "--train.eval_blocks=32", "--optim.warmup_steps=4", "--logging.progress=false",
                "--logging.tensorboard=false"])
    assert done.returncode == 0, done.stderr
    val = [r["val_loss"] for r in read_metrics(out, "val")]
    assert val[0] > 7.5 and val[-1] < val[0] - 1.5, val
    assert (out / "loss.png").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    tokenizer = AutoTokenizer.from_pretrained(out / "export")
    ids = tokenizer("import os\n", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert generated.shape[1] > ids.shape[1] and isinstance(tokenizer.decode(generated[0]), str)
    assert os.path.exists(out / "export" / "model.safetensors")


def test_a_tokenizer_with_ids_beyond_its_length_trains(micro, tmp_path, tokenizer_dir):
    """A tokenizer of 512 tokens whose ids reach 900 (a gap in its vocabulary): the model's embedding covers
    every id it produces (with len(tokenizer) rows, id 900 was an IndexError, a device-side assert on GPU,
    at the first batch that held it)."""
    import json
    import shutil

    from retnet.train.checkpoint import load_checkpoint

    gappy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, gappy)
    spec = json.loads((gappy / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] = 900  # a frequent merge ("mple"): in most blocks of the corpus
    (gappy / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "run"
    assert main(micro(out, train__steps=3, data__tokenizer=gappy, data__cache_dir=tmp_path / "cache")) == 0
    model = load_checkpoint(out / "checkpoints" / "step_00000003")["model"]
    assert model["model.embed_tokens.weight"].shape[0] == 901


def test_training_takes_the_loss_without_logits_and_the_export_returns_them(exported_run, micro, tmp_path,
                                                                            monkeypatch):
    """retnet-train computes the loss from the hidden states (no [B, T, vocab] logits); the model it exports
    is a plain one that returns its logits in training mode too."""
    import json

    from retnet.model import modeling_retnet

    out, fused_calls = exported_run
    assert fused_calls == 4 * 2  # 4 steps of 2 micro-batches (the evaluations, in eval mode, take the logits)
    assert json.loads((out / "export" / "config.json").read_text())["fuse_linear_cross_entropy"] is False
    calls = []
    fused = modeling_retnet.linear_cross_entropy
    monkeypatch.setattr(modeling_retnet, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    assert main(micro(tmp_path / "plain", train__steps=1, **{"model.extra.fuse_linear_cross_entropy": "false"})) == 0
    assert not calls
