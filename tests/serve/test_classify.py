"""Serving a classifier and a reward model (``RetNetForSequenceClassification`` exports) with vLLM's pooling API:
``/classify`` and ``/pooling`` against a direct fp32 forward of the same tokens, packing against each input alone,
``messages`` against the reward trainer's own rendering of a pair, the errors, and the startup refusals."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from retnet.model import RetNetConfig, RetNetForSequenceClassification
from retnet.serve.app import create_app
from retnet.serve.classify import ClassifyRequest
from retnet.serve.pooling import PoolingEngine as ClassifyEngine
from retnet.serve.protocol import APIError
from retnet.serve.settings import ServeSettings, StartupError
from tests.serve.conftest import ServerProcess, ThreadServer, make_settings, running_servers, serve_app

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
KEY = "sk-classify"
AUTH = {"Authorization": f"Bearer {KEY}"}
BUDGET = 40  # --prefill-token-budget of the classifier's server: requests' inputs pack into several forwards
MAX_TOKENS = 64  # its --max-prompt-tokens
MAX_INPUTS = 12  # its --max-pooling-inputs
TEXTS = ["def add(a, b):", "Hello world! How are you today?", "x", "The retention mechanism replaces attention.",
         "for i in range(10):\n    print(i * i)\n", "Unicode: café, naïve, 東京"]
PROMPT = [{"role": "user", "content": "What replaces attention in a RetNet?"}]
CHOSEN = [{"role": "assistant", "content": "Retention: a decaying recurrence."}]
REJECTED = [{"role": "assistant", "content": "Nothing at all."}]

pytestmark = pytest.mark.anyio


def save_classifier(path, tokenizer_dir, num_labels: int, id2label: dict | None = None):
    """A micro random classifier (seed 1) with the micro LM's tokenizer, saved as retnet-train exports one."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          chunk_size=16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          initializer_range=0.2, num_labels=num_labels,
                          **({"id2label": id2label} if id2label else {}))
    torch.manual_seed(1)
    RetNetForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier_dir(model_dir, tmp_path_factory):
    return save_classifier(tmp_path_factory.mktemp("classifier"), model_dir, 3, LABELS)


@pytest.fixture(scope="module")
def reward_dir(model_dir, tmp_path_factory):
    return save_classifier(tmp_path_factory.mktemp("reward"), model_dir, 1)


@pytest.fixture(scope="module")
def servers(classifier_dir, reward_dir):
    """(the classifier's, the reward model's) servers, started together: a real uvicorn process (its routes keyed,
    so a real process checks what it answers without a key) and, in this process, uvicorn serving the reward model
    as ``retnet-serve`` would (``ThreadServer``)."""
    reward = ThreadServer(reward_dir)  # the first: loading in this process may fail, and leave no process behind
    procs = [ServerProcess(classifier_dir, "--prefill-token-budget", str(BUDGET), "--max-prompt-tokens",
                           str(MAX_TOKENS), "--max-pooling-inputs", str(MAX_INPUTS), "--api-keys", KEY), reward]
    with running_servers(*procs):
        yield procs


