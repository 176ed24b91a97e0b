"""The prefix cache keeps the state after a finished answer too (prompt + generated tokens), so a chat's next
turn or a Responses continuation prefills only its new tokens."""

import asyncio

import pytest
import torch

from retnet.serve.sampling import SamplingParams
from retnet.serve.state_cache import PrefixCache
from tests.serve.conftest import watch_state_copies
from tests.serve.test_units import standalone_engine

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}


def word_ids(tokenizer) -> list[int]:
    """Tokens that are a space and letters and encode to themselves: a text of them re-encodes token for token
    (a random model's own choices are often bytes that another encoding would merge)."""
    ids = []
    for token, i in tokenizer.get_vocab().items():
        word = token[1:]
        if token.startswith("Ġ") and word.isalpha() and word.isascii() and tokenizer.encode(" " + word) == [i]:
            ids.append(i)
    return sorted(ids)


def fresh_cache(engine) -> None:
    s = engine.settings
    engine.prefix_cache = PrefixCache(s.prefix_cache_entries, s.prefix_cache_bytes, s.prefix_cache_min_tokens)


def run(engine) -> None:
    with torch.inference_mode():
        while engine.waiting or engine.prefilling or engine.joining or engine.running:
            engine._iteration()


def ends(handle) -> dict[int, tuple[list[int], str]]:
    """Each choice's tokens and finish_reason."""
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    while not handle.queue.empty():
        for out in handle.queue.get_nowait():
            tokens.setdefault(out.index, []).extend(out.token_ids)
            if out.finish_reason:
                reasons[out.index] = out.finish_reason
    return {i: (tokens[i], reasons[i]) for i in tokens}


async def generate(engine, prompt, params, n=1) -> dict[int, tuple[list[int], str]]:
    handle = engine.submit([prompt], params, n=n)
    run(engine)
    await asyncio.sleep(0)  # the outputs were queued with call_soon_threadsafe
    return ends(handle)


def first_new(tokens: list[int], fits=lambda i: True) -> int:
    """The first index from 2 whose token did not come before (and ``fits``): a stop there ends the choice there."""
    return next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i] and fits(i))


async def test_an_answer_entry_holds_exactly_the_tokens_its_state_absorbed(model_dir):
    # Whichever way a choice ends, its state has absorbed the prompt and every sampled token but the last (each
    # is fed by the next decode step): the key must be those tokens, or a later prompt starting with them would
    # continue a state that does not match it. Checked by feeding the cached state what follows and comparing
    # with one uncached forward over the whole. The choices end in the same decode steps, so a row mix-up shows.
    engine = standalone_engine(model_dir)
    tok = engine.tokenizer
    words = frozenset(word_ids(tok))
    base = dict(temperature=0.0, ignore_eos=True)
    prompts = {name: tok.encode(text) for name, text in (
        ("length", "def add(a, b):"), ("token", "class Stack:"), ("string", "Hello world! How are"),
        ("sampled", "for i in range(10):"), ("one", "The retention mechanism"))}
    # Where each choice will stop, read off a greedy run first.
    probe_t = (await generate(engine, prompts["token"], SamplingParams(max_tokens=8, **base)))[0][0]
    probe_s = (await generate(engine, prompts["string"], SamplingParams(max_tokens=8, allowed_token_ids=words,
                                                                        **base)))[0][0]
    i = first_new(probe_t)
    j = first_new(probe_s, lambda j: tok.decode(probe_s[j]) not in tok.decode(probe_s[:j]))
    fresh_cache(engine)

    requests = {
        "length": (SamplingParams(max_tokens=6, **base), 1),
        "token": (SamplingParams(max_tokens=8, stop_token_ids=frozenset({probe_t[i]}), min_tokens=2, **base), 1),
        "string": (SamplingParams(max_tokens=8, stop=[tok.decode(probe_s[j])], allowed_token_ids=words, **base), 1),
        "sampled": (SamplingParams(max_tokens=5, temperature=1.0, seed=3), 2),
        "one": (SamplingParams(max_tokens=1, **base), 1),
    }
    with engine.cond:  # one burst: prefilled together, decoded in one batch
        handles = {name: engine.submit([prompts[name]], params, n=n) for name, (params, n) in requests.items()}
    run(engine)
    await asyncio.sleep(0)
    got = {name: ends(handle) for name, handle in handles.items()}
    assert got["length"][0] == (got["length"][0][0], "length") and len(got["length"][0][0]) == 6
    assert got["token"][0] == (probe_t[: i + 1], "stop")
    assert got["string"][0] == (probe_s[: j + 1], "stop")
    assert got["one"][0][1] == "length" and len(got["one"][0][0]) == 1
    sampled = [got["sampled"][c][0] for c in (0, 1)]
    assert sampled[0] != sampled[1]  # two choices, two entries

    answers = {tuple(prompts[name] + tokens[:-1]): tokens
               for name in requests for tokens, _ in got[name].values() if len(tokens) > 1}
    assert len(answers) == 5  # max_tokens 1: the state is the prompt's, no entry of its own
    prompt_keys = {tuple(p) for p in prompts.values()}
    assert set(engine.prefix_cache.entries) == prompt_keys | set(answers)
    model, device = engine.model, engine.device
    tol = 1e-5 if device.type == "cpu" else 2e-3  # fp32; a GPU's kernels may round products to TF32
    with torch.inference_mode():
        for key, tokens in answers.items():
            entry = engine.prefix_cache.entries[key]
            assert entry.logits is None  # nothing was computed after it: only a longer prompt uses it
            after = [tokens[-1], 7, 8]  # what a continuation feeds next
            state = entry.cache.clone()
            fed = model(input_ids=torch.tensor([after], device=device), cache=state, use_cache=True,
                        retention_mode="recurrent")
            whole = model(input_ids=torch.tensor([list(key) + after], device=device))
            torch.testing.assert_close(fed.logits[0], whole.logits[0, -len(after) :], rtol=tol, atol=tol)
            assert int(state.offsets[0]) == len(key) + len(after)


