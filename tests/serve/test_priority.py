"""--scheduling-policy priority (vLLM's): the waiting queue in (priority, arrival) order, and running sequences of a
worse priority preempted for a better one, each keeping its recurrent state and resuming where it stopped. The
engine driven one iteration at a time, the pooling engine's batches, the routes' checks, and a real uvicorn
server."""

import asyncio
import json
import time

import httpx
import pytest
import torch

from retnet.serve.sampling import SamplingParams
from retnet.serve.sequence import EngineFailure
from tests.serve import test_lora_runtime
from tests.serve.conftest import decoding_held, held_serve_env, make_settings

adapter_dirs = test_lora_runtime.adapter_dirs  # its fixture: peft directories "a" and "b"

pytestmark = pytest.mark.anyio

GREEDY = dict(temperature=0.0, ignore_eos=True)
LOW_PROMPT, HIGH_PROMPT = [5, 6, 7, 8, 9], [20, 21, 22]


def engine_with(model_dir, **overrides):
    """An engine whose scheduler the test drives itself (``engine._iteration()``), with ``overrides``' settings."""
    from transformers import AutoTokenizer

    from retnet.model import RetNetForCausalLM
    from retnet.serve.engine import Engine
    from retnet.serve.metrics import ServeMetrics

    engine = Engine(make_settings(model_dir, **overrides), AutoTokenizer.from_pretrained(model_dir), ServeMetrics(),
                    model=RetNetForCausalLM.from_pretrained(model_dir))
    engine._load()
    engine.ready = True
    return engine


def busy(engine) -> bool:
    return bool(engine.waiting or engine.prefilling or engine.joining or engine.running or engine.preempted)


class Outputs:
    """What the handles received, read after each iteration: tokens and text per (handle, choice), and the order in
    which choices finished."""

    def __init__(self, **handles):
        self.handles = handles
        self.tokens = {(name, i): [] for name, h in handles.items() for i in range(h.num_choices)}
        self.text = dict.fromkeys(self.tokens, "")
        self.finished: list[tuple[str, int, str]] = []

    def add(self, name: str, handle) -> None:
        self.handles[name] = handle
        self.tokens.update({(name, i): [] for i in range(handle.num_choices)})
        self.text.update({(name, i): "" for i in range(handle.num_choices)})

    async def read(self) -> None:
        await asyncio.sleep(0)  # the engine queues its outputs with call_soon_threadsafe
        for name, handle in self.handles.items():
            while not handle.queue.empty():
                item = handle.queue.get_nowait()
                assert not isinstance(item, EngineFailure), item.message
                for out in item:
                    self.tokens[name, out.index] += out.token_ids
                    self.text[name, out.index] += out.text
                    if out.finish_reason is not None:
                        self.finished.append((name, out.index, out.finish_reason))


async def step(engine, outputs: Outputs, times: int = 1) -> None:
    for _ in range(times):
        with torch.inference_mode():
            engine._iteration()
        await outputs.read()


async def run_out(engine, outputs: Outputs) -> None:
    for _ in range(500):
        if not busy(engine):
            return
        await step(engine, outputs)
    raise AssertionError("the engine did not finish")


async def alone(model_dir, prompt: list[int], params: SamplingParams, n: int = 1) -> dict:
    """Each choice's tokens and text when the request runs alone (fcfs, nothing else in the server)."""
    engine = engine_with(model_dir)
    outputs = Outputs(only=engine.submit([prompt], params, n=n))
    await run_out(engine, outputs)
    return {i: (outputs.tokens["only", i], outputs.text["only", i]) for i in range(n)}


def preemptions(engine) -> float:
    return engine.metrics.registry.get_sample_value("retnet_preemptions_total")


