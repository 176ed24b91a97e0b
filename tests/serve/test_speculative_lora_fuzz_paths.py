"""Randomised differential checks of speculative decoding and LoRA serving: prompt lookup against a scan of the
context; a burst of random requests on a busy speculating server (prompt lookup, a draft that is the target itself
and so always agrees, a random draft that almost never does) answering each as a plain idle server does; seeded
speculative sampling drawing the target's exact token and pair frequencies (chi-square); random LoRA and DoRA
adapters loaded at runtime, batched with each other and the base (sharing prompts, so that the prefix cache holds
each one's states), answering as peft's merged models served alone."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch

from retnet.model import RetNetForCausalLM
from retnet.serve.speculative import NgramIndex

from .conftest import serve_app
from .test_engine_fuzz_paths import answer, assert_close
from .test_lora import _peft_model
from .test_speculative_draft import save_draft

pytestmark = pytest.mark.anyio

WORDS = ("def", "add", "return", "class", "Stack", "self", "items", "for", "range", "print", "hello", "world", "the",
         "retention", "state", "token", "an", "he")
VOCAB = 384  # the micro model's


def scanned_drafts(tokens: list[int], sizes: range, count: int) -> list[int]:
    """Prompt lookup's documented rule by a scan of the whole context: the longest n in ``sizes`` whose last n
    tokens occurred earlier; what followed the latest such occurrence, a match running into the end repeating
    itself."""
    last = len(tokens) - 1
    for n in sorted(sizes, reverse=True):
        if n > len(tokens):
            continue
        for end in range(last - 1, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == tokens[len(tokens) - n :]:
                draft = tokens[end + 1 : end + 1 + count]
                while len(draft) < count:
                    draft.append(draft[len(draft) - (last - end)])
                return draft
    return []


def test_prompt_lookup_proposes_what_a_scan_of_the_context_finds():
    rng = random.Random(0)
    for _ in range(3000):
        vocab = rng.randint(1, 5)  # a small alphabet: matches, loops and overlaps everywhere
        low = rng.randint(1, 4)
        sizes = range(low, rng.randint(low, 5) + 1)
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
        index = NgramIndex(tokens, sizes)
        for _ in range(rng.randint(1, 6)):
            new = [rng.randrange(vocab) for _ in range(rng.randint(0, 4))]
            tokens = tokens + new
            count = rng.randint(1, 6)
            assert index.propose(new, count) == scanned_drafts(tokens, sizes, count), (tokens, sizes, count)


def random_request(rng: random.Random, models: tuple[str, ...] = ("micro",)) -> dict:
    """A completion or chat request mixing the features a speculative step must sample, stop and report as a
    plain decode step does."""
    unit = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.2:
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]
    else:  # repeats give prompt lookup matches
        prompt = unit * rng.randint(1, 5)
    body = {"model": rng.choice(models), "prompt": prompt, "max_tokens": rng.randint(1, 20),
            "ignore_eos": rng.random() < 0.7, "temperature": 0.0, "logprobs": rng.randint(0, 2)}
    if rng.random() < 0.4:
        body.update(temperature=rng.choice([0.7, 1.0, 1.5]), seed=rng.randrange(1000))
        if rng.random() < 0.3:
            body["top_k"] = rng.choice([2, 20])
    if rng.random() < 0.3:
        body["n"] = 2
    if rng.random() < 0.3:
        body["stop"] = [rng.choice(["an", "e", "he", " ", "re"])]
        body["include_stop_str_in_output"] = rng.random() < 0.5
    if rng.random() < 0.2:
        body["min_tokens"] = rng.randint(0, body["max_tokens"])
    if rng.random() < 0.2:
        body[rng.choice(["frequency_penalty", "presence_penalty", "repetition_penalty"])] = 1.2
    if rng.random() < 0.15:
        body["guided_regex"] = rng.choice(["(an|he|ab)+", "[a-z ]{1,12}"])
    if rng.random() < 0.2:
        body["stream"] = True
    elif rng.random() < 0.2:
        body["echo"] = True
    if rng.random() < 0.2 and isinstance(prompt, str):
        del body["prompt"], body["logprobs"]
        body.pop("echo", None)
        body.update(messages=[{"role": "user", "content": prompt}], logprobs=True, top_logprobs=1)
    return body


@pytest.fixture(scope="module")
def random_draft(model_dir, tmp_path_factory):
    return save_draft(tmp_path_factory.mktemp("fuzz-draft") / "draft", model_dir)


@pytest.mark.parametrize("proposer", ["ngram", "target_as_draft", "random_draft"])
async def test_a_random_burst_on_a_speculating_server_answers_as_plain_decoding(model_dir, random_draft, proposer):
    rng = random.Random(f"burst-{proposer}")
    requests = [random_request(rng) for _ in range(10)]
    speculative = {
        "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
        "target_as_draft": {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 4},
        "random_draft": {"method": "draft_model", "model": str(random_draft), "num_speculative_tokens": 2},
    }[proposer]
    async with serve_app(model_dir, prefix_cache_entries=0) as client:
        alone = [await answer(client, body) for body in requests]
    # Fewer rows than requests and prompts prefilled in small pieces: requests join and leave between steps,
    # some drafting and some not, and a draft state catches up over several steps.
    async with serve_app(model_dir, speculative_config=json.dumps(speculative), max_running=3,
                         prefill_chunk_tokens=4) as client:
        together = await asyncio.gather(*(answer(client, body) for body in requests))
        again = [await answer(client, body) for body in requests]  # the prefix cache warm with their answers
        drafted = client.app.state.engine.metrics.registry.get_sample_value(
            "retnet_spec_decode_num_draft_tokens_total")
    assert drafted > 0
    for index, body in enumerate(requests):
        assert_close(together[index], alone[index], f"request {index} in the burst: {body}")
        assert_close(again[index], alone[index], f"request {index} after the burst: {body}")


def chi_square_p(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probabilities`` (same shape), the outcomes expected fewer than 5
    times pooled into one bin."""
    from scipy.stats import chisquare

    expected = probabilities.double() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    return float(chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item()).pvalue)


