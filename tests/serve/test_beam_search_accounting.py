"""What a beam search costs the server (retnet.serve.beam_search over the engine): the metrics count it once, as a
request of its n choices, and its steps start from its beams' cached states, however small the prefix cache or
whatever another search of the same prompt does."""

import asyncio

import pytest

from retnet.serve.engine import Engine
from retnet.serve.sequence import QueueFull

pytestmark = pytest.mark.anyio

PROMPT = "def add(a, b):"
BEAMS = {"use_beam_search": True, "return_token_ids": True}


def sample(engine, name: str, labels: dict | None = None) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def ended(engine) -> float:
    """Sequences finished (any reason), failed and cancelled."""
    finished = sum(s.value for metric in engine.metrics.registry.collect() for s in metric.samples
                   if s.name == "retnet_sequences_finished_total")
    return finished + sample(engine, "retnet_sequences_failed_total") + sample(engine,
                                                                               "retnet_sequences_cancelled_total")


def watch_prefills(monkeypatch) -> list[tuple]:
    """(prefix_cache_tag, tokens fed) of every prompt piece prefilled from now on."""
    pieces = []
    piece_done = Engine._piece_done

    def watched(self, group, end, last_logits):
        pieces.append((group.params.prefix_cache_tag, end - group.pos))
        return piece_done(self, group, end, last_logits)

    monkeypatch.setattr(Engine, "_piece_done", watched)
    return pieces


async def test_a_beam_search_counts_once_as_a_request_of_its_n_choices(open_app):
    """Its steps were each counted as a request of every beam: an n=4 search of 5 tokens after a 9-token prompt
    counted 17 sequences, 193 prompt tokens and 17 generated ones. Now what an n=4 request of its usage counts."""
    async with open_app() as client:
        engine, serving = client.app.state.engine, client.app.state.serving
        names = ["retnet_sequences_submitted_total", "retnet_prompt_tokens_total", "retnet_generation_tokens_total",
                 "retnet_time_to_first_token_seconds_count"]
        before = [sample(engine, name) for name in names]
        r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "n": 4, **BEAMS})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        counted = [sample(engine, name) - was for name, was in zip(names, before)]
        # time to first token once, as a prompt's n choices are observed once by the engine
        assert counted == [4, usage["prompt_tokens"], usage["completion_tokens"], 1]
        reasons = [c["finish_reason"] for c in r.json()["choices"]]
        assert sample(engine, "retnet_sequences_finished_total", {"finished_reason": "length"}) == reasons.count(
            "length")
        assert ended(engine) == sample(engine, "retnet_sequences_submitted_total")
        # a search cancelled in flight: its n choices cancelled, none of its steps' sequences
        from retnet.serve.protocol import CompletionRequest

        request = CompletionRequest(prompt=PROMPT, n=2, max_tokens=50, use_beam_search=True)
        params = serving.checks.params(request, request.max_tokens, None)
        cancelled = sample(engine, "retnet_sequences_cancelled_total")
        handle = serving._beam_search([engine.tokenizer.encode(PROMPT)], params, request)
        await asyncio.sleep(0.05)
        handle.cancel()
        await asyncio.wait_for(handle.queue.get(), 30)
        for _ in range(200):
            if engine.in_system == 0 and ended(engine) == sample(engine, "retnet_sequences_submitted_total"):
                break
            await asyncio.sleep(0.01)
        assert sample(engine, "retnet_sequences_cancelled_total") - cancelled == 2
        assert ended(engine) == sample(engine, "retnet_sequences_submitted_total") == 6
        before = [sample(engine, name) for name in names]
        r = await client.post("/v1/completions", json={"prompt": [PROMPT, "x = 1"], "max_tokens": 3, "n": 2, **BEAMS})
        assert r.status_code == 200, r.text
        counted = [sample(engine, name) - was for name, was in zip(names, before)]
        assert counted[0] == 4 and counted[3] == 2  # once a prompt, as a sampled request of two prompts


async def test_two_searches_of_one_prompt_never_cost_each_other_a_beam_prefilled_again(open_app, monkeypatch):
    """Two searches of one prompt make the same states; one that starts from the other's held none of its own,
    and the other's end (or its steps two on) freed them: its next step prefilled its beams from the prompt on.
    Held here so that the longer one follows the shorter a step behind, and steps again only once it has ended."""
    async with open_app() as client:
        engine = client.app.state.engine
        width, short, long = 3, 4, 7
        alone = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": long, "n": width,
                                                           **BEAMS})
        submit, first_id = engine.submit, []
        short_steps, short_done = set(), asyncio.Event()

        def held(prompts, params, *args, **kwargs):
            tag = params.prefix_cache_tag
            if tag is not None:
                first_id[:] = first_id or [tag[0]]
                if tag[0] == first_id[0]:
                    short_steps.add(tag[1])
                elif not (short_done.is_set() or tag[1] + 1 in short_steps):
                    raise QueueFull("held a step behind")  # the search retries (BeamSearch._step)
            return submit(prompts, params, *args, **kwargs)

        monkeypatch.setattr(engine, "submit", held)
        pieces = watch_prefills(monkeypatch)

        async def shorter():
            r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": short, "n": width,
                                                           **BEAMS})
            short_done.set()
            return r

        first = asyncio.ensure_future(shorter())
        while not first_id:  # the shorter one is the first to step
            await asyncio.sleep(0.005)
        second = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": long, "n": width,
                                                            **BEAMS})
        assert (await first).status_code == second.status_code == 200
        assert second.json()["choices"] == alone.json()["choices"]
        # each beam of a step starts from its parent's state (or the whole beam's), never further back
        assert pieces and all(fed == 1 for tag, fed in pieces if tag is not None), pieces


