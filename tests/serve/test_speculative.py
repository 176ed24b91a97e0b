"""n-gram speculative decoding (``--speculative-config``): the same answers as plain decoding (greedy tokens,
text and logprobs; seeded sampling's tokens), with fewer forwards on a prompt whose continuation repeats."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from retnet.model import RetNetForCausalLM
from retnet.serve.settings import ServeSettings

from .conftest import serve_app
from .test_lora import _peft_model

pytestmark = pytest.mark.anyio

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
GREEDY = {"temperature": 0, "ignore_eos": True}
# The micro model's greedy continuation of this falls into a loop ("ananan..."), which the drafts follow; the
# other prompts' continuations mostly do not repeat (no drafts, or rejected ones).
REPEATS = "The retention mechanism replaces attention with a decaying recurrence. " * 3
OTHERS = ["Hello world! How", "Unicode: café"]


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec-lora") / "a"
    _peft_model(model_dir, 0, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]).save_pretrained(path)
    return path


def counted_model(model_dir) -> tuple[torch.nn.Module, list[int]]:
    model = RetNetForCausalLM.from_pretrained(model_dir).eval()
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return model, calls


async def post(client, body: dict) -> dict:
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def streamed(client, body: dict) -> tuple[str, int]:
    """The text of a streamed completion and how many chunks carried tokens."""
    text, chunks = "", 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                chunks += bool(choice["text"])
    return text, chunks


async def answers(client, calls: list[int], loop: str, stop: str) -> dict:
    """Every case's response on ``client``: one greedy request alone (its forwards counted), then the rest at
    once, then a session's two turns. ``loop``: a prompt whose greedy continuation repeats itself."""
    out = {}
    an, he = (await client.post("/tokenize", json={"prompt": "anhe", "add_special_tokens": False})).json()["tokens"]
    before = calls[0]
    out["alone"] = await post(client, {"prompt": loop, "max_tokens": 32, "logprobs": 2, **GREEDY})
    out["alone_forwards"] = calls[0] - before
    bodies = {
        "repeats": {"prompt": REPEATS, "max_tokens": 32, "logprobs": 1, **GREEDY},
        "loop": {"prompt": loop, "max_tokens": 31, "logprobs": 1, **GREEDY},
        "cut": {"prompt": REPEATS, "max_tokens": 23, "logprobs": 1, **GREEDY},
        "n2": {"prompt": REPEATS, "max_tokens": 16, "n": 2, "logprobs": 0, **GREEDY},
        "seeded": {"prompt": loop, "max_tokens": 20, "n": 2, "temperature": 0.8, "seed": 7, "ignore_eos": True,
                   "return_token_ids": True},
        # Biased towards two tokens, the samples loop for a while and break off: drafts taken and refused.
        "seeded_loops": {"prompt": REPEATS, "max_tokens": 24, "n": 2, "temperature": 0.8, "seed": 7,
                         "logit_bias": {str(an): 3, str(he): 2}, "logprobs": 1, "return_token_ids": True,
                         "ignore_eos": True},
        "penalised": {"prompt": REPEATS, "max_tokens": 16, "frequency_penalty": 0.3, **GREEDY},
        "lora": {"model": "a", "prompt": loop, "max_tokens": 20, "logprobs": 1, **GREEDY},
        "scored": {"prompt": REPEATS, "max_tokens": 16, "prompt_logprobs": 1, **GREEDY},
        "regex": {"prompt": REPEATS, "max_tokens": 24, "structured_outputs": {"regex": "(an|en|he)+"}, **GREEDY},
        **{f"other{i}": {"prompt": p, "max_tokens": 24, "logprobs": 1, **GREEDY} for i, p in enumerate(OTHERS)},
    }
    bodies["stop"] = {"prompt": REPEATS, "max_tokens": 40, "stop": [stop], **GREEDY}
    # Met a few tokens into the first drafts (the loop's continuation is drafted from its first step on).
    out["loop_stop"] = out["alone"]["choices"][0]["text"][4:20]
    bodies["stop_in_draft"] = {"prompt": loop, "max_tokens": 20, "stop": [out["loop_stop"]], "logprobs": 1, **GREEDY}
    stream = asyncio.ensure_future(streamed(client, {"prompt": loop, "max_tokens": 32, **GREEDY}))
    results = await asyncio.gather(*(post(client, body) for body in bodies.values()))
    out.update(zip(bodies, results))
    out["stream"] = await stream
    session = {"max_tokens": 12, "session_id": "s-spec", "return_token_ids": True, **GREEDY}
    out["turn1"] = await post(client, {**session, "prompt": loop})
    out["turn2"] = await post(client, {**session, "prompt": " The retention mechanism"})
    out["metrics"] = (await client.get("/metrics")).text
    return out


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_speculation_changes_no_answer(model_dir, adapter_dir):
    lora = [f"a={adapter_dir}"]
    model, calls = counted_model(model_dir)
    async with serve_app(model_dir, model=model, lora_modules=lora) as client:
        first = (await post(client, {"prompt": REPEATS, "max_tokens": 40, **GREEDY}))["choices"][0]["text"]
        stop = first[28:31]  # from the loop the drafts follow (met where it begins)
        loop = REPEATS + first
        plain = await answers(client, calls, loop, stop)
    model, calls = counted_model(model_dir)
    # Six running at most: the requests join and leave the batch between speculative steps.
    async with serve_app(model_dir, model=model, lora_modules=lora, speculative_config=json.dumps(SPEC),
                         max_running=6) as client:
        await post(client, {"prompt": REPEATS, "max_tokens": 40, **GREEDY})
        fast = await answers(client, calls, loop, stop)

    for case in plain:
        if case in ("metrics", "alone_forwards", "stream", "loop_stop"):
            continue
        for a, b in zip(plain[case]["choices"], fast[case]["choices"], strict=True):
            assert a["text"] == b["text"], case
            assert a["finish_reason"] == b["finish_reason"], case
            assert a.get("token_ids") == b.get("token_ids"), case
            if a["logprobs"] is not None:
                assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"], case
                assert a["logprobs"]["text_offset"] == b["logprobs"]["text_offset"], case
                assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-4)
                for x, y in zip(a["logprobs"]["top_logprobs"], b["logprobs"]["top_logprobs"], strict=True):
                    assert x.keys() == y.keys(), case
            if a.get("prompt_logprobs") is not None:
                assert len(a["prompt_logprobs"]) == len(b["prompt_logprobs"])
    assert plain["stop"]["choices"][0]["finish_reason"] == "stop"
    assert not plain["stop"]["choices"][0]["text"].endswith(stop) and stop not in plain["stop"]["choices"][0]["text"]
    in_draft = plain["stop_in_draft"]["choices"][0]
    assert in_draft["finish_reason"] == "stop" and plain["loop_stop"] not in in_draft["text"]
    assert plain["cut"]["usage"]["completion_tokens"] == 23
    seeded = [c["text"] for c in plain["seeded"]["choices"]]
    assert seeded[0] != seeded[1]  # the two choices draw from seed and seed + 1
    assert fast["stream"][0] == plain["stream"][0] == plain["alone"]["choices"][0]["text"]
    assert fast["stream"][1] < plain["stream"][1]  # several tokens to a chunk
    assert fast["turn2"]["choices"][0]["token_ids"] == plain["turn2"]["choices"][0]["token_ids"]

    assert metric(plain["metrics"], "retnet_spec_decode_num_drafts_total") == 0
    accepted = metric(fast["metrics"], "retnet_spec_decode_num_accepted_tokens_total")
    proposed = metric(fast["metrics"], "retnet_spec_decode_num_draft_tokens_total")
    assert 0 < accepted <= proposed
    assert metric(fast["metrics"], "retnet_spec_decode_num_drafts_total") > 0
    assert plain["alone_forwards"] == 32  # the prefill and 31 steps
    assert fast["alone_forwards"] < 24, fast["alone_forwards"]


