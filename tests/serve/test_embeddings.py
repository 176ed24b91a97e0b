"""Serving embeddings (``--convert embed``): OpenAI's ``/v1/embeddings`` and vLLM's ``/pooling`` against a direct
fp32 forward of ``RetNetModel`` on each input alone (LAST and MEAN pooling, normalized or not), packing against each
input alone, the official ``openai`` client, the errors, and the startup refusals."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from retnet.serve.__main__ import parse_settings
from retnet.serve.app import create_app
from retnet.serve.run_batch import parse_lines, served_urls
from retnet.serve.settings import StartupError
from tests.serve.conftest import ServerProcess, make_settings, running_servers, save_micro_model, serve_app
from tests.serve.test_classify import refused, save_classifier

BUDGET = 40  # --prefill-token-budget of the embedding server: requests' inputs pack into several forwards
MAX_TOKENS = 64  # its --max-prompt-tokens
MAX_INPUTS = 12  # its --max-pooling-inputs
HIDDEN = 64  # the micro model's hidden_size
TEXTS = ["def add(a, b):", "Hello world! How are you today?", "x", "The retention mechanism replaces attention.",
         "for i in range(10):\n    print(i * i)\n", "Unicode: café, naïve, 東京"]

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server(model_dir):
    """A real uvicorn process serving the micro causal LM's backbone as an embedding model (LAST, normalized)."""
    proc = ServerProcess(model_dir, "--convert", "embed", "--prefill-token-budget", str(BUDGET), "--max-prompt-tokens",
                         str(MAX_TOKENS), "--max-pooling-inputs", str(MAX_INPUTS))
    with running_servers(proc):
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def load_backbone(path):
    """``RetNetModel`` loaded from an export, checked to have loaded every weight of the backbone."""
    model, info = AutoModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def backbone(model_dir):
    return load_backbone(model_dir)


def embed(model, ids: list[int], pooling: str = "LAST", normalize: bool = True) -> list[float]:
    """The embedding of ``ids`` run alone: the final norm's output pooled, in fp32, L2-normalized or not."""
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0].float()
    row = hidden[-1] if pooling == "LAST" else hidden.mean(0)
    return (F.normalize(row, dim=-1) if normalize else row).tolist()


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def vectors(body: dict) -> list[list[float]]:
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    return [item["embedding"] for item in body["data"]]


# ----------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------
def test_embeddings_are_the_normalized_last_hidden_state_of_each_input_alone(client, backbone, tokenizer):
    body = ok(client.post("/v1/embeddings", json={"model": "micro", "input": TEXTS, "user": "u1"}))
    assert body["object"] == "list" and body["model"] == "micro" and re.fullmatch(r"embd-[0-9a-f]+", body["id"])
    assert all(item["object"] == "embedding" for item in body["data"])
    total = 0
    for text, got in zip(TEXTS, vectors(body), strict=True):
        ids = tokenizer.encode(text)
        total += len(ids)
        assert len(got) == HIDDEN and float(np.linalg.norm(got)) == pytest.approx(1.0, abs=1e-5)
        assert got == pytest.approx(embed(backbone, ids), abs=1e-5)
    assert body["usage"] == {"prompt_tokens": total, "total_tokens": total}
    # One string is one input; /pooling answers the same vectors in vLLM's pooling shape.
    one = ok(client.post("/v1/embeddings", json={"input": TEXTS[1]}))
    assert vectors(one)[0] == pytest.approx(vectors(body)[1], abs=1e-6)
    pooled = ok(client.post("/pooling", json={"input": TEXTS[:2]}))
    assert re.fullmatch(r"pool-[0-9a-f]+", pooled["id"]) and pooled["usage"]["prompt_tokens"] > 0
    for item, expected in zip(pooled["data"], vectors(body)[:2], strict=True):
        assert item["object"] == "pooling" and item["data"] == pytest.approx(expected, abs=1e-6)


