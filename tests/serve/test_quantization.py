"""``retnet-serve --quantization int8``: the engine serves the model with int8 decoder weights (completions,
n-gram speculation, LoRA adapters, embeddings), and what it cannot serve is refused at startup in one line."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from retnet.model import RetNetForCausalLM
from retnet.model.quantization import quantize_model
from retnet.serve.__main__ import main

from .conftest import make_settings, serve_app
from .test_lora import _peft_model

pytestmark = pytest.mark.anyio
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install 'retnet-stack[quant]')")

GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 12}
# Repetitive, so that n-gram speculation finds drafts to verify.
PROMPT = "for i in range(10):\n    print(i * i)\nfor i in range(10):\n"


def _is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


async def _complete(client, **extra) -> dict:
    response = await client.post("/v1/completions", json={"prompt": PROMPT, **GREEDY, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def startup_error(capsys, *argv: str) -> str:
    """``retnet-serve ARGV``'s one-line error (exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@needs_torchao
async def test_a_quantized_server_decodes_what_the_quantized_model_does_and_speculation_changes_nothing(model_dir):
    async with serve_app(model_dir, quantization="int8") as client:
        engine = client.app.state.engine
        projections = [m for m in engine.model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
        assert projections and all(_is_quantized(m.weight) for m in projections)
        assert not _is_quantized(engine.model.lm_head.weight)
        assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight  # still tied
        got = (await _complete(client, return_token_ids=True))["choices"][0]
    # The reference: the model quantized here, greedy through transformers' generate. (Not the float32 server's
    # text: the micro model's wide random init makes it chaotic enough that ~1% on the logits changes its greedy
    # path after a few tokens; tests/model/test_quantization.py bounds the logits' error on a model at training's
    # init.)
    model = RetNetForCausalLM.from_pretrained(model_dir).eval()
    quantize_model(model, "int8")
    prompt = torch.tensor([got["prompt_token_ids"]])
    want = model.generate(prompt, max_new_tokens=GREEDY["max_tokens"], do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert got["token_ids"] == want
    async with serve_app(model_dir, quantization="int8",
                         speculative_config='{"method": "ngram", "num_speculative_tokens": 3}') as client:
        speculated = (await _complete(client, return_token_ids=True))["choices"][0]
    assert speculated["token_ids"] == want
    # A draft model runs unquantized (its drafts are proposals only): the answer is still the quantized model's.
    draft = f'{{"method": "draft_model", "model": "{model_dir}", "num_speculative_tokens": 3}}'
    async with serve_app(model_dir, quantization="int8", speculative_config=draft) as client:
        drafted = (await _complete(client, return_token_ids=True))["choices"][0]
        assert client.app.state.engine.drafter is not None
    assert drafted["token_ids"] == want


@needs_torchao
async def test_a_quantized_embedding_server_embeds_as_the_float32_one(model_dir):
    body = {"input": ["def add(a, b):", "Hello world! How are you today?"]}
    rows = {}
    for method in ("none", "int8"):
        async with serve_app(model_dir, convert="embed", quantization=method) as client:
            response = await client.post("/v1/embeddings", json=body)
            assert response.status_code == 200, response.text
            rows[method] = torch.tensor([item["embedding"] for item in response.json()["data"]])
    cosine = torch.nn.functional.cosine_similarity(rows["int8"], rows["none"], dim=-1)
    assert (cosine > 0.99).all(), cosine


@needs_torchao
async def test_lora_and_dora_adapters_are_served_on_the_quantized_model(model_dir, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"]
    _peft_model(model_dir, 0, r=4, lora_alpha=8, target_modules=targets).save_pretrained(tmp_path / "lora")
    _peft_model(model_dir, 1, r=4, lora_alpha=8, use_dora=True, target_modules=targets).save_pretrained(
        tmp_path / "dora")
    async with serve_app(model_dir, quantization="int8",
                         lora_modules=[f"a={tmp_path / 'lora'}", f"d={tmp_path / 'dora'}"]) as client:
        base, lora, dora = (await _complete(client), await _complete(client, model="a"),
                            await _complete(client, model="d"))
    texts = {reply["choices"][0]["text"] for reply in (base, lora, dora)}
    assert lora["model"] == "a" and dora["model"] == "d" and len(texts) == 3, texts


def test_without_torchao_int8_is_refused_at_startup_with_the_install_command(model_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` then fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    err = startup_error(capsys, "--model", str(model_dir), "--quantization", "int8")
    assert err.startswith("retnet-serve: error: --quantization int8 needs torchao"), err
    assert "pip install 'retnet-stack[quant]'" in err


def test_an_unknown_method_is_an_invalid_setting(model_dir, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--model", str(model_dir), "--quantization", "int4"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "quantization" in err and "'none' or 'int8'" in err and "int4" in err, err



@needs_torchao
def test_saved_sessions_are_tied_to_the_quantization(model_dir, tmp_path):
    """A session state computed with int8 weights is another model's: --session-dir files record it, so a server
    of the other kind refuses to continue them (as one of another --dtype does)."""
    from retnet.serve.app import create_app

    recorded = {method: create_app(make_settings(model_dir, session_dir=str(tmp_path), quantization=method))
                .state.engine.sessions.files.model["dtype"] for method in ("none", "int8")}
    assert recorded == {"none": "float32", "int8": "float32+int8"}