@pytest.mark.parametrize("config, message", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be 'ngram'"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a whole number >= 1; got 0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 3},
     "prompt_lookup_min must be <= prompt_lookup_max (2); got 3"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min must be a whole"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "model is only read by method 'draft_model'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "quantization": "x"}, "unknown field(s) 'quantization'"),
    ("[1]", "must be a JSON object"),
])
def test_settings_refusals(config, message, model_dir):
    value = config if isinstance(config, str) else json.dumps(config)
    with pytest.raises(ValueError, match="speculative_config") as info:
        ServeSettings(model=str(model_dir), speculative_config=value)
    assert message in str(info.value)


def test_settings_defaults_and_environment(model_dir, monkeypatch):
    assert ServeSettings(model=str(model_dir)).speculative is None
    monkeypatch.setenv("RETNET_SPECULATIVE_CONFIG", json.dumps({"method": "ngram", "num_speculative_tokens": 3}))
    config = ServeSettings(model=str(model_dir)).speculative
    assert (config.num_speculative_tokens, config.prompt_lookup_max, config.prompt_lookup_min) == (3, 5, 5)
    config = ServeSettings(model=str(model_dir), speculative_config=json.dumps(SPEC)).speculative
    assert (config.num_speculative_tokens, config.prompt_lookup_max, config.prompt_lookup_min) == (4, 4, 2)


