"""The Responses API's ``reasoning.effort`` and Anthropic Messages' ``output_config.effort`` reach the chat template as
chat's ``reasoning_effort`` does (vLLM reads the first as it); ``reasoning.summary`` is accepted, other settings and
unknown efforts are refused by name."""

import pytest

from tests.serve.conftest import serve_app
from tests.serve.test_request_fields_hunt_paths import TEMPLATE

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def client(model_dir):
    async with serve_app(model_dir, chat_template=TEMPLATE) as c:
        yield c


@pytest.fixture
def prompts(client, monkeypatch):
    """The text of every prompt the engine is given from now on."""
    engine, seen = client.app.state.engine, []
    submit = engine.submit

    def watched(prompt_ids, *args, **kwargs):
        seen.extend(engine.tokenizer.decode(ids) for ids in prompt_ids)
        return submit(prompt_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", watched)
    return seen


async def responses(client, **body):
    return await client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 1, "store": False, **body})


async def test_responses_reasoning_effort_reaches_the_template(client, prompts):
    """It was refused (400 unsupported_parameter "reasoning"), as a feature this server does not run."""
    r = await responses(client, reasoning={"effort": "low"})
    assert r.status_code == 200, r.text
    assert "[effort=low thinking=True]" in prompts[-1]
    assert r.json()["reasoning"] == {"effort": "low", "summary": None}
    r = await responses(client, reasoning={"effort": "none", "summary": "auto"})
    assert r.status_code == 200, r.text
    assert "[effort=none thinking=False]" in prompts[-1]
    assert r.json()["reasoning"] == {"effort": "none", "summary": "auto"}
    # chat_template_kwargs (a chat extra here) wins, as on chat
    r = await responses(client, reasoning={"effort": "high"}, chat_template_kwargs={"enable_thinking": False})
    assert r.status_code == 200 and "[effort=high thinking=False]" in prompts[-1], r.text
    for reasoning in (None, {}, {"effort": None}, {"summary": "detailed"}, {"generate_summary": "concise"}):
        r = await responses(client, reasoning=reasoning)
        assert r.status_code == 200, (reasoning, r.text)
        assert "[effort=unset thinking=unset]" in prompts[-1]
    assert r.json()["reasoning"] == {"effort": None, "summary": "concise"}
    assert (await responses(client)).json()["reasoning"] is None


@pytest.mark.parametrize(("reasoning", "param", "code"), [
    ({"effort": "lots"}, "reasoning.effort", "invalid_value"),
    ({"effort": 3}, "reasoning.effort", "invalid_value"),
    ({"summary": "long"}, "reasoning.summary", "invalid_value"),
    ({"effort": "low", "budget_tokens": 100}, "reasoning.budget_tokens", "unsupported_parameter"),
    ("low", "reasoning", "invalid_type"),
])
async def test_responses_reasoning_settings_not_run_are_refused_by_name(client, reasoning, param, code):
    r = await responses(client, reasoning=reasoning)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert param in error["message"]


async def test_messages_output_config_effort_reaches_the_template(client, prompts):
    """It was ignored: the template never saw it."""
    body = {"max_tokens": 1, "messages": MESSAGES}
    r = await client.post("/v1/messages", json={**body, "output_config": {"effort": "medium"}})
    assert r.status_code == 200, r.text
    assert "[effort=medium thinking=True]" in prompts[-1]
    r = await client.post("/v1/messages", json=body)
    assert r.status_code == 200 and "[effort=unset thinking=unset]" in prompts[-1], r.text
    # count_tokens counts the prompt the effort makes
    counts = []
    for extra in ({}, {"output_config": {"effort": "medium"}}):
        r = await client.post("/v1/messages/count_tokens", json={"messages": MESSAGES, **extra})
        assert r.status_code == 200, r.text
        counts.append(r.json()["input_tokens"])
    tokenizer = client.app.state.serving.tokenizer
    assert counts[1] - counts[0] == len(tokenizer.encode(prompts[-2])) - len(tokenizer.encode(prompts[-1])) != 0
    r = await client.post("/v1/messages", json={**body, "output_config": {"effort": "lots"}})
    assert r.status_code == 400 and "output_config.effort" in r.json()["error"]["message"], r.text
    r = await client.post("/v1/messages", json={**body, "reasoning_effort": "low"})
    assert r.status_code == 400 and "output_config.effort" in r.json()["error"]["message"], r.text
