"""vLLM's request extras that change the output (``min_tokens``, ``stop_token_ids``, ``include_stop_str_in_output``,
``allowed_token_ids``, ``truncate_prompt_tokens``, ``bad_words``, chat's template extras), and those the server
refuses by name instead of ignoring, against an in-process app."""

import json

import pytest

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def streamed_choices(events: list, chat: bool = False) -> dict[int, dict]:
    """Per choice index: its text, token ids and finish reasons, gathered from a stream's chunks."""
    out: dict[int, dict] = {}
    for event in events:
        for choice in event["choices"]:
            mine = out.setdefault(choice["index"], {"text": "", "token_ids": [], "finish": []})
            mine["text"] += (choice["delta"].get("content") or "") if chat else choice["text"]
            mine["token_ids"] += choice.get("token_ids") or []
            if choice["finish_reason"]:
                mine["finish"].append(choice["finish_reason"])
    return out


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


def eos_of(client) -> int:
    (eos,) = client.app.state.engine.eos_ids
    return eos


# -- min_tokens ------------------------------------------------------------------------------------------------
async def test_min_tokens_holds_eos_back_until_that_many_tokens(client):
    eos = eos_of(client)
    # EOS is every step's greedy choice: without min_tokens the completion is EOS alone.
    req = {"prompt": "Hello", "max_tokens": 12, "temperature": 0, "return_token_ids": True,
           "logit_bias": {str(eos): 100}}
    alone = (await client.post("/v1/completions", json=req)).json()
    assert alone["choices"][0]["token_ids"] == [eos] and alone["choices"][0]["finish_reason"] == "stop"
    # What the model writes with EOS out of the way: min_tokens must give exactly its first 5 tokens.
    free = (await client.post("/v1/completions", json={**req, "max_tokens": 5, "logit_bias": {str(eos): -100}}))
    free_choice = free.json()["choices"][0]
    assert eos not in free_choice["token_ids"]
    for stream in (False, True):
        r = await client.post("/v1/completions", json={**req, "min_tokens": 5, "stream": stream,
                                                       "stream_options": {"include_usage": True} if stream else None})
        if stream:
            events = sse_events(r.text)
            choice = streamed_choices(events)[0]
            ids, text, finish = choice["token_ids"], choice["text"], choice["finish"]
            usage = events[-1]["usage"]
        else:
            body = r.json()
            ids, text = body["choices"][0]["token_ids"], body["choices"][0]["text"]
            finish, usage = [body["choices"][0]["finish_reason"]], body["usage"]
        assert ids == free_choice["token_ids"] + [eos], stream
        assert text == free_choice["text"] and finish == ["stop"]
        assert usage["completion_tokens"] == 6  # EOS counts, as it always has


async def test_min_tokens_masks_eos_when_sampling_too(client):
    eos = eos_of(client)
    req = {"prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "seed": 3, "n": 3, "min_tokens": 4,
           "return_token_ids": True, "logit_bias": {str(eos): 100}}
    for choice in (await client.post("/v1/completions", json=req)).json()["choices"]:
        assert len(choice["token_ids"]) == 5 and eos not in choice["token_ids"][:4], choice
        assert choice["token_ids"][4] == eos and choice["finish_reason"] == "stop"


async def test_min_tokens_with_ignore_eos_masks_eos_only_before_it(client):
    # As vLLM: EOS is masked for the first min_tokens tokens whatever ignore_eos, and ignore_eos still
    # lets it be generated (without ending the choice) afterwards.
    eos = eos_of(client)
    req = {"prompt": "Hello", "max_tokens": 6, "min_tokens": 3, "return_token_ids": True,
           "logit_bias": {str(eos): 100}, **GREEDY}
    choice = (await client.post("/v1/completions", json=req)).json()["choices"][0]
    assert eos not in choice["token_ids"][:3] and choice["token_ids"][3:] == [eos] * 3
    assert choice["finish_reason"] == "length"


async def test_stop_strings_do_not_end_a_choice_before_min_tokens(client):
    req = {"prompt": "The retention", "max_tokens": 10, "return_token_ids": True, **GREEDY}
    base = (await client.post("/v1/completions", json=req)).json()["choices"][0]
    first = base["text"][:1]
    assert first
    stopped = (await client.post("/v1/completions", json={**req, "stop": first})).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == ""
    head = (await client.post("/v1/completions", json={**req, "max_tokens": 4})).json()["choices"][0]["text"]
    assert head.startswith(first)
    for stream in (False, True):
        r = await client.post("/v1/completions", json={**req, "stop": first, "min_tokens": 4, "stream": stream})
        choice = streamed_choices(sse_events(r.text))[0] if stream else r.json()["choices"][0]
        ids = choice["token_ids"]
        assert len(ids) >= 4 and ids == base["token_ids"][: len(ids)]
        # The first 4 tokens' text comes whole, the stop string in it included; any stop is looked for after.
        assert choice["text"].startswith(head), (stream, choice["text"], head)
        assert first not in choice["text"][len(head):]