async def test_seeded_speculative_sampling_draws_the_targets_distribution(model_dir):
    # The target as its own draft proposes its greedy token, accepted only where the sample is that token: the
    # second token's frequencies are those of the target's own two-token distribution only if a refused draft's
    # position is sampled from the target's distribution there, not the draft's.
    temperature, draws_per_request, requests = 0.7, 64, 24
    speculative = {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 2}
    async with serve_app(model_dir, speculative_config=json.dumps(speculative), max_n=draws_per_request) as client:
        prompt = (await client.post("/tokenize", json={"prompt": "the retention state token an he the"})).json()
        prompt = prompt["tokens"]
        responses = []
        for first_seed in range(0, requests * draws_per_request, draws_per_request):  # choice i: seed + i
            # The second token is the one drafted (a choice drafts no further than max_tokens allows).
            body = {"prompt": prompt, "max_tokens": 3, "n": draws_per_request, "temperature": temperature,
                    "seed": first_seed, "ignore_eos": True, "return_token_ids": True}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            responses.append(r.json())
        accepted = client.app.state.engine.metrics.registry.get_sample_value(
            "retnet_spec_decode_num_accepted_tokens_total")
    pairs = torch.tensor([choice["token_ids"][:2] for r in responses for choice in r["choices"]])
    model = RetNetForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        vocab = first.shape[0]
        contexts = torch.tensor([[*prompt, token] for token in range(vocab)])
        second = torch.softmax(model(contexts).logits[:, -1].double() / temperature, -1)
    joint = first[:, None] * second
    # Drafts were both taken and refused (a draft always taken or never proposed would test nothing).
    assert 0 < accepted < len(pairs)
    assert chi_square_p(torch.bincount(pairs[:, 0], minlength=vocab), first) > 1e-3
    assert chi_square_p(torch.bincount(pairs[:, 1], minlength=vocab), joint.sum(0)) > 1e-3
    assert chi_square_p(torch.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab),
                        joint.flatten()) > 1e-3


