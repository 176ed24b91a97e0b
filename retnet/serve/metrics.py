"""Prometheus metrics, on a registry of the app's own (several apps in one process do not clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Time to first token includes the wait in the queue (--max-queue), minutes on a loaded server: ended at 30 s, every
# such wait fell in +Inf and histogram_quantile reported 30 s for any of them (vLLM's buckets reach 2560 s).
TTFT_BUCKETS = (*LATENCY_BUCKETS, 60.0, 120.0, 300.0, 600.0, 1200.0, 2400.0)


class ServeMetrics:
    """Every metric the server exports; the engine and the routes update them (prometheus-client is
    thread-safe, so the scheduler thread writes directly)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("retnet_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("retnet_prompt_tokens", "prompt tokens received", registry=r)
        self.generation_tokens = Counter("retnet_generation_tokens", "tokens generated", registry=r)
        self.prefill_tokens = Counter("retnet_prefill_tokens", "prompt tokens run through the model", registry=r)
        self.prefix_cache_hits = Counter("retnet_prefix_cache_hits", "prompts that started from a cached prefix state",
                                         registry=r)
        self.prefix_cache_misses = Counter("retnet_prefix_cache_misses", "prompts with no cached prefix", registry=r)
        self.prefix_cache_evictions = Counter("retnet_prefix_cache_evictions", "prefix-cache states evicted (least "
                                              "recently used first) to stay within --prefix-cache-entries and "
                                              "--prefix-cache-bytes", registry=r)
        self.prefix_cache_hit_tokens = Counter("retnet_prefix_cache_hit_tokens",
                                               "prompt tokens not prefilled thanks to a cached prefix", registry=r)
        self.session_resumes = Counter("retnet_session_resumes", "requests that continued a saved session", registry=r)
        # --session-dir: the files behind the sessions held in memory.
        self.session_writes = Counter("retnet_session_writes", "session states written to --session-dir (a turn "
                                      "superseded by the next before its write is not written)", registry=r)
        self.session_write_failures = Counter("retnet_session_write_failures", "session states that could not be "
                                              "written to --session-dir (the session stays in memory)", registry=r)
        self.session_loads = Counter("retnet_session_loads", "sessions not in memory read back from --session-dir",
                                     registry=r)
        self.session_load_failures = Counter("retnet_session_load_failures", "session files refused, by reason: "
                                             "session_model_changed, session_corrupt, session_lost, "
                                             "session_not_a_file (409), session_unavailable (503, the file could "
                                             "not be read now)", ["reason"],
                                             registry=r)
        self.session_sweep_failures = Counter("retnet_session_sweep_failures", "sweeps of --session-dir for "
                                              "expired files that failed (the directory removed or unreadable); the "
                                              "writer goes on", registry=r)
        # Every sequence submitted ends counted once, finished, failed or cancelled: with none in the engine,
        # submitted = finished + failed + cancelled.
        self.submitted = Counter("retnet_sequences_submitted", "sequences the engine accepted (a request's prompts "
                                 "x n); each ends finished, failed or cancelled", registry=r)
        self.finished = Counter("retnet_sequences_finished", "sequences that ended normally, by finished_reason "
                                "(stop, length: vLLM's request_success)", ["finished_reason"], registry=r)
        self.cancelled = Counter("retnet_sequences_cancelled", "sequences cancelled (client gone, shutdown)",
                                 registry=r)
        self.failed = Counter("retnet_sequences_failed", "sequences of requests that failed alone (a 500 "
                              "internal_error: their decoder, grammar ... raised; the engine served on), the "
                              "request's other choices with them; and those in the engine when it died", registry=r)
        self.structured = Counter("retnet_structured_requests", "requests held to a grammar, by the field that asked "
                                  "(response_format, guided_json ..., tool_choice)", ["field"], registry=r)
        self.model_requests = Counter("retnet_model_requests", "requests submitted, by the model they named: the "
                                      "base model or a LoRA adapter (vLLM's model_name label)", ["model_name"],
                                      registry=r)
        # vLLM's spec_decode counters (--speculative-config): acceptance rate = accepted / draft tokens.
        self.spec_drafts = Counter("retnet_spec_decode_num_drafts", "steps in which a sequence proposed draft "
                                   "tokens (one a sequence a step)", registry=r)
        self.spec_draft_tokens = Counter("retnet_spec_decode_num_draft_tokens", "draft tokens proposed",
                                         registry=r)
        self.spec_accepted_tokens = Counter("retnet_spec_decode_num_accepted_tokens", "draft tokens accepted (the "
                                            "token sampled there was the draft)", registry=r)
        self.preemptions = Counter("retnet_preemptions", "running sequences preempted for a request of a better "
                                   "priority (--scheduling-policy priority); each keeps its state and resumes where "
                                   "it stopped", registry=r)
        self.rejected = Counter("retnet_requests_rejected", "requests refused before running", ["reason"], registry=r)
        self.queue_depth = Gauge("retnet_queue_depth", "sequences waiting for a slot", registry=r)
        self.running = Gauge("retnet_running_sequences", "sequences in the batched decode step", registry=r)
        self.prefilling = Gauge("retnet_prefilling_sequences", "sequences being prefilled", registry=r)
        self.prefix_cache_entries = Gauge("retnet_prefix_cache_entries", "states in the prefix cache", registry=r)
        self.prefix_cache_bytes = Gauge("retnet_prefix_cache_bytes", "bytes of state in the prefix cache", registry=r)
        self.sessions = Gauge("retnet_sessions", "saved sessions", registry=r)
        self.lora_adapters = Gauge("retnet_lora_adapters", "LoRA adapters served (--lora-modules and those loaded "
                                   "at runtime)", registry=r)
        self.lora_adapters_loaded = Gauge("retnet_lora_adapters_loaded", "LoRA adapters whose matrices are installed "
                                          "in the model; the others served are read again when a request needs "
                                          "them (--max-cpu-loras)", registry=r)
        self.lora_reloads = Counter("retnet_lora_reloads", "evicted LoRA adapters read again from their directory "
                                    "(--max-cpu-loras), by outcome: ok, failed, changed", ["outcome"], registry=r)
        self.lora_evictions = Counter("retnet_lora_evictions", "LoRA adapters evicted to make room "
                                      "(--max-cpu-loras)", registry=r)
        # The pooling engine (a classifier's /classify and /pooling, --convert embed's /v1/embeddings and /pooling,
        # and /score and /rerank on either): what its forwards ran.
        self.pooling_inputs = Counter("retnet_pooling_inputs", "inputs pooled: scored by a classifier or embedded "
                                      "(/classify, /pooling, /v1/embeddings; /score and /rerank: each distinct pair, "
                                      "or an embedding model's distinct text)", registry=r)
        self.pooling_tokens = Counter("retnet_pooling_tokens", "tokens of the inputs pooled (scored or embedded)",
                                      registry=r)
        self.pooling_batch = Histogram("retnet_pooling_batch_inputs", "inputs packed together in one pooling "
                                       "forward (a classifier's or an embedding model's)", buckets=BATCH_BUCKETS,
                                       registry=r)
        self.engine_ready = Gauge("retnet_engine_ready", "1 while the engine serves", registry=r)
        self.ttft = Histogram("retnet_time_to_first_token_seconds", "arrival to first token (the queue's wait "
                              "included)", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("retnet_inter_token_latency_seconds", "time between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_batch = Histogram("retnet_prefill_batch_prompts",
                                       "prompt pieces run together in one prefill forward", buckets=BATCH_BUCKETS,
                                       registry=r)
        self.step = Histogram("retnet_decode_step_seconds",
                              "one batched decode step (speculative: its drafts proposed and verified)",
                              buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["ServeMetrics"]
