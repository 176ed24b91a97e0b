"""Seeded random requests to the pooling routes (``/v1/embeddings``, ``/pooling``, ``/classify``, ``/score``,
``/rerank``), sent concurrently so that their inputs pack together, each answer compared with the model run on
each input alone (fp32, 1e-5), tokenized as the README says the route does: the usage, the order, base64 against
the floats, rerank's order, ``top_n`` and ``return_documents``; then bad inputs, each a 400 naming its field, with
the server still serving."""

from __future__ import annotations

import asyncio
import base64
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from retnet.tokenization import closed_by_eos, render_pair
from tests.serve.conftest import serve_app
from tests.serve.test_classify import LABELS, refused, save_classifier

pytestmark = pytest.mark.anyio

MAX_TOKENS = 48  # --max-prompt-tokens
BUDGET = 40  # --prefill-token-budget: a request's inputs span several forwards, shared with other requests'
WORDS = ["def", "add", "return", "class", "Stack", "the", "retention", "mechanism", "hello", "world", "café", "東京",
         "🙂", "for", "i", "in", "range", "print", "x", "recurrent", "state"]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reward_dir(model_dir, tmp_path_factory):
    return save_classifier(tmp_path_factory.mktemp("reward"), model_dir, 1)


def text(rng: random.Random, most: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, most)))


def reference(model, ids: list[int], read) -> torch.Tensor:
    """``read(model output)`` for ``ids`` run alone, in fp32."""
    with torch.no_grad():
        return read(model(input_ids=torch.tensor([ids]))).float()


def random_inputs(rng: random.Random, tokenizer, count: int, length) -> tuple[list, list[list[int]]]:
    """``count`` inputs, texts or token-id lists of ``length()`` ids (half the time each), and the ids each runs
    as."""
    if rng.random() < 0.5:
        inputs = [text(rng, 10) for _ in range(count)]
        return inputs, [tokenizer.encode(t) for t in inputs]
    inputs = [[rng.randrange(len(tokenizer)) for _ in range(length())] for _ in range(count)]
    return inputs, [list(x) for x in inputs]


def steady_draw(draw, steady: set[int]):
    """``draw()``'s (route, body, the token ids each input runs as, ...), drawn again while an input runs as one
    token that is not steady (:func:`steady_tokens`)."""
    while True:
        drawn = draw()
        if all(len(ids) > 1 or ids[0] in steady for ids in drawn[2]):
            return drawn


def steady_tokens(model, read) -> set[int]:
    """The token ids whose one-token answer is the same in recurrent form (how it runs alone) and parallel form
    (how it runs packed beside longer inputs), to 2e-6. Another's retention output is near zero in some head, whose
    norm scales rounding up by as much as 1e-3 (the micro model's token "world"): packed beside other inputs, its
    answer moves by as much as that, so it is kept out of inputs of one token."""
    ids = torch.arange(model.config.vocab_size)[:, None]
    with torch.no_grad():
        recurrent, parallel = (read(model(input_ids=ids, retention_mode=mode)) for mode in ("recurrent", "parallel"))
    return set(((recurrent - parallel).abs().amax(-1) <= 2e-6).nonzero()[:, 0].tolist())


def error(got, expected: torch.Tensor) -> float:
    return (torch.tensor(got, dtype=torch.float32) - expected).abs().max().item()


def pair_ids(tokenizer, query: str, document: str) -> list[int]:
    """A reward model's tokens for a pair, as the README says: the user turn rendered with the generation prompt,
    the assistant's turn the rest, encoded apart without special tokens, then EOS."""
    render = lambda messages, **options: tokenizer.apply_chat_template(messages, tokenize=False, **options)
    head, completion = render_pair([{"role": "user", "content": query}],
                                   [[{"role": "assistant", "content": document}]], render)
    ids = tokenizer.encode(head, add_special_tokens=False) + tokenizer.encode(completion, add_special_tokens=False)
    return closed_by_eos(ids, tokenizer.eos_token_id)


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
async def test_random_embedding_requests_equal_each_input_embedded_alone(model_dir, tokenizer, pooling_type):
    rng = random.Random(f"embed-{pooling_type}")
    backbone = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    pool = (lambda out: out.last_hidden_state[0, -1]) if pooling_type == "LAST" else (
        lambda out: out.last_hidden_state[0].mean(0))
    steady = steady_tokens(backbone, lambda out: out.last_hidden_state[:, 0])

    def draw() -> tuple[str, dict, list[list[int]], bool]:
        """(route, body, the token ids each input should run as, normalized?)."""
        count = rng.randint(1, 6)
        inputs, ids = random_inputs(rng, tokenizer, count, lambda: rng.choice((1, rng.randint(2, MAX_TOKENS))))
        body = {"input": inputs[0] if count == 1 and rng.random() < 0.5 else inputs,
                "encoding_format": rng.choice(("float", "base64"))}
        cut, side = rng.choice((None, None, 1, 3, -1)), rng.choice((None, "left", "right"))
        if cut is not None:
            body["truncate_prompt_tokens"] = cut
            keep = MAX_TOKENS if cut == -1 else cut
            ids = [x[:keep] if side == "right" else x[-keep:] for x in ids]
        if side is not None:
            body["truncation_side"] = side
        normalize = rng.choice((None, True, False))
        if normalize is not None:
            body["use_activation"] = normalize
        return rng.choice(("/v1/embeddings", "/pooling")), body, ids, normalize is not False

    requests = [steady_draw(draw, steady) for _ in range(24)]
    async with serve_app(model_dir, convert="embed", pooler_config={"pooling_type": pooling_type},
                         prefill_token_budget=BUDGET, max_prompt_tokens=MAX_TOKENS) as client:
        answers = await asyncio.gather(*(client.post(route, json=body) for route, body, _, _ in requests))
        for (route, body, ids, normalized), answer in zip(requests, answers, strict=True):
            assert answer.status_code == 200, (body, answer.text)
            answer = answer.json()
            assert [d["index"] for d in answer["data"]] == list(range(len(ids)))
            tokens = sum(map(len, ids))
            assert (answer["usage"]["prompt_tokens"], answer["usage"]["total_tokens"]) == (tokens, tokens)
            for data, input_ids in zip(answer["data"], ids, strict=True):
                vector = data["embedding"] if route == "/v1/embeddings" else data["data"]
                if body["encoding_format"] == "base64":
                    vector = np.frombuffer(base64.b64decode(vector), dtype=np.float32).tolist()
                expected = reference(backbone, input_ids, pool)
                if normalized:
                    expected = F.normalize(expected, dim=-1)
                assert error(vector, expected) < 1e-5, (route, body, input_ids)


