"""benchmarks/quantization.py's output: the README's *Weight-only int8* table quotes its recorded full run."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.quantization import QuantizationReport

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _benchmark(monkeypatch, load_benchmark):
    """The script as a module, its training, quantization, eval and timing replaced by instant stand-ins."""
    bench = load_benchmark("quantization")
    config = RetNetConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=1)
    monkeypatch.setattr(bench, "build_trained", lambda *args: (RetNetForCausalLM(config).eval(), None))
    monkeypatch.setattr(bench, "quantize_model", lambda model, method: QuantizationReport(method, 7, 4, 1, 5, 2))
    monkeypatch.setattr(bench, "eval_documents", lambda *args: [])
    scored = SimpleNamespace(documents=1, tokens=10, loss=1.0, perplexity=2.7)
    monkeypatch.setattr(bench, "evaluate", lambda *args, **kwargs: scored)
    monkeypatch.setattr(bench, "decode_rates", lambda models, *args: {name: 1.0 for name in models})
    return bench


def test_a_quick_run_writes_only_to_an_output_given(tmp_path, monkeypatch, load_benchmark):
    # A quick run once overwrote benchmarks/results/quantization-cpu.json, the full run the README's table quotes.
    bench = _benchmark(monkeypatch, load_benchmark)
    recorded = BENCHMARKS / "results" / "quantization-cpu.json"
    before = recorded.read_bytes()
    monkeypatch.setattr(sys, "argv", ["quantization.py", "--quick", "--device", "cpu"])
    bench.main()
    assert recorded.read_bytes() == before
    monkeypatch.setattr(sys, "argv", ["quantization.py", "--quick", "--device", "cpu", "--output",
                                      str(tmp_path / "q.json")])
    bench.main()
    written = json.loads((tmp_path / "q.json").read_text())
    assert written["quick"] is True and written["report"]["layers"] == 7
