"""Known limitations of the server, fixed: a speculative step right after a refused draft proposes drafts too
(its drafts follow the tokens it feeds again), with the answers of plain decoding; a request without the API key
gets 401 whatever its body (too deep, too large), before the body limits' 400 and 413."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from retnet.model import RetNetForCausalLM
from retnet.serve.sampling import SamplingParams

from .test_priority import engine_with
from .test_speculative import REPEATS
from .test_speculative_draft import draft_config

pytestmark = pytest.mark.anyio

K = 4
NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 1})


async def run(engine, requests: dict[str, tuple[list[int], SamplingParams, int]], session_id=None) -> dict:
    """Every choice's (tokens, logprobs, finish reason, text) for ``requests`` (name -> prompt, params, n), sent
    together and run to the end."""
    handles = {name: engine.submit([prompt], params, n=n, session_id=session_id)
               for name, (prompt, params, n) in requests.items()}
    with torch.inference_mode():
        while engine.waiting or engine.prefilling or engine.joining or engine.running or engine.preempted:
            engine._iteration()
    await asyncio.sleep(0)  # the engine queues its outputs with call_soon_threadsafe
    out = {}
    for name, handle in handles.items():
        while not handle.queue.empty():
            for piece in handle.queue.get_nowait():
                tokens, logprobs, reason, text = out.setdefault((name, piece.index), ([], [], [None], [""]))
                tokens.extend(piece.token_ids)
                logprobs.extend(lp.logprob for lp in piece.logprobs or [])
                reason[0] = piece.finish_reason or reason[0]
                text[0] += piece.text
    return out


def recorded_steps(engine) -> list[list[tuple[int, int, list[int]]]]:
    """Each speculative step's (room, lag, drafts, tokens so far) per running choice, as the step found them
    (room: the drafts its ``max_tokens`` still allows)."""
    steps = []
    speculative_step = engine._speculative_step

    def recording(drafts, start):
        steps.append([(min(K, seq.group.params.max_tokens - len(seq.tokens) - 1), seq.lag, draft, len(seq.tokens))
                      for seq, draft in zip(engine.running, drafts)])
        return speculative_step(drafts, start)

    engine._speculative_step = recording
    return steps


def assert_same_answers(plain: dict, fast: dict) -> None:
    assert plain.keys() == fast.keys() and plain
    for key, (tokens, logprobs, reason, text) in plain.items():
        assert fast[key][0] == tokens, key
        assert fast[key][2] == reason and fast[key][3] == text, key
        assert fast[key][1] == pytest.approx(logprobs, abs=1e-4), key


def requests_of(engine) -> dict:
    prompt = engine.tokenizer.encode(REPEATS)
    an, he = engine.tokenizer.encode("anhe", add_special_tokens=False)[:2]
    greedy = {"temperature": 0.0, "ignore_eos": True, "logprobs": 1}
    return {
        "greedy": (prompt, SamplingParams(max_tokens=40, **greedy), 1),
        "cut": (prompt[:30], SamplingParams(max_tokens=17, **greedy), 1),
        # Biased towards two tokens, the samples loop for a while and break off: drafts taken and refused.
        "seeded": (prompt, SamplingParams(max_tokens=32, temperature=0.8, seed=7, ignore_eos=True, logprobs=0,
                                          logit_bias={an: 3.0, he: 2.0}), 2),
        "penalised": (prompt, SamplingParams(max_tokens=24, frequency_penalty=0.3, **greedy), 1),
        "stopped": (prompt, SamplingParams(max_tokens=40, stop=["ion"], **greedy), 1),
    }


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
async def test_the_step_after_a_refused_draft_drafts_and_answers_as_plain_decoding(method, model_dir):
    plain_engine = engine_with(model_dir)
    plain = await run(plain_engine, requests_of(plain_engine))
    # The target as its own draft: its greedy drafts are all taken, sampling's refused now and then.
    config = NGRAM if method == "ngram" else draft_config(model_dir)
    engine = engine_with(model_dir, speculative_config=config, max_running=4)
    steps = recorded_steps(engine)
    packed, widths = engine._packed_forward, []  # (positions fed, positions with logits) of each verification

    def measured(feeds, cache, slots, keep_all, **options):
        out = packed(feeds, cache, slots, keep_all, **options)
        if keep_all:
            widths.append((sum(map(len, feeds)), out.logits.shape[1]))
        return out

    engine._packed_forward = measured
    fast = await run(engine, requests_of(engine))
    assert_same_answers(plain, fast)
    # the catch-up segments' logits, never read, are not computed
    assert any(kept < fed for fed, kept in widths) and all(kept <= fed for fed, kept in widths)

    rows = [row for step in steps for row in step]
    refused = [row for row in rows if row[1] > 1]
    assert refused, "no choice refused a draft"
    # A choice feeding again the tokens since a refusal still drafts: before, every such step decoded one token.
    assert any(drafts for _, _, drafts, _ in refused)
    if method == "draft_model":  # its draft state holds every token by then: it always proposes
        assert all(drafts for room, _, drafts, _ in refused if room > 0)
    # It never feeds more than k + 1 tokens before its drafts, however many steps in a row it refuses.
    assert max(lag for _, lag, _, _ in rows) <= K + 1
    metrics = engine.metrics.registry
    assert metrics.get_sample_value("retnet_spec_decode_num_accepted_tokens_total") > 0


async def test_a_choice_ending_right_after_a_refusal_it_drafted_after_saves_every_token_but_the_last(model_dir):
    # The state it goes back to is the one after the tokens it fed again (its catch-up segment): its session must
    # hold prompt + answer[:-1] exactly, as after plain decoding.
    engine = engine_with(model_dir, speculative_config=NGRAM)
    steps = recorded_steps(engine)
    prompt = engine.tokenizer.encode("Unicode: café")
    an, he = engine.tokenizer.encode("anhe", add_special_tokens=False)[:2]
    # Sampled (the same tokens for the seed, with or without a stop token), biased towards a loop it breaks off.
    params = {"max_tokens": 40, "temperature": 0.8, "seed": 7, "ignore_eos": True, "logit_bias": {an: 3.0, he: 2.0}}
    answer = (await run(engine, {"a": (prompt, SamplingParams(**params), 1)}))["a", 0][0]
    # Where a step that started behind (lag > 1) refused a draft whose token is new: a stop token there ends the
    # choice right after that refusal. Its first draft refused, the choice holds every token but the last already;
    # a later one, it runs the drafts it took (the extra forward).
    ends: dict[bool, int] = {}
    for step in steps:
        _, lag, drafts, done = step[0]
        p = next((p for p, token in enumerate(drafts) if answer[done + p] != token), None)
        if lag > 1 and p is not None and answer[done + p] not in answer[: done + p]:
            ends.setdefault(p > 0, done + p)
    assert ends.keys() == {False, True}, ends
    model = RetNetForCausalLM.from_pretrained(model_dir).eval()
    for end in ends.values():
        session = f"s{end}"
        stop = SamplingParams(**params, stop_token_ids=frozenset({answer[end]}))
        stopped = await run(engine, {"s": (prompt, stop, 1)}, session_id=session)
        assert stopped["s", 0][0] == answer[: end + 1]
        with torch.inference_mode():
            reference = model(torch.tensor([prompt + answer[:end]]), use_cache=True).cache
        saved = engine.sessions.sessions[session].cache
        assert int(saved.offsets[0]) == len(prompt) + end
        for layer, state in enumerate(saved.states):
            torch.testing.assert_close(state[0], reference.states[layer][0], atol=1e-4, rtol=1e-4)



async def test_a_request_without_the_key_gets_401_whatever_its_body(open_app):
    deep = b'{"prompt": "hi", "x": ' + b"[" * 200 + b"]" * 200 + b"}"
    large = b'{"prompt": "' + b"a" * 5000 + b'"}'

    async def chunked(body: bytes):  # no Content-Length: the limit is met while reading
        for start in range(0, len(body), 1024):
            yield body[start : start + 1024]

    async with open_app(api_keys=["k1"], max_body_bytes=4096) as client:
        keys = {"none": {}, "wrong": {"Authorization": "Bearer k2"}, "valid": {"Authorization": "Bearer k1"}}
        for route in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/tokenize/"):
            for key, headers in keys.items():
                headers = {**headers, "Content-Type": "application/json"}
                answers = {
                    "deep": await client.post(route, content=deep, headers=headers),
                    "large": await client.post(route, content=large, headers=headers),
                    "large, chunked": await client.post(route, content=chunked(large), headers=headers),
                }
                for body, r in answers.items():
                    if key != "valid":
                        assert r.status_code == 401, (route, key, body, r.text)
                        assert r.json()["error"]["code"] == "invalid_api_key"
                    elif body == "deep":
                        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
                    else:
                        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        # A route outside the key's keeps its refusal (no key to ask for).
        r = await client.post("/nothing", content=deep, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
    async with open_app(max_body_bytes=4096) as client:  # no --api-keys: the refusals as ever
        headers = {"Content-Type": "application/json"}
        assert (await client.post("/v1/completions", content=deep, headers=headers)).status_code == 400
        assert (await client.post("/v1/completions", content=large, headers=headers)).status_code == 413
