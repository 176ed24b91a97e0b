"""Prometheus counts of a request's choices: time to first token once a request, and how its choices ended."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[str, float]:
    return {s.name + str(sorted(s.labels.items()) or ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_time_to_first_token_is_observed_once_a_prompt_not_once_a_choice(open_app):
    # Each of the n choices observed it (6 for two prompts of n=3): a request with n=8 weighed 8 times one with
    # n=1 in the histogram, its first token's latency repeated. vLLM observes it once a request (a prompt).
    async with open_app() as client:
        r = await client.post("/v1/completions", json={"prompt": ["hello", "world"], "n": 3, "max_tokens": 3,
                                                       "temperature": 1, "ignore_eos": True})
        assert r.status_code == 200, r.text
        now = samples((await client.get("/metrics")).text)
    assert now["retnet_time_to_first_token_seconds_count"] == 2
    assert now["retnet_inter_token_latency_seconds_count"] == 6 * 2
    assert now["retnet_generation_tokens_total"] == 6 * 3


async def test_a_choice_ending_in_the_step_its_sibling_fails_counts_as_finished(open_app, monkeypatch):
    # Choice 0 reaches max_tokens in the very step choice 1 raises: it ended normally (its text whole), as one
    # that ended a step earlier did, so it counts once, as finished; the one that raised counts as failed.
    from retnet.serve.engine import Engine

    advance = Engine._advance

    def failing(self, seq, row, sample):
        if seq.index == 1 and len(seq.tokens) == 2:
            raise RuntimeError("simulated decoder failure")
        return advance(self, seq, row, sample)

    monkeypatch.setattr(Engine, "_advance", failing)
    async with open_app() as client:
        r = await client.post("/v1/completions", json={"prompt": "boom", "n": 2, "max_tokens": 3,
                                                       "temperature": 0, "ignore_eos": True})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
        now = samples((await client.get("/metrics")).text)
    assert now["retnet_sequences_submitted_total"] == 2
    assert now["retnet_sequences_finished_total[('finished_reason', 'length')]"] == 1
    assert now["retnet_sequences_failed_total"] == 1
    assert now.get("retnet_sequences_cancelled_total", 0) == 0


def test_a_first_token_after_minutes_in_the_queue_falls_in_a_bucket_of_its_own():
    # Time to first token counts the queue's wait: the buckets ended at 30 s, so a wait of minutes fell in +Inf and a
    # quantile of any such waits read 30 s.
    from retnet.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    for seconds in (45.0, 200.0, 900.0):
        metrics.ttft.observe(seconds)
    now = samples(metrics.render()[0].decode())
    buckets = {key: value for key, value in now.items() if key.startswith("retnet_time_to_first_token_seconds_bucket")}
    counts = [buckets[f"retnet_time_to_first_token_seconds_bucket[('le', '{le}')]"] for le in ("30.0", "60.0", "300.0",
                                                                                               "1200.0", "+Inf")]
    assert counts == [0, 1, 2, 3, 3]
