"""Resume exactness, kept from a randomised differential driver: runs of drawn settings (pretraining, streamed, chat,
prompt/completion, DPO, reward, GRPO and distillation data; AdamW or Muon; accumulation, schedules, LoRA, mixtures,
evaluation and checkpoint intervals, full or sharded checkpoints) stopped by a SIGTERM or crashed after a checkpoint,
then resumed, compared with the run never stopped: metrics.jsonl, the final checkpoint (weights, optimizer, trainer
state) and the export. In-process runs (``main`` returns the exit status)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from retnet.train import checkpoint as ckpt_module
from retnet.train.__main__ import main
from retnet.train.checkpoint import list_checkpoints, load_checkpoint
from retnet.train.trainer import Trainer

from .conftest import one_thread
from .test_resume import _interrupt

TIMING = ("time", "tokens_per_s", "mfu")


@pytest.fixture(autouse=True)
def _bit_for_bit():
    """One thread, as the driver ran: the comparisons are exact."""
    with one_thread():
        yield


def _stop(monkeypatch, args: list[str], during_step: int, how: str) -> None:
    with monkeypatch.context() as patch:
        _interrupt(patch, during_step, how)
        if how == "crash":
            with pytest.raises(RuntimeError, match="killed"):
                main(args)
        else:
            assert main(args) == 0


def _records(out: Path, read_metrics) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING}
            for kind in ("train", "val") for r in read_metrics(out, kind)]


def _final_state(out: Path) -> dict:
    ckpt_module._checked.clear()
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    del state["trainer"]["config"]
    return state


def _assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _export_digests(out: Path) -> dict[str, str]:
    export = out / "export"
    return {str(p.relative_to(export)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(export.rglob("*")) if p.is_file()}


def _assert_resumed_as_uninterrupted(whole: Path, stopped: Path, read_metrics) -> None:
    assert _records(stopped, read_metrics) == _records(whole, read_metrics)
    got, expected = _final_state(stopped), _final_state(whole)
    for key in ("step", "model", "optimizer", "trainer"):
        _assert_equal(got[key], expected[key], key)
    assert _export_digests(stopped) == _export_digests(whole)


def test_a_run_stopped_in_its_final_step_ends_as_one_never_stopped(micro, tmp_path, monkeypatch, read_metrics):
    """A SIGTERM in the final step saves it with its evaluation pending. The resume evaluates and exports, and
    saves that step again: its checkpoint said the evaluation was still pending (the step was saved already, so
    the final save skipped it), and each later start of the finished run evaluated the final step again, where
    one of the run never stopped only re-exports. Saved again from a sharded checkpoint under Muon, the optimizer
    is the one loaded: torch's loader gave the AdamW group that holds no parameter (every decayed weight is Muon's)
    the rate it was built with, where the checkpoint held the schedule's."""
    common = dict(train__steps=2, checkpoint__interval=1, checkpoint__export=True, checkpoint__layout="sharded",
                  optim__name="muon", optim__schedule="linear")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(micro(whole, **common)) == 0
    assert [len(group["params"]) for group in _final_state(whole)["optimizer"]["param_groups"]][1] == 0
    _stop(monkeypatch, micro(stopped, **common), during_step=2, how="signal")
    assert _final_state(stopped)["trainer"]["pending_eval"] is True
    assert not (stopped / "export").exists()
    assert main(micro(stopped, **common)) == 0
    _assert_resumed_as_uninterrupted(whole, stopped, read_metrics)

    evaluated = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self: evaluated.append(self.step) or evaluate(self))
    assert main(micro(stopped, **common)) == 0
    assert evaluated == []