async def test_a_better_priority_preempts_and_the_preempted_resumes_with_the_same_output(model_dir):
    engine = engine_with(model_dir, scheduling_policy="priority", max_running=1)
    long = SamplingParams(max_tokens=24, **GREEDY)
    low = engine.submit([LOW_PROMPT], long, priority=1, session_id="s")
    outputs = Outputs(low=low)
    await step(engine, outputs, 4)
    generated = len(outputs.tokens["low", 0])
    assert 0 < generated < 24
    high = engine.submit([HIGH_PROMPT], SamplingParams(max_tokens=6, **GREEDY), priority=0)
    outputs.add("high", high)
    await step(engine, outputs)
    # Preempted at once, with the tokens it had: it waits, holding its state, while the better one runs.
    assert [(seq.group.handle, seq.index) for seq, _ in engine.preempted] == [(low, 0)]
    assert [seq.group.handle for seq in engine.running] == [high]
    assert len(outputs.tokens["low", 0]) == generated and preemptions(engine) == 1
    # The preempted sequence waits for a slot.
    assert engine.metrics.registry.get_sample_value("retnet_queue_depth") == 1
    await run_out(engine, outputs)
    assert [name for name, _, _ in outputs.finished] == ["high", "low"]
    expected = await alone(model_dir, LOW_PROMPT, long)
    assert (outputs.tokens["low", 0], outputs.text["low", 0]) == expected[0]
    assert engine.in_system == 0 and preemptions(engine) == 1
    # Its session was saved as after any finished response: the whole prompt and answer.
    session = engine.sessions.sessions["s"]
    assert not session.busy and session.tokens == len(LOW_PROMPT) + 24


async def test_each_choice_is_preempted_on_its_own_and_seeded_sampling_is_unchanged(model_dir):
    # n=2 under --max-running 2: a request of n=1 needs one slot, and takes it from the low request's last choice;
    # its first choice runs on. Both draw from their own seeded generators, which a pause does not touch.
    engine = engine_with(model_dir, scheduling_policy="priority", max_running=2)
    sampled = SamplingParams(max_tokens=20, temperature=1.0, seed=3, top_k=50, ignore_eos=True)
    low = engine.submit([LOW_PROMPT], sampled, n=2, priority=5)
    outputs = Outputs(low=low)
    await step(engine, outputs, 3)
    high = engine.submit([HIGH_PROMPT], SamplingParams(max_tokens=5, **GREEDY), priority=-2)
    outputs.add("high", high)
    await step(engine, outputs)
    assert [seq.index for seq, _ in engine.preempted] == [1]
    assert sorted((seq.group.handle is high, seq.index) for seq in engine.running) == [(False, 0), (True, 0)]
    await run_out(engine, outputs)
    assert outputs.finished.index(("high", 0, "length")) < outputs.finished.index(("low", 1, "length"))
    expected = await alone(model_dir, LOW_PROMPT, sampled, n=2)
    for i in range(2):
        assert (outputs.tokens["low", i], outputs.text["low", i]) == expected[i]
    assert engine.in_system == 0


async def test_preemption_between_speculative_steps_changes_no_token(model_dir):
    # --speculative-config: a sequence whose draft was refused is preempted holding the state from before its
    # step (Sequence.lag); resumed, its next step feeds the tokens since. Preempted after a step that took all its
    # drafts, and after one that refused one (this prompt's 9th iteration, on the micro model).
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                       "prompt_lookup_min": 1})
    params = SamplingParams(max_tokens=40, **GREEDY)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    expected = await alone(model_dir, prompt, params)  # plain decoding: speculation changes no token
    lags = []
    for preempt_at in (4, 9):
        engine = engine_with(model_dir, scheduling_policy="priority", max_running=1, speculative_config=spec)
        outputs = Outputs(low=engine.submit([prompt], params, priority=1))
        await step(engine, outputs, preempt_at)
        lags.append(engine.running[0].lag)
        outputs.add("high", engine.submit([HIGH_PROMPT], SamplingParams(max_tokens=4, **GREEDY)))
        await run_out(engine, outputs)
        assert (outputs.tokens["low", 0], outputs.text["low", 0]) == expected[0], preempt_at
        assert preemptions(engine) == 1 and [name for name, _, _ in outputs.finished] == ["high", "low"]
    assert lags[0] == 1 and lags[1] > 1, lags


async def test_waiting_requests_are_served_by_priority_then_arrival_and_never_preempt_an_equal(model_dir):
    params = SamplingParams(max_tokens=3, **GREEDY)
    for policy in ("priority", "fcfs"):
        engine = engine_with(model_dir, scheduling_policy=policy, max_running=1)
        first = engine.submit([LOW_PROMPT], params, priority=0)
        outputs = Outputs(first=first)
        await step(engine, outputs)
        assert engine.running
        # Each worse than (or equal to) the one running: none preempts it, they wait in line.
        if policy == "priority":
            asked = [("p5", 5), ("p1a", 1), ("p3", 3), ("p1b", 1), ("p0", 0)]
        else:
            asked = [("p5", 0), ("p1a", 0), ("p3", 0), ("p1b", 0), ("p0", 0)]
        for name, priority in asked:
            outputs.add(name, engine.submit([[10 + len(name), 11, 12]], params, priority=priority))
        await run_out(engine, outputs)
        order = [name for name, _, _ in outputs.finished]
        if policy == "priority":
            assert order == ["first", "p0", "p1a", "p1b", "p3", "p5"]
        else:
            assert order == ["first", "p5", "p1a", "p3", "p1b", "p0"]
        assert preemptions(engine) == 0 and engine.in_system == 0


