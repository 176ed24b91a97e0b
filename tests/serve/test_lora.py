"""LoRA adapters (``--lora-modules``): real peft adapters on the micro model, served several at once beside the
base model, checked against peft's own merged models (``merge_and_unload``) served alone."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from retnet.model import RetNetForCausalLM
from retnet.serve.engine import Engine
from retnet.serve.lora import LoraSlots
from retnet.serve.run_batch import parse_lines, run_batch, served_urls

from .conftest import make_settings, serve_app

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPTS = ["def add(a, b):", "class Stack:", "Hello world! How are", "The retention mechanism"]


def _peft_model(model_dir: Path, seed: int, **lora):
    from peft import LoraConfig, get_peft_model

    base = RetNetForCausalLM.from_pretrained(model_dir).eval()
    peft_model = get_peft_model(base, LoraConfig(**lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (no change): a trained adapter's B is not
                param.normal_(0.0, 0.15)
    return peft_model


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Two adapters, each as its peft directory and peft's merged model: ``a`` on every projection, ``b`` with
    rsLoRA, a rank_pattern and an alpha_pattern on a few."""
    root = tmp_path_factory.mktemp("lora")
    specs = {
        "a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        "b": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj", "o_proj", "down_proj"],
                  rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3}),
    }
    out = {}
    for seed, (name, spec) in enumerate(specs.items()):
        peft_model = _peft_model(model_dir, seed, **spec)
        peft_model.save_pretrained(root / name)
        out[name] = (root / name, peft_model.merge_and_unload().eval())
    return out


def lora_flags(adapters) -> list[str]:
    return [f"{name}={path}" for name, (path, _) in adapters.items()]


async def complete(client, model: str | None, prompt, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": 8, "logprobs": 1, **GREEDY, **extra}
    if model is not None:
        body["model"] = model
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def chat(client, model: str | None) -> dict:
    body = {"messages": [{"role": "user", "content": "How are you?"}], "max_tokens": 8, **GREEDY}
    r = await client.post("/v1/chat/completions", json=body if model is None else {**body, "model": model})
    assert r.status_code == 200, r.text
    return r.json()


def tokens_and_logprobs(response: dict) -> tuple[list[str], list[float]]:
    lp = response["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"]


def assert_same_answer(got: dict, want: dict, where: str) -> None:
    got_tokens, got_lp = tokens_and_logprobs(got)
    want_tokens, want_lp = tokens_and_logprobs(want)
    assert got_tokens == want_tokens, where
    assert got_lp == pytest.approx(want_lp, abs=1e-4), where


async def wait_until_submitted(engine: Engine, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.in_system < count:
        assert time.monotonic() < deadline, f"{engine.in_system} of {count} requests reached the engine"
        await asyncio.sleep(0.01)


@pytest.fixture
def recorded_slots(monkeypatch) -> list[tuple[list[int], list[int] | None]]:
    """Every ``(slots, counts)`` the engine runs a forward with: what was batched with what."""
    calls = []
    original = LoraSlots.tokens

    def tokens(self, slots, counts=None):
        calls.append((list(slots), None if counts is None else list(counts)))
        return original(self, slots, counts)

    monkeypatch.setattr(LoraSlots, "tokens", tokens)
    return calls


async def test_mixed_batches_give_each_adapter_its_merged_models_answer(model_dir, adapters, recorded_slots,
                                                                        tmp_path, monkeypatch):
    # The reference: each merged model (and the base) served alone, one request at a time.
    want: dict[tuple[str, str], dict] = {}
    for name, model in [("micro", None), *((n, merged) for n, (_, merged) in adapters.items())]:
        async with serve_app(model_dir, model=model, prefix_cache_entries=0) as client:
            for prompt in PROMPTS:
                want[name, prompt] = await complete(client, None, prompt)
            want[name, "chat"] = await chat(client, None)
    assert want["a", PROMPTS[0]]["choices"][0]["text"] != want["micro", PROMPTS[0]]["choices"][0]["text"]
    assert want["b", PROMPTS[0]]["choices"][0]["text"] != want["micro", PROMPTS[0]]["choices"][0]["text"]

    # The scheduler starts only once the whole burst is queued: on a loaded machine the requests would otherwise
    # reach it over several iterations, and no prefill need hold the base, a and b together.
    gate = threading.Event()
    iteration = Engine._iteration
    monkeypatch.setattr(Engine, "_iteration", lambda engine: gate.wait(120) and iteration(engine))
    async with serve_app(model_dir, lora_modules=lora_flags(adapters)) as client:
        # Every prompt under the base and both adapters at once: one packed prefill, then mixed decode steps.
        jobs = [(model, prompt) for prompt in PROMPTS for model in ("micro", "a", "b")]
        try:
            burst = [asyncio.create_task(complete(client, model, prompt)) for model, prompt in jobs]
            await wait_until_submitted(client.app.state.engine, len(jobs))
        finally:
            gate.set()
        got = await asyncio.gather(*burst)
        for (model, prompt), response in zip(jobs, got, strict=True):
            assert response["model"] == model
            assert_same_answer(response, want[model, prompt], f"{model}: {prompt!r}")
        packed = [slots for slots, counts in recorded_slots if counts is not None and len(set(slots)) == 3]
        decode = [slots for slots, counts in recorded_slots if counts is None and len(set(slots)) == 3]
        assert packed and decode, recorded_slots  # both paths really ran base, a and b together

        # A chat, a stream and a run_batch line pick the adapter by `model` too.
        chats = await asyncio.gather(*(chat(client, model) for model in ("micro", "a", "b")))
        for model, response in zip(("micro", "a", "b"), chats, strict=True):
            assert response["model"] == model
            assert response["choices"][0]["message"] == want[model, "chat"]["choices"][0]["message"], model
        body = {"model": "b", "prompt": PROMPTS[1], "max_tokens": 8, "stream": True, **GREEDY}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            chunks = [json.loads(line[6:]) for line in [x async for x in r.aiter_lines()]
                      if line.startswith("data: {")]
        assert {c["model"] for c in chunks} == {"b"}
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == \
            want["b", PROMPTS[1]]["choices"][0]["text"]
        out = io.StringIO()
        lines = [json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions",
                             "body": {"model": "a", "prompt": PROMPTS[2], "max_tokens": 8, **GREEDY}})]
        await run_batch(client.app, parse_lines(lines, served_urls(client.app)), out, 4)
        result = json.loads(out.getvalue())["response"]["body"]
        assert result["model"] == "a" and result["choices"][0]["text"] == want["a", PROMPTS[2]]["choices"][0]["text"]