@pytest.fixture(scope="module")
def classifier(servers):
    with httpx.Client(base_url=servers[0].url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def reward(servers):
    with httpx.Client(base_url=servers[1].url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def direct(classifier_dir, reward_dir):
    """``direct[name](ids)``: the fp32 score row of ``ids`` run alone through the model loaded from its export."""
    models = {name: AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in (("classifier", classifier_dir), ("reward", reward_dir))}

    def run(name: str, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return models[name](input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()

    return {name: (lambda ids, name=name: run(name, ids)) for name in models}


@pytest.fixture(scope="module")
def tokenizer(classifier_dir):
    return AutoTokenizer.from_pretrained(classifier_dir)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def refused(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> str:
    """The error's message, after checking OpenAI's body shape, the status, param and code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and (code is None or error["code"] == code), error
    return error["message"]


# ----------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------
def test_classify_is_the_softmax_of_a_direct_forward(classifier, direct, tokenizer):
    body = ok(classifier.post("/classify", json={"model": "micro", "input": TEXTS}))
    assert re.fullmatch(r"classify-[0-9a-f]+", body["id"]) and body["object"] == "list"
    assert isinstance(body["created"], int) and body["model"] == "micro"
    total = 0
    for index, (text, item) in enumerate(zip(TEXTS, body["data"], strict=True)):
        ids = tokenizer.encode(text)
        total += len(ids)
        logits = direct["classifier"](ids)
        assert item["index"] == index and item["num_classes"] == 3
        assert item["probs"] == pytest.approx(torch.softmax(logits, -1).tolist(), abs=1e-5)
        assert item["label"] == LABELS[int(logits.argmax())]
    assert body["usage"] == {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    # /v1/classify is the same handler; use_activation false gives the raw scores.
    raw = ok(classifier.post("/v1/classify", json={"input": TEXTS[1], "use_activation": False}))["data"][0]
    assert raw["probs"] == pytest.approx(direct["classifier"](tokenizer.encode(TEXTS[1])).tolist(), abs=1e-5)


def test_a_reward_model_pools_its_raw_score_and_classifies_with_a_sigmoid(reward, direct, tokenizer):
    pooled = ok(reward.post("/pooling", json={"input": TEXTS[:3]}))
    assert re.fullmatch(r"pool-[0-9a-f]+", pooled["id"]) and pooled["object"] == "list"
    classified = ok(reward.post("/classify", json={"input": TEXTS[:3]}))
    for index, text in enumerate(TEXTS[:3]):
        score = direct["reward"](tokenizer.encode(text))
        assert pooled["data"][index]["object"] == "pooling" and pooled["data"][index]["index"] == index
        assert pooled["data"][index]["data"] == pytest.approx(score.tolist(), abs=1e-5)
        item = classified["data"][index]
        assert item["probs"] == pytest.approx(torch.sigmoid(score).tolist(), abs=1e-5)
        assert item["label"] == "LABEL_0" and item["num_classes"] == 1
    # use_activation on /pooling, and vLLM's base64 encoding (the float32 bytes)
    activated = ok(reward.post("/pooling", json={"input": TEXTS[0], "use_activation": True}))["data"][0]["data"]
    assert activated == pytest.approx(classified["data"][0]["probs"], abs=1e-5)
    encoded = ok(reward.post("/pooling", json={"input": TEXTS[0], "encoding_format": "base64"}))["data"][0]["data"]
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == \
        pytest.approx(pooled["data"][0]["data"], abs=1e-5)


def test_concurrent_requests_packed_together_score_as_each_input_alone(classifier, direct):
    # Odd lengths, one over the token budget (it runs alone), sent as concurrent requests and as one request of
    # several inputs: the engine packs them into forwards of up to BUDGET tokens.
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(2, 384, (n,), generator=generator).tolist() for n in (1, 3, 7, 11, 17, 23, 29, 45, 5, 13)]
    before = _batches(classifier)
    with ThreadPoolExecutor(len(inputs)) as pool:
        alone = list(pool.map(lambda ids: ok(classifier.post("/pooling", json={"input": ids}))["data"][0]["data"],
                              inputs))
    together = [item["data"] for item in ok(classifier.post("/pooling", json={"input": inputs}))["data"]]
    for ids, served, packed in zip(inputs, alone, together, strict=True):
        expected = direct["classifier"](ids).tolist()
        assert served == pytest.approx(expected, abs=1e-5) and packed == pytest.approx(expected, abs=1e-5)
    forwards, scored = (after - first for after, first in zip(_batches(classifier), before, strict=True))
    assert scored == 2 * len(inputs) and forwards < scored  # some forwards held several inputs


def _batches(client: httpx.Client) -> tuple[float, float]:
    """(classifier forwards run, inputs they scored), from /metrics."""
    text = client.get("/metrics").text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
    return value("retnet_pooling_batch_inputs_count"), value("retnet_pooling_batch_inputs_sum")


def test_token_ids_score_as_their_text(classifier, tokenizer):
    texts = ok(classifier.post("/classify", json={"input": TEXTS[:2]}))["data"]
    ids = ok(classifier.post("/classify", json={"input": [tokenizer.encode(t) for t in TEXTS[:2]]}))["data"]
    one = ok(classifier.post("/classify", json={"input": tokenizer.encode(TEXTS[0])}))["data"]
    for by_ids, by_text in zip([*ids, *one], [*texts, texts[0]], strict=True):
        assert by_ids["probs"] == pytest.approx(by_text["probs"], abs=1e-5)


def test_unknown_fields_are_ignored_as_on_every_route(classifier):
    plain = ok(classifier.post("/classify", json={"input": TEXTS[0]}))["data"]
    extra = ok(classifier.post("/classify", json={"input": TEXTS[0], "priority": 0, "request_id": "r1"}))["data"]
    assert extra[0]["probs"] == pytest.approx(plain[0]["probs"], abs=1e-6)


def test_vllms_deprecated_activation_names_are_use_activation(classifier, reward):
    raw = ok(classifier.post("/classify", json={"input": TEXTS[0], "use_activation": False}))["data"][0]["probs"]
    for name in ("softmax", "activation"):
        body = {"input": TEXTS[0], name: False, "use_activation": False if name == "softmax" else None}
        assert ok(classifier.post("/classify", json=body))["data"][0]["probs"] == pytest.approx(raw, abs=1e-6)
    activated = ok(reward.post("/pooling", json={"input": TEXTS[0], "use_activation": True}))["data"][0]["data"]
    pooled = ok(reward.post("/pooling", json={"input": TEXTS[0], "softmax": True}))["data"][0]["data"]
    assert pooled == pytest.approx(activated, abs=1e-6)


def test_messages_score_the_tokens_the_reward_trainer_scored(reward, direct, reward_dir, tokenizer):
    from retnet.train.config import DataConfig
    from retnet.train.preference import PairEncoder

    pairs = PairEncoder(tokenizer, DataConfig(dataset="pairs.jsonl", format="preference", seq_len=256)).encode(
        [(0, (PROMPT, CHOSEN, REJECTED))])
    prompt, chosen, _ = pairs.parts(0)
    trained = [int(t) for t in (*prompt, *chosen)]  # what the trainer scores for the chosen side (EOS last)
    assert trained[-1] == tokenizer.eos_token_id
    served = ok(reward.post("/pooling", json={"messages": PROMPT + CHOSEN}))
    assert served["usage"]["prompt_tokens"] == len(trained)
    assert served["data"][0]["data"] == pytest.approx(direct["reward"](trained).tolist(), abs=1e-5)
    # vLLM's chat options at their defaults change nothing
    defaults = {"add_generation_prompt": False, "continue_final_message": False, "chat_template_kwargs": {}}
    assert ok(reward.post("/pooling", json={"messages": PROMPT + CHOSEN, **defaults}))["data"] == served["data"]
    # the very tokens (the served app's own tokenization, without a server)
    app = create_app(make_settings(reward_dir))
    assert app.state.serving._conversation_ids(ClassifyRequest(messages=PROMPT + CHOSEN)) == trained


def test_messages_use_the_chat_template_flag_and_the_requests_variables(reward_dir):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ mark | default('') }}\n{% endfor %}"
    serving = create_app(make_settings(reward_dir, chat_template=template)).state.serving
    tokenizer = serving.tokenizer
    for variables, mark in ((None, ""), ({"mark": "!"}, "!")):
        ids = serving._conversation_ids(ClassifyRequest(messages=PROMPT + CHOSEN, chat_template_kwargs=variables))
        head = f"[user] {PROMPT[0]['content']}{mark}\n"
        expected = tokenizer.encode(head, add_special_tokens=False) + tokenizer.encode(
            f"[assistant] {CHOSEN[0]['content']}{mark}\n", add_special_tokens=False) + [tokenizer.eos_token_id]
        assert ids == expected


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [
    ("/classify", {"input": ""}, 400, "input", "empty_input"),
    ("/classify", {"input": []}, 400, "input", "empty_input"),
    ("/pooling", {"input": ["a", ""]}, 400, "input", "empty_input"),
    ("/classify", {"input": [[5, 6], []]}, 400, "input", "empty_input"),
    ("/classify", {"input": [5, 384]}, 400, "input", "invalid_token_id"),
    ("/classify", {"input": [5, -1]}, 400, "input", None),
    ("/classify", {"input": [7] * (MAX_TOKENS + 1)}, 400, "input", "context_length_exceeded"),
    ("/pooling", {"messages": [{"role": "user", "content": "word " * MAX_TOKENS}]}, 400, "messages",
     "context_length_exceeded"),
    ("/classify", {"input": ["a"] * (MAX_INPUTS + 1)}, 400, "input", "too_many_inputs"),
    ("/classify", {"input": "a", "messages": PROMPT}, 400, "messages", None),
    ("/classify", {}, 400, "input", "missing"),
    ("/classify", {"input": "a", "truncate_prompt_tokens": True}, 400, "truncate_prompt_tokens", None),
    ("/classify", {"input": "a", "truncate_prompt_tokens": MAX_TOKENS + 1}, 400, "truncate_prompt_tokens",
     "invalid_value"),
    ("/classify", {"input": "a", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens", "invalid_value"),
    ("/classify", {"input": "a", "softmax": True, "use_activation": False}, 400, "softmax", "invalid_value"),
    ("/pooling", {"input": "a", "activation": False, "softmax": True}, 400, "activation", "invalid_value"),
    ("/classify", {"input": "a", "add_generation_prompt": False}, 400, "add_generation_prompt", "invalid_value"),
    ("/classify", {"input": "a", "chat_template_kwargs": {}}, 400, "chat_template_kwargs", "invalid_value"),
    ("/pooling", {"messages": PROMPT, "add_generation_prompt": True}, 400, "add_generation_prompt",
     "unsupported_parameter"),
    ("/pooling", {"messages": PROMPT, "continue_final_message": True}, 400, "continue_final_message",
     "unsupported_parameter"),
    ("/pooling", {"messages": PROMPT, "chat_template_kwargs": {"add_generation_prompt": True}}, 400,
     "chat_template_kwargs.add_generation_prompt", "unsupported_parameter"),
    ("/pooling", {"messages": PROMPT, "chat_template_kwargs": {"tokenize": True}}, 400, "chat_template_kwargs",
     "invalid_value"),
    ("/pooling", {"messages": PROMPT, "chat_template": "{{ messages }}"}, 400, "chat_template",
     "unsupported_parameter"),
    ("/pooling", {"input": "a", "encoding_format": "bytes"}, 400, "encoding_format", None),
    ("/classify", {"messages": []}, 400, "messages", None),
    ("/classify", {"input": "a", "model": "other"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "a"}, 400, None, "model_not_generative"),
    ("/v1/chat/completions", {"messages": PROMPT}, 400, None, "model_not_generative"),
    ("/v1/responses", {"input": "a"}, 400, None, "model_not_generative"),
])
def test_a_bad_request_is_refused_and_the_next_one_served(classifier, path, body, status, param, code):
    message = refused(classifier.post(path, json=body), status, param, code)
    if code == "model_not_generative":
        assert "/classify" in message and "/pooling" in message
    assert ok(classifier.post("/classify", json={"input": "a"}))["data"]


def test_truncation_keeps_the_last_tokens(classifier):
    long = list(range(10, 10 + MAX_TOKENS + 20))
    # -1: vLLM's "up to the model's length", here --max-prompt-tokens
    for truncate, kept in ((9, 9), (-1, MAX_TOKENS)):
        cut = ok(classifier.post("/pooling", json={"input": long, "truncate_prompt_tokens": truncate}))
        last = ok(classifier.post("/pooling", json={"input": long[-kept:]}))
        assert cut["usage"]["prompt_tokens"] == kept
        assert cut["data"][0]["data"] == pytest.approx(last["data"][0]["data"], abs=1e-5)


def test_the_pooling_routes_are_keyed(servers):
    for path in ("/classify", "/v1/classify", "/pooling"):
        for body in ({"input": "a"}, {"input": [-1]}):  # a bad body is 401 too, not told how it was read
            refused(httpx.post(servers[0].url + path, json=body), 401, "authorization", "invalid_api_key")


def test_models_tokenize_and_metrics_in_classification_mode(classifier, tokenizer):
    card = ok(classifier.get("/v1/models"))["data"][0]
    assert card["id"] == "micro" and card["max_completion_tokens"] == 0 and card["max_model_len"] == MAX_TOKENS
    assert ok(classifier.post("/tokenize", json={"prompt": TEXTS[0]}))["tokens"] == tokenizer.encode(TEXTS[0])
    metrics = classifier.get("/metrics").text
    assert re.search(r'^retnet_requests_total\{route="/classify",status="200"\} [1-9]', metrics, re.M)
    assert re.search(r"^retnet_pooling_inputs_total [1-9]", metrics, re.M)
    assert re.search(r"^retnet_pooling_tokens_total [1-9]", metrics, re.M)


async def test_health_is_503_until_the_classifier_is_loaded(reward_dir):
    app = create_app(make_settings(reward_dir))  # its lifespan not entered: the engine has not loaded the model
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "loading"
        refused(await client.post("/classify", json={"input": "a"}), 503, None, "unavailable")


async def test_a_forward_that_fails_fails_its_batch_alone(reward_dir):
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    forward = model.forward

    def failing(input_ids=None, **kwargs):
        if input_ids.shape[1] == 13:
            raise RuntimeError("out of memory (simulated)")
        return forward(input_ids=input_ids, **kwargs)

    model.forward = failing
    app = create_app(make_settings(reward_dir), model=model)
    async with app.router.lifespan_context(app):
        assert app.state.engine.wait_ready(60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/pooling", json={"input": list(range(5, 18))})
            assert "simulated" in refused(response, 500, None, "forward_failed")
            assert response.json()["error"]["type"] == "server_error"
            assert ok(await client.post("/pooling", json={"input": list(range(5, 17))}))["data"]



async def test_a_small_request_behind_a_large_one_is_not_held_back(classifier_dir, direct):
    # Inputs are taken round-robin across the waiting requests: one of 12 inputs needs 6 forwards at this budget,
    # and a request of 2 sent behind it is run within the next forward or two, so it is answered first.
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    forward, segments = model.forward, []  # each forward's inputs, in the order packed
    queued = threading.Event()

    def recorded(input_ids=None, cu_seqlens=None, **kwargs):
        if not segments:  # the first forward ends only once the small request is queued, however slow the loop
            assert queued.wait(30)
        bounds = cu_seqlens.tolist()
        segments.append([input_ids[0, a:b].tolist() for a, b in itertools.pairwise(bounds)])
        return forward(input_ids=input_ids, cu_seqlens=cu_seqlens, **kwargs)

    model.forward = recorded
    generator = torch.Generator().manual_seed(0)
    large = [torch.randint(2, 384, (6,), generator=generator).tolist() for _ in range(12)]
    small = [torch.randint(2, 384, (n,), generator=generator).tolist() for n in (3, 5)]
    app = create_app(make_settings(classifier_dir, prefill_token_budget=16), model=model)
    engine: ClassifyEngine = app.state.engine
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(engine.wait_ready, 60)
        big = asyncio.ensure_future(engine.score(large))
        await asyncio.sleep(0)  # queued first
        little = asyncio.ensure_future(engine.score(small))
        await asyncio.sleep(0)
        queued.set()
        done, _ = await asyncio.wait({big, little}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert done == {little}, "the small request waited for the large one"
        await asyncio.wait_for(big, 60)
    ran = [next(n for n, packed in enumerate(segments) if ids in packed) for ids in small]
    # Within the next forward or two after it arrives (the first may have been taken before it), where FIFO
    # would have run it after all 6 of the large request's.
    assert max(ran) <= 2, segments
    assert [ids for packed in segments for ids in packed if ids in large] == large  # each request's own order
    assert len(segments) >= 6 and all(sum(map(len, packed)) <= 16 for packed in segments)
    for inputs, task in ((large, big), (small, little)):
        for ids, row in zip(inputs, task.result(), strict=True):
            assert row.tolist() == pytest.approx(direct["classifier"](ids).tolist(), abs=1e-5)

MARK = 7  # an input starting with this token is scored inf by the models below


def overflowing(model):
    """``model``, whose forward scores inf each packed input that starts with MARK (a float16 overflow)."""
    forward = model.forward

    def scored(input_ids=None, cu_seqlens=None, **kwargs):
        output = forward(input_ids=input_ids, cu_seqlens=cu_seqlens, **kwargs)
        output.logits[input_ids[0, cu_seqlens[:-1]] == MARK] = float("inf")
        return output

    model.forward = scored
    return model


async def test_a_non_finite_score_fails_its_own_request_alone(reward_dir, direct):
    model = overflowing(AutoModelForSequenceClassification.from_pretrained(reward_dir).eval())
    app = create_app(make_settings(reward_dir), model=model)
    engine: ClassifyEngine = app.state.engine
    # Three requests in one forward, run by hand (the thread not started): only those holding an inf row fail.
    engine.ready = True
    requests = [asyncio.ensure_future(engine.score(inputs)) for inputs in
                ([[MARK, 5, 6]], [[8, 9, 10], [MARK, 11]], [[12, 13, 14]])]
    await asyncio.sleep(0)
    batch = engine._next_batch()
    assert len(batch) == 4
    with torch.inference_mode():
        engine._forward(batch)
    outcomes = await asyncio.gather(*requests, return_exceptions=True)
    for failed, index in zip(outcomes[:2], (0, 1), strict=True):
        assert isinstance(failed, APIError) and failed.status == 500 and failed.code == "non_finite_score"
        assert f"input {index} " in failed.message and "--dtype float32" in failed.message
    assert outcomes[2][0].tolist() == pytest.approx(direct["reward"]([12, 13, 14]).tolist(), abs=1e-5)
    engine.ready = False
    # Through the routes: a JSON error, not the serializer's unhandled 500 (with base64 too, which could carry it).
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(engine.wait_ready, 60)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for path, body in (("/classify", {}), ("/pooling", {}), ("/pooling", {"encoding_format": "base64"})):
                response = await client.post(path, json={"input": [MARK, 5, 6], **body})
                assert "non-finite" in refused(response, 500, None, "non_finite_score")
            assert ok(await client.post("/pooling", json={"input": [12, 13, 14]}))["data"]


async def test_a_forward_missing_rows_or_an_engine_that_dies_settles_every_request(reward_dir):
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    forward = model.forward

    def short(input_ids=None, **kwargs):  # a head that ignores cu_seqlens: one row for the packed inputs
        output = forward(input_ids=input_ids, **kwargs)
        output.logits = output.logits[:1]
        return output

    model.forward = short
    app = create_app(make_settings(reward_dir), model=model)
    engine: ClassifyEngine = app.state.engine
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(engine.wait_ready, 60)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            response = await asyncio.wait_for(client.post("/pooling", json={"input": [[5, 6], [7, 8]]}), 30)
            assert "one row per input" in refused(response, 500, None, "forward_failed")

            def dies(batch):  # a bug outside the forward's own handling, with the batch in hand
                raise RuntimeError("bug (simulated)")

            engine._forward = dies
            response = await asyncio.wait_for(client.post("/pooling", json={"input": [5, 6]}), 30)
            assert "bug (simulated)" in refused(response, 503, None, "engine_failure")


async def test_a_classifier_made_from_a_language_models_export_is_served_as_one(model_dir):
    # from_pretrained keeps the LM's architectures in the config: the model's class decides.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    assert model.config.architectures == ["RetNetForCausalLM"]
    async with serve_app(model_dir, model=model) as client:
        assert len(ok(await client.post("/pooling", json={"input": [5, 6, 7]}))["data"][0]["data"]) == 1
        refused(await client.post("/v1/completions", json={"prompt": "a"}), 400, None, "model_not_generative")


async def test_a_language_model_server_refuses_the_pooling_routes(open_app):
    async with open_app() as client:
        for path in ("/classify", "/v1/classify", "/pooling"):
            message = refused(await client.post(path, json={"input": "a"}), 400, None, "model_not_classifier")
            assert "language model" in message and "RetNetForSequenceClassification" in message


# ----------------------------------------------------------------------------------------------------------
# Startup
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("setting", "value", "flag"), [
    ("lora_modules", None, "--lora-modules"),
    ("session_dir", "/tmp/sessions", "--session-dir"),
    ("speculative_config", {"method": "ngram", "num_speculative_tokens": 2}, "--speculative-config"),
    ("allow_runtime_lora_updating", True, "--allow-runtime-lora-updating"),
    ("generation_config", "vllm", "--generation-config"),
    ("max_running", 8, "--max-running"),
    ("tool_call_parser", "hermes", "--tool-call-parser"),
])
def test_generation_only_flags_are_refused_for_a_classifier(classifier_dir, model_dir, setting, value, flag):
    if setting == "lora_modules":
        value = [f"adapter={model_dir}"]
    with pytest.raises(StartupError) as refusal:
        create_app(make_settings(classifier_dir, **{setting: value}))
    message = str(refusal.value)
    assert message.startswith(flag) and "classifier" in message and "\n" not in message
    # their defaults, and --chat-template (it templates `messages`), start
    create_app(make_settings(classifier_dir, chat_template="{{ messages[0].content }}"))


def test_a_refused_setting_names_the_variable_it_came_from(classifier_dir, monkeypatch):
    monkeypatch.setenv("RETNET_MAX_RUNNING", "8")
    with pytest.raises(StartupError, match=r"^RETNET_MAX_RUNNING=8 \(--max-running\) only applies to generation.*"
                       r"classifier .*: unset it$"):
        create_app(ServeSettings(model=str(classifier_dir)))
    # a flag wins over the variable: the flag is named
    with pytest.raises(StartupError, match=r"^--max-running 16 .*leave --max-running out$"):
        create_app(ServeSettings(model=str(classifier_dir), max_running=16))
    monkeypatch.delenv("RETNET_MAX_RUNNING")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    with pytest.raises(StartupError, match=r"^VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 \(it turns on "
                       r"--allow-runtime-lora-updating\) .*: unset VLLM_ALLOW_RUNTIME_LORA_UPDATING$"):
        create_app(make_settings(classifier_dir))


def test_run_batch_classifies_a_file(classifier_dir, tmp_path):
    from retnet.serve.run_batch import main as run_batch_main

    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/classify", "body": {"input": TEXTS[:2]}},
             {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "a"}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run_batch_main(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                           "--model", str(classifier_dir)]) == 0
    first, second = (json.loads(text) for text in (tmp_path / "out.jsonl").read_text().splitlines())
    assert first["error"] is None and len(first["response"]["body"]["data"]) == 2
    assert second["response"]["status_code"] == 400 and second["error"]["code"] == "model_not_generative"