async def test_a_stop_string_straddling_the_min_tokens_text_ends_the_choice(client):
    """vLLM's: a stop that starts in the first min_tokens tokens' text and ends after it is found, and the text
    from it on is not returned (also streamed: its start was held back)."""
    req = {"prompt": "The retention", "max_tokens": 10, **GREEDY}
    base = (await client.post("/v1/completions", json=req)).json()["choices"][0]["text"]
    head = (await client.post("/v1/completions", json={**req, "max_tokens": 4})).json()["choices"][0]["text"]
    assert base.startswith(head) and len(base) > len(head)
    stop = base[len(head) - 1 : len(head) + 1]
    for stream in (False, True):
        r = await client.post("/v1/completions", json={**req, "stop": stop, "min_tokens": 4, "stream": stream})
        choice = streamed_choices(sse_events(r.text))[0] if stream else r.json()["choices"][0]
        finish = choice["finish"] if stream else [choice["finish_reason"]]
        assert choice["text"] == head[:-1] and finish == ["stop"], (stream, choice, head, stop)


async def test_min_tokens_on_chat_with_stop_token_ids(client):
    forced = 300
    req = {**CHAT, "max_tokens": 8, "return_token_ids": True, "logit_bias": {str(forced): 100},
           "stop_token_ids": [forced], "min_tokens": 3, **GREEDY}
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json={**req, "stream": stream})
        if stream:
            choice = streamed_choices(sse_events(r.text), chat=True)[0]
            ids, finish = choice["token_ids"], choice["finish"]
        else:
            choice = r.json()["choices"][0]
            ids, finish = choice["token_ids"], [choice["finish_reason"]]
        assert len(ids) == 4 and forced not in ids[:3] and ids[3] == forced and finish == ["stop"], (stream, ids)


async def test_min_tokens_is_checked_against_max_tokens(client):
    cases = [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "min_tokens": 4}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "min_tokens": -1}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "min_tokens": True}),
        ("/v1/completions", {"prompt": "hi", "min_tokens": 10**6}),  # over the default max_tokens
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2, "min_tokens": 3}),
    ]
    for path, body in cases:
        r = await client.post(path, json=body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == "min_tokens" and "min_tokens" in error["message"], (body, error)
    for body in ({"min_tokens": 3}, {"min_tokens": None}, {"min_tokens": 0}):
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, **body})
        assert r.status_code == 200, (body, r.text)


# -- stop_token_ids --------------------------------------------------------------------------------------------
async def test_stop_token_ids_end_the_choice_without_their_text(client):
    req = {"prompt": "The retention", "max_tokens": 12, "return_token_ids": True, **GREEDY}
    base = (await client.post("/v1/completions", json=req)).json()["choices"][0]["token_ids"]
    at = next(i for i in range(1, len(base)) if base[i] not in base[:i])
    before = (await client.post("/v1/completions", json={**req, "max_tokens": at})).json()["choices"][0]
    never = next(i for i in range(client.app.state.engine.vocab_size) if i not in base)
    for stream in (False, True):
        r = await client.post("/v1/completions", json={**req, "stop_token_ids": [base[at], never],
                                                       "stream": stream,
                                                       "stream_options": {"include_usage": True} if stream else None})
        if stream:
            events = sse_events(r.text)
            choice = streamed_choices(events)[0]
            finish, usage = choice["finish"], events[-1]["usage"]
        else:
            choice, usage = r.json()["choices"][0], r.json()["usage"]
            finish = [choice["finish_reason"]]
        # Like EOS: the token counts and is in token_ids, its text is not in the output.
        assert choice["token_ids"] == base[: at + 1] and finish == ["stop"], stream
        assert choice["text"] == before["text"]
        assert usage["completion_tokens"] == at + 1
    # [] and null are no stop token ids.
    for none in ([], None):
        r = await client.post("/v1/completions", json={**req, "stop_token_ids": none})
        assert r.json()["choices"][0]["token_ids"] == base