def test_a_state_two_searches_made_stays_for_the_one_still_running():
    from retnet.model import RetNetCache
    from retnet.serve.state_cache import PrefixCache

    class Config:
        num_hidden_layers, num_attention_heads, head_dim, value_head_dim = 1, 1, 2, 2

    cache, prefix = RetNetCache.zeros(Config, 1), PrefixCache(64, 1 << 30)
    prefix.insert((4, 1), cache, None, tag=(11, 1))
    prefix.insert((4, 1), cache, None, tag=(10, 1))  # search 10 made it last ...
    prefix.insert((4, 1, 1, 1), cache, None, tag=(10, 3))  # ... moves two steps on
    assert prefix.lookup((4, 1, 5)) is prefix.entries[(4, 1)]
    prefix.end_search(10)  # ... and ends: search 11 still needs it
    assert prefix.lookup((4, 1, 5)) is prefix.entries[(4, 1)]
    prefix.insert((4, 1, 2, 2), cache, None, tag=(11, 3))  # search 11 two steps on: nobody needs it
    assert (4, 1) not in prefix.entries and sorted(prefix.entries) == [(4, 1, 2, 2)]
    assert prefix.nbytes == sum(entry.nbytes for entry in prefix.entries.values())


async def test_a_search_of_more_beams_than_the_cache_holds_starts_each_step_from_its_beams(open_app, monkeypatch):
    """n=8 beams with --prefix-cache-entries 4 (the default 1 GiB holds 6 states of a 2.7B RetNet): each step's
    states evicted one another, and every step prefilled every beam whole. They now stay past the bounds, and
    the ordinary entries are evicted first."""
    async with open_app(prefix_cache_entries=4) as client:
        engine = client.app.state.engine
        pieces = watch_prefills(monkeypatch)
        other = {"prompt": "for i in range(10): print(i)", "max_tokens": 1, "temperature": 0}
        await client.post("/v1/completions", json=other)
        width, tokens = 8, 5
        r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": tokens, "n": width, **BEAMS})
        assert r.status_code == 200, r.text
        ids = engine.tokenizer.encode(PROMPT)
        assert [fed for tag, fed in pieces[1:]] == [len(ids)] + [1] * (tokens - 1) * width
        model = engine.model
        import torch

        out = model.generate(torch.tensor([ids]), num_beams=width, do_sample=False, max_new_tokens=tokens,
                             num_return_sequences=width, early_stopping=False)
        assert [c["token_ids"] for c in r.json()["choices"]] == [row[len(ids):].tolist() for row in out]
        # the search's states are gone with it; the cache is back within its bounds
        await client.post("/v1/completions", json=other)
        assert len(engine.prefix_cache) <= 4
        assert all(entry.searches is None for entry in engine.prefix_cache.entries.values())


def test_ordinary_states_are_evicted_before_a_search_s():
    from retnet.model import RetNetCache
    from retnet.serve.state_cache import PrefixCache

    class Config:
        num_hidden_layers, num_attention_heads, head_dim, value_head_dim = 1, 1, 2, 2

    cache = RetNetCache.zeros(Config, 1)
    one = cache.nbytes()
    prefix = PrefixCache(2, 2 * one, search_entries=2, search_bytes=2 * one)
    prefix.insert((1, 2), cache, None)
    for beam in (5, 6, 7):
        prefix.insert((9, 9, beam), cache, None, tag=(3, 1))
    assert sorted(prefix.entries) == [(9, 9, 5), (9, 9, 6), (9, 9, 7)]  # past the bounds, within the allowance
    prefix.insert((1, 3), cache, None)  # no room for an ordinary one beside them
    prefix.insert((9, 9, 8), cache, None, tag=(3, 1))
    prefix.insert((9, 9, 9), cache, None, tag=(3, 1))  # past the allowance: the least recently used goes
    assert sorted(prefix.entries) == [(9, 9, 6), (9, 9, 7), (9, 9, 8), (9, 9, 9)]
    assert prefix.nbytes == 4 * one and prefix.evictions == 3


