"""DoRA adapters (peft's ``use_dora``) served unmerged: real peft DoRA adapters on the micro model, beside a plain
LoRA adapter and the base model, checked against peft's merged models (``merge_and_unload``) served alone, and,
on one Linear with a bias, against peft's own DoRA layer."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from retnet.serve.engine import Engine
from retnet.serve.lora import LoraLinear, LoraModule, LoraSlots, install, linear_modules, load_adapter

from .conftest import serve_app
from .test_lora import PROMPTS, _peft_model, assert_same_answer, complete, wait_until_submitted

pytestmark = pytest.mark.anyio

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _perturb_magnitudes(peft_model: nn.Module, seed: int) -> None:
    """peft starts each magnitude at its row's norm (DoRA then computes what LoRA does); a trained one is not."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """``d``: DoRA on every projection; ``e``: DoRA with rsLoRA and a rank_pattern on a few; ``a``: plain LoRA."""
    root = tmp_path_factory.mktemp("dora")
    specs = {
        "d": dict(r=4, lora_alpha=8, use_dora=True, target_modules=PROJECTIONS),
        "e": dict(r=4, lora_alpha=4, use_dora=True, use_rslora=True, target_modules=["v_proj", "o_proj", "up_proj"],
                  rank_pattern={"o_proj": 2}),
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    }
    for seed, (name, spec) in enumerate(specs.items()):
        peft_model = _peft_model(model_dir, seed, **spec)
        if spec.get("use_dora"):
            _perturb_magnitudes(peft_model, seed)
        peft_model.save_pretrained(root / name)
        merged[name] = peft_model.merge_and_unload().eval()
    return {name: root / name for name in specs}


merged: dict[str, nn.Module] = {}  # peft's merge_and_unload() of each adapter, by name (set by ``adapters``)


@pytest.fixture(scope="module")
async def want(model_dir, adapters) -> dict[tuple[str, str], dict]:
    """Each merged model (and the base) served alone: the answers every adapter must give."""
    out = {}
    for name in ("micro", *adapters):
        async with serve_app(model_dir, model=merged.get(name), prefix_cache_entries=0) as client:
            for prompt in PROMPTS:
                out[name, prompt] = await complete(client, None, prompt)
    texts = {name: out[name, PROMPTS[0]]["choices"][0]["text"] for name in ("micro", *adapters)}
    assert len(set(texts.values())) == len(texts), texts  # each adapter changes the answer
    return out


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


def dora_scales(engine, name: str) -> list[torch.Tensor]:
    slot = engine.adapters[name].slot
    return [m.adapters[slot][2] for m in engine.model.modules() if isinstance(m, LoraLinear) and slot in m.adapters]


async def test_dora_in_mixed_batches_gives_the_merged_models_answer(model_dir, adapters, want, monkeypatch):
    batched = []
    tokens = LoraSlots.tokens

    def recording(self, slots, counts=None):
        batched.append(set(slots))
        return tokens(self, slots, counts)

    monkeypatch.setattr(LoraSlots, "tokens", recording)
    # The scheduler starts only once the whole burst is queued: on a loaded machine the requests would otherwise
    # reach it over several iterations, and no forward need hold the base and the three adapters together.
    gate = threading.Event()
    iteration = Engine._iteration
    monkeypatch.setattr(Engine, "_iteration", lambda engine: gate.wait(120) and iteration(engine))
    flags = [f"{name}={path}" for name, path in adapters.items()]
    async with serve_app(model_dir, lora_modules=flags) as client:
        engine = client.app.state.engine
        scales = dora_scales(engine, "d")
        assert len(scales) == 2 * len(PROJECTIONS) and max((s - 1).abs().max().item() for s in scales) > 0.3
        assert all(scale is None for scale in dora_scales(engine, "a"))  # plain LoRA: unchanged path
        # Every prompt under the base and each adapter at once: packed prefills and decode steps that mix them.
        jobs = [(model, prompt) for prompt in PROMPTS for model in ("micro", *adapters)]
        try:
            burst = [asyncio.create_task(complete(client, model, prompt)) for model, prompt in jobs]
            await wait_until_submitted(engine, len(jobs))
        finally:
            gate.set()
        got = await asyncio.gather(*burst)
        for (model, prompt), response in zip(jobs, got, strict=True):
            assert_same_answer(response, want[model, prompt], f"{model}: {prompt!r}")
        assert any(len(slots) == 4 for slots in batched), batched
        # Alone in its forwards: every token is d's (no gather, no scatter).
        assert_same_answer(await complete(client, "d", PROMPTS[1]), want["d", PROMPTS[1]], "d alone")