def test_a_streamed_mixture_crashed_then_stopped_resumes_as_one_never_stopped(micro, corpus, tmp_path, monkeypatch,
                                                                              read_metrics):
    """Coverage kept from the driver (~800 drawn runs matched once the test above was fixed): two streamed sources,
    3 micro-batches a step, a warmup into a cosine decay, evaluations and checkpoints every 2 steps (one kept). A
    crash in step 3 resumes from step 2's checkpoint, a SIGTERM in step 4 saves it with its evaluation pending."""
    from retnet.train.data import stdlib_files

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f.read_text(errors="replace")[:2000]}) + "\n"
                             for f in stdlib_files()[150:190]))
    args = [*micro(tmp_path / "unused", data__streaming=True, data__val_documents=10, train__steps=5,
                   train__global_batch_size=6, train__micro_batch_size=2, optim__warmup_steps=2, optim__lr=1e-2,
                   train__eval_interval=2, checkpoint__interval=2, checkpoint__keep_last=1, model__dropout=0.1),
            f'--data.mixture.docs={{dataset="{corpus}", weight=0.7}}', f'--data.mixture.other={{dataset="{other}", '
            'weight=0.3}']
    args = [a for a in args if not a.startswith(("--data.dataset=", "--train.output_dir="))]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main([*args, f"--train.output_dir={whole}"]) == 0
    _stop(monkeypatch, [*args, f"--train.output_dir={stopped}"], during_step=3, how="crash")
    assert [p.name for p in list_checkpoints(stopped / "checkpoints")] == ["step_00000002"]
    _stop(monkeypatch, [*args, f"--train.output_dir={stopped}"], during_step=4, how="signal")
    assert _final_state(stopped)["trainer"]["pending_eval"] is True
    assert main([*args, f"--train.output_dir={stopped}"]) == 0
    _assert_resumed_as_uninterrupted(whole, stopped, read_metrics)
    assert {"val_loss.docs", "val_loss.other"} <= set(read_metrics(whole, "val")[0])

@pytest.mark.parametrize("binary", ["binary", "large_binary"])
def test_a_later_parquet_file_of_bytes_is_refused_naming_it(binary, tmp_path):
    """As a first file of bytes is refused: datasets casts a later file's column to the first file's strings, bytes
    of UTF-8 silently (they trained as documents), others failing with an error that names no file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retnet.train.config import ConfigError, DataConfig
    from retnet.train.data import load_documents, local_files

    pq.write_table(pa.table({"text": pa.array(["a first document", "a second one"])}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": pa.array([b"bytes of UTF-8", b"more"], getattr(pa, binary)())}),
                   tmp_path / "b.parquet")
    spec = str(tmp_path / "*.parquet")
    with pytest.raises(ConfigError, match=re.escape(f"'text' of '{tmp_path / 'b.parquet'}' holds {binary} values")):
        load_documents(DataConfig(dataset=spec), local_files(spec), tmp_path / "cache")


@pytest.mark.parametrize(("rows", "line"), [
    ('{"text": "a first document"}\n{"text": NaN}\n{"text": "a third"}\n', "line 2: 'text' holds NaN"),
    ('{"text": "a first document", "score": 1}\n{"text": [-Infinity]}\n', "line 2: 'text' holds -Infinity"),
    # named by its row: the first line holding the word is a string's
    ('[\n {"text": "what NaN and Infinity mean"},\n {"text": Infinity}\n]\n', "row 2: 'text' holds Infinity"),
], ids=["jsonl-nan", "jsonl-nested-infinity", "array"])
def test_a_non_finite_json_number_is_refused_naming_its_line(rows, line, tmp_path):
    """NaN and Infinity are no JSON: pyarrow refuses the file, and datasets then reads it with pandas, which reads a
    NaN as null, and the row was dropped as a null document. The words inside a string are text."""
    from retnet.train.config import ConfigError, DataConfig
    from retnet.train.data import load_documents, local_files

    path = tmp_path / "docs.jsonl"
    path.write_text(rows)
    with pytest.raises(ConfigError, match=re.escape(f"'{path}', {line}: not JSON")):
        load_documents(DataConfig(dataset=str(path)), local_files(str(path)), tmp_path / "cache")
    # The words in a string are text; a NaN in a column the run does not read keeps its row, as it always did.
    path.write_text('{"text": "NaN and Infinity are words here", "score": NaN}\n{"text": "a second, NaN", '
                    '"score": -Infinity}\n')
    assert load_documents(DataConfig(dataset=str(path)), local_files(str(path)), tmp_path / "cache2") == \
        ["NaN and Infinity are words here", "a second, NaN"]