async def test_random_classify_and_pooling_requests_equal_each_input_scored_alone(model_dir, tokenizer,
                                                                                  tmp_path_factory):
    rng = random.Random("classify")
    path = save_classifier(tmp_path_factory.mktemp("classifier"), model_dir, 3, LABELS)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    steady = steady_tokens(model, lambda out: out.logits)

    def draw() -> tuple[str, dict, list[list[int]], bool]:
        inputs, ids = random_inputs(rng, tokenizer, rng.randint(1, 6), lambda: rng.randint(1, MAX_TOKENS))
        route, activation = rng.choice(("/classify", "/pooling")), rng.choice((None, True, False))
        body = {"input": inputs} if activation is None else {"input": inputs, "use_activation": activation}
        return route, body, ids, activation if activation is not None else route == "/classify"

    requests = [steady_draw(draw, steady) for _ in range(20)]
    async with serve_app(path, prefill_token_budget=BUDGET, max_prompt_tokens=MAX_TOKENS) as client:
        answers = await asyncio.gather(*(client.post(route, json=body) for route, body, _, _ in requests))
        for (route, body, ids, activated), answer in zip(requests, answers, strict=True):
            assert answer.status_code == 200, (body, answer.text)
            answer = answer.json()
            tokens = sum(map(len, ids))
            assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] == tokens
            for index, (data, input_ids) in enumerate(zip(answer["data"], ids, strict=True)):
                assert data["index"] == index
                expected = reference(model, input_ids, lambda out: out.logits[0])
                if activated:
                    expected = torch.softmax(expected, dim=-1)
                row = data["probs"] if route == "/classify" else data["data"]
                assert error(row, expected) < 1e-5, (route, body, input_ids)
                if route == "/classify":
                    assert data["label"] == LABELS[int(np.argmax(row))] and data["num_classes"] == 3


async def test_random_score_and_rerank_requests_equal_each_pair_scored_alone(reward_dir, tokenizer):
    rng = random.Random("score")
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32).eval()
    sigmoid_of_score = lambda out: torch.sigmoid(out.logits[0, 0])

    def request() -> tuple[str, dict, list[tuple[str, str]]]:
        count = rng.randint(1, 5)
        queries = [text(rng, 5) for _ in range(rng.choice((1, count)))]
        documents = [text(rng, 6) for _ in range(count)]
        if count > 1 and rng.random() < 0.3:  # a document sent twice: one score, ties in the documents' order
            documents[-1] = documents[0]
        if rng.random() < 0.5:
            first = queries[0] if len(queries) == 1 and rng.random() < 0.5 else queries
            pairs = list(zip(queries * count if len(queries) == 1 else queries, documents, strict=True))
            return "/score", {"text_1": first, "text_2": documents}, pairs
        body = {"query": queries[0], "documents": documents, "top_n": rng.choice((0, 1, count, count + 2)),
                "return_documents": rng.choice((True, False))}
        return "/rerank", body, [(queries[0], d) for d in documents]

    requests = [request() for _ in range(20)]
    async with serve_app(reward_dir, prefill_token_budget=2 * BUDGET, max_prompt_tokens=128) as client:
        answers = await asyncio.gather(*(client.post(route, json=body) for route, body, _ in requests))
        for (route, body, pairs), answer in zip(requests, answers, strict=True):
            assert answer.status_code == 200, (body, answer.text)
            answer = answer.json()
            ids = [pair_ids(tokenizer, query, document) for query, document in pairs]
            expected = [reference(model, pair, sigmoid_of_score) for pair in ids]
            # The tokens run: a pair sent twice runs once.
            tokens = sum(map(len, dict.fromkeys(map(tuple, ids))))
            assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] == tokens
            if route == "/score":
                assert [d["index"] for d in answer["data"]] == list(range(len(pairs)))
                for data, score in zip(answer["data"], expected, strict=True):
                    assert error(data["score"], score) < 1e-5, body
                continue
            results = answer["results"]
            assert len(results) == min(body["top_n"] or len(pairs), len(pairs))
            # Best first, ties in the documents' order; none left out scores above one returned.
            order = [(-r["relevance_score"], r["index"]) for r in results]
            assert order == sorted(order), body
            left_out = set(range(len(pairs))) - {r["index"] for r in results}
            assert all(expected[i].item() <= results[-1]["relevance_score"] + 1e-5 for i in left_out), body
            for result in results:
                assert error(result["relevance_score"], expected[result["index"]]) < 1e-5
                assert result.get("document") == ({"text": body["documents"][result["index"]]}
                                                  if body["return_documents"] else None)


