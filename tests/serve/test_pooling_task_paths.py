"""vLLM's ``task`` on ``/pooling``: the task served is read (a classifier's ``classify`` applies the activation by
default, as ``/classify``), any other is 400 naming ``task`` rather than answered with one pooled row an input
(``token_embed`` and ``token_classify`` ask for a row a token)."""

from __future__ import annotations

import pytest

from tests.serve.conftest import serve_app
from tests.serve.test_classify import save_classifier

pytestmark = pytest.mark.anyio


def refused_task(response, value: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("task", "unsupported_parameter") and value in error["message"]


async def test_a_classifiers_pooling_reads_the_classify_task_and_refuses_the_others(model_dir, tmp_path):
    async with serve_app(save_classifier(tmp_path / "classifier", model_dir, 3)) as http:
        probs = (await http.post("/classify", json={"input": "Hello world!"})).json()["data"][0]["probs"]
        raw = (await http.post("/pooling", json={"input": "Hello world!"})).json()["data"][0]["data"]
        assert raw != pytest.approx(probs, abs=1e-3)
        task = (await http.post("/pooling", json={"input": "Hello world!", "task": "classify"})).json()
        assert task["data"][0]["data"] == pytest.approx(probs, abs=1e-6)
        off = await http.post("/pooling", json={"input": "Hello world!", "task": "classify", "use_activation": False})
        assert off.json()["data"][0]["data"] == pytest.approx(raw, abs=1e-6)
        for value in ("token_classify", "embed", "token_embed", "score"):
            refused_task(await http.post("/pooling", json={"input": "Hello world!", "task": value}), value)
        assert (await http.post("/pooling", json={"input": "Hello world!", "task": None})).status_code == 200


async def test_an_embedding_servers_pooling_reads_the_embed_task_and_refuses_the_others(model_dir):
    async with serve_app(model_dir, convert="embed") as http:
        plain = (await http.post("/pooling", json={"input": "Hello world!"})).json()["data"][0]["data"]
        task = (await http.post("/pooling", json={"input": "Hello world!", "task": "embed"})).json()
        assert task["data"][0]["data"] == pytest.approx(plain, abs=1e-6)
        for value in ("token_embed", "classify", "token_classify"):
            refused_task(await http.post("/pooling", json={"input": "Hello world!", "task": value}), value)
