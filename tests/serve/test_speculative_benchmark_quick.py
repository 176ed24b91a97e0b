"""``python benchmarks/speculative.py --quick``: a smoke run that speculates (its check that speculation keeps the
greedy text has drafts to check) and writes no JSON unless ``--out`` names one (the recorded full runs stay)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_a_quick_ngram_run_drafts_and_writes_only_to_an_out_given(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repository first on it
    spec = importlib.util.spec_from_file_location("speculative_benchmark", BENCHMARKS / "speculative.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recorded = {path: path.read_bytes() for path in (BENCHMARKS / "results").glob("speculative*.json")}
    assert recorded
    small = ["--hidden", "32", "--layers", "1", "--lead", "8", "--threads", str(torch.get_num_threads())]
    monkeypatch.setattr(sys, "argv", ["speculative.py", "--quick", *small, "--out", str(tmp_path / "s.json")])
    bench.main()
    assert {path: path.read_bytes() for path in recorded} == recorded
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    # Once it had only the repeats case, whose 32 tokens drew no draft: acceptance None, nothing verified.
    assert sum(row["draft_tokens_per_round"] for row in rows) > 0
    assert any(row["acceptance_rate"] == 1.0 for row in rows)