def test_concurrent_requests_packed_together_embed_as_each_input_alone(client, backbone):
    # Odd lengths, one over the token budget (it runs alone), sent as concurrent requests and as one request of
    # several inputs: the engine packs them into forwards of up to BUDGET tokens.
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(2, 384, (n,), generator=generator).tolist() for n in (1, 3, 7, 11, 17, 23, 29, 45, 5, 13)]
    before = _batches(client)
    with ThreadPoolExecutor(len(inputs)) as pool:
        alone = list(pool.map(lambda ids: vectors(ok(client.post("/v1/embeddings", json={"input": ids})))[0],
                              inputs))
    together = vectors(ok(client.post("/v1/embeddings", json={"input": inputs})))
    for ids, served, packed in zip(inputs, alone, together, strict=True):
        expected = embed(backbone, ids)
        assert served == pytest.approx(expected, abs=1e-5) and packed == pytest.approx(expected, abs=1e-5)
    forwards, embedded = (after - first for after, first in zip(_batches(client), before, strict=True))
    assert embedded == 2 * len(inputs) and forwards < embedded  # some forwards held several inputs


def _batches(client: httpx.Client) -> tuple[float, float]:
    """(pooling forwards run, inputs they embedded), from /metrics."""
    text = client.get("/metrics").text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
    return value("retnet_pooling_batch_inputs_count"), value("retnet_pooling_batch_inputs_sum")


def test_token_ids_embed_as_their_text_and_the_tokenizer_options_apply(client, tokenizer):
    texts = vectors(ok(client.post("/v1/embeddings", json={"input": TEXTS[:2]})))
    ids = vectors(ok(client.post("/v1/embeddings", json={"input": [tokenizer.encode(t) for t in TEXTS[:2]]})))
    one = vectors(ok(client.post("/v1/embeddings", json={"input": tokenizer.encode(TEXTS[0])})))
    for by_ids, by_text in zip([*ids, *one], [*texts, texts[0]], strict=True):
        assert by_ids == pytest.approx(by_text, abs=1e-6)
    # add_special_tokens (vLLM's, default true) and truncate_prompt_tokens (the last tokens kept; -1: up to
    # --max-prompt-tokens), with unknown fields ignored
    plain = ok(client.post("/v1/embeddings", json={"input": TEXTS[1], "add_special_tokens": False, "request_id": "r1"}))
    assert plain["usage"]["prompt_tokens"] == len(tokenizer.encode(TEXTS[1], add_special_tokens=False))
    long = list(range(10, 10 + MAX_TOKENS + 20))
    for truncate, kept in ((9, 9), (-1, MAX_TOKENS)):
        cut = ok(client.post("/v1/embeddings", json={"input": long, "truncate_prompt_tokens": truncate}))
        last = ok(client.post("/v1/embeddings", json={"input": long[-kept:]}))
        assert cut["usage"]["prompt_tokens"] == kept and vectors(cut)[0] == pytest.approx(vectors(last)[0], abs=1e-6)


def test_base64_is_the_float32_bytes_and_dimensions_is_the_hidden_size(client):
    floats = vectors(ok(client.post("/v1/embeddings", json={"input": TEXTS[:2], "dimensions": HIDDEN})))
    for path, key in (("/v1/embeddings", "embedding"), ("/pooling", "data")):
        encoded = ok(client.post(path, json={"input": TEXTS[:2], "encoding_format": "base64"}))["data"]
        for item, expected in zip(encoded, floats, strict=True):
            assert np.frombuffer(base64.b64decode(item[key]), dtype="<f4").tolist() == pytest.approx(expected, abs=0)
    message = refused(client.post("/v1/embeddings", json={"input": "a", "dimensions": 32}), 400, "dimensions",
                      "invalid_value")
    assert str(HIDDEN) in message and "matryoshka" in message


