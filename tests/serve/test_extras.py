"""vLLM's request extras that change the output (``min_tokens``, ``stop_token_ids``), and the structured-output
extras the server refuses by name instead of ignoring, against an in-process app."""

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


# -- structured output: refused by name ------------------------------------------------------------------------
REFUSED = [
    ("guided_json", {"type": "object"}),
    ("guided_regex", "[a-z]+"),
    ("guided_choice", ["yes", "no"]),
    ("guided_grammar", "root ::= \"a\""),
    ("structured_outputs", {"choice": ["yes", "no"]}),
    ("grammar", "root ::= \"a\""),
    ("json_schema", {"type": "object"}),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
]


# -- vLLM's other output-changing extras: refused unless they would change nothing -----------------------------
REFUSED_EXTRAS = [
    ("use_beam_search", True),
    ("length_penalty", 0.5),
    ("length_penalty", True),
    ("include_stop_str_in_output", True),
    ("include_stop_str_in_output", 0),
    ("bad_words", ["foo"]),
    ("allowed_token_ids", [1, 2]),
    ("truncate_prompt_tokens", 4),
    ("prompt_logprobs", 1),
    ("logits_processors", ["x"]),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("field", "value"), REFUSED + REFUSED_EXTRAS,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(REFUSED + REFUSED_EXTRAS)])
async def test_structured_output_extras_are_refused_by_name(client, path, field, value):
    base = CHAT if path.endswith("chat/completions") else {"prompt": "hi", "max_tokens": 3}
    r = await client.post(path, json={**base, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"] and error["code"] == "unsupported_parameter"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_no_op_values_of_the_refused_extras_are_accepted(client, path):
    base = CHAT if path.endswith("chat/completions") else {"prompt": "hi", "max_tokens": 3}
    nulls = {field: None for field, _ in REFUSED + REFUSED_EXTRAS}
    no_ops = {"response_format": {"type": "text"}, "use_beam_search": False, "length_penalty": 1,
              "include_stop_str_in_output": False, "bad_words": []}
    for extra in (nulls, no_ops):
        r = await client.post(path, json={**base, **extra})
        assert r.status_code == 200, (extra, r.text)
