"""Weight-only int8 quantization (``retnet.model.quantization``, ``--quantization int8``): the quantized model
computes nearly the fp32 model's logits, its retention forms and its cache still agree with each other, its
decoder weights take a quarter of the bytes, and what is kept unquantized (embeddings, a tied or untied lm_head)
is untouched. Errors name the flag."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from retnet.model.quantization import quantize_model

from .conftest import make_model

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install 'retnet-stack[quant]')")

MODES = ("parallel", "chunkwise", "recurrent")
# Per-channel int8 moves this model's logits by ~1% (relative, in norm); a transposed weight moves them by ~55%,
# a projection's rows mis-scaled by ~20-25% (test_a_wrong_scale_...), so 3% catches either with room for rounding.
# (Random models at training's init, as here, not a wider one: a random RetNet initialised at 0.2 is chaotic enough
# that any rounding, torchao's or a hand-written one, moves its logits by 3-15%.)
LOGITS_RTOL = 0.03


def _ids(batch=2, length=37, vocab=101, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=generator)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _quantized(**overrides):
    """(fp32 model, the same weights quantized, the quantization report)."""
    reference, model = make_model(**overrides), make_model(**overrides)
    return reference, model, quantize_model(model, "int8")


@needs_torchao
@torch.no_grad()
def test_int8_logits_are_close_to_fp32_and_pick_the_same_tokens():
    reference, model, report = _quantized()
    ids = _ids()
    want, got = reference(ids).logits, model(ids).logits
    error = _relative_error(got, want)
    assert 0 < error < LOGITS_RTOL, error  # > 0: the weights really were rounded
    agreement = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, agreement
    # 2 layers x (q, k, v, g, o, up, down): every decoder Linear, nothing else.
    decoder = [m for m in reference.model.layers.modules() if isinstance(m, nn.Linear)]
    assert report.layers == len(decoder) and report.method == "int8"


@needs_torchao
@torch.no_grad()
def test_a_wrong_scale_or_a_transposed_weight_would_be_caught_by_the_tolerance():
    """The bound above means something: the same model with a square projection's weight transposed, or with an
    FFN projection's rows scaled by 1.5 (a scale applied twice, or to the wrong rows), is far outside it."""
    reference, ids = make_model(), _ids()
    want = reference(ids).logits
    for name, damage in (("retention.q_proj", lambda w: w.T), ("mlp.down_proj", lambda w: w * 1.5),
                         ("mlp.up_proj", lambda w: w * torch.linspace(0.5, 1.5, w.shape[0])[:, None])):
        broken = make_model()
        projection = broken.model.layers[0].get_submodule(name)
        projection.weight.copy_(damage(projection.weight.clone()))
        assert _relative_error(broken(ids).logits, want) > 3 * LOGITS_RTOL, name


@needs_torchao
@torch.no_grad()
def test_parallel_chunkwise_and_recurrent_forms_agree_on_the_quantized_model():
    _, model, _ = _quantized()
    ids = _ids()  # 37 tokens: not a multiple of the chunk size 8
    logits = {mode: model(ids, retention_mode=mode).logits for mode in MODES}
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(logits[mode], logits["parallel"], rtol=1e-5, atol=1e-5)


@needs_torchao
@torch.no_grad()
def test_cached_generation_is_uncached_generation_on_the_quantized_model():
    _, model, _ = _quantized()
    prompt = _ids(batch=1, length=11)
    settings = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, use_cache=True, **settings)
    uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape[1] == prompt.shape[1] + 16
    assert torch.equal(cached, uncached)


@needs_torchao
def test_decoder_weights_take_a_quarter_of_their_fp32_bytes():
    _, _, report = _quantized(hidden_size=128)
    # int8 data plus a float32 scale (and a zero point) per output row of 128: just under 4x.
    assert 3.5 < report.linear_bytes_before / report.linear_bytes_after <= 4, report
    saved = report.model_bytes_before - report.model_bytes_after
    assert saved == report.linear_bytes_before - report.linear_bytes_after  # nothing else changed size
    again = quantize_model(_quantized()[1], "int8")  # already quantized: left as it is
    assert again.layers == 0 and again.linear_bytes_after == again.linear_bytes_before