async def test_cached_states_never_cross_adapters(model_dir, adapters):
    path, merged = adapters["a"]

    async def ids_run(client, model, prompt_ids):
        return await complete(client, model, prompt_ids, return_token_ids=True)

    def cached(response):
        return response["usage"]["prompt_tokens_details"]["cached_tokens"]

    # Token ids, not text: a prompt and its answer's ids are then exactly the key of the answer's cache entry.
    async with serve_app(model_dir, lora_modules=[f"a={path}"]) as client:
        prompt = (await client.post("/tokenize", json={"prompt": PROMPTS[3]})).json()["tokens"]
    async with serve_app(model_dir, model=merged, prefix_cache_entries=0) as client:
        want_repeat = await ids_run(client, None, prompt)
        follow_up = prompt + want_repeat["choices"][0]["token_ids"]
        want_follow = await ids_run(client, None, follow_up)
    async with serve_app(model_dir, lora_modules=[f"a={path}"]) as client:
        base = await ids_run(client, "micro", prompt)
        assert cached(await ids_run(client, "micro", prompt)) == len(prompt)  # the cache is on
        # The base model's prompt entry (with its logits) and its answer entry are the base's alone.
        base_follow = prompt + base["choices"][0]["token_ids"]
        for ids, want in ((base_follow, None), (prompt, want_repeat), (follow_up, want_follow)):
            got = await ids_run(client, "a", ids)
            if ids != follow_up:  # a's own entries serve the follow-up
                assert cached(got) == 0, ids
            if want is not None:
                assert_same_answer(got, want, str(ids))
        # Now a's entries exist, its answers' too; the base still starts from its own entries only.
        assert_same_answer(await ids_run(client, "micro", prompt), base, "base after a")
        assert cached(await ids_run(client, "micro", follow_up)) == len(prompt)
        assert cached(await ids_run(client, "a", follow_up)) == len(follow_up)
        prompt = PROMPTS[3]

        # A session is bound to the model it started with.
        r = await client.post("/v1/completions", json={"model": "a", "prompt": prompt, "max_tokens": 2,
                                                       "session_id": "s1", **GREEDY})
        assert r.status_code == 200, r.text
        r = await client.post("/v1/completions", json={"model": "micro", "prompt": " more", "max_tokens": 2,
                                                       "session_id": "s1", **GREEDY})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        r = await client.post("/v1/completions", json={"model": "a", "prompt": " more", "max_tokens": 2,
                                                       "session_id": "s1", **GREEDY})
        assert r.status_code == 200, r.text  # refused without losing the session or leaving it busy