async def test_stop_token_ids_with_n_choices_end_each_on_its_own(client):
    req = {"prompt": "Hello", "max_tokens": 16, "temperature": 1.0, "seed": 11, "n": 4, "ignore_eos": True,
           "return_token_ids": True}
    free = [c["token_ids"] for c in (await client.post("/v1/completions", json=req)).json()["choices"]]
    stop = free[0][3]  # one choice's 4th token: that choice (and any other that samples it) stops there
    expected = [ids[: ids.index(stop) + 1] if stop in ids else ids for ids in free]
    whole = (await client.post("/v1/completions", json={**req, "stop_token_ids": [stop]})).json()["choices"]
    assert [c["token_ids"] for c in whole] == expected
    assert [c["finish_reason"] for c in whole] == ["stop" if stop in ids else "length" for ids in free]
    streamed = streamed_choices(sse_events((await client.post("/v1/completions", json={
        **req, "stop_token_ids": [stop], "stream": True})).text))
    for i, choice in enumerate(whole):
        assert streamed[i]["token_ids"] == choice["token_ids"] and streamed[i]["text"] == choice["text"]
        assert streamed[i]["finish"] == [choice["finish_reason"]]

    chat = {**CHAT, "max_tokens": 16, "temperature": 1.0, "seed": 11, "n": 3, "ignore_eos": True,
            "return_token_ids": True}
    free = [c["token_ids"] for c in (await client.post("/v1/chat/completions", json=chat)).json()["choices"]]
    stop = free[1][2]
    streamed = streamed_choices(sse_events((await client.post("/v1/chat/completions", json={
        **chat, "stop_token_ids": [stop], "stream": True})).text), chat=True)
    for i, ids in enumerate(free):
        assert streamed[i]["token_ids"] == (ids[: ids.index(stop) + 1] if stop in ids else ids)
        assert streamed[i]["finish"] == ["stop" if stop in ids else "length"]


async def test_stop_token_ids_stop_even_with_ignore_eos(client):
    forced = 300
    req = {"prompt": "Hello", "max_tokens": 5, "return_token_ids": True, "logit_bias": {str(forced): 100},
           "stop_token_ids": [forced], **GREEDY}
    choice = (await client.post("/v1/completions", json=req)).json()["choices"][0]
    assert choice["token_ids"] == [forced] and choice["text"] == "" and choice["finish_reason"] == "stop"


async def test_stop_token_ids_outside_the_vocabulary_are_refused(client):
    vocab = client.app.state.engine.vocab_size
    for bad in ([vocab], [1, -1], [True], "5", [1.5], {"a": 1}):
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stop_token_ids": bad})
        assert r.status_code == 400, (bad, r.text)
        error = r.json()["error"]
        assert error["param"].startswith("stop_token_ids") and "stop_token_ids" in error["message"], (bad, error)
    r = await client.post("/v1/chat/completions", json={**CHAT, "stop_token_ids": [vocab + 5]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text


async def test_min_tokens_that_would_mask_the_whole_vocabulary_is_refused(client):
    every = list(range(client.app.state.engine.vocab_size))
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "min_tokens": 1,
                                                   "stop_token_ids": every})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
    ok = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stop_token_ids": every})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "stop"


