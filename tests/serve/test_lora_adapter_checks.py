"""Adapters ``load_adapter`` refuses rather than serves wrong: one trained on changed base weights (LoRA-GA, as
PiSSA/CorDA/OLoRA), one whose weights hold a NaN or an infinity (a diverged run's export), and one whose config's
numbers are no rank or alpha (infinite, too large for a float, a fractional rank)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from retnet.model import RetNetConfig
from retnet.serve.lora import LoraError, LoraModule, linear_modules, load_adapter, meta_model

from .conftest import serve_app
from .test_lora import _edited, _peft_model
from .test_lora_runtime import error_of, load

V = "base_model.model.model.layers.0.retention.v_proj"


@pytest.fixture(scope="module")
def saved(model_dir, tmp_path_factory) -> dict[str, Path]:
    """A plain LoRA adapter and a DoRA one on v_proj, as peft saves them."""
    root = tmp_path_factory.mktemp("lora-checks")
    _peft_model(model_dir, 0, r=2, lora_alpha=4, target_modules=["v_proj"]).save_pretrained(root / "lora")
    _peft_model(model_dir, 1, r=2, lora_alpha=4, use_dora=True, target_modules=["v_proj"]).save_pretrained(
        root / "dora")
    return {"lora": root / "lora", "dora": root / "dora"}


@pytest.fixture(scope="module")
def linears(model_dir):
    return linear_modules(meta_model(RetNetConfig.from_pretrained(model_dir)))


def poisoned(key: str, value: float):
    def edit(tensors):
        tensor = tensors[key].clone()
        tensor.view(-1)[0] = value
        return {**tensors, key: tensor}
    return edit


def test_a_lora_ga_adapter_saved_unconverted_is_refused(saved, linears, tmp_path):
    # peft's LoRA-GA init subtracts its initial B A from the base weights (as PiSSA does): served on the original
    # base, the adapter's model was off by several logits.
    bad = _edited(saved["lora"], tmp_path / "ga", config={"init_lora_weights": "lora_ga"})
    with pytest.raises(LoraError, match=r"'ga'.*init_lora_weights = 'lora_ga' is not supported.*"
                                        r"path_initial_model_for_weight_conversion"):
        load_adapter(LoraModule("ga", str(bad)), linears, 16)
    # Converted by peft (it then writes True), it is a plain LoRA adapter.
    converted = _edited(saved["lora"], tmp_path / "converted", config={"init_lora_weights": True})
    assert load_adapter(LoraModule("ok", str(converted)), linears, 16).weights


@pytest.mark.parametrize(("which", "key", "value", "part"), [
    ("lora", f"{V}.lora_B.weight", math.nan, "lora_B"),
    ("lora", f"{V}.lora_A.weight", math.inf, "lora_A"),
    ("dora", f"{V}.lora_magnitude_vector", -math.inf, "lora_magnitude_vector"),
])
def test_weights_that_are_not_finite_are_refused_naming_the_module(saved, linears, tmp_path, which, key, value,
                                                                   part):
    bad = _edited(saved[which], tmp_path / "bad", tensors=poisoned(key, value))
    with pytest.raises(LoraError, match=rf"'bad'.*'model.layers.0.retention.v_proj' has a {part} holding values "
                                        r"that are not finite"):
        load_adapter(LoraModule("bad", str(bad)), linears, 16)


@pytest.mark.parametrize(("config", "field", "why"), [
    ({"r": math.inf}, "r / rank_pattern", "must be finite"),  # json writes Infinity; int(inf) is an OverflowError
    ({"r": 10**400}, "r / rank_pattern", "must be finite"),  # float() of it overflows
    ({"rank_pattern": {"v_proj": math.inf}}, "r / rank_pattern", "must be finite"),
    ({"lora_alpha": 10**400}, "lora_alpha / alpha_pattern", "must be finite"),
    ({"alpha_pattern": {"v_proj": -(10**400)}}, "lora_alpha / alpha_pattern", "must be finite"),
    ({"r": 2.5}, "r / rank_pattern", "must be a whole number"),  # was served as rank 2
])
def test_config_numbers_that_are_no_rank_or_alpha_are_refused_naming_the_field(saved, linears, tmp_path, config,
                                                                                field, why):
    bad = _edited(saved["lora"], tmp_path / "bad", config=config)
    with pytest.raises(LoraError, match=rf"'bad'.*{field} {why}.*; got "):
        load_adapter(LoraModule("bad", str(bad)), linears, 16)
    # A whole number written as a float (or a string) is still a rank.
    good = _edited(saved["lora"], tmp_path / "good", config={"r": 2.0, "rank_pattern": {"v_proj": "2"}})
    assert load_adapter(LoraModule("good", str(good)), linears, 16).rank == 2


@pytest.mark.anyio
async def test_a_runtime_load_of_a_nan_adapter_is_a_400_and_the_server_goes_on(model_dir, saved, tmp_path):
    # It was loaded and served: its answers were one token repeated, and asking for logprobs was a 500 (NaN is no
    # JSON number).
    bad = _edited(saved["lora"], tmp_path / "nan", tensors=poisoned(f"{V}.lora_B.weight", math.nan))
    async with serve_app(model_dir, allow_runtime_lora_updating=True, max_lora_rank=4) as client:
        error = error_of(await load(client, "nan", bad), 400)
        assert error["code"] == "invalid_lora_adapter" and "not finite" in error["message"], error
        assert "nan" not in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        # An infinite rank was an OverflowError out of the route: a 500
        huge = _edited(saved["lora"], tmp_path / "huge", config={"r": math.inf})
        error = error_of(await load(client, "huge", huge), 400)
        assert error["code"] == "invalid_lora_adapter" and "r / rank_pattern must be finite" in error["message"]
        assert (await load(client, "ok", saved["lora"])).status_code == 200
        response = await client.post("/v1/completions", json={"model": "ok", "prompt": "def add(a, b):",
                                                                "max_tokens": 4, "logprobs": 1})
        assert response.status_code == 200, response.text
        assert all(math.isfinite(v) for v in response.json()["choices"][0]["logprobs"]["token_logprobs"])