def test_ngram_lookup():
    from retnet.serve.speculative import NgramIndex

    # The latest earlier occurrence of the longest suffix: (1, 2) ended at 1 and at 4; the one at 4 is taken.
    assert NgramIndex([1, 2, 3, 1, 2, 9, 1, 2], range(2, 5)).propose([], 3) == [9, 1, 2]
    assert NgramIndex([5, 6, 7, 8], range(2, 5)).propose([], 3) == []
    # A loop close to the end continues itself.
    index = NgramIndex([4, 7, 7], range(2, 3))
    assert index.propose([], 3) == []
    assert index.propose([7], 3) == [7, 7, 7]


async def test_a_cancel_landing_anywhere_in_speculative_steps_ends_the_choice_once(model_dir):
    # As plain decoding's: wherever the event loop's cancel lands in a speculative step, the choice ends once
    # ("length" with its session saved, or "abort" with it untouched) and its slot is freed once.
    from transformers import AutoTokenizer

    from retnet.serve.engine import Engine
    from retnet.serve.metrics import ServeMetrics
    from retnet.serve.sampling import SamplingParams

    from .test_engine_state import drain
    from .test_units import cancel_late

    settings = ServeSettings(model=str(model_dir), speculative_config=json.dumps(SPEC))
    engine = Engine(settings, AutoTokenizer.from_pretrained(model_dir), ServeMetrics(),
                    model=RetNetForCausalLM.from_pretrained(model_dir))
    engine._load()
    engine.ready = True

    def run():
        with torch.inference_mode():
            while engine.waiting or engine.prefilling or engine.joining or engine.running:
                engine._iteration()

    prompt = engine.tokenizer.encode(REPEATS)
    handle = engine.submit([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    run()
    await asyncio.sleep(0)
    loop = prompt + drain(handle)[0]  # its greedy continuation loops: drafts from the first step on
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outcomes = set()
    for cancel_at in (*range(1, 12), 16, 24, 40, 80):
        engine.submit([loop[:20]], params, session_id="s")
        run()
        before = engine.sessions.sessions["s"].tokens
        handle = engine.submit([loop[20:]], params, session_id="s")
        cancel_late(handle, cancel_at)
        run()
        await asyncio.sleep(0)
        ends = []
        while not handle.queue.empty():
            ends += [out.finish_reason for out in handle.queue.get_nowait() if out.finish_reason]
        assert len(ends) == 1 and ends[0] in ("length", "abort"), (cancel_at, ends)
        session = engine.sessions.sessions["s"]
        assert session.tokens == (before if ends[0] == "abort" else before + len(loop) - 20 + 12)
        assert engine.in_system == 0 and not session.busy
        outcomes.add(ends[0])
        assert engine.sessions.delete("s")
    assert outcomes == {"length", "abort"}
    assert engine.metrics.spec_accepted_tokens._value.get() > 0


@pytest.mark.parametrize("xpos", [False, True])
def test_a_packed_verify_forward_is_token_by_token_decoding(xpos):
    # What a speculative step relies on: a packed recurrent forward of a few tokens a row, each row continuing its
    # own state, gives every position the logits and the final state that decoding them one by one gives.
    from retnet.model import RetNetCache, RetNetConfig
    from retnet.serve.speculative import VERIFY_MODE

    config = RetNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, chunk_size=8,
                          use_xpos=xpos)
    torch.manual_seed(0)
    model = RetNetForCausalLM(config).eval()
    feeds = [[3, 4, 5, 6], [7], [8, 9]]
    with torch.inference_mode():
        start = model(torch.randint(0, 64, (3, 5)), use_cache=True).cache
        cu_seqlens = torch.tensor([0, 4, 5, 7])
        packed = model(torch.tensor([[t for feed in feeds for t in feed]]), cache=start.clone(), use_cache=True,
                       retention_mode=VERIFY_MODE, cu_seqlens=cu_seqlens)
        for row, feed in enumerate(feeds):
            cache = start.select([row])
            for t, token in enumerate(feed):
                out = model(torch.tensor([[token]]), cache=cache, use_cache=True, retention_mode="recurrent")
                cache = out.cache
                torch.testing.assert_close(out.logits[0, -1], packed.logits[0, cu_seqlens[row] + t], atol=1e-5,
                                           rtol=1e-5)
            for layer in range(config.num_hidden_layers):
                torch.testing.assert_close(cache.states[layer][0], packed.cache.states[layer][row], atol=1e-5,
                                           rtol=1e-5)
            assert int(cache.offsets[0]) == int(packed.cache.offsets[row])
    assert isinstance(packed.cache, RetNetCache)


async def test_a_choice_ending_after_a_refused_draft_saves_every_token_but_the_last(model_dir, monkeypatch):
    # Its row went back to the state from before the step: the extra forward must bring it to prompt +
    # answer[:-1] exactly (the state plain decoding leaves), for its session and its prefix-cache entry alike.
    from transformers import AutoTokenizer

    import retnet.serve.engine as engine_module
    from retnet.serve.metrics import ServeMetrics
    from retnet.serve.sampling import SamplingParams

    from .test_engine_state import drain

    model = RetNetForCausalLM.from_pretrained(model_dir).eval()
    settings = ServeSettings(model=str(model_dir), speculative_config=json.dumps(SPEC))
    engine = engine_module.Engine(settings, AutoTokenizer.from_pretrained(model_dir), ServeMetrics(), model=model)
    engine._load()
    engine.ready = True
    # (tokens so far, drafts) of each step; the feeds of the extra forwards for rows that ended behind.
    steps, catch_ups = [], []
    propose, packed = engine_module.propose_drafts, engine._packed_forward

    def recording(running, config):
        drafts = propose(running, config)
        steps.append((len(running[0].tokens), drafts[0]))
        return drafts

    def counting(feeds, cache, slots, keep_all, **options):
        catch_ups.extend([] if keep_all else feeds)
        return packed(feeds, cache, slots, keep_all, **options)

    engine._packed_forward = counting
    monkeypatch.setattr(engine_module, "propose_drafts", recording)

    async def run(session_id=None, **kw):
        handle = engine.submit([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, **kw),
                               session_id=session_id)
        with torch.inference_mode():
            while engine.waiting or engine.prefilling or engine.joining or engine.running:
                engine._iteration()
        await asyncio.sleep(0)
        return drain(handle)[0]

    prompt = engine.tokenizer.encode(REPEATS)
    answer = await run()
    # The first refusal of a draft whose token is new: a stop token there ends the choice right after it.
    refused = [length + p for length, draft in steps for p, token in enumerate(draft)
               if length + p < len(answer) and answer[length + p] != token
               and all(answer[length + q] == draft[q] for q in range(p))]
    end = next(j for j in refused if answer[j] not in answer[:j])
    # A new session's answer is a prefix-cache entry too.
    assert await run("s", stop_token_ids=frozenset({answer[end]})) == answer[: end + 1]
    assert catch_ups, "no choice ended behind its state"
    with torch.inference_mode():
        reference = model(torch.tensor([prompt + answer[:end]]), use_cache=True).cache
    saved = {"session": engine.sessions.sessions["s"].cache,
             "prefix entry": engine.prefix_cache.entries[tuple(prompt + answer[:end])].cache}
    for where, cache in saved.items():
        assert int(cache.offsets[0]) == len(prompt) + end, where
        for layer, state in enumerate(cache.states):
            torch.testing.assert_close(state[0], reference.states[layer][0], atol=1e-4, rtol=1e-4, msg=where)