# -- include_stop_str_in_output -------------------------------------------------------------------------------
async def completion(client, stream: bool, chat: bool = False, **body) -> tuple[dict[int, dict], dict]:
    """Per choice index its text, token ids and finish reasons, and the usage, streamed or not alike."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if stream:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    r = await client.post(path, json=body)
    assert r.status_code == 200, r.text
    if stream:
        events = sse_events(r.text)
        return streamed_choices(events, chat), events[-1]["usage"]
    out = {}
    for c in r.json()["choices"]:
        text = c["message"]["content"] if chat else c["text"]
        out[c["index"]] = {"text": text, "token_ids": c.get("token_ids"), "finish": [c["finish_reason"]],
                           "prompt_token_ids": c.get("prompt_token_ids")}
    return out, r.json()["usage"]


async def test_include_stop_str_in_output_keeps_the_stop_string(client):
    req = {"prompt": "The retention", "max_tokens": 16, "return_token_ids": True, **GREEDY}
    base = (await client.post("/v1/completions", json=req)).json()["choices"][0]["text"]
    stop = base[6:8]  # ends the text after a few tokens (the micro model writes "rom" then "en"s here)
    cut = base.find(stop)
    assert len(stop) == 2 and cut > 0
    for stream in (False, True):
        without, _ = await completion(client, stream, **req, stop=stop)
        with_, _ = await completion(client, stream, **req, stop=stop, include_stop_str_in_output=True)
        assert without[0]["text"] == base[:cut] and without[0]["finish"] == ["stop"], stream
        assert with_[0]["text"] == base[: cut + len(stop)] and with_[0]["text"].endswith(stop), stream
        assert with_[0]["finish"] == ["stop"] and with_[0]["token_ids"] == without[0]["token_ids"]
    # Chat too, and every one of n sampled choices on its own: the stop string ends each text that it ended.
    for chat in (False, True):
        body = {"max_tokens": 24, "temperature": 1.0, "seed": 5, "n": 4, "ignore_eos": True, "stop": ["e", "n"],
                **({"messages": CHAT["messages"]} if chat else {"prompt": "The retention"})}
        for stream in (False, True):
            without, _ = await completion(client, stream, chat, **body)
            with_, _ = await completion(client, stream, chat, **body, include_stop_str_in_output=True)
            stopped = 0
            for i in range(4):
                assert with_[i]["finish"] == without[i]["finish"], (chat, stream, i)
                if without[i]["finish"] == ["stop"]:
                    stopped += 1
                    assert with_[i]["text"][:-1] == without[i]["text"], (chat, stream, i)
                    assert with_[i]["text"][-1:] in ("e", "n"), (chat, stream, i)
                else:
                    assert with_[i]["text"] == without[i]["text"]
            assert stopped >= 2, (chat, stream, without)


async def test_include_stop_str_in_output_keeps_a_stop_tokens_text_as_vllm_does(client):
    # vLLM's detokenizer leaves the stop token out of the text only without include_stop_str_in_output.
    forced = 300
    text = client.app.state.engine.tokenizer.decode([forced])
    assert text
    req = {"prompt": "Hello", "max_tokens": 5, "return_token_ids": True, "logit_bias": {str(forced): 100},
           "stop_token_ids": [forced], **GREEDY}
    for stream in (False, True):
        without, _ = await completion(client, stream, **req)
        with_, _ = await completion(client, stream, **req, include_stop_str_in_output=True)
        assert without[0]["text"] == "" and with_[0]["text"] == text, stream
        assert with_[0]["token_ids"] == [forced] and with_[0]["finish"] == ["stop"]


async def test_include_stop_str_in_output_must_be_a_boolean(client):
    for bad in ("maybe", [True], {"a": 1}, 2):
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                       "include_stop_str_in_output": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "include_stop_str_in_output", (bad, r.text)


# -- allowed_token_ids -----------------------------------------------------------------------------------------
async def test_allowed_token_ids_restrict_greedy_and_sampled_tokens(client):
    req = {"prompt": "The retention", "max_tokens": 10, "return_token_ids": True, **GREEDY}
    base = (await client.post("/v1/completions", json=req)).json()["choices"][0]["token_ids"]
    # None of the tokens greedy decoding picks: every step's argmax is forbidden.
    allowed = [t for t in range(40, 120) if t not in base][:12]
    biased = next(t for t in range(200, 260) if t not in allowed)
    for stream in (False, True):
        # A +100 bias on a token outside the set does not let it through: the mask comes last.
        got, usage = await completion(client, stream, **req, allowed_token_ids=allowed,
                                      logit_bias={str(biased): 100, str(allowed[3]): 5})
        ids = got[0]["token_ids"]
        assert len(ids) == 10 and set(ids) <= set(allowed) and ids[0] != base[0], (stream, ids)
        assert usage["completion_tokens"] == 10
    # The bias still ranks the allowed tokens: +100 on one of them makes it every step's choice.
    got, _ = await completion(client, False, **req, allowed_token_ids=allowed, logit_bias={str(allowed[3]): 100})
    assert got[0]["token_ids"] == [allowed[3]] * 10
    for chat in (False, True):
        body = {"max_tokens": 12, "temperature": 1.0, "seed": 2, "n": 3, "return_token_ids": True,
                "ignore_eos": True, "allowed_token_ids": allowed,
                **({"messages": CHAT["messages"]} if chat else {"prompt": "Hello"})}
        for stream in (False, True):
            got, _ = await completion(client, stream, chat, **body)
            seen = set()
            for i in range(3):
                assert len(got[i]["token_ids"]) == 12 and set(got[i]["token_ids"]) <= set(allowed), (chat, stream)
                seen.update(got[i]["token_ids"])
            assert len(seen) > 3  # sampled, not one token


async def test_allowed_token_ids_with_min_tokens_hold_eos_back(client):
    eos = eos_of(client)
    other = 77
    req = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "return_token_ids": True,
           "allowed_token_ids": [eos, other], "logit_bias": {str(eos): 50}}
    assert (await completion(client, False, **req))[0][0]["token_ids"] == [eos]
    for stream in (False, True):
        got, _ = await completion(client, stream, **req, min_tokens=3)
        assert got[0]["token_ids"] == [other] * 3 + [eos] and got[0]["finish"] == ["stop"], stream
    # EOS alone, masked by min_tokens, would leave nothing to sample.
    r = await client.post("/v1/completions", json={**req, "allowed_token_ids": [eos], "min_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids", r.text


async def test_allowed_token_ids_are_checked(client):
    vocab = client.app.state.engine.vocab_size
    for path, base in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("/v1/chat/completions", CHAT)):
        for bad in ([], [vocab], [1, -1], [True], "5", [1.5]):
            r = await client.post(path, json={**base, "allowed_token_ids": bad})
            assert r.status_code == 400, (bad, r.text)
            error = r.json()["error"]
            assert error["param"].startswith("allowed_token_ids") and "allowed_token_ids" in error["message"], error


# -- truncate_prompt_tokens ------------------------------------------------------------------------------------
async def test_truncate_prompt_tokens_runs_the_prompts_last_tokens(client):
    prompt = "The retention mechanism replaces attention"
    req = {"prompt": prompt, "max_tokens": 6, "return_token_ids": True, **GREEDY}
    full, full_usage = await completion(client, False, **req)
    ids = full[0]["prompt_token_ids"]
    assert len(ids) > 4
    tail_text = client.app.state.engine.tokenizer.decode(ids[-4:])
    # What the last 4 tokens alone generate, given as token ids.
    alone, _ = await completion(client, False, **{**req, "prompt": ids[-4:]})
    assert alone[0]["token_ids"] != full[0]["token_ids"]  # so that truncation shows in the output
    for stream in (False, True):
        got, usage = await completion(client, stream, **req, truncate_prompt_tokens=4, echo=True)
        assert usage["prompt_tokens"] == 4 and full_usage["prompt_tokens"] == len(ids), stream
        assert got[0]["token_ids"] == alone[0]["token_ids"], stream
        # echo returns the prompt that ran, not the one sent.
        assert got[0]["text"] == tail_text + alone[0]["text"] and not got[0]["text"].startswith(prompt), stream
        if not stream:
            assert got[0]["prompt_token_ids"] == ids[-4:]
    # A limit above the prompt's length changes nothing; a token-id prompt is cut the same way.
    same, usage = await completion(client, False, **req, truncate_prompt_tokens=len(ids) + 5, echo=True)
    assert same[0]["text"] == prompt + full[0]["text"] and usage["prompt_tokens"] == len(ids)
    cut, usage = await completion(client, False, **{**req, "prompt": [ids, ids[:3]]}, truncate_prompt_tokens=4)
    assert cut[0]["token_ids"] == alone[0]["token_ids"] and usage["prompt_tokens"] == 4 + 3


async def test_truncate_prompt_tokens_on_chat_cuts_the_templated_conversation(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The retention mechanism"}]
    req = {"messages": messages, "max_tokens": 5, "return_token_ids": True, **GREEDY}
    full, _ = await completion(client, False, True, **req)
    ids = full[0]["prompt_token_ids"]
    alone, _ = await completion(client, False, **{**req, "messages": None, "prompt": ids[-5:]})
    for stream in (False, True):
        got, usage = await completion(client, stream, True, **req, truncate_prompt_tokens=5)
        assert usage["prompt_tokens"] == 5 and got[0]["token_ids"] == alone[0]["token_ids"], stream
        assert got[0]["text"] == alone[0]["text"]


async def test_truncate_prompt_tokens_lets_a_long_prompt_in_and_is_checked(open_app):
    async with open_app(max_prompt_tokens=8) as client:
        long = "The retention mechanism replaces attention with a decaying recurrence."
        r = await client.post("/v1/completions", json={"prompt": long, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = await client.post("/v1/completions", json={"prompt": long, "max_tokens": 2, "truncate_prompt_tokens": 8})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 8, r.text
        # vLLM's -1: as many as the server runs (--max-prompt-tokens), on both endpoints
        r = await client.post("/v1/completions", json={"prompt": long, "max_tokens": 2, "truncate_prompt_tokens": -1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 8, r.text
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": long}], "max_tokens": 2, "truncate_prompt_tokens": -1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 8, r.text
        for bad in (0, -2, 9, True, 1.5, "x"):
            for path, base in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                               ("/v1/chat/completions", CHAT)):
                r = await client.post(path, json={**base, "truncate_prompt_tokens": bad})
                assert r.status_code == 400, (bad, r.text)
                assert r.json()["error"]["param"] == "truncate_prompt_tokens", (bad, r.text)


# -- bad_words -------------------------------------------------------------------------------------------------
def spellings(client, word: str) -> list[list[int]]:
    """vLLM's: the word without leading spaces, and with one when that is another word-initial token."""
    tok = client.app.state.engine.tokenizer
    plain = tok.encode(word.lstrip(), add_special_tokens=False)
    spaced = tok.encode(" " + word.lstrip(), add_special_tokens=False)
    if not plain:
        return []
    return [plain] + ([spaced] if spaced[0] != plain[0] and len(spaced) == len(plain) else [])