def test_vllms_output_fields_are_read_alike_on_both_routes(client, backbone):
    # use_activation (and its older name normalize) false: the pooled row without the L2 normalization
    ids = list(range(10, 40))
    raw, unit = embed(backbone, ids, normalize=False), embed(backbone, ids)
    for path, key in (("/v1/embeddings", "embedding"), ("/pooling", "data")):
        for fields, expected in (({"use_activation": False}, raw), ({"normalize": False}, raw),
                                 ({"use_activation": True, "normalize": True}, unit)):
            got = ok(client.post(path, json={"input": ids, **fields}))["data"][0][key]
            assert got == pytest.approx(expected, abs=1e-5), (path, fields)
        # truncation_side: which end truncate_prompt_tokens keeps (left, the default: the last tokens)
        for side, kept in (("right", ids[:5]), ("left", ids[-5:])):
            body = {"input": ids, "truncate_prompt_tokens": 5, "truncation_side": side}
            assert ok(client.post(path, json=body))["data"][0][key] == pytest.approx(embed(backbone, kept), abs=1e-5)
    # base64's embed_dtype and endianness, decoded as vLLM's client does; the floats of "float" are unchanged
    served = vectors(ok(client.post("/v1/embeddings", json={"input": ids})))[0]
    assert vectors(ok(client.post("/v1/embeddings", json={"input": ids, "embed_dtype": "float16"})))[0] == served
    floats = torch.tensor(served)
    for dtype, bits, width in (("float32", torch.float32, "f4"), ("float16", torch.float16, "f2"),
                               ("bfloat16", torch.bfloat16, "i2"), ("fp8_e4m3", torch.float8_e4m3fn, "u1")):
        for endianness, order in (("native", "="), ("little", "<"), ("big", ">")):
            body = {"input": ids, "encoding_format": "base64", "embed_dtype": dtype, "endianness": endianness}
            data = base64.b64decode(ok(client.post("/v1/embeddings", json=body))["data"][0]["embedding"])
            values = np.frombuffer(data, dtype=order + width).astype(width)
            decoded = torch.from_numpy(values).view(bits) if width in ("i2", "u1") else torch.from_numpy(values)
            assert torch.equal(decoded, floats.to(bits)), (dtype, endianness)


def test_the_openai_client_embeds(server, client):
    openai = pytest.importorskip("openai")
    expected = vectors(ok(client.post("/v1/embeddings", json={"input": TEXTS[:3]})))
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as api:
        # the client asks for base64 unless told otherwise, and decodes it
        for extra in ({}, {"encoding_format": "float"}, {"dimensions": HIDDEN}):
            response = api.embeddings.create(model="micro", input=TEXTS[:3], **extra)
            assert response.model == "micro" and response.usage.prompt_tokens == response.usage.total_tokens > 0
            for item, want in zip(response.data, expected, strict=True):
                assert list(item.embedding) == pytest.approx(want, abs=1e-6)
        with pytest.raises(openai.BadRequestError) as refusal:
            api.embeddings.create(model="micro", input="a", dimensions=8)
        assert refusal.value.body["param"] == "dimensions"


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [
    ("/v1/embeddings", {"input": ""}, 400, "input", "empty_input"),
    ("/v1/embeddings", {"input": []}, 400, "input", "empty_input"),
    ("/v1/embeddings", {"input": ["a", ""]}, 400, "input", "empty_input"),
    ("/v1/embeddings", {"input": [[5, 6], []]}, 400, "input", "empty_input"),
    ("/v1/embeddings", {"input": [5, 384]}, 400, "input", "invalid_token_id"),
    ("/v1/embeddings", {"input": [5, -1]}, 400, "input", None),
    ("/v1/embeddings", {"input": {"text": "a"}}, 400, "input", None),
    ("/v1/embeddings", {"input": [7] * (MAX_TOKENS + 1)}, 400, "input", "context_length_exceeded"),
    ("/v1/embeddings", {"input": ["a"] * (MAX_INPUTS + 1)}, 400, "input", "too_many_inputs"),
    ("/v1/embeddings", {}, 400, "input", "missing"),
    ("/v1/embeddings", {"input": "a", "model": "other"}, 404, "model", "model_not_found"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "bytes"}, 400, "encoding_format", None),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, 400, "dimensions", "invalid_value"),
    ("/v1/embeddings", {"input": "a", "dimensions": True}, 400, "dimensions", None),
    ("/v1/embeddings", {"input": "a", "dimensions": str(HIDDEN)}, 400, "dimensions", None),
    ("/v1/embeddings", {"input": "a", "dimensions": float(HIDDEN)}, 400, "dimensions", None),
    ("/v1/embeddings", {"input": "a", "use_activation": True, "normalize": False}, 400, "normalize", "invalid_value"),
    ("/v1/embeddings", {"input": "a", "embed_dtype": "int8"}, 400, "embed_dtype", None),
    ("/v1/embeddings", {"input": "a", "endianness": "middle"}, 400, "endianness", None),
    ("/v1/embeddings", {"input": "a", "truncation_side": "both"}, 400, "truncation_side", None),
    ("/v1/embeddings", {"input": "a", "padding": "max_length"}, 400, "padding", "unsupported_parameter"),
    ("/v1/embeddings", {"input": "a", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens", "invalid_value"),
    ("/v1/embeddings", {"input": "a", "truncate_prompt_tokens": MAX_TOKENS + 1}, 400, "truncate_prompt_tokens",
     "invalid_value"),
    ("/pooling", {"messages": [{"role": "user", "content": "a"}]}, 400, "messages", "unsupported_parameter"),
    ("/pooling", {"input": "a", "dimensions": 32}, 400, "dimensions", "invalid_value"),
    ("/pooling", {"input": "a", "softmax": True}, 400, "softmax", "unsupported_parameter"),
    ("/pooling", {"input": "a", "chat_template_kwargs": {}}, 400, "chat_template_kwargs", "invalid_value"),
    ("/classify", {"input": "a"}, 400, None, "model_not_classifier"),
    ("/v1/classify", {"input": "a"}, 400, None, "model_not_classifier"),
    ("/v1/completions", {"prompt": "a"}, 400, None, "model_not_generative"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}, 400, None, "model_not_generative"),
    ("/v1/responses", {"input": "a"}, 400, None, "model_not_generative"),
])
def test_a_bad_request_is_refused_and_the_next_one_served(client, path, body, status, param, code):
    message = refused(client.post(path, json=body), status, param, code)
    if code in ("model_not_generative", "model_not_classifier"):
        assert "/v1/embeddings" in message and "--convert embed" in message
    assert vectors(ok(client.post("/v1/embeddings", json={"input": "a"})))


