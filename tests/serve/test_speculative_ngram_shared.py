"""Prompt lookup's index of a request's prompt is built once for its ``n`` choices, and each choice still proposes
from its own tokens alone: the same drafts, choice by choice, as ``n`` requests of one choice each."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch

import retnet.serve.speculative as speculative
from retnet.serve.sampling import SamplingParams
from retnet.serve.sequence import Group, RequestHandle, Sequence
from retnet.serve.settings import ServeSettings, SpeculativeConfig

from .test_speculative import REPEATS, SPEC
from .test_speculative_lora_fuzz_paths import scanned_drafts

pytestmark = pytest.mark.anyio


@pytest.fixture
def built(monkeypatch) -> list[list[int]]:
    """The prompts whose n-grams were indexed, one entry a build."""
    builds = []
    # Before PromptNgrams, each choice's NgramIndex indexed the prompt itself: counted so, the test shows the bug.
    name = "PromptNgrams" if hasattr(speculative, "PromptNgrams") else "NgramIndex"

    class Counted(getattr(speculative, name)):
        __slots__ = ()

        def __init__(self, tokens, sizes, *args):
            builds.append(list(tokens))
            super().__init__(tokens, sizes, *args)

    monkeypatch.setattr(speculative, name, Counted)
    return builds


def choices(prompt: list[int], n: int, max_tokens: int) -> list[Sequence]:
    group = Group(RequestHandle(None, n), prompt, SamplingParams(max_tokens=max_tokens), n, 0, inputs=prompt)
    # The proposer reads a choice's group and tokens alone: no sampler, detokenizer or stop strings needed.
    return [Sequence(group, j, None, None, None) for j in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_a_requests_choices_share_the_prompts_index_and_propose_from_their_own_tokens(built, seed):
    rng = random.Random(seed)
    config = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=4, prompt_lookup_min=1)
    sizes = range(1, 5)
    prompt = [rng.randrange(4) for _ in range(rng.randint(0, 40))]
    shared = choices(prompt, 3, max_tokens=60)
    alone = [choices(prompt, 1, max_tokens=60)[0] for _ in range(3)]
    assert not built
    drafted = 0
    for _ in range(12):
        # Each choice's own tokens this step (a speculative step samples 1 to k + 1), different per choice: one
        # choice's tokens in another's table would change its drafts.
        for j in range(3):
            new = [rng.randrange(4) + 10 * j for _ in range(rng.randint(1, 5))]
            shared[j].tokens.extend(new)
            alone[j].tokens.extend(new)
        together = speculative.propose_drafts(shared, config)
        separately = [speculative.propose_drafts([seq], config)[0] for seq in alone]
        assert together == separately
        for j, seq in enumerate(shared):
            room = min(4, 60 - len(seq.tokens) - 1)
            expected = scanned_drafts(prompt + seq.tokens, sizes, room) if room > 0 else []
            assert together[j] == expected, (j, prompt, seq.tokens)
            drafted += bool(expected)
    assert drafted
    # Once for the three choices together, once for each request of one choice.
    assert built == [prompt] * 4
    assert all(seq.ngrams.prompt is shared[0].group.ngrams for seq in shared)


async def test_n_choices_on_a_server_draft_as_n_requests_of_one_and_index_their_prompt_once(model_dir, built,
                                                                                           monkeypatch):
    from transformers import AutoTokenizer

    import retnet.serve.engine as engine_module
    from retnet.model import RetNetForCausalLM
    from retnet.serve.metrics import ServeMetrics

    from .test_engine_state import drain

    settings = ServeSettings(model=str(model_dir), speculative_config=json.dumps(SPEC), prefix_cache_entries=0)
    engine = engine_module.Engine(settings, AutoTokenizer.from_pretrained(model_dir), ServeMetrics(),
                                  model=RetNetForCausalLM.from_pretrained(model_dir))
    engine._load()
    engine.ready = True
    proposals: dict[tuple[RequestHandle, int], list[list[int]]] = {}  # (request, choice) -> its drafts, step by step
    propose = engine_module.propose_drafts

    def recording(running, config):
        drafts = propose(running, config)
        for seq, draft in zip(running, drafts):
            proposals.setdefault((seq.group.handle, seq.index), []).append(draft)
        return drafts

    monkeypatch.setattr(engine_module, "propose_drafts", recording)
    prompt = engine.tokenizer.encode(REPEATS)
    an, he = engine.tokenizer.encode("anhe")[:2]
    # Biased towards two tokens, seeded samples loop for a while and break off, each choice its own way.
    options = {"max_tokens": 24, "temperature": 0.8, "ignore_eos": True, "logit_bias": {an: 3.0, he: 2.0}}

    async def run(n: int, seed: int) -> tuple[dict[int, list[int]], list[list[list[int]]]]:
        handle = engine.submit([prompt], SamplingParams(seed=seed, **options), n=n)
        with torch.inference_mode():
            while engine.waiting or engine.prefilling or engine.joining or engine.running:
                engine._iteration()
        await asyncio.sleep(0)
        return drain(handle), [proposals[handle, j] for j in range(n)]

    together, drafts = await run(3, 7)
    assert len(built) == 1
    for j in range(3):
        # Choice j of a request samples with seed + j: alone with that seed, it samples (and drafts) the same.
        tokens, [alone] = await run(1, 7 + j)
        assert tokens[0] == together[j]
        assert alone == drafts[j]
    assert len(built) == 4
    assert len({tuple(tokens) for tokens in together.values()}) == 3
    assert len({json.dumps(choice) for choice in drafts}) == 3 and all(any(choice) for choice in drafts)