async def test_a_preempted_request_cancelled_frees_its_slot_and_leaves_its_session(model_dir):
    engine = engine_with(model_dir, scheduling_policy="priority", max_running=1)
    first_turn = Outputs(turn=engine.submit([[30, 31, 32]], SamplingParams(max_tokens=2, **GREEDY), session_id="s"))
    await run_out(engine, first_turn)
    saved = engine.sessions.sessions["s"]
    before = (saved.cache, list(saved.pending), saved.tokens)
    low = engine.submit([LOW_PROMPT], SamplingParams(max_tokens=30, **GREEDY), priority=1, session_id="s")
    outputs = Outputs(low=low)
    await step(engine, outputs, 3)
    high = engine.submit([HIGH_PROMPT], SamplingParams(max_tokens=8, **GREEDY), priority=0)
    outputs.add("high", high)
    await step(engine, outputs)
    assert engine.preempted and engine.in_system == 2
    low.cancel()
    await step(engine, outputs)
    assert not engine.preempted and engine.in_system == 1
    assert ("low", 0, "abort") in outputs.finished
    await run_out(engine, outputs)
    session = engine.sessions.sessions["s"]
    assert not session.busy and (session.cache, session.pending, session.tokens) == before  # as it was
    assert engine.in_system == 0 and outputs.finished[-1] == ("high", 0, "length")


async def test_preempted_states_held_stay_within_max_running(model_dir):
    # Ever better requests arriving one after another: each preempts the one running, until --max-running
    # sequences are preempted; the next waits for a slot like any other.
    engine = engine_with(model_dir, scheduling_policy="priority", max_running=1)
    params = SamplingParams(max_tokens=12, **GREEDY)
    outputs = Outputs()
    for priority in (3, 2, 1):
        name = f"p{priority}"
        outputs.add(name, engine.submit([[10 + priority, 11, 12]], params, priority=priority))
        await step(engine, outputs, 2)
    assert [seq.group.priority for seq, _ in engine.preempted] == [3]
    assert [seq.group.priority for seq in engine.running] == [2] and preemptions(engine) == 1
    await run_out(engine, outputs)
    assert [name for name, _, _ in outputs.finished] == ["p2", "p1", "p3"]


@pytest.mark.parametrize("lora_limit", [{"max_loras": 1}, {"max_cpu_loras": 1}])
async def test_a_preempted_sequence_resumes_while_the_best_request_waits_for_its_adapter(model_dir, adapter_dirs,
                                                                                        lora_limit):
    # A (adapter a) preempted by B (the base); C (adapter b) arrives. Once B finishes, C waits for a's place,
    # which A, preempted, holds: A must resume into the free slot (it would otherwise wait behind C forever, and
    # the scheduler spin), then C runs once a leaves.
    engine = engine_with(model_dir, scheduling_policy="priority", max_running=1,
                         lora_modules=[f"{name}={adapter_dirs[name]}" for name in "ab"], **lora_limit)
    params = SamplingParams(max_tokens=12, **GREEDY)
    outputs = Outputs(A=engine.submit([LOW_PROMPT], params, adapter=engine.adapters["a"].slot, priority=5))
    await step(engine, outputs, 3)
    outputs.add("B", engine.submit([HIGH_PROMPT], SamplingParams(max_tokens=3, **GREEDY), priority=0))
    await step(engine, outputs)
    assert [seq.group.priority for seq, _ in engine.preempted] == [5]
    outputs.add("C", engine.submit([[8, 8, 8]], SamplingParams(max_tokens=3, **GREEDY),
                                   adapter=engine.adapters["b"].slot, priority=1))
    await run_out(engine, outputs)
    assert [name for name, _, _ in outputs.finished] == ["B", "A", "C"]
    assert engine.in_system == 0 and preemptions(engine) == 1