def test_models_tokenize_health_and_metrics_in_embedding_mode(client, tokenizer):
    card = ok(client.get("/v1/models"))["data"][0]
    assert card["id"] == "micro" and card["max_completion_tokens"] == 0 and card["max_model_len"] == MAX_TOKENS
    assert ok(client.post("/tokenize", json={"prompt": TEXTS[0]}))["tokens"] == tokenizer.encode(TEXTS[0])
    assert ok(client.post("/detokenize", json={"tokens": tokenizer.encode(TEXTS[0])}))["prompt"] == TEXTS[0]
    assert ok(client.get("/health")) == {"status": "ok"}
    ok(client.post("/v1/embeddings", json={"input": "a"}))
    metrics = client.get("/metrics").text
    assert re.search(r'^retnet_requests_total\{route="/v1/embeddings",status="200"\} [1-9]', metrics, re.M)
    assert re.search(r"^retnet_pooling_inputs_total [1-9]", metrics, re.M)
    assert re.search(r"^retnet_pooling_tokens_total [1-9]", metrics, re.M)


# ----------------------------------------------------------------------------------------------------------
# In-process: other pooler configs, other exports, failures
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "pooling", "normalize"), [
    ('{"pooling_type": "mean"}', "MEAN", True),
    ({"pooling_type": "MEAN", "normalize": False}, "MEAN", False),
    ({"normalize": False}, "LAST", False),
])
async def test_the_pooler_config_picks_the_pooling_and_the_normalization(model_dir, backbone, config, pooling,
                                                                         normalize):
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randint(2, 384, (n,), generator=generator).tolist() for n in (1, 6, 13, 30)]
    async with serve_app(model_dir, convert="embed", pooler_config=config) as http:
        assert http.app.state.settings.pooler == {"pooling_type": pooling, "normalize": normalize}
        body = ok(await http.post("/v1/embeddings", json={"input": inputs}))  # one packed forward
        # a request's use_activation overrides the configured normalization, either way
        flipped = ok(await http.post("/pooling", json={"input": inputs[-1], "use_activation": not normalize}))
    for ids, got in zip(inputs, vectors(body), strict=True):
        assert got == pytest.approx(embed(backbone, ids, pooling, normalize), abs=1e-5)
    assert flipped["data"][0]["data"] == pytest.approx(embed(backbone, inputs[-1], pooling, not normalize), abs=1e-5)