@needs_torchao
@pytest.mark.parametrize("tied", [True, False])
def test_embeddings_and_lm_head_are_kept_and_a_tied_head_stays_tied(tied):
    reference, model, _ = _quantized(tie_word_embeddings=tied)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert type(embedding) is nn.Parameter and type(head) is nn.Parameter
    assert (head is embedding) == tied
    torch.testing.assert_close(head, reference.get_output_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(embedding, reference.get_input_embeddings().weight, rtol=0, atol=0)


def test_an_unknown_method_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--quantization must be one of none, int8; got 'int4'"):
        quantize_model(make_model(), "int4")


def test_without_torchao_int8_is_refused_with_the_install_command_and_none_needs_nothing(monkeypatch):
    # None in sys.modules makes `import torchao...` raise ImportError, as when it is not installed.
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)
    model = make_model()
    with pytest.raises(ValueError, match=r"--quantization int8 needs torchao.*pip install 'retnet-stack\[quant\]'"):
        quantize_model(model, "int8")
    report = quantize_model(model, "none")
    assert report.layers == 0 and report.model_bytes_after == report.model_bytes_before


@needs_torchao
def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="--quantization: expected a RetNet"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int8")


@needs_torchao
def test_retnet_eval_scores_the_quantized_model_close_to_fp32(tmp_path, bpe_tokenizer, capsys):
    """``retnet-eval --quantization int8``: the same documents, a loss within a few percent of float32's."""
    from retnet.train.evaluate import main

    model = make_model(vocab_size=len(bpe_tokenizer), pad_token_id=bpe_tokenizer.pad_token_id,
                       eos_token_id=bpe_tokenizer.eos_token_id)
    model.save_pretrained(tmp_path)
    bpe_tokenizer.save_pretrained(tmp_path)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(a, b):\n    return a * {i} + b\n"}) + "\n"
                            for i in range(6)))
    records = {}
    for method in ("none", "int8"):
        assert main(["--model", str(tmp_path), "--dataset", str(data), "--json", "--no-progress",
                     "--quantization", method]) == 0
        records[method] = json.loads(capsys.readouterr().out)
    assert records["int8"]["quantization"] == "int8" and records["int8"]["tokens"] == records["none"]["tokens"]
    assert records["int8"]["loss"] != records["none"]["loss"]  # the weights the loss was computed with differ
    assert records["int8"]["loss"] == pytest.approx(records["none"]["loss"], rel=0.02)


def test_retnet_eval_without_torchao_exits_2_naming_the_flag(tmp_path, monkeypatch, capsys):
    from retnet.train.evaluate import EXIT_USAGE, main

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    make_model().save_pretrained(tmp_path)  # no tokenizer needed: the flag is refused before anything loads
    assert main(["--model", str(tmp_path), "--quantization", "int8", "--no-progress"]) == EXIT_USAGE
    assert "--quantization int8 needs torchao" in capsys.readouterr().err


@needs_torchao
def test_doras_row_scale_of_an_int8_weight_is_that_of_the_matrix_the_layer_computes_with():
    """The served DoRA scale ``m / ||W + B A||`` on an int8 layer: W the int8 weight dequantized (what its forward
    multiplies by), not its codes; a plain weight on a device without aten's dequantize (meta) is taken as is."""
    from retnet.model.quantization import _torchao
    from retnet.serve.lora import dora_scale

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(24, 16, bias=False))
    x = torch.randn(5, 24)
    quantization, config = _torchao("int8")
    quantization.quantize_(layer, config)  # as quantize_model does to a decoder's Linears
    weight = layer[0].weight
    dense = weight.dequantize().float()
    assert torch.allclose(layer(x), x @ dense.T, atol=1e-5)  # the dequantized weight is what the layer computes with
    a, b, magnitude = torch.randn(4, 24), torch.randn(16, 4) * 0.1, torch.rand(16) + 0.5
    expected = magnitude / torch.linalg.vector_norm(dense + b @ a, dim=1)
    assert torch.allclose(dora_scale(weight, a, b, magnitude), expected, rtol=1e-6)
    meta = dora_scale(torch.empty(16, 24, device="meta"), a.to("meta"), b.to("meta"), magnitude.to("meta"))
    assert meta.shape == (16,) and meta.device.type == "meta"