async def test_requests_whose_state_is_not_their_tokens_or_are_not_cached_add_no_answer_entry(model_dir):
    engine = standalone_engine(model_dir)
    prompt = [5, 6, 7, 8, 9, 10]
    # A scored prompt (echo with logprobs, prompt_logprobs; max_tokens 0 or not) is run whole and caches nothing.
    for max_tokens in (0, 4):
        await generate(engine, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                      logprobs=1, prompt_logprobs=1))
    assert len(engine.prefix_cache) == 0
    # A session's first turn is a prompt like any other; its continuation's state holds the history, which is
    # not in its tokens.
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = engine.submit([prompt], params, session_id="s")
    run(engine)
    await asyncio.sleep(0)
    answer = ends(first)[0][0]
    assert set(engine.prefix_cache.entries) == {tuple(prompt), tuple(prompt + answer[:-1])}
    engine.submit([[11, 12, 13]], params, session_id="s")
    run(engine)
    assert set(engine.prefix_cache.entries) == {tuple(prompt), tuple(prompt + answer[:-1])}
    # Turned off: prompts' states alone.
    engine.settings.prefix_cache_answers = False
    other = [20, 21, 22, 23, 24]
    await generate(engine, other, params)
    assert set(engine.prefix_cache.entries) == {tuple(prompt), tuple(prompt + answer[:-1]), tuple(other)}


async def test_an_answer_entry_copies_one_row_and_none_when_it_cannot_fit(model_dir, monkeypatch):
    engine = standalone_engine(model_dir)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    await generate(engine, [40, 41, 42, 43], params)  # the prompt's entry is written before the batch runs
    copied = watch_state_copies(monkeypatch)
    sampled = SamplingParams(max_tokens=4, temperature=1.0, seed=1)
    answers = await generate(engine, [40, 41, 42, 43], sampled, n=3)  # three answers ending in the same step
    assert len({tuple(tokens) for tokens, _ in answers.values()}) == 3
    # The prompt's state (cloned from its entry), then each answer's row once.
    assert copied == [1, 1, 1, 1] and len(engine.prefix_cache) == 5, copied
    copied.clear()
    state = engine.prefix_cache.entries[(40, 41, 42, 43)].cache.nbytes()
    engine.prefix_cache = PrefixCache(64, state - 1)  # no state fits
    await generate(engine, [50, 51, 52, 53], params)
    assert copied == [] and len(engine.prefix_cache) == 0


async def test_a_chats_next_turn_starts_from_the_state_after_the_answer(open_app, model_dir):
    from transformers import AutoTokenizer

    words = word_ids(AutoTokenizer.from_pretrained(model_dir))
    user = {"role": "user", "content": "def add(a, b)"}
    first = {"messages": [user], "max_tokens": 8, "allowed_token_ids": words, "return_token_ids": True, **GREEDY}

    async def turns(client):
        a = (await client.post("/v1/chat/completions", json=first)).json()
        answer = {"role": "assistant", "content": a["choices"][0]["message"]["content"]}
        second = {"messages": [user, answer, {"role": "user", "content": "And then?"}], "max_tokens": 8,
                  "return_token_ids": True, **GREEDY}
        return a, (await client.post("/v1/chat/completions", json=second)).json()

    async with open_app(prefix_cache_entries=0, dtype="float32") as cold:  # fp32 on a GPU too: equal greedy picks
        probe = (await cold.post("/v1/chat/completions", json=first)).json()["choices"][0]["token_ids"]
        # The answer ends on a stop token, as a chat turn ends on EOS: its text holds every token but that one.
        i = first_new(probe)
        first["stop_token_ids"] = [probe[i]]
        cold_a, cold_b = await turns(cold)
    async with open_app(dtype="float32") as client:
        a, b = await turns(client)
        # A scored prompt adds no entry.
        entries = len(client.app.state.engine.prefix_cache)
        r = await client.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 3, "echo": True,
                                                       "logprobs": 1, **GREEDY})
        assert r.status_code == 200 and len(client.app.state.engine.prefix_cache) == entries
    assert a["choices"][0]["token_ids"] == probe[: i + 1] and a["choices"][0]["finish_reason"] == "stop"
    assert a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # The second turn starts from the state after the first prompt and the whole answer.
    cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == a["usage"]["prompt_tokens"] + i
    assert b["choices"][0]["prompt_token_ids"][:cached] == a["choices"][0]["prompt_token_ids"] + probe[:i]
    assert cold_b["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert b["choices"] == cold_b["choices"] and a["choices"] == cold_a["choices"]
