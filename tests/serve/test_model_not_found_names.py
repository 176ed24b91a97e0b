"""The 404 for a model the server does not serve names what a request may name instead: it said "this server serves
'micro'", leaving out --served-model-name's other names (which a request may give), so a client told to use the
first could not learn of the rest; many LoRA adapters are shown as a few and a count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from retnet.serve.protocol import APIError
from retnet.serve.serving import OpenAIServing


def refusal(names: list[str], adapters: list[str]) -> str:
    serving = object.__new__(OpenAIServing)
    serving.settings = SimpleNamespace(served_model_name=names, model_paths=("/models/micro", *names[1:]))
    serving.model_name = names[0]
    serving.engine = SimpleNamespace(adapters=dict.fromkeys(adapters))
    with pytest.raises(APIError) as refused:
        serving._check_model("gpt-4")
    assert refused.value.status == 404 and refused.value.code == "model_not_found"
    return refused.value.message


@pytest.mark.parametrize(("names", "adapters", "said"), [
    (["micro"], [], "this server serves 'micro'"),
    (["micro", "alias", "other"], [], "this server serves 'micro' (also named 'alias', 'other')"),
    (["micro"], ["sql"], "this server serves 'micro' and the LoRA adapter 'sql'"),
    (["micro", "alias"], ["sql", "chat"], "serves 'micro' (also named 'alias') and the LoRA adapters 'sql', 'chat'"),
    (["micro"], [f"a{i}" for i in range(12)],
     "and the LoRA adapters 'a0', 'a1', 'a2', 'a3', 'a4' and 7 more (GET /v1/models)"),
])
def test_the_refusal_names_every_name_a_request_may_give(names, adapters, said):
    message = refusal(names, adapters)
    assert message.startswith("the model 'gpt-4' does not exist; ") and message.endswith(said), message



@pytest.mark.anyio
async def test_the_server_answers_an_unknown_model_with_its_aliases(open_app):
    async with open_app(served_model_name=["micro", "alias"]) as client:
        r = await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "Hi", "max_tokens": 1})
    error = r.json()["error"]
    assert r.status_code == 404 and error["code"] == "model_not_found", r.text
    assert "serves 'micro' (also named 'alias')" in error["message"], error
