"""The /metrics help of the pooling engine's counters names every route that feeds them: /score and /rerank run
their pairs (or an embedding model's texts) through the same forwards as /classify, /pooling and /v1/embeddings."""

from __future__ import annotations

from prometheus_client import generate_latest

from retnet.serve.metrics import ServeMetrics


def test_pooling_inputs_help_names_the_score_and_rerank_routes():
    exposition = generate_latest(ServeMetrics().registry).decode()
    (help_line,) = [
        line for line in exposition.splitlines() if line.startswith("# HELP retnet_pooling_inputs_total ")
    ]
    for route in ("/classify", "/pooling", "/v1/embeddings", "/score", "/rerank"):
        assert route in help_line, (route, help_line)