async def test_dora_loaded_at_runtime_gives_the_merged_models_answer(model_dir, adapters, want):
    from .test_lora_runtime import eventually, installed_slots, load, unload

    async with serve_app(model_dir, lora_modules=[f"a={adapters['a']}"], allow_runtime_lora_updating=True) as client:
        for name in ("d", "e"):
            r = await load(client, name, adapters[name])
            assert r.status_code == 200, r.text
        jobs = [(model, prompt) for prompt in PROMPTS[:2] for model in ("micro", "a", "d", "e")]
        got = await asyncio.gather(*(complete(client, model, prompt) for model, prompt in jobs))
        for (model, prompt), response in zip(jobs, got, strict=True):
            assert_same_answer(response, want[model, prompt], f"{model} (runtime): {prompt!r}")
        # Unloaded, its matrices and per-row scales leave every Linear with its slot; the others still serve.
        engine = client.app.state.engine
        slot = engine.adapters["d"].slot
        assert (await unload(client, "d")).status_code == 200
        await eventually(lambda: slot not in installed_slots(engine))
        assert_same_answer(await complete(client, "e", PROMPTS[0]), want["e", PROMPTS[0]], "e after d's unload")


class _Biased(nn.Module):
    """One Linear with a bias (as RetNet's FFN with ffn_bias), DoRA's other case."""

    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(12, 10, bias=True)

    def forward(self, x):
        return self.up_proj(x)


def test_dora_on_a_linear_with_a_bias_is_peft_layer(tmp_path):
    """The bias is added after DoRA's rescaling (peft's forward): per token (gathered) and whole (no gather)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(_Biased(), LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["up_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    _perturb_magnitudes(peft_model, 0)
    peft_model.save_pretrained(tmp_path / "d")
    base = _Biased()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in peft_model.base_model.model.state_dict().items()
                          if "lora_" not in k})
    adapter = load_adapter(LoraModule("d", str(tmp_path / "d")), linear_modules(base), max_rank=8)
    adapter.slot = 1
    slots = install(base, [adapter], torch.device("cpu"), torch.float32)
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = peft_model.eval()(x)
        plain = base.up_proj.base(x)
        assert not torch.allclose(expected, plain, atol=1e-2)
        with slots.tokens([1] * 5):
            torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-5)
        with slots.tokens([1, 0, 1, 0, 1]):
            got = base(x)
        torch.testing.assert_close(got[::2], expected[::2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1::2], plain[1::2], rtol=0, atol=0)


class _Two(nn.Module):
    """A Linear with a bias and one without, in a row: two DoRA adapters and a LoRA adapter over them."""

    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(12, 10, bias=True)
        self.down_proj = nn.Linear(10, 12, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


def test_two_dora_adapters_and_a_lora_adapter_in_one_packed_forward_are_each_peft(tmp_path):
    """Per packed sequence, each under its own adapter (DoRA with rsLoRA, a rank_pattern and an alpha_pattern;
    plain LoRA; DoRA on the unbiased Linear only) or the base: each token's output is its peft model's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _Two()
    specs = [dict(r=4, lora_alpha=6, use_dora=True, use_rslora=True, target_modules=["up_proj", "down_proj"],
                  rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3}),
             dict(r=3, lora_alpha=5, target_modules=["up_proj"]),
             dict(r=2, lora_alpha=2, use_dora=True, target_modules=["down_proj"])]
    references, adapters = [base], []
    for slot, spec in enumerate(specs, start=1):
        model = _Two()
        model.load_state_dict(base.state_dict())
        peft_model = get_peft_model(model, LoraConfig(**spec))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.3)
        _perturb_magnitudes(peft_model, slot)
        peft_model.save_pretrained(tmp_path / str(slot))
        references.append(peft_model.eval())
        adapter = load_adapter(LoraModule(str(slot), str(tmp_path / str(slot))), linear_modules(base), max_rank=8)
        adapter.slot = slot
        adapters.append(adapter)
    slots = install(base, adapters, torch.device("cpu"), torch.float32)
    x = torch.randn(13, 12)
    sequences, counts = [1, 0, 3, 2, 1, 3, 2], [2, 1, 2, 3, 1, 2, 2]
    per_token = torch.repeat_interleave(torch.tensor(sequences), torch.tensor(counts)).tolist()
    with torch.no_grad():
        with slots.tokens(sequences, counts):
            got = base(x)
        expected = torch.cat([references[slot](x[i:i + 1]) for i, slot in enumerate(per_token)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dora_weights_must_match_use_dora(adapters, model_dir, tmp_path):
    """use_dora without magnitudes, or magnitudes without it, is refused naming use_dora."""
    from retnet.model import RetNetForCausalLM

    from .test_lora import _edited

    linears = linear_modules(RetNetForCausalLM.from_pretrained(model_dir))
    missing = _edited(adapters["a"], tmp_path / "missing", config={"use_dora": True})
    unset = _edited(adapters["d"], tmp_path / "unset", config={"use_dora": False})
    for path, message in ((missing, "use_dora = True but .* has no lora_magnitude_vector"),
                          (unset, "use_dora = False but .* has a lora_magnitude_vector")):
        with pytest.raises(ValueError, match=message):
            load_adapter(LoraModule("bad", str(path)), linears, max_rank=16)
