"""``python benchmarks/speculative.py --quick``: a smoke run that speculates, so its check that speculation keeps
the greedy text has drafts to check."""

from __future__ import annotations

import json
import sys

import torch


def test_a_quick_ngram_run_drafts(tmp_path, monkeypatch, load_benchmark):
    bench = load_benchmark("speculative")
    small = ["--hidden", "32", "--layers", "1", "--lead", "8", "--threads", str(torch.get_num_threads())]
    monkeypatch.setattr(sys, "argv", ["speculative.py", "--quick", *small, "--out", str(tmp_path / "s.json")])
    bench.main()
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    # Once it had only the repeats case, whose 32 tokens drew no draft: acceptance None, nothing verified.
    assert sum(row["draft_tokens_per_round"] for row in rows) > 0
    assert any(row["acceptance_rate"] == 1.0 for row in rows)