def test_a_search_trailing_another_of_its_prompt_keeps_only_its_last_two_steps():
    # Every step of the trailing search found its beams whole in the leading one's states, so it inserted nothing,
    # and only an insert dropped a search's older steps: it held every step's states until it ended (76 here),
    # evicting every ordinary entry first
    import torch

    from retnet.model import RetNetCache
    from retnet.serve.state_cache import PrefixCache

    class Config:
        num_hidden_layers, num_attention_heads, head_dim, value_head_dim = 1, 1, 2, 2

    cache, prefix = RetNetCache.zeros(Config, 1), PrefixCache(64, 1 << 30, search_entries=16, search_bytes=1 << 20)
    prefix.insert((1, 2), cache, None)  # an ordinary prompt's
    prompt, logits = (9, 9), torch.zeros(8)  # (a whole beam's hit needs the logits after it)

    def beams(step):
        return [prompt + (token,) * step for token in (3, 4)]

    for step in range(1, 40):
        for beam in beams(step):
            prefix.insert(beam, cache, logits, tag=(1, step))  # the leading search's step
        for beam in beams(step - 1) if step > 1 else []:
            assert prefix.lookup(beam, tag=(2, step - 1)).tokens == beam  # the trailing one's: whole beams
    prefix.end_search(1)
    prefix.lookup((0,))
    held = sorted(len(entry.tokens) for entry in prefix.entries.values() if entry.searches)
    assert held == [2 + 37] * 2 + [2 + 38] * 2 and (1, 2) in prefix.entries


def test_a_search_s_older_steps_are_dropped_once_a_step(monkeypatch):
    # each beam's lookup and insert passed over every entry twice to drop what the first beam's had dropped already
    from retnet.model import RetNetCache
    from retnet.serve.state_cache import PrefixCache

    class Config:
        num_hidden_layers, num_attention_heads, head_dim, value_head_dim = 1, 1, 2, 2

    cache, prefix = RetNetCache.zeros(Config, 1), PrefixCache(64, 1 << 30)
    passes = []
    release = PrefixCache._release
    monkeypatch.setattr(PrefixCache, "_release", lambda self, released: passes.append(1) or release(self, released))
    for step in (1, 2, 3):
        for token in range(4):
            prefix.lookup((9,) + (token,) * step, tag=(7, step))
            prefix.insert((9,) + (token,) * step, cache, None, tag=(7, step))
    assert len(passes) == 3 and sorted(len(entry.tokens) for entry in prefix.entries.values()) == [3] * 4 + [4] * 4
    prefix.end_search(7)
    prefix.lookup((1,))
    assert not prefix.entries and not prefix.dropped_before


def test_a_search_s_state_that_an_ordinary_request_makes_its_own_counts_in_the_bounds_at_once():
    # An ordinary request reaching a running search's beam (its prompt, or its answer, those very tokens) makes the
    # entry an ordinary one: it left the searches' allowance, so the bounds are enforced then, not at some later
    # insert (the cache held 2 ordinary entries under --prefix-cache-entries 1 after the search had ended)
    from retnet.model import RetNetCache
    from retnet.serve.state_cache import PrefixCache

    class Config:
        num_hidden_layers, num_attention_heads, head_dim, value_head_dim = 1, 1, 2, 2

    cache = RetNetCache.zeros(Config, 1)
    one = cache.nbytes()
    prefix = PrefixCache(1, one, search_entries=2, search_bytes=2 * one)
    prefix.insert((1, 2), cache, None)
    for beam in (5, 6):
        prefix.insert((9, 9, beam), cache, None, tag=(3, 1))
    assert list(prefix.entries) == [(9, 9, 5), (9, 9, 6)]  # past the bounds, within the searches' allowance
    prefix.insert((9, 9, 5), cache, None)
    prefix.insert((9, 9, 6), cache, None)
    assert list(prefix.entries) == [(9, 9, 6)]  # the most recently used ordinary entry alone, as the bounds say
    assert prefix.nbytes == one
    prefix.end_search(3)
    prefix.lookup((9, 9, 6, 1))
    assert list(prefix.entries) == [(9, 9, 6)] and prefix.nbytes == one


def test_an_idle_server_frees_an_ended_search_s_states(model_dir):
    # An ended search's last two steps' states were freed at the cache's next lookup or insert only: a server left
    # idle after a search held its 2n states (past --prefix-cache-entries and --prefix-cache-bytes, up to
    # 2 x --max-n of them) and reported them in its gauges until the next request came. The scheduler frees them while
    # it waits for work.
    import torch

    from tests.serve.test_units import standalone_engine

    engine = standalone_engine(model_dir)
    prefix = engine.prefix_cache
    state = engine.model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=True, return_dict=True).cache
    prefix.insert((5, 6, 7, 8), state, None)  # an ordinary prompt's, which stays
    for beam in (9, 10, 11):
        prefix.insert((5, 6, 7, 8, beam), state, None, tag=(7, 1))
    engine._prefix_cache_metrics()
    prefix.end_search(7)  # (the event loop, as the search's answer went out)

    def one_wait(timeout=None):  # the scheduler's idle wait, once: then it is told to stop
        engine.stopping = True

    engine.cond.wait = one_wait
    assert engine._iteration() is False
    assert list(prefix.entries) == [(5, 6, 7, 8)] and prefix.nbytes == state.nbytes()
    assert sample(engine, "retnet_prefix_cache_entries") == 1
    assert sample(engine, "retnet_prefix_cache_bytes") == state.nbytes()
