"""vLLM's score and rerank APIs (``/score``, ``/rerank``) on the pooling engine: a reward model's score of a pair
against ``/pooling`` and ``/classify`` of the same pair as ``messages`` (the reward trainer's rendering), an
embedding model's against the cosine of ``/v1/embeddings``' vectors, the rerank order, the errors, the model kinds
refused, and run_batch's lines."""

from __future__ import annotations

import io
import json
import math
import re

import httpx
import pytest
import torch
import torch.nn.functional as F

from retnet.serve.app import create_app
from retnet.serve.run_batch import parse_lines, run_batch, served_urls
from tests.serve.conftest import ServerProcess, ThreadServer, make_settings, running_servers, serve_app
from tests.serve.test_classify import refused, save_classifier

PROMPTS = ["What replaces attention in a RetNet?", "Name a prime number."]
ANSWERS = ["Retention: a decaying recurrence.", "Nothing at all.", "Seven.", "def add(a, b):\n    return a + b\n"]
KEY = "sk-score"

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def reward_dir(model_dir, tmp_path_factory):
    return save_classifier(tmp_path_factory.mktemp("reward"), model_dir, 1)


@pytest.fixture(scope="module")
def servers(model_dir, reward_dir):
    """(the reward model's, the micro LM's as an embedding model) servers, started together: a real uvicorn process,
    and uvicorn serving the embedding model in this process as ``retnet-serve`` would (``ThreadServer``)."""
    embedder = ThreadServer(model_dir, "--convert", "embed")  # the first: loading here may fail, and leave no process
    with running_servers(ServerProcess(reward_dir), embedder) as procs:
        yield procs