def contains(ids: list[int], seq: list[int]) -> bool:
    return any(ids[i : i + len(seq)] == seq for i in range(len(ids) - len(seq) + 1))


async def test_a_single_token_bad_word_is_never_generated(client):
    tok = client.app.state.engine.tokenizer
    req = {"prompt": "The retention", "max_tokens": 16, "return_token_ids": True, **GREEDY}
    base = (await client.post("/v1/completions", json=req)).json()["choices"][0]
    # The token greedy decoding picks most often (the micro model repeats "en"), as a word.
    common = max(set(base["token_ids"]), key=base["token_ids"].count)
    word = tok.decode([common])
    forms = spellings(client, word)
    assert [common] in forms and base["token_ids"].count(common) >= 3
    for stream in (False, True):
        got, _ = await completion(client, stream, **req, bad_words=[word])
        ids = got[0]["token_ids"]
        assert len(ids) == 16 and not any(contains(ids, f) for f in forms), (stream, ids)
        first = base["token_ids"].index(common)
        assert ids[:first] == base["token_ids"][:first] and ids[first] != common
    # Every one of n sampled choices, chat too.
    for chat in (False, True):
        body = {"max_tokens": 16, "temperature": 1.0, "seed": 9, "n": 3, "return_token_ids": True,
                "ignore_eos": True, **({"messages": CHAT["messages"]} if chat else {"prompt": "The retention"})}
        free, _ = await completion(client, False, chat, **body)
        # The most sampled token that is a word's spelling (not a byte of a character, say).
        sampled = [t for i in range(3) for t in free[i]["token_ids"] if [t] in spellings(client, tok.decode([t]))]
        word = tok.decode([max(set(sampled), key=sampled.count)])
        forms = spellings(client, word)
        assert sum(contains(free[i]["token_ids"], f) for i in range(3) for f in forms) >= 2
        for stream in (False, True):
            got, _ = await completion(client, stream, chat, **body, bad_words=[word])
            for i in range(3):
                assert not any(contains(got[i]["token_ids"], f) for f in forms), (chat, stream, i)