async def test_a_slot_freed_by_a_finished_sequence_is_taken_without_a_preemption(model_dir):
    # X and A run (--max-running 2); A finishes. B, of a better priority, arrives: A's slot is free, although A
    # leaves the batch only at the next rebuild, so B is admitted at once and X runs on.
    engine = engine_with(model_dir, scheduling_policy="priority", max_running=2)
    outputs = Outputs(X=engine.submit([LOW_PROMPT], SamplingParams(max_tokens=30, **GREEDY), priority=5),
                      A=engine.submit([[8, 6, 7]], SamplingParams(max_tokens=4, **GREEDY), priority=5))
    for _ in range(20):
        await step(engine, outputs)
        if outputs.finished:
            break
    assert outputs.finished == [("A", 0, "length")] and len(engine.running) == 2  # A still in the batch
    outputs.add("B", engine.submit([HIGH_PROMPT], SamplingParams(max_tokens=3, **GREEDY), priority=0))
    await step(engine, outputs)
    assert preemptions(engine) == 0 and not engine.preempted and not engine.waiting
    assert sorted(seq.group.priority for seq in engine.running) == [0, 5]
    await run_out(engine, outputs)
    assert [name for name, _, _ in outputs.finished] == ["A", "B", "X"]
    assert engine.in_system == 0 and preemptions(engine) == 0


