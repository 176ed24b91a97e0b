"""``--enable-request-id-headers`` holds ``X-Request-Id`` to completions' and chat's limit on every route; chat's
``reasoning_effort`` (vLLM's, OpenAI's) reaches the chat template, and ``include_reasoning`` is accepted; request fields
that were a 500: against an in-process app."""

import pytest

from tests.serve.conftest import serve_app

pytestmark = pytest.mark.anyio

# Prints the variables reasoning_effort sets, or that they are unset.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "[effort={{ reasoning_effort | default('unset') }} thinking={{ enable_thinking | default('unset') }}]"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KEY = {"Authorization": "Bearer k"}
MESSAGES = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def client(model_dir):
    async with serve_app(model_dir, enable_request_id_headers=True, api_keys=["k"], chat_template=TEMPLATE) as c:
        yield c


async def test_an_overlong_request_id_header_is_refused_on_every_route(client):
    """Completions and chat refused an X-Request-Id over 256 characters but echoed it back in the header; every
    other route echoed one of any length."""
    long_id = {"X-Request-Id": "h" * 257}
    for method, path, body in [("GET", "/health", None), ("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                               ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 1}),
                               ("POST", "/tokenize", {"prompt": "hi"})]:
        r = await client.request(method, path, json=body, headers={**KEY, **long_id})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == "X-Request-Id" and "257" in r.json()["error"]["message"], r.text
        assert len(r.headers["x-request-id"]) == 32, (path, r.headers)  # a new one (uuid4's hex), not the sent one
    r = await client.post("/v1/messages", json={"max_tokens": 1, "messages": MESSAGES}, headers={**KEY, **long_id})
    assert r.status_code == 400 and r.json()["type"] == "error" and "X-Request-Id" in r.json()["error"]["message"]
    # Without the key its route needs: the 401 first, as over the body limits
    r = await client.post("/v1/completions", json={"prompt": "hi"}, headers=long_id)
    assert r.status_code == 401, r.text
    r = await client.get("/health", headers={"X-Request-Id": "h" * 256})
    assert r.status_code == 200 and r.headers["x-request-id"] == "h" * 256
    metrics = (await client.get("/metrics")).text
    assert 'retnet_requests_total{route="/health",status="400"}' in metrics, metrics  # counted as answers are


async def prompt_text(client, **body) -> str:
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, "return_token_ids": True,
                                                        **GREEDY, **body}, headers=KEY)
    assert r.status_code == 200, r.text
    return client.app.state.serving.tokenizer.decode(r.json()["choices"][0]["prompt_token_ids"])


async def test_reasoning_effort_reaches_the_chat_template(client):
    """vLLM passes reasoning_effort to the template (and the enable_thinking it implies); it was ignored."""
    assert "[effort=unset thinking=unset]" in await prompt_text(client)
    assert "[effort=low thinking=True]" in await prompt_text(client, reasoning_effort="low")
    assert "[effort=none thinking=False]" in await prompt_text(client, reasoning_effort="none")
    # What chat_template_kwargs sets itself wins, as over add_generation_prompt
    text = await prompt_text(client, reasoning_effort="high", chat_template_kwargs={"enable_thinking": False})
    assert "[effort=high thinking=False]" in text
    # /tokenize's chat form counts the prompt chat runs
    r = await client.post("/tokenize", json={"messages": MESSAGES, "reasoning_effort": "medium"}, headers=KEY)
    assert "[effort=medium thinking=True]" in client.app.state.serving.tokenizer.decode(r.json()["tokens"])
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "reasoning_effort": "lots"}, headers=KEY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort", r.text


async def test_include_reasoning_is_accepted_and_changes_nothing(client):
    """No reasoning parser splits reasoning off the answer: either value is the same answer."""
    body = {"messages": MESSAGES, "max_tokens": 4, **GREEDY}
    answers = []
    for extra in ({}, {"include_reasoning": False}, {"include_reasoning": True}):
        r = await client.post("/v1/chat/completions", json={**body, **extra}, headers=KEY)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"])
    assert answers[0] == answers[1] == answers[2]
    r = await client.post("/v1/messages", json={"max_tokens": 1, "messages": MESSAGES, "include_reasoning": False},
                          headers=KEY)
    assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", json={**body, "include_reasoning": "maybe"}, headers=KEY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "include_reasoning", r.text


async def test_a_logit_bias_key_of_thousands_of_digits_is_a_400(client):
    """int() refuses a string of over 4300 digits: the ValueError was a 500."""
    for key in ("9" * 5000, "-" + "9" * 5000):
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logit_bias": {key: 1}},
                              headers=KEY)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token_id", r.text
    # Leading zeros name the token all the same, past int()'s 4300 digits too (a 500), and two names of one token
    # are refused naming both
    for zeros in (30, 5000):
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1,
                                                       "logit_bias": {"0" * zeros + "5": 1}}, headers=KEY)
        assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1,
                                                   "logit_bias": {"5": 1, "0" * 5000 + "5": 2}}, headers=KEY)
    assert r.status_code == 400 and "both name token 5" in r.json()["error"]["message"], r.text