async def test_a_multi_token_bad_words_last_token_is_banned_after_its_prefix(client):
    tok = client.app.state.engine.tokenizer
    req = {"prompt": "The retention", "max_tokens": 16, "return_token_ids": True, **GREEDY}
    base = (await client.post("/v1/completions", json=req)).json()["choices"][0]["token_ids"]
    # Two generated tokens whose text the tokenizer spells as exactly those two tokens.
    at = next(j for j in range(len(base) - 1)
              if tok.encode(tok.decode(base[j : j + 2]), add_special_tokens=False) == base[j : j + 2]
              and not contains(base[: j + 1], base[j : j + 2]))
    word = tok.decode(base[at : at + 2])
    for stream in (False, True):
        got, _ = await completion(client, stream, **req, bad_words=[word, "zzzq"])
        ids = got[0]["token_ids"]
        # The first token is allowed; only the one completing the word is banned right after it.
        assert ids[: at + 1] == base[: at + 1] and ids[at + 1] != base[at + 1], (stream, at, ids, base)
        assert not any(contains(ids, f) for f in spellings(client, word)), (stream, ids)


async def test_bad_words_are_checked(client):
    for path, base in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("/v1/chat/completions", CHAT)):
        for bad in ("foo", [""], ["   "], [1], ["x" * 65], ["w"] * 65):
            r = await client.post(path, json={**base, "bad_words": bad})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["param"].startswith("bad_words"), (bad, r.text)
    # Banning every allowed token leaves nothing to sample.
    (only,) = client.app.state.engine.tokenizer.encode("en", add_special_tokens=False)
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "allowed_token_ids": [only],
                                                   "bad_words": ["en"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", r.text


async def test_a_multi_token_bad_word_yields_when_nothing_else_is_allowed(client):
    # allowed_token_ids leave only the bad word's tokens: spelling it beats sampling from no distribution.
    tok = client.app.state.engine.tokenizer
    word = next(w for w in ("Hello", "retention", "Stack", "print") if len(tok.encode(w, add_special_tokens=False)) > 1)
    ids = tok.encode(word, add_special_tokens=False)
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6, "return_token_ids": True,
                                                   "allowed_token_ids": ids, "bad_words": [word], **GREEDY})
    assert r.status_code == 200, r.text
    assert set(r.json()["choices"][0]["token_ids"]) <= set(ids)


# Structured output (tests/serve/test_structured_output.py): its fields' nulls pass below like the extras'.
STRUCTURED = ["response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
              "grammar", "json_schema"]