async def test_a_classifier_export_embeds_with_its_backbone(model_dir, tmp_path):
    path = save_classifier(tmp_path / "classifier", model_dir, 2)
    ids = [5, 9, 40, 7]
    async with serve_app(path, convert="embed") as http:
        got = vectors(ok(await http.post("/v1/embeddings", json={"input": ids})))[0]
        refused(await http.post("/classify", json={"input": ids}), 400, None, "model_not_classifier")
    assert got == pytest.approx(embed(load_backbone(path), ids), abs=1e-5)
    # Served as a classifier, its /pooling reads the fields it shares with an embedding server's: normalize is
    # use_activation (vLLM's older name), truncation_side and base64's endianness apply, dimensions is refused.
    async with serve_app(path) as http:
        async def pooled(**fields):
            return ok(await http.post("/pooling", json={"input": ids, **fields}))["data"][0]["data"]

        assert await pooled(normalize=True) == pytest.approx(await pooled(use_activation=True), abs=1e-6)
        assert await pooled(truncate_prompt_tokens=2, truncation_side="right") == pytest.approx(
            ok(await http.post("/pooling", json={"input": ids[:2]}))["data"][0]["data"], abs=1e-5)
        big = await pooled(encoding_format="base64", endianness="big")
        assert np.frombuffer(base64.b64decode(big), dtype=">f4").tolist() == pytest.approx(await pooled(), abs=0)
        response = await http.post("/pooling", json={"input": ids, "dimensions": 2})
        assert "classifier" in refused(response, 400, "dimensions", "unsupported_parameter")


async def test_a_causal_lm_given_loaded_embeds_with_its_backbone(model_dir, backbone):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    async with serve_app(model_dir, model=model, convert="embed") as http:
        got = vectors(ok(await http.post("/v1/embeddings", json={"input": [5, 6, 7]})))[0]
    assert got == pytest.approx(embed(backbone, [5, 6, 7]), abs=1e-5)


async def test_a_backbone_missing_weights_fails_the_engine_naming_them(model_dir, tmp_path, tokenizer):
    path = save_micro_model(tmp_path / "partial", tokenizer)
    weights = load_file(path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, path / "model.safetensors",
              metadata={"format": "pt"})
    app = create_app(make_settings(path, convert="embed"))
    async with app.router.lifespan_context(app):
        assert not await asyncio.to_thread(app.state.engine.wait_ready, 60)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            health = await http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            assert "missing" in health.json()["detail"] and "layers.1." in health.json()["detail"]
            refused(await http.post("/v1/embeddings", json={"input": "a"}), 503, None, "unavailable")


MARK = 7  # an input starting with this token gets an inf hidden state from the model below


async def test_a_non_finite_embedding_or_a_failed_forward_fails_its_own_request(model_dir):
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    forward = model.forward

    def patched(input_ids=None, cu_seqlens=None, **kwargs):
        if input_ids.shape[1] == 13:
            raise RuntimeError("out of memory (simulated)")
        output = forward(input_ids=input_ids, cu_seqlens=cu_seqlens, **kwargs)
        output.last_hidden_state[0, cu_seqlens[:-1][input_ids[0, cu_seqlens[:-1]] == MARK]] = float("inf")
        return output

    model.forward = patched
    async with serve_app(model_dir, model=model, convert="embed", pooler_config={"pooling_type": "MEAN"}) as http:
        for body in ({}, {"encoding_format": "base64"}):
            response = await http.post("/v1/embeddings", json={"input": [[MARK, 5, 6]], **body})
            assert "non-finite embedding" in refused(response, 500, None, "non_finite_score")
        response = await http.post("/v1/embeddings", json={"input": list(range(5, 18))})
        assert "simulated" in refused(response, 500, None, "forward_failed")
        assert vectors(ok(await http.post("/v1/embeddings", json={"input": [[8, 9], [10, 11, 12]]})))


async def test_a_client_that_leaves_cancels_its_pooling_work(model_dir, monkeypatch):
    """As a generation request's: the inputs of a client gone are not run for nobody, holding a place in the queue
    (a non-streaming handler is not cancelled by the server when its client hangs up)."""
    from retnet.serve import streaming
    from tests.serve.test_api import _leaving_client, _post_scope

    monkeypatch.setattr(streaming, "DISCONNECT_POLL_S", 0.05)

    bodies = {"/v1/embeddings": {"input": ["a", "b"]}, "/pooling": {"input": "a"},
              "/score": {"text_1": "a", "text_2": ["b", "c"]}, "/rerank": {"query": "a", "documents": ["b"]}}
    async with serve_app(model_dir, convert="embed") as http:
        engine, cancelled = http.app.state.engine, []

        async def held(inputs, priority=0):  # the engine busy with other work: this request waits in its queue
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(inputs)
                raise

        engine.score = held
        for path, request in bodies.items():
            body, sent = json.dumps(request).encode(), []

            async def send(message, sent=sent):
                sent.append(message)

            scope = {**_post_scope(body, "2.3"), "path": path, "raw_path": path.encode()}
            await asyncio.wait_for(http.app(scope, _leaving_client(body), send), 10)
            assert len(cancelled) == len(sent[:1]) == 1 and sent[0]["status"] == 499, (path, sent)
            cancelled.clear()