async def test_models_lists_adapters_and_unknown_names_are_404(model_dir, adapters, recorded_slots):
    (path_a, _), (path_b, _) = adapters["a"], adapters["b"]
    flags = [f"a={path_a}", json.dumps({"name": "b", "path": str(path_b), "base_model_name": "org/base"})]
    async with serve_app(model_dir, lora_modules=flags, max_loras=1) as client:
        models = (await client.get("/v1/models")).json()["data"]
        assert [(m["id"], m["parent"], m["root"]) for m in models] == [
            ("micro", None, str(model_dir)), ("a", "micro", str(path_a)), ("b", "org/base", str(path_b))]
        assert (await client.get("/v1/models/a")).json() == models[1]
        for route, body in (("/v1/completions", {"prompt": "x"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                            ("/v1/responses", {"input": "x"}), ("/tokenize", {"prompt": "x"})):
            r = await client.post(route, json={"model": "c", **body})
            error = r.json()["error"]
            assert r.status_code == 404 and (error["param"], error["code"]) == ("model", "model_not_found"), r.text
        r = await client.post("/v1/responses", json={"model": "b", "input": "Hello", "max_output_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "b", r.text
        # --max-loras 1: a and b are never in one forward, yet both are answered.
        recorded_slots.clear()
        await asyncio.gather(*(complete(client, m, p) for m in ("a", "b", "micro") for p in PROMPTS[:2]))
        assert recorded_slots and all(len(set(slots) - {0}) <= 1 for slots, _ in recorded_slots), recorded_slots
        metrics = (await client.get("/metrics")).text
        assert 'retnet_model_requests_total{model_name="b"} 3.0' in metrics


def _edited(src: Path, dst: Path, config=None, tensors=None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    data = json.loads((dst / "adapter_config.json").read_text())
    data.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def test_unsupported_adapters_are_refused_at_startup_naming_the_field(model_dir, adapters, tmp_path):
    from retnet.serve.app import create_app

    path = adapters["a"][0]
    q = "base_model.model.model.layers.0.retention.q_proj"

    def renamed(old, new):
        return lambda t: {k.replace(old, new): v for k, v in t.items()}

    cases = {
        "use_dora": dict(config={"use_dora": True}),
        "bias": dict(config={"bias": "lora_only"}),
        "modules_to_save": dict(config={"modules_to_save": ["lm_head"]}),
        "alora_invocation_tokens": dict(config={"alora_invocation_tokens": [1, 2]}),
        "max_lora_rank": dict(),  # rank 8 over --max-lora-rank 4
        "lm_head": dict(tensors=renamed(q, "base_model.model.lm_head")),
        "not a Linear layer": dict(tensors=renamed(q, "base_model.model.model.layers.0.retention.x_proj")),
        r"lora_A \(8, 64\) and lora_B \(64, 4\)": dict(
            tensors=lambda t: {**t, f"{q}.lora_B.weight": t[f"{q}.lora_B.weight"][:, :4].contiguous()}),
        "rank_pattern": dict(config={"rank_pattern": {"q_proj": 2}}),
        "init_lora_weights": dict(config={"init_lora_weights": "pissa_niter_4"}),
        "lora_alpha": dict(config={"lora_alpha": None}),
        "alpha_pattern": dict(config={"alpha_pattern": ["q_proj"]}),
        "r / rank_pattern": dict(config={"r": "eight"}),
    }
    for i, (field, edit) in enumerate(cases.items()):
        bad = _edited(path, tmp_path / str(i), **edit)
        rank = 4 if field == "max_lora_rank" else 16
        with pytest.raises(ValueError, match=rf"'bad'.*{field}"):
            create_app(make_settings(model_dir, lora_modules=[f"bad={bad}"], max_lora_rank=rank))
    listed = _edited(path, tmp_path / "listed")
    (listed / "adapter_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"'bad'.*must be a JSON object"):
        create_app(make_settings(model_dir, lora_modules=[f"bad={listed}"], max_lora_rank=16))
    for flags, message in (([f"a={path}", f"a={path}"], "given twice"), ([f"micro={path}"], "base model's name"),
                           (["nopath"], "name=path")):
        with pytest.raises(ValueError, match=message):
            make_settings(model_dir, lora_modules=flags)


def test_without_adapters_the_model_is_untouched(model_dir):
    from retnet.serve.app import create_app
    from retnet.serve.lora import LoraLinear

    model = RetNetForCausalLM.from_pretrained(model_dir).eval()
    app = create_app(make_settings(model_dir), model=model)
    app.state.engine._load()
    assert app.state.engine.adapter_slots.lora is None
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