@pytest.fixture(scope="module")
def reward(servers):
    with httpx.Client(base_url=servers[0].url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def embedder(servers):
    with httpx.Client(base_url=servers[1].url, timeout=60) as client:
        yield client


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def scores(body: dict) -> list[float]:
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    assert all(item["object"] == "score" for item in body["data"])
    return [item["score"] for item in body["data"]]


def pooled(client: httpx.Client, prompt: str, answer: str, **fields) -> tuple[float, int]:
    """(/pooling's raw reward of the pair sent as messages, its prompt tokens)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    body = ok(client.post("/pooling", json={"messages": messages, **fields}))
    return body["data"][0]["data"][0], body["usage"]["prompt_tokens"]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def forwards(client: httpx.Client) -> tuple[float, float]:
    """(pooling forwards run, inputs they pooled), from /metrics."""
    text = client.get("/metrics").text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
    return value("retnet_pooling_batch_inputs_count"), value("retnet_pooling_batch_inputs_sum")


# ----------------------------------------------------------------------------------------------------------
# A reward model
# ----------------------------------------------------------------------------------------------------------
def test_a_pairs_score_is_the_sigmoid_of_its_reward_as_messages(reward):
    before = forwards(reward)
    body = ok(reward.post("/score", json={"model": "micro", "text_1": PROMPTS[0], "text_2": ANSWERS}))
    assert re.fullmatch(r"score-[0-9a-f]+", body["id"]) and body["object"] == "list"
    assert isinstance(body["created"], int) and body["model"] == "micro"
    runs, inputs = (after - first for after, first in zip(forwards(reward), before, strict=True))
    assert (runs, inputs) == (1, len(ANSWERS))  # one submission: the pairs packed into one forward
    expected = [pooled(reward, PROMPTS[0], answer) for answer in ANSWERS]
    assert scores(body) == pytest.approx([sigmoid(raw) for raw, _ in expected], abs=1e-5)
    tokens = sum(count for _, count in expected)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    # /classify's probability of the same messages; use_activation false (or vLLM's older names): the raw reward.
    messages = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": ANSWERS[0]}]
    classified = ok(reward.post("/classify", json={"messages": messages}))["data"][0]["probs"][0]
    assert scores(body)[0] == pytest.approx(classified, abs=1e-5)
    for off in ({"use_activation": False}, {"activation": False}, {"softmax": False}):
        raw = ok(reward.post("/v1/score", json={"text_1": PROMPTS[0], "text_2": ANSWERS[:2], **off}))
        assert scores(raw) == pytest.approx([value for value, _ in expected[:2]], abs=1e-5)
    # truncate_prompt_tokens cuts the pair's tokens as it cuts the messages'
    for cut in ({"truncate_prompt_tokens": 5}, {"truncate_prompt_tokens": 5, "truncation_side": "right"}):
        short = ok(reward.post("/score", json={"text_1": PROMPTS[0], "text_2": ANSWERS[0], "use_activation": False,
                                               **cut}))
        assert scores(short) == pytest.approx([pooled(reward, PROMPTS[0], ANSWERS[0], **cut)[0]], abs=1e-5)
        assert short["usage"]["prompt_tokens"] == 5


def test_n_to_n_pairs_are_scored_pairwise_under_each_of_vllms_field_names(reward):
    left, right = [PROMPTS[0], PROMPTS[1], PROMPTS[0]], ANSWERS[:3]
    expected = [sigmoid(pooled(reward, q, a)[0]) for q, a in zip(left, right, strict=True)]
    for first, second in (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2")):
        body = ok(reward.post("/score", json={first: left, second: right}))
        assert scores(body) == pytest.approx(expected, abs=1e-5), (first, second)
    one = ok(reward.post("/score", json={"text_1": [PROMPTS[1]], "text_2": right[1]}))  # 1:1 given as lists
    assert scores(one) == pytest.approx([expected[1]], abs=1e-5)


def test_rerank_orders_the_documents_by_score(reward):
    expected = scores(ok(reward.post("/score", json={"text_1": PROMPTS[0], "text_2": ANSWERS})))
    order = sorted(range(len(ANSWERS)), key=lambda i: -expected[i])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        body = ok(reward.post(path, json={"model": "micro", "query": PROMPTS[0], "documents": ANSWERS}))
        assert re.fullmatch(r"rerank-[0-9a-f]+", body["id"]) and body["model"] == "micro"
        assert [r["index"] for r in body["results"]] == order
        assert [r["relevance_score"] for r in body["results"]] == pytest.approx(sorted(expected, reverse=True),
                                                                                abs=1e-5)
        assert [r["document"] for r in body["results"]] == [{"text": ANSWERS[i]} for i in order]
        tokens = body["usage"]["total_tokens"]
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens} and tokens > 0
    top = ok(reward.post("/rerank", json={"query": PROMPTS[0], "documents": ANSWERS, "top_n": 2,
                                          "return_documents": False}))["results"]
    assert [r["index"] for r in top] == order[:2] and all(set(r) == {"index", "relevance_score"} for r in top)
    raw = ok(reward.post("/rerank", json={"query": PROMPTS[0], "documents": ANSWERS[0], "use_activation": False}))
    assert raw["results"][0]["relevance_score"] == pytest.approx(pooled(reward, PROMPTS[0], ANSWERS[0])[0], abs=1e-5)


@pytest.mark.parametrize(("path", "body", "param", "code"), [
    ("/score", {"text_1": PROMPTS, "text_2": ANSWERS}, "text_1", "invalid_value"),  # 2 against 4
    ("/score", {"text_1": PROMPTS[0], "text_2": []}, "text_2", "empty_input"),
    ("/score", {"text_1": [], "text_2": ANSWERS}, "text_1", "empty_input"),
    ("/score", {"text_1": PROMPTS[0]}, "text_2", "missing"),
    ("/score", {"documents": ANSWERS}, "queries", "missing"),
    ("/score", {}, "text_1", "missing"),
    ("/score", {"text_1": PROMPTS[0], "documents": ANSWERS}, "documents", "invalid_value"),
    ("/score", {"text_1": PROMPTS[0], "queries": PROMPTS[0], "text_2": ANSWERS}, "queries", "invalid_value"),
    ("/score", {"queries": PROMPTS[0], "documents": ANSWERS, "items": ANSWERS}, "items", "invalid_value"),
    ("/score", {"text_1": PROMPTS[0], "text_2": [1, 2]}, "text_2[0]", "string_type"),
    ("/score", {"input": "a", "text_1": "a", "text_2": "b"}, "input", "unsupported_parameter"),
    ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens",
     "invalid_value"),
    ("/score", {"text_1": "a", "text_2": "b", "use_activation": True, "softmax": False}, "softmax", "invalid_value"),
    ("/score", {"text_1": "a", "text_2": "b", "padding": "max_length"}, "padding", "unsupported_parameter"),
    ("/score", {"model": "other", "text_1": "a", "text_2": "b"}, "model", "model_not_found"),
    ("/rerank", {"documents": ANSWERS}, "query", "missing"),
    ("/rerank", {"query": "a", "documents": []}, "documents", "empty_input"),
    ("/rerank", {"query": "a", "documents": ANSWERS, "top_n": -1}, "top_n", "greater_than_equal"),
    ("/v1/rerank", {"query": "a", "documents": ANSWERS, "top_n": "2"}, "top_n", "int_type"),
])
def test_a_bad_request_is_refused_naming_the_field_and_the_next_one_served(reward, path, body, param, code):
    refused(reward.post(path, json=body), 404 if code == "model_not_found" else 400, param, code)
    assert scores(ok(reward.post("/score", json={"text_1": "a", "text_2": "b"})))


# ----------------------------------------------------------------------------------------------------------
# An embedding model
# ----------------------------------------------------------------------------------------------------------
def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_an_embedding_models_score_is_the_cosine_of_its_embeddings(embedder):
    texts = [PROMPTS[0], *ANSWERS]
    embedded = ok(embedder.post("/v1/embeddings", json={"input": texts}))
    vectors = dict(zip(texts, (item["embedding"] for item in embedded["data"]), strict=True))
    one_to_n = ok(embedder.post("/score", json={"text_1": PROMPTS[0], "text_2": ANSWERS}))
    assert scores(one_to_n) == pytest.approx([cosine(vectors[PROMPTS[0]], vectors[a]) for a in ANSWERS], abs=1e-5)
    assert one_to_n["usage"]["prompt_tokens"] == embedded["usage"]["prompt_tokens"]  # each text embedded once
    # N:N with repeated texts: each distinct text embedded once, all in one forward
    left, right = [ANSWERS[0], ANSWERS[1], ANSWERS[0]], [ANSWERS[1], ANSWERS[0], ANSWERS[0]]
    before = forwards(embedder)
    pairs = ok(embedder.post("/v1/score", json={"queries": left, "documents": right, "use_activation": False}))
    assert tuple(after - first for after, first in zip(forwards(embedder), before, strict=True)) == (1, 2)
    assert scores(pairs) == pytest.approx([cosine(vectors[a], vectors[b]) for a, b in zip(left, right, strict=True)],
                                          abs=1e-5)
    two = ok(embedder.post("/v1/embeddings", json={"input": ANSWERS[:2]}))["usage"]["prompt_tokens"]
    assert pairs["usage"]["prompt_tokens"] == two
    ranked = ok(embedder.post("/rerank", json={"query": PROMPTS[0], "documents": ANSWERS, "top_n": 3}))["results"]
    order = sorted(range(len(ANSWERS)), key=lambda i: -scores(one_to_n)[i])[:3]
    assert [r["index"] for r in ranked] == order
    assert [r["document"] for r in ranked] == [{"text": ANSWERS[i]} for i in order]
    assert [r["relevance_score"] for r in ranked] == pytest.approx([scores(one_to_n)[i] for i in order], abs=1e-5)
    # an empty text has no tokens to embed: named where it was sent
    refused(embedder.post("/score", json={"text_1": "a", "text_2": ["b", ""]}), 400, "text_2", "empty_input")
    assert scores(ok(embedder.post("/score", json={"text_1": "a", "text_2": ["b"]})))


def test_an_embedding_model_counts_pairs_against_max_pooling_inputs(embedder):
    """One distinct text in 1025 pairs: embedded once, but each pair is a score of the response."""
    many = ["a"] * 1025  # --max-pooling-inputs' default, 1024, plus one
    message = refused(embedder.post("/score", json={"text_1": "a", "text_2": many}), 400, "text_2", "too_many_inputs")
    assert "1024 pairs" in message and "1025" in message, message
    refused(embedder.post("/rerank", json={"query": "a", "documents": many}), 400, "documents", "too_many_inputs")
    refused(embedder.post("/score", json={"queries": many, "documents": many}), 400, "documents", "too_many_inputs")
    assert scores(ok(embedder.post("/score", json={"text_1": "a", "text_2": many[:1024]}))) == pytest.approx(
        [1.0] * 1024, abs=1e-6)


def test_the_cosines_from_the_distinct_rows_are_torchs_cosine_similarity():
    from retnet.serve.score import _cosines

    torch.manual_seed(0)
    rows = torch.randn(5, 16) * torch.tensor([[1.0], [1e-3], [10.0], [0.0], [1.0]])  # a zero row: eps
    texts = ["a", "b", "c", "zero", "e"]
    for left, right in ((["a"] * 5, texts), (["a", "b", "zero", "c", "e", "a"], ["b", "b", "a", "zero", "e", "c"])):
        rows_of = lambda side: torch.stack([rows[texts.index(t)] for t in side])
        expected = F.cosine_similarity(rows_of(left), rows_of(right), dim=-1)
        assert torch.allclose(_cosines(rows, texts, left, right), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# A reward model's pairs over --max-prompt-tokens
# ----------------------------------------------------------------------------------------------------------
def watch_rendering(monkeypatch, http: httpx.AsyncClient) -> list[bool]:
    """Whether the tokenizer's lock was held at each chat template rendering from now on, in call order."""
    serving = http.app.state.serving
    tokenizer, render = serving.tokenizer, serving.tokenizer.apply_chat_template
    held: list[bool] = []

    def watched(*args, **kwargs):
        held.append(serving.tokenizer_lock.locked())
        return render(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", watched)
    return held


async def test_a_first_text_over_the_limit_is_refused_before_its_pairs_are_rendered(reward_dir, monkeypatch):
    async with serve_app(reward_dir, max_prompt_tokens=64) as http:
        held = watch_rendering(monkeypatch, http)
        long = "word " * 100
        message = refused(await http.post("/score", json={"text_1": long, "text_2": ["b"] * 500}), 400, "text_1",
                          "context_length_exceeded")
        assert message.startswith("text_1 has ") and "at most 64" in message, message
        assert len(held) <= 2  # the prompt alone, not once a pair
        refused(await http.post("/score", json={"text_1": ["a", long], "text_2": ["b", "c"]}), 400, "text_1",
                "context_length_exceeded")
        # truncate_prompt_tokens cuts each pair instead: rendered, and served
        cut = ok(await http.post("/score", json={"text_1": long, "text_2": ["b", "c"], "truncate_prompt_tokens": 64}))
        assert cut["usage"]["prompt_tokens"] == 2 * 64
        # Rendering takes no lock: a long first text rendered once a pair leaves the tokenizer to other requests.
        held.clear()
        assert scores(ok(await http.post("/score", json={"text_1": "a", "text_2": ANSWERS})))
        assert held and not any(held)


async def test_a_pair_over_the_limit_is_named_as_the_pair(reward_dir):
    long = "word " * 100
    async with serve_app(reward_dir, max_prompt_tokens=64) as http:
        for path, body, param, named in (
            ("/rerank", {"query": long, "documents": ["b"]}, "query", "query has "),
            ("/rerank", {"query": "a", "documents": ["b", long]}, "documents", "query + documents[1] has "),
            ("/score", {"text_1": "a", "text_2": long}, "text_2", "text_1 + text_2[0] has "),
            ("/score", {"queries": ["a", "b"], "items": ["c", long]}, "items", "queries[1] + items[1] has "),
        ):
            message = refused(await http.post(path, json=body), 400, param, "context_length_exceeded")
            assert message.startswith(named) and "at most 64" in message, (body, message)
            assert scores(ok(await http.post("/score", json={"text_1": "a", "text_2": "b"})))


# ----------------------------------------------------------------------------------------------------------
# Models that give no score a pair, the API key, run_batch
# ----------------------------------------------------------------------------------------------------------
async def test_a_language_model_and_a_classifier_of_several_labels_are_refused(model_dir, tmp_path):
    apps = {"language model": create_app(make_settings(model_dir)),  # no lifespan: nothing loads or runs
            "classifier of 3 labels": create_app(make_settings(save_classifier(tmp_path / "c3", model_dir, 3)))}
    for kind, app in apps.items():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            for path, body in (("/score", {"text_1": "a", "text_2": "b"}), ("/v1/score", {"text_1": "a", "text_2": "b"}),
                               ("/rerank", {"query": "a", "documents": ["b"]}),
                               ("/v2/rerank", {"query": "a", "documents": ["b"]})):
                message = refused(await http.post(path, json=body), 400, None, "model_not_scorer")
                assert kind in message and "--convert embed" in message, message


async def test_the_routes_take_the_api_key_before_reading_the_body(reward_dir):
    app = create_app(make_settings(reward_dir, api_keys=[KEY]))
    json_type = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        for path in ("/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"):
            # A body that does not parse: 401 without the key, so the key is checked before the body is read.
            refused(await http.post(path, content=b"{", headers=json_type), 401, "authorization", "invalid_api_key")
            refused(await http.post(path, content=b"{", headers={**json_type, "Authorization": f"Bearer {KEY}"}),
                    400, None, "invalid_json")


@pytest.mark.parametrize("kind", ["reward model", "embedding model"])
async def test_run_batch_takes_score_and_rerank_lines(reward_dir, model_dir, kind):
    lines = [json.dumps({"custom_id": "s", "method": "POST", "url": "/v1/score",
                         "body": {"text_1": PROMPTS[0], "text_2": ANSWERS}}),
             json.dumps({"custom_id": "r", "method": "POST", "url": "/v1/rerank",
                         "body": {"query": PROMPTS[0], "documents": ANSWERS, "top_n": 1}})]
    served = serve_app(reward_dir) if kind == "reward model" else serve_app(model_dir, convert="embed")
    async with served as http:
        urls = served_urls(http.app)
        assert {"/v1/score", "/v1/rerank"} <= urls
        out = io.StringIO()
        summary = await run_batch(http.app, parse_lines(lines, urls), out, 2, progress=False)
    score, rerank = (json.loads(line) for line in out.getvalue().splitlines())
    assert summary.failed == 0 and score["error"] is None and rerank["error"] is None
    best = max(range(len(ANSWERS)), key=lambda i: score["response"]["body"]["data"][i]["score"])
    assert [r["index"] for r in rerank["response"]["body"]["results"]] == [best]