# -- vLLM's other output-changing extras: refused unless they would change nothing -----------------------------
# (use_beam_search runs, tests/serve/test_beam_search.py; length_penalty is refused without it)
REFUSED_EXTRAS = [
    ("length_penalty", 0.5),
    ("logits_processors", ["x"]),
    ("structural_tag", '{"structures": [], "triggers": ["<f>"]}'),  # vLLM's (chat): dropped, the text was free
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("field", "value"), REFUSED_EXTRAS,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(REFUSED_EXTRAS)])
async def test_output_changing_extras_are_refused_by_name(client, path, field, value):
    base = CHAT if path.endswith("chat/completions") else {"prompt": "hi", "max_tokens": 3}
    r = await client.post(path, json={**base, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"] and error["code"] == "unsupported_parameter"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_no_op_values_of_the_refused_extras_are_accepted(client, path):
    base = CHAT if path.endswith("chat/completions") else {"prompt": "hi", "max_tokens": 3}
    nulls = {field: None for field in [*STRUCTURED, *(field for field, _ in REFUSED_EXTRAS)]}
    no_ops = {"response_format": {"type": "text"}, "use_beam_search": False, "length_penalty": 1,
              "include_stop_str_in_output": False, "bad_words": [], "skip_special_tokens": True,
              "return_tokens_as_token_ids": False}
    nulls.update({"include_stop_str_in_output": None, "bad_words": None, "allowed_token_ids": None,
                  "truncate_prompt_tokens": None})
    for extra in (nulls, no_ops):
        r = await client.post(path, json={**base, **extra})
        assert r.status_code == 200, (extra, r.text)


# -- return_tokens_as_token_ids: logprobs name tokens by id ------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
async def test_return_tokens_as_token_ids_names_logprobs_tokens_by_id(client, stream):
    """vLLM's: every logprobs token and alternative is "token_id:<id>" (the chosen ones the ids returned), in a
    completion (with its echoed prompt) and a chat, whole or streamed; chat's ``bytes`` stay the tokens' own, and
    text offsets count the text as before. Without the field the tokens are text."""
    async def post(path, body):
        if not stream:
            return (await client.post(path, json=body)).json()["choices"]
        choices = {}
        async with client.stream("POST", path, json={**body, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        choices.setdefault(choice["index"], []).append(choice)
        return [choices[0]]

    completion = {"prompt": "def add", "max_tokens": 5, "logprobs": 2, "return_token_ids": True, **GREEDY}
    if not stream:
        completion["echo"] = True
    by_text = await post("/v1/completions", completion)
    by_id = await post("/v1/completions", {**completion, "return_tokens_as_token_ids": True})
    if stream:
        by_text = [_merge_completion_chunks(by_text[0])]
        by_id = [_merge_completion_chunks(by_id[0])]
    text_lp, id_lp = by_text[0]["logprobs"], by_id[0]["logprobs"]
    ids = (by_id[0]["prompt_token_ids"] if not stream else []) + by_id[0]["token_ids"]
    assert id_lp["tokens"] == [f"token_id:{i}" for i in ids]
    assert text_lp["tokens"] != id_lp["tokens"] and not any(t.startswith("token_id:") for t in text_lp["tokens"])
    assert id_lp["text_offset"] == text_lp["text_offset"] and id_lp["token_logprobs"] == text_lp["token_logprobs"]
    for top in id_lp["top_logprobs"]:
        assert top is None or (top and all(key.startswith("token_id:") for key in top))
    chat = {**CHAT, "max_tokens": 4, "logprobs": True, "top_logprobs": 2, "return_token_ids": True, **GREEDY}
    plain = (await post("/v1/chat/completions", chat))[0]
    named = (await post("/v1/chat/completions", {**chat, "return_tokens_as_token_ids": True}))[0]
    plain_content = plain["logprobs"]["content"] if not stream else _chat_logprob_entries(plain)
    named_content = named["logprobs"]["content"] if not stream else _chat_logprob_entries(named)
    chat_ids = named["token_ids"] if not stream else [t for c in named for t in c.get("token_ids") or []]
    assert [e["token"] for e in named_content] == [f"token_id:{i}" for i in chat_ids]
    assert [e["bytes"] for e in named_content] == [e["bytes"] for e in plain_content]
    assert all(t["token"].startswith("token_id:") for e in named_content for t in e["top_logprobs"])


def _merge_completion_chunks(chunks: list[dict]) -> dict:
    merged = {"logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, "token_ids": []}
    for chunk in chunks:
        for key in merged["logprobs"]:
            merged["logprobs"][key] += (chunk.get("logprobs") or {}).get(key) or []
        merged["token_ids"] += chunk.get("token_ids") or []
    return merged


def _chat_logprob_entries(chunks: list[dict]) -> list[dict]:
    return [entry for chunk in chunks for entry in ((chunk.get("logprobs") or {}).get("content") or [])]


async def test_the_servers_default_names_tokens_by_id_unless_a_request_says_otherwise(model_dir):
    from .conftest import serve_app

    async with serve_app(model_dir, return_tokens_as_token_ids=True) as served:
        body = {"prompt": "def add", "max_tokens": 3, "logprobs": 1, "return_token_ids": True, **GREEDY}
        default = (await served.post("/v1/completions", json=body)).json()["choices"][0]
        assert default["logprobs"]["tokens"] == [f"token_id:{i}" for i in default["token_ids"]]
        text = (await served.post("/v1/completions", json={**body, "return_tokens_as_token_ids": False})).json()
        assert not any(t.startswith("token_id:") for t in text["choices"][0]["logprobs"]["tokens"])


# -- chat's template extras: continue_final_message, echo, chat_template_kwargs, documents, add_special_tokens ----
PREFILLED = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


async def test_continue_final_message_leaves_the_last_message_open(client):
    # It was ignored: the template closed the assistant's message ("Hello<|endoftext|>") and the model started a new line
    # instead of continuing the prefilled answer.
    tokenizer = client.app.state.serving.tokenizer
    req = {"messages": PREFILLED, "max_tokens": 3, "return_token_ids": True, **GREEDY}
    r = await client.post("/v1/chat/completions", json={**req, "continue_final_message": True,
                                                        "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    expected = tokenizer.encode("<|user|>\nHi<|endoftext|><|assistant|>\nHello", add_special_tokens=False)
    assert r.json()["choices"][0]["prompt_token_ids"] == expected
    # vLLM's rule: both at once are a contradiction (a new message opened after one left open).
    r = await client.post("/v1/chat/completions", json={**req, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message", r.text


async def test_chat_echo_starts_the_answer_with_the_continued_message(client):
    req = {"messages": PREFILLED, "max_tokens": 4, "continue_final_message": True, "add_generation_prompt": False,
           **GREEDY}
    plain = (await client.post("/v1/chat/completions", json=req)).json()["choices"][0]["message"]["content"]
    echoed = (await client.post("/v1/chat/completions", json={**req, "echo": True})).json()
    assert echoed["choices"][0]["message"]["content"] == "Hello" + plain
    assert echoed["usage"]["completion_tokens"] == 4  # the echoed text is the prompt's, not generated
    events = sse_events((await client.post("/v1/chat/completions", json={**req, "echo": True, "stream": True})).text)
    assert streamed_choices(events, chat=True)[0]["text"] == "Hello" + plain
    # A new assistant message after a user's starts empty: nothing to echo.
    user_last = {**req, "messages": PREFILLED[:1], "continue_final_message": False, "add_generation_prompt": True}
    alone = (await client.post("/v1/chat/completions", json=user_last)).json()["choices"][0]["message"]["content"]
    echoed = (await client.post("/v1/chat/completions", json={**user_last, "echo": True})).json()
    assert echoed["choices"][0]["message"]["content"] == alone


async def test_chat_template_kwargs_and_documents_reach_the_template(client):
    tokenizer = client.app.state.serving.tokenizer
    tokenizer.chat_template = ("{% if documents %}{% for d in documents %}({{ d['text'] }}){% endfor %}{% endif %}"
                               "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                               "{% if style %}<{{ style }}>{% endif %}")
    req = {**CHAT, "return_token_ids": True, **GREEDY}

    async def prompt_text(**extra) -> str:
        r = await client.post("/v1/chat/completions", json={**req, **extra})
        assert r.status_code == 200, r.text
        return tokenizer.decode(r.json()["choices"][0]["prompt_token_ids"])

    assert await prompt_text() == "[hi]"
    assert await prompt_text(chat_template_kwargs={"style": "terse"}) == "[hi]<terse>"
    assert await prompt_text(documents=[{"title": "t", "text": "doc"}]) == "(doc)[hi]"
    # Arguments of the templating itself are not template variables: refused by name, not half applied.
    for argument in ("tokenize", "conversations"):  # (render_jinja_template's own: the template rejected "messages")
        r = await client.post("/v1/chat/completions", json={**req, "chat_template_kwargs": {argument: True}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
        assert f"{argument!r} is not a template variable" in r.json()["error"]["message"], r.text
    # A template sent by the client is not run.
    r = await client.post("/v1/chat/completions", json={**req, "chat_template": "{{ 'x' }}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text
