"""The official ``openai`` client, unchanged, against a real ``python -m retnet.serve`` (uvicorn) process:
what "OpenAI-compatible" has to mean for the users who already have that client in their code."""

import pytest

openai = pytest.importorskip("openai", reason="the openai client is in the [dev] extra")

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as api:
        yield api


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["micro"]
    card = client.models.retrieve("micro")
    assert card.id == "micro" and (card.max_prompt_tokens, card.max_completion_tokens) == (8192, 4096)
    assert card.max_model_len == 8192 + 4096
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert missing.value.body["code"] == "model_not_found"


def test_parameters_given_as_none_mean_the_default(client):
    # The client sends an argument given as None as JSON null; OpenAI reads that as "not given".
    nulls = {"n": None, "top_p": None, "presence_penalty": None, "frequency_penalty": None, "stream": None}
    base = client.completions.create(model="micro", prompt="def add(a, b):", max_tokens=4, **GREEDY)
    got = client.completions.create(model="micro", prompt="def add(a, b):", max_tokens=4, echo=None,
                                    logprobs=None, **nulls, **GREEDY)
    assert got.choices[0].text == base.choices[0].text
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]
    chat = client.chat.completions.create(model="micro", messages=messages, max_completion_tokens=3,
                                          temperature=None, logprobs=None, top_logprobs=None, **nulls,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3


def test_top_p_zero_is_accepted_and_greedy(client):
    greedy = client.completions.create(model="micro", prompt="class Stack:", max_tokens=6, **GREEDY)
    nucleus = client.completions.create(model="micro", prompt="class Stack:", max_tokens=6, temperature=1.0,
                                        top_p=0, seed=5, extra_body={"ignore_eos": True})
    assert nucleus.choices[0].text == greedy.choices[0].text


def test_completion_streamed_equals_non_streamed(client):
    whole = client.completions.create(model="micro", prompt="def add(a, b):", max_tokens=12, **GREEDY)
    choice = whole.choices[0]
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0

    chunks = list(client.completions.create(model="micro", prompt="def add(a, b):", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert {c.id for c in chunks} == {chunks[0].id}


def test_chat_stream_with_usage_and_roles(client):
    stream = client.chat.completions.create(
        model="micro", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=8, stream=True, stream_options={"include_usage": True}, **GREEDY,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8

    whole = client.chat.completions.create(
        model="micro", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=8, **GREEDY,
    )
    assert whole.choices[0].message.content == "".join(d.content or "" for d in deltas)


def test_seed_n_and_logprobs(client):
    def sample():
        return client.completions.create(model="micro", prompt="class Stack:", max_tokens=6, temperature=1.0,
                                         seed=7, n=2, logprobs=2)

    first, second = sample(), sample()
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert [c.index for c in first.choices] == [0, 1]
    logprobs = first.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) >= 1 for top in logprobs.top_logprobs)


def test_errors_become_the_clients_exceptions(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="micro", prompt="x", max_tokens=-1)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "max_tokens"

    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert missing.value.body["param"] == "model"

    # and the server still serves
    assert client.completions.create(model="micro", prompt="x", max_tokens=2).usage.completion_tokens <= 2


def test_session_continues_without_resending_history(client):
    session = {"ignore_eos": True, "return_token_ids": True, "session_id": "oa-1"}
    first = client.completions.create(model="micro", prompt="def add(a, b):", max_tokens=4, temperature=0,
                                      extra_body=session)
    second = client.completions.create(model="micro", prompt="\nclass Stack:", max_tokens=4, temperature=0,
                                       extra_body=session)
    turn, follow = first.choices[0], second.choices[0]
    history = turn.prompt_token_ids + turn.token_ids + follow.prompt_token_ids
    whole = client.completions.create(model="micro", prompt=history, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    assert whole.choices[0].token_ids == follow.token_ids
    assert whole.usage.prompt_tokens == len(history) > second.usage.prompt_tokens


def test_logit_bias_applies_and_unsupported_features_raise(client):
    forced = client.completions.create(model="micro", prompt="class Stack:", max_tokens=3, logit_bias={"300": 100},
                                       extra_body={"ignore_eos": True, "return_token_ids": True}, temperature=0)
    assert forced.choices[0].token_ids == [300, 300, 300]
    messages = [{"role": "user", "content": "Hello!"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for kwargs, param in (({"tools": [tool]}, "tools"), ({"stream_options": {"include_usage": True}}, "stream_options"),
                          ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": [1]}}},
                           "response_format.json_schema.schema")):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="micro", messages=messages, max_tokens=2, **kwargs)
        assert bad.value.body["param"] == param


def test_structured_output_through_the_clients_own_parse(client):
    """The official client's ``parse``: a pydantic model sent as a strict JSON schema, the reply read back into
    it. The micro model is random: the reply is an instance only because the server held it to the schema."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Reply(BaseModel):
        ok: bool
        n: int = Field(ge=0, le=99)
        tag: Literal["red", "green"]

    for seed in range(3):
        completion = client.chat.completions.parse(
            model="micro", messages=[{"role": "user", "content": "Hello!"}], response_format=Reply, max_tokens=80,
            temperature=1.0, seed=seed)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Reply), choice.message.content


def test_tool_calls_through_the_client_whole_and_streamed(client):
    """A named function's call, read back by the official client: from the response, and accumulated from a
    stream by the client's own helper (its events, the arguments parsed into the tool's pydantic model)."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Paint(BaseModel):
        color: Literal["red", "green"]
        glossy: bool
        label: str = Field(max_length=6)

    tool = openai.pydantic_function_tool(Paint)
    asked = {"model": "micro", "messages": [{"role": "user", "content": "Paint it."}], "tools": [tool],
             "tool_choice": {"type": "function", "function": {"name": "Paint"}}, "max_tokens": 100}
    for seed in range(2):
        choice = client.chat.completions.create(**asked, temperature=1.0, seed=seed).choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None  # a named call: OpenAI's "stop"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "Paint"
        Paint.model_validate_json(call.function.arguments)
    whole = client.chat.completions.create(**asked, temperature=0).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**asked, temperature=0) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion().choices[0]
    assert len(done) == 1 and done[0].name == "Paint" and isinstance(done[0].parsed_arguments, Paint)
    assert done[0].arguments == whole.function.arguments
    assert final.finish_reason == "stop" and final.message.tool_calls[0].function.name == "Paint"