async def test_generation_and_classification_servers_refuse_embeddings(open_app, model_dir, tmp_path):
    async with open_app() as http:
        message = refused(await http.post("/v1/embeddings", json={"input": "a"}), 400, None, "model_not_embedding")
        assert "--convert embed" in message
    app = create_app(make_settings(save_classifier(tmp_path / "classifier", model_dir, 1)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        message = refused(await http.post("/v1/embeddings", json={"input": "a"}), 400, None, "model_not_embedding")
        assert "--convert embed" in message and "classifier" in message


# ----------------------------------------------------------------------------------------------------------
# Startup
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "shown"), [
    (["--convert", "embed", "--pooler-config", '{"pooling_type": "CLS"}'], "CLS"),
    (["--convert", "embed", "--pooler-config", '{"pooling_type": "LAST", "normalize": "yes"}'], '"yes"'),
    (["--convert", "embed", "--pooler-config", '{"dimensions": 32}'], "dimensions"),
    (["--convert", "embed", "--pooler-config", "LAST"], "'LAST'"),
    (["--pooler-config", '{"pooling_type": "MEAN"}'], "MEAN"),  # without --convert embed nothing would read it
    (["--convert", "classify"], "classify"),
])
def test_a_bad_convert_or_pooler_config_is_refused_naming_it(model_dir, capsys, flags, shown):
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--model", str(model_dir), *flags])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert ("pooler_config (--pooler-config)" in error or "convert" in error) and shown in error


@pytest.mark.parametrize("value", ["", "none", "{}", '{"pooling_type": null}', '{"normalize": null}'])
def test_an_empty_pooler_config_is_the_defaults_with_or_without_convert_embed(model_dir, value):
    for flags in ([], ["--convert", "embed"]):
        settings = parse_settings(["--model", str(model_dir), "--pooler-config", value, *flags])
        assert settings.pooler_config is None and settings.pooler == {"pooling_type": "LAST", "normalize": True}


def test_a_pooler_config_without_convert_embed_is_refused_naming_its_source(model_dir, capsys, monkeypatch):
    monkeypatch.setenv("RETNET_POOLER_CONFIG", '{"pooling_type": "MEAN"}')
    for flags, source in (([], 'RETNET_POOLER_CONFIG={"pooling_type": "MEAN"}'),
                          (["--pooler-config", '{"pooling_type": "LAST"}'], "--pooler-config")):  # the flag wins
        with pytest.raises(SystemExit):
            parse_settings(["--model", str(model_dir), *flags])
        error = capsys.readouterr().err
        assert f"pooler_config ({source}) only applies with convert embed" in error and "RETNET_CONVERT=embed" in error
    assert parse_settings(["--model", str(model_dir), "--convert", "embed"]).pooler["pooling_type"] == "MEAN"


def test_run_batch_in_embed_mode_takes_and_lists_the_embedding_routes(model_dir):
    urls = served_urls(create_app(make_settings(model_dir, convert="embed")))
    line = json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {}})
    (entry,) = parse_lines([line], urls)
    assert urls == {"/v1/embeddings", "/v1/rerank", "/v1/score"} and entry.error.code == "unsupported_url"
    assert entry.error.message.endswith("expected one of /v1/embeddings, /v1/rerank, /v1/score")


@pytest.mark.parametrize(("setting", "value", "flag"), [
    ("lora_modules", None, "--lora-modules"),
    ("session_dir", "/tmp/sessions", "--session-dir"),
    ("speculative_config", {"method": "ngram", "num_speculative_tokens": 2}, "--speculative-config"),
    ("generation_config", "vllm", "--generation-config"),
    ("max_running", 8, "--max-running"),
])
def test_generation_only_flags_are_refused_with_convert_embed(model_dir, setting, value, flag):
    if setting == "lora_modules":
        value = [f"adapter={model_dir}"]
    with pytest.raises(StartupError) as refusal:
        create_app(make_settings(model_dir, convert="embed", **{setting: value}))
    message = str(refusal.value)
    assert message.startswith(flag) and "--convert embed" in message and "\n" not in message