async def test_an_engine_dying_as_it_preempts_answers_the_request_joining_the_batch(model_dir, monkeypatch):
    # The preempted row's copy fails (a GPU out of memory): the engine dies, and every request in it gets its 503,
    # the better one too, prefilled and joining the batch as the copy failed (it was in no list _fail_all reads: its
    # client waited forever).
    from retnet.model import RetNetCache

    engine = engine_with(model_dir, scheduling_policy="priority", max_running=1)
    low = engine.submit([LOW_PROMPT], SamplingParams(max_tokens=30, **GREEDY), priority=1)
    await step(engine, Outputs(low=low), 2)
    high = engine.submit([HIGH_PROMPT], SamplingParams(max_tokens=8, **GREEDY), priority=0)

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(RetNetCache, "clone", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
            engine._iteration()  # admits `high`, prefills it (joining) and preempts `low`, whose copy fails
    engine._fail_all("engine failed: OutOfMemoryError")  # as the dying scheduler thread does
    await asyncio.sleep(0)
    for handle in (low, high):
        items = [handle.queue.get_nowait() for _ in range(handle.queue.qsize())]
        assert isinstance(items[-1], EngineFailure), items
    assert engine.in_system == 0


async def test_a_resuming_sequence_may_preempt_with_max_running_states_preempted(model_dir):
    # --max-running 2: A (3) runs while X (9, a long prompt) is prefilled; B (0) preempts A, then G (-1) preempts
    # B: two states preempted, the cap. Once X joins, B is the better: it resumes in X's place, its own state
    # leaving the preempted ones as X's enters (two, still).
    engine = engine_with(model_dir, scheduling_policy="priority", max_running=2, prefill_chunk_tokens=8,
                         prefill_token_budget=8, prefix_cache_entries=0)
    params = SamplingParams(max_tokens=40, **GREEDY)
    outputs = Outputs(A=engine.submit([LOW_PROMPT], params, priority=3))
    await step(engine, outputs, 2)
    long_prompt = [10 + i % 50 for i in range(160)]
    outputs.add("X", engine.submit([long_prompt], SamplingParams(max_tokens=4, **GREEDY), priority=9))
    await step(engine, outputs)
    outputs.add("B", engine.submit([HIGH_PROMPT], params, priority=0))
    await step(engine, outputs, 2)
    outputs.add("G", engine.submit([[8, 8, 8]], params, priority=-1))
    await step(engine, outputs, 2)
    assert [seq.group.priority for seq, _ in engine.preempted] == [0, 3]
    assert [seq.group.priority for seq in engine.running] == [-1] and [g.priority for g in engine.prefilling] == [9]
    for _ in range(40):
        await step(engine, outputs)
        if not engine.prefilling:
            break
    assert sorted(seq.group.priority for seq in engine.running) == [-1, 9]  # X joined
    await step(engine, outputs)
    assert sorted(seq.group.priority for seq in engine.running) == [-1, 0]
    assert [seq.group.priority for seq, _ in engine.preempted] == [3, 9] and preemptions(engine) == 3
    await run_out(engine, outputs)
    # A resumes as G finishes, X (3 tokens left) as B does.
    assert [name for name, _, _ in outputs.finished] == ["G", "B", "X", "A"] and engine.in_system == 0
    for name, prompt, asked in (("B", HIGH_PROMPT, params), ("X", long_prompt, SamplingParams(max_tokens=4, **GREEDY))):
        assert (outputs.tokens[name, 0], outputs.text[name, 0]) == (await alone(model_dir, prompt, asked))[0], name


async def test_fcfs_refuses_a_priority(model_dir):
    engine = engine_with(model_dir)
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        engine.submit([LOW_PROMPT], SamplingParams(max_tokens=2, **GREEDY), priority=1)
    assert not engine.waiting and engine.in_system == 0


async def test_the_pooling_engine_takes_the_best_priority_first_round_robin_among_equals(model_dir):
    from retnet.model import RetNetForCausalLM
    from retnet.serve.metrics import ServeMetrics
    from retnet.serve.pooling import EmbedPooler, PoolingEngine

    model = RetNetForCausalLM.from_pretrained(model_dir)
    requests = {"a": (2, 3), "b": (0, 2), "c": (2, 2), "d": (0, 1)}  # name: (priority, inputs)
    expected = {"priority": ["b0", "d0", "b1", "a0", "c0", "a1", "c1", "a2"],
                "fcfs": ["a0", "b0", "c0", "d0", "a1", "b1", "c1", "a2"]}
    for policy, order in expected.items():
        engine = PoolingEngine(make_settings(model_dir, scheduling_policy=policy, prefill_token_budget=6),
                               ServeMetrics(), model=model, pooler=EmbedPooler(model.config))
        engine.ready = True  # the thread not started: batches taken by hand
        labels = {}
        tasks = []
        for name, (priority, count) in requests.items():
            inputs = [[ord(name), i, 1] for i in range(count)]
            labels.update({tuple(ids): f"{name}{i}" for i, ids in enumerate(inputs)})
            tasks.append(asyncio.ensure_future(engine.score(inputs, priority if policy == "priority" else 0)))
        await asyncio.sleep(0)
        batches = []
        while engine.waiting:
            batches.append([labels[tuple(item.ids)] for item in engine._next_batch()])
        assert [label for batch in batches for label in batch] == order, policy
        assert all(len(batch) == 2 for batch in batches)  # 3 tokens an input, a budget of 6
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        await engine.score([[5, 6]], 1)  # the last engine's: fcfs
    assert not engine.waiting and engine.requests == 0


# -- the routes -----------------------------------------------------------------------------------------------
def refused_priority(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "priority" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("Got priority 1 but Priority scheduling is not enabled.")


async def test_fcfs_answers_a_non_zero_priority_with_400_on_every_generation_route(open_app):
    async with open_app() as client:
        body = {"max_tokens": 2, "temperature": 0}
        refused_priority(await client.post("/v1/completions", json={**body, "prompt": "Hi", "priority": 1}))
        chat = {**body, "messages": [{"role": "user", "content": "Hi"}]}
        refused_priority(await client.post("/v1/chat/completions", json={**chat, "priority": 1}))
        refused_priority(await client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2,
                                                                   "priority": 1}))
        bad = await client.post("/v1/completions", json={**body, "prompt": "Hi", "priority": True})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
        for priority in (0, None):  # the default, as vLLM's fcfs takes it
            assert (await client.post("/v1/completions", json={**body, "prompt": "Hi", "priority": priority})
                    ).status_code == 200
        assert (await client.post("/v1/chat/completions", json={**chat, "priority": 0})).status_code == 200
        # The routes that queue no work read no priority: one there is ignored as any unknown field.
        for priority in (1, "high", True):
            tokenized = await client.post("/tokenize", json={"prompt": "Hi", "priority": priority})
            assert tokenized.status_code == 200, tokenized.text
            detokenized = await client.post("/detokenize", json={"tokens": tokenized.json()["tokens"],
                                                                  "priority": priority})
            assert detokenized.status_code == 200 and detokenized.json()["prompt"] == "Hi", detokenized.text