class RowLengthRounding(torch.nn.Module):
    """The reward model, its scores moved by 1e-6 times the packed row's length: the last-bit difference a CPU
    GEMM makes between rows of different lengths (seen here: 1.2e-7 apart for one pair), made large enough to see
    on any machine."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        out.logits = out.logits + 1e-6 * input_ids.shape[1]
        return out


async def test_a_document_sent_twice_gets_one_score_and_ties_keep_the_documents_order(reward_dir, tokenizer):
    """Each pair ran as its own input, so copies of a document packed into forwards of different lengths got
    scores a few ulps apart (found by the random rerank requests beside others): the same pair two scores, and
    rerank put the later copy first when its rounding was higher, where ties are documented in the documents'
    order. Equal pairs run once now and share their row."""
    model = RowLengthRounding(AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32))
    same = "Retention: a decaying recurrence."
    # Pairs of 41, 30, 34 and 41 tokens under a budget of 80: the copies run in rows of 71 and 75 tokens.
    documents = [same, "x", "Seven.", same]
    assert [len(pair_ids(tokenizer, "Name one.", d)) for d in documents] == [41, 30, 34, 41]
    async with serve_app(reward_dir, model=model.eval(), prefill_token_budget=80) as client:
        ranked = (await client.post("/rerank", json={"query": "Name one.", "documents": documents})).json()
        scored = (await client.post("/score", json={"text_1": "Name one.", "text_2": documents,
                                                    "use_activation": False})).json()
    copies = [r for r in ranked["results"] if r["index"] in (0, 3)]
    assert copies[0]["relevance_score"] == copies[1]["relevance_score"]
    assert [r["index"] for r in copies] == [0, 3]
    assert scored["data"][0]["score"] == scored["data"][3]["score"]
    # The tokens run: the repeated pair's once.
    tokens = sum(len(pair_ids(tokenizer, "Name one.", d)) for d in dict.fromkeys(documents))
    assert scored["usage"]["prompt_tokens"] == ranked["usage"]["prompt_tokens"] == tokens


BAD_REQUESTS = [
    ("/v1/embeddings", {"input": ""}, "input", "empty_input"),
    ("/v1/embeddings", {"input": ["x", ""]}, "input", "empty_input"),
    ("/v1/embeddings", {"input": [[]]}, "input", "empty_input"),
    ("/v1/embeddings", {"input": [[-1]]}, "input", None),
    ("/v1/embeddings", {"input": [10**6]}, "input", "invalid_token_id"),
    ("/v1/embeddings", {"input": "x", "dimensions": 3}, "dimensions", "invalid_value"),
    ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", None),
    ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": MAX_TOKENS + 1}, "truncate_prompt_tokens",
     "invalid_value"),
    ("/v1/embeddings", {"input": [0] * (MAX_TOKENS + 1)}, "input", "context_length_exceeded"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format", None),
    ("/pooling", {"input": "x", "softmax": True}, "softmax", "unsupported_parameter"),
    ("/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1", "invalid_value"),
    ("/score", {"text_1": "a", "text_2": [""]}, "text_2", "empty_input"),
    ("/rerank", {"query": "a", "documents": []}, "documents", "empty_input"),
    ("/rerank", {"query": "a", "documents": ["a"], "top_n": -1}, "top_n", None),
]


async def test_bad_requests_are_400s_naming_the_field_and_the_server_keeps_serving(model_dir):
    async with serve_app(model_dir, convert="embed", max_prompt_tokens=MAX_TOKENS) as client:
        for route, body, param, code in BAD_REQUESTS:
            refused(await client.post(route, json=body), 400, param, code)
            answer = await client.post("/v1/embeddings", json={"input": ["still", "served"]})
            assert answer.status_code == 200 and len(answer.json()["data"]) == 2, (route, body)
