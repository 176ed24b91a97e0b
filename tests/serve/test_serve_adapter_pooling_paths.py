"""Client-side paths of LoRA adapters, batch files and the pooling routes, compared with what vLLM does: each test
here failed before its fix (a 500 for a bad adapter, a batch line split in two)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from retnet.serve.lora import LoraError, LoraModule, linear_modules, load_adapter, meta_model
from retnet.serve.run_batch import _read_input, parse_lines

from .conftest import make_settings, serve_app

pytestmark = pytest.mark.anyio

Q_PROJ = "model.layers.0.retention.q_proj"


def write_adapter(directory: Path, model_dir: Path, rank: int, **config) -> Path:
    """A peft-format adapter on layer 0's q_proj, written by hand (no peft needed): ``rank`` rows in lora_A."""
    from transformers import AutoConfig

    linear = linear_modules(meta_model(AutoConfig.from_pretrained(model_dir)))[Q_PROJ]
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"base_model.model.{Q_PROJ}"
    save_file({f"{prefix}.lora_A.weight": torch.randn(rank, linear.in_features),
               f"{prefix}.lora_B.weight": torch.randn(linear.out_features, rank)},
              str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"], **config}))
    return directory


async def test_a_bad_adapter_loaded_at_runtime_is_a_400_not_a_500(model_dir, tmp_path):
    """A rank-0 adapter divided its alpha by zero, and a rank_pattern key that is no regular expression raised
    re.error: both escaped load_adapter's LoraError, so /v1/load_lora_adapter answered 500 (and --lora-modules
    died with a traceback instead of exit 2). Each is the adapter's 400 naming the field; the server goes on."""
    bad = {"zero": write_adapter(tmp_path / "zero", model_dir, 0),
           "pattern": write_adapter(tmp_path / "pattern", model_dir, 2, rank_pattern={"q_proj[": 2}),
           "alpha": write_adapter(tmp_path / "alpha", model_dir, 2, alpha_pattern={"(q_proj": 4})}
    async with serve_app(model_dir, allow_runtime_lora_updating=True, max_lora_rank=4) as client:
        for name, path in bad.items():
            response = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            assert response.status_code == 400, (name, response.text)
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_lora_adapter", "lora_path"), error
            assert name in error["message"]
        good = write_adapter(tmp_path / "good", model_dir, 2)
        response = await client.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": str(good)})
        assert response.status_code == 200, response.text
        answer = await client.post("/v1/completions", json={"model": "good", "prompt": "def", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["micro", "good"]


def test_a_rank_0_adapter_is_refused_by_name_at_startup(model_dir, tmp_path):
    from transformers import AutoConfig

    linears = linear_modules(meta_model(AutoConfig.from_pretrained(model_dir)))
    path = write_adapter(tmp_path / "zero", model_dir, 0)
    with pytest.raises(LoraError, match=r"'zero'.*rank 0"):
        load_adapter(LoraModule("zero", str(path)), linears, 16)


def test_a_batch_line_holding_a_unicode_line_separator_stays_one_line(tmp_path):
    """JSON lets U+2028, U+2029 and U+0085 stand unescaped in a string (json.dumps(ensure_ascii=False) writes
    them so), and JSONL's lines end at "\\n" alone; str.splitlines() also split at those, so the line became two
    invalid-JSON lines and its request was never run. A byte-order mark made line 1 no JSON."""
    prompts = ["para one\u2028para two", "next\u2029line", "old\x85newline", "form\x0cfeed escaped"]
    text = "\r\n".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                   "body": {"prompt": p, "max_tokens": 1}}, ensure_ascii=False)
                       for i, p in enumerate(prompts)) + "\r\n\n"
    path = tmp_path / "in.jsonl"
    path.write_text("\ufeff" + text, encoding="utf-8", newline="")  # a BOM too, as Windows tools write
    entries = parse_lines(_read_input(str(path)), {"/v1/completions"})
    assert [(e.line, e.custom_id, e.error) for e in entries] == [(i + 1, f"c{i}", None) for i in range(len(prompts))]
    assert [e.body["prompt"] for e in entries] == prompts


async def test_a_batch_line_the_server_refuses_as_json_gets_its_400_not_a_500(model_dir):
    """A NaN (json.loads reads it) or a lone surrogate escape in a line's body made httpx's strict JSON encoder
    raise inside the batch's client: the line was written as a 500 "internal error" with a traceback, where the
    server answers the same body online with a 400 naming the field. The other lines are unaffected."""
    import io

    from retnet.serve.run_batch import run_batch, served_urls

    lines = ['{"custom_id": "nan", "method": "POST", "url": "/v1/completions", '
             '"body": {"prompt": "x", "max_tokens": 2, "temperature": NaN}}',
             '{"custom_id": "surrogate", "method": "POST", "url": "/v1/completions", '
             '"body": {"prompt": "\\ud83d", "max_tokens": 2}}',
             '{"custom_id": "ok", "method": "POST", "url": "/v1/completions", '
             '"body": {"prompt": "def", "max_tokens": 2, "temperature": 0}}']
    async with serve_app(model_dir) as client:
        out = io.StringIO()
        summary = await run_batch(client.app, parse_lines(lines, served_urls(client.app)), out, 4, progress=False)
    results = {r["custom_id"]: r for r in map(json.loads, out.getvalue().splitlines())}
    assert list(results) == ["nan", "surrogate", "ok"] and summary.failed == 2
    for custom_id, (param, code) in {"nan": ("temperature", "less_than_equal"),
                                     "surrogate": ("prompt", "invalid_unicode")}.items():
        assert results[custom_id]["response"]["status_code"] == 400, results[custom_id]
        assert (results[custom_id]["error"]["param"], results[custom_id]["error"]["code"]) == (param, code)
    assert results["ok"]["response"]["status_code"] == 200 and results["ok"]["error"] is None


def test_lora_modules_json_fields_must_be_strings(model_dir):
    """vLLM's JSON form of --lora-modules: a base_model_name that is no string was kept as it came and became
    the adapter card's parent, which failed ModelCard's validation on every GET /v1/models (a 500 while the
    server ran). It is a startup error naming the field, as a missing name or path is."""
    from pydantic import ValidationError

    from retnet.serve.lora import parse_lora_modules

    assert parse_lora_modules('{"name": "a", "path": "p", "base_model_name": null}')[0].base_model_name is None
    for entry, field in (('{"name": "a", "path": "p", "base_model_name": 5}', "base_model_name"),
                         ('{"name": "a", "path": "p", "base_model_name": {"x": 1}}', "base_model_name"),
                         ('{"name": 7, "path": "p"}', "name"), ('{"name": "a", "path": ["p"]}', "path")):
        with pytest.raises(ValueError, match=f"lora_modules: {field} must be a string"):
            parse_lora_modules(entry)
        with pytest.raises(ValidationError, match=f"{field} must be a string"):
            make_settings(model_dir, lora_modules=[json.loads(entry)])