async def test_priority_orders_waiting_requests_through_the_routes(open_app, monkeypatch):
    # One slot, a request of priority 0 running; three worse ones arrive in the order 9, 2, 5 and are answered
    # 2, 5, 9 (the Responses route takes the field too).
    async with open_app(scheduling_policy="priority", max_running=1) as client:
        finished = []

        async def complete(name: str, priority: int, max_tokens: int):
            r = await client.post("/v1/completions", json={"prompt": name, "max_tokens": max_tokens,
                                                           "priority": priority, **GREEDY})
            assert r.status_code == 200, r.text
            finished.append(name)

        engine = client.app.state.engine
        # The scheduler holds before each decode step until the three are queued: "first" cannot finish (and free
        # the slot) before they arrive, however slowly a loaded machine sends them.
        with decoding_held(engine, monkeypatch):
            first = asyncio.ensure_future(complete("first", 0, 400))
            while not engine.running:
                await asyncio.sleep(0.005)
            rest = []
            for name, priority in (("nine", 9), ("two", 2), ("five", 5)):
                rest.append(asyncio.ensure_future(complete(name, priority, 2)))
                deadline = time.monotonic() + 60
                while len(engine.waiting) < len(rest) and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                assert len(engine.waiting) == len(rest) and not first.done()
        await asyncio.gather(first, *rest)
        assert finished == ["first", "two", "five", "nine"]
        response = await client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2, "priority": -3})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
async def test_the_pooling_routes_read_the_priority(model_dir, policy):
    from tests.serve.conftest import serve_app

    bodies = {"/v1/embeddings": {"input": "Hi"}, "/pooling": {"input": ["Hi", "there"]},
              "/score": {"text_1": "Hi", "text_2": ["a", "b"]}, "/rerank": {"query": "Hi", "documents": ["a", "b"]}}
    async with serve_app(model_dir, convert="embed", scheduling_policy=policy) as client:
        for path, body in bodies.items():
            response = await client.post(path, json={**body, "priority": 1})
            if policy == "fcfs":
                refused_priority(response)
            else:
                assert response.status_code == 200, (path, response.text)
            assert (await client.post(path, json={**body, "priority": 0})).status_code == 200, path


# -- a real server ----------------------------------------------------------------------------------------------
# Until the first preemption, a lone request's decode steps wait (for two minutes at most) once 8 tokens are out,
# until a second request is in the server: the one streaming cannot finish before the better one arrives, however
# slowly a loaded machine sends it.
HELD_UNTIL_A_SECOND_REQUEST = """
import time

from retnet.serve.engine import Engine

decode_step = Engine._decode_step


def held(self):
    sample = self.metrics.registry.get_sample_value
    deadline = time.monotonic() + 120
    while (sample("retnet_generation_tokens_total") >= 8 and self.in_system < 2
           and not sample("retnet_preemptions_total") and time.monotonic() < deadline):
        time.sleep(0.01)
    decode_step(self)


Engine._decode_step = held
"""


async def test_a_high_priority_request_finishes_first_and_the_preempted_stream_is_unchanged(server_process,
                                                                                          tmp_path):
    proc = server_process("--max-running", "1", "--scheduling-policy", "priority", module="held_serve",
                          env=held_serve_env(tmp_path, "held_serve", HELD_UNTIL_A_SECOND_REQUEST))
    proc.wait_healthy()
    low = {"prompt": "The retention mechanism", "max_tokens": 250, "priority": 10, **GREEDY}
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=proc.url, timeout=60) as client:
        events: list[tuple[float, dict]] = []
        started = asyncio.Event()

        async def stream_low():
            async with client.stream("POST", "/v1/completions", json={**low, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    payload = line.removeprefix("data: ")
                    if payload == "[DONE]":
                        return
                    events.append((loop.time(), json.loads(payload)))
                    started.set()

        streaming = asyncio.ensure_future(stream_low())
        await asyncio.wait_for(started.wait(), 30)
        high = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, **GREEDY})
        high_done = loop.time()
        assert high.status_code == 200 and high.json()["choices"][0]["finish_reason"] == "length"
        await asyncio.wait_for(streaming, 60)
        low_done = events[-1][0]
        finishes = [c["finish_reason"] for _, e in events for c in e["choices"]]
        assert finishes[-1] == "length" and high_done < low_done
        streamed = "".join(c["text"] for _, e in events for c in e["choices"])
        # Run alone, with nothing to preempt it: the same text.
        again = await client.post("/v1/completions", json=low)
        assert streamed == again.json()["choices"][0]["text"]
        metrics = (await client.get("/metrics")).text
    assert "retnet_preemptions_total 1.0" in metrics.splitlines()