def random_adapter(model_dir, rng: random.Random, path):
    """A random peft LoRA or DoRA adapter on random targets, saved in ``path``; returns peft's merged model."""
    targets = rng.sample(["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "up_proj", "down_proj"], rng.randint(1, 4))
    spec = dict(r=rng.choice([1, 2, 4, 8]), lora_alpha=rng.choice([1, 4, 16]), target_modules=targets,
                use_rslora=rng.random() < 0.5, use_dora=rng.random() < 0.5,
                alpha_pattern={targets[-1]: rng.choice([2, 7])})
    if len(targets) > 1:
        spec["rank_pattern"] = {targets[0]: 3}
    if rng.random() < 0.5:
        spec["layers_to_transform"] = [rng.randint(0, 1)]
    peft_model = _peft_model(model_dir, rng.randrange(1000), **spec)
    with torch.no_grad():  # a trained DoRA's magnitudes are not the norms it started from
        for name, param in peft_model.named_parameters():
            if "lora_magnitude" in name:
                param.mul_(1 + 0.3 * torch.randn_like(param))
    peft_model.save_pretrained(path)
    return peft_model.merge_and_unload().eval()


async def test_random_adapters_batched_with_the_base_answer_as_their_merged_models(model_dir, tmp_path):
    rng = random.Random("adapters")
    merged = {name: random_adapter(model_dir, rng, tmp_path / name) for name in ("a", "b")}
    models = ("micro", "a", "b")
    shared = [random_request(rng) for _ in range(6)]
    # The same prompts under two models each: a cached state (a prompt's, an answer's) must serve only its own.
    requests = [{**body, "model": model} for body in shared for model in rng.sample(models, 2)]
    requests += [random_request(rng, models) for _ in range(4)]
    want: list[dict | None] = [None] * len(requests)
    for model in models:
        async with serve_app(model_dir, model=merged.get(model), prefix_cache_entries=0) as client:
            for index, body in enumerate(requests):
                if body["model"] == model:
                    want[index] = await answer(client, {**body, "model": "micro"})
    speculative = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    async with serve_app(model_dir, allow_runtime_lora_updating=True, max_running=4, prefill_chunk_tokens=5,
                         speculative_config=json.dumps(speculative)) as client:
        # Another adapter loaded first, used (its states cached) and unloaded: slots and cache entries move on.
        for body in ({"lora_name": "old", "lora_path": str(tmp_path / "b")},
                     {"lora_name": "a", "lora_path": str(tmp_path / "a")}):
            r = await client.post("/v1/load_lora_adapter", json=body)
            assert r.status_code == 200, r.text
        await asyncio.gather(*(answer(client, {**body, "model": "old"}) for body in shared))
        r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "old"})
        assert r.status_code == 200, r.text
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(tmp_path / "b")})
        assert r.status_code == 200, r.text
        together = await asyncio.gather(*(answer(client, body) for body in requests))
        again = [await answer(client, body) for body in requests]
    for index, body in enumerate(requests):
        for got, when in ((together[index], "in the burst"), (again[index], "after the burst")):
            if "model" in got:  # the reference is the merged model, served under the base model's name
                got = {**got, "model": "micro"}
            assert_close(got, want[index], f"request {index} {when}: {body}")


async def test_sessions_under_adapters_continue_on_a_busy_speculating_server_as_alone(model_dir, tmp_path):
    rng = random.Random("sessions")
    random_adapter(model_dir, rng, tmp_path / "a")
    lora = [f"a={tmp_path / 'a'}"]
    plans = {}
    for index in range(4):
        turns = []
        for _ in range(rng.randint(2, 3)):
            unit = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
            turns.append({"prompt": unit * rng.randint(1, 3), "max_tokens": rng.randint(1, 12), "temperature": 0.0,
                          "ignore_eos": True, "logprobs": 1, "return_token_ids": True,
                          "stop": [rng.choice(["an", "e", " "])] if rng.random() < 0.3 else None})
        plans[f"fuzz-{index}"] = (rng.choice(["micro", "a"]), turns)

    async def converse(client, session_id):
        model, turns = plans[session_id]
        return [await answer(client, {**turn, "model": model, "session_id": session_id}) for turn in turns]

    async with serve_app(model_dir, lora_modules=lora, prefix_cache_entries=0) as client:
        alone = [await converse(client, session_id) for session_id in plans]
    speculative = {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3}
    async with serve_app(model_dir, lora_modules=lora, max_running=2, prefill_chunk_tokens=3,
                         speculative_config=json.dumps(speculative)) as client:
        together = await asyncio.gather(*(converse(client, session_id) for session_id in plans))
    for (session_id, plan), got, want in zip(plans.items(), together, alone, strict=True):
        assert_close(got, want, f"session {session_id}: {plan}")
