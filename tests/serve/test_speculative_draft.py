"""Draft-model speculative decoding (``--speculative-config`` method ``draft_model``): the same answers as plain
decoding whatever the draft (greedy tokens, text and logprobs; seeded sampling's tokens); a draft that is the
target itself has every draft accepted, which only a draft state that follows each sequence's tokens exactly
gives; the startup checks."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.serve.sampling import SamplingParams
from retnet.serve.settings import ServeSettings, StartupError, resolve_draft_model

from .conftest import running_servers, serve_app
from .test_lora import _peft_model
from .test_priority import HIGH_PROMPT, Outputs, alone, engine_with, preemptions, run_out, step
from .test_speculative import GREEDY, OTHERS, REPEATS, counted_model, metric, post

pytestmark = pytest.mark.anyio

K = 4
# Joins and leaves between steps; prompts prefilled in pieces, so that a draft state catches up over several steps.
LIMITS = {"max_running": 3, "prefill_chunk_tokens": 16}
_PLAIN: dict[str, dict] = {}  # the plain server's answers, computed once for the tests that compare with them


def draft_config(model: Path) -> str:
    return json.dumps({"method": "draft_model", "model": str(model), "num_speculative_tokens": K})


def save_draft(path: Path, model_dir: Path, vocab_extra: int = 0, seed: int = 1) -> Path:
    """A random RetNet smaller than the micro model, with its tokenizer (``vocab_extra`` more ids: another
    vocabulary)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = RetNetConfig(vocab_size=len(tokenizer) + vocab_extra, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, chunk_size=16, tie_word_embeddings=True,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          initializer_range=0.2)
    torch.manual_seed(seed)
    RetNetForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def drafts(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec-draft")
    return {"other": save_draft(root / "other", model_dir), "vocab": save_draft(root / "vocab", model_dir, 8)}


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec-draft-lora") / "a"
    _peft_model(model_dir, 0, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]).save_pretrained(path)
    return path


async def greedy_answers(client) -> dict:
    """Greedy requests whose every token a draft equal to the target predicts: several lengths at once (more than
    --max-running), n = 2, then a prompt again (its state from the prefix cache)."""
    bodies = {
        "repeats": {"prompt": REPEATS, "max_tokens": 24, "logprobs": 2},
        "short": {"prompt": REPEATS[:20], "max_tokens": 5, "logprobs": 1},
        "cut": {"prompt": REPEATS, "max_tokens": 13},
        "n2": {"prompt": OTHERS[0], "max_tokens": 12, "n": 2},
        **{f"other{i}": {"prompt": p * (i + 1), "max_tokens": 9 + 5 * i, "logprobs": 1} for i, p in enumerate(OTHERS)},
    }
    results = await asyncio.gather(*(post(client, {**body, **GREEDY}) for body in bodies.values()))
    out = dict(zip(bodies, results))
    out["cached"] = await post(client, {"prompt": REPEATS, "max_tokens": 12, **GREEDY})
    return out


async def other_answers(client) -> dict:
    """What a draft cannot predict however good, still unchanged: seeded sampling (n = 2, drafts taken and
    refused), penalties, a LoRA adapter (the draft runs without it), a session's next turn (the draft knows only
    the turn's tokens); a stop string met inside the drafts (those after it are not taken)."""
    bodies = {
        "seeded": {"prompt": REPEATS, "max_tokens": 14, "n": 2, "temperature": 0.8, "seed": 7, "ignore_eos": True,
                   "return_token_ids": True, "logprobs": 1},
        "seeded_top": {"prompt": OTHERS[0], "max_tokens": 10, "temperature": 1.0, "top_k": 5, "seed": 3,
                       "ignore_eos": True, "return_token_ids": True},
        "penalised": {"prompt": REPEATS, "max_tokens": 10, "frequency_penalty": 0.3, **GREEDY},
        "lora": {"model": "a", "prompt": REPEATS, "max_tokens": 12, "logprobs": 1, **GREEDY},
        "stop": {"prompt": OTHERS[1], "max_tokens": 20, "stop": ["an"], **GREEDY},
    }
    results = await asyncio.gather(*(post(client, body) for body in bodies.values()))
    out = dict(zip(bodies, results))
    session = {"max_tokens": 8, "session_id": "s-draft", "return_token_ids": True, **GREEDY}
    out["turn1"] = await post(client, {**session, "prompt": REPEATS})
    out["turn2"] = await post(client, {**session, "prompt": " The retention mechanism"})
    return out


async def plain_answers(model_dir, adapter_dir) -> dict:
    if "greedy" not in _PLAIN:
        async with serve_app(model_dir, lora_modules=[f"a={adapter_dir}"], **LIMITS) as client:
            _PLAIN["greedy"] = await greedy_answers(client)
            _PLAIN["other"] = await other_answers(client)
    return _PLAIN


def spec_counts(client_metrics: str) -> tuple[float, float, float]:
    return tuple(metric(client_metrics, f"retnet_spec_decode_num_{name}_total")
                 for name in ("drafts", "draft_tokens", "accepted_tokens"))


def assert_same(plain: dict, fast: dict) -> None:
    for case in plain:
        for a, b in zip(plain[case]["choices"], fast[case]["choices"], strict=True):
            assert (a["text"], a["finish_reason"], a.get("token_ids")) == (b["text"], b["finish_reason"],
                                                                           b.get("token_ids")), case
            if a["logprobs"] is not None:
                assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"], case
                assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-4)


async def test_a_draft_equal_to_the_target_has_every_draft_accepted(model_dir, adapter_dir):
    plain = await plain_answers(model_dir, adapter_dir)
    model, calls = counted_model(model_dir)
    async with serve_app(model_dir, model=model, lora_modules=[f"a={adapter_dir}"],
                         speculative_config=draft_config(model_dir), **LIMITS) as client:
        before = calls[0]
        alone_32 = await post(client, {"prompt": OTHERS[0], "max_tokens": 32, **GREEDY})
        forwards = calls[0] - before
        fast = await greedy_answers(client)
        greedy_counts = spec_counts((await client.get("/metrics")).text)
        others = await other_answers(client)
    assert_same(plain["greedy"], fast)
    assert_same(plain["other"], others)
    assert plain["other"]["stop"]["choices"][0]["finish_reason"] == "stop"
    drafts, proposed, accepted = greedy_counts
    assert drafts > 0 and accepted == proposed, greedy_counts
    # The prefill, then 5 tokens a step (k = 4 drafts and the token after them): 31 tokens in 7 steps.
    assert forwards == 8, forwards
    assert alone_32["usage"]["completion_tokens"] == 32


async def test_another_draft_changes_no_answer(model_dir, adapter_dir, drafts):
    plain = await plain_answers(model_dir, adapter_dir)
    async with serve_app(model_dir, lora_modules=[f"a={adapter_dir}"],
                         speculative_config=draft_config(drafts["other"]), **LIMITS) as client:
        fast = await greedy_answers(client)
        others = await other_answers(client)
        drafted, proposed, accepted = spec_counts((await client.get("/metrics")).text)
    assert_same(plain["greedy"], fast)
    assert_same(plain["other"], others)
    assert drafted > 0 and 0 <= accepted < proposed


async def test_a_preempted_sequence_keeps_its_draft_state(model_dir):
    # Preempted between two steps, its draft state copied out of the last draft step's (not a view that would
    # keep every row's alive); resumed, it goes on proposing what the target samples.
    params = SamplingParams(max_tokens=30, **GREEDY)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    expected = await alone(model_dir, prompt, params)
    engine = engine_with(model_dir, scheduling_policy="priority", max_running=1,
                         speculative_config=draft_config(model_dir))
    outputs = Outputs(low=engine.submit([prompt], params, priority=1))
    await step(engine, outputs, 3)
    low = engine.running[0]
    assert low.draft_state is not None and low.draft_state.fed == len(prompt) + len(low.tokens) - K - 1
    outputs.add("high", engine.submit([HIGH_PROMPT], SamplingParams(max_tokens=6, **GREEDY)))
    await step(engine, outputs)
    assert [seq for seq, _ in engine.preempted] == [low]
    assert all(state._base is None for state in low.draft_state.cache.states)
    await run_out(engine, outputs)
    assert (outputs.tokens["low", 0], outputs.text["low", 0]) == expected[0]
    assert preemptions(engine) == 1
    metrics = engine.metrics
    assert metrics.spec_accepted_tokens._value.get() == metrics.spec_draft_tokens._value.get() > 0


def draft_gaps(engine) -> list[int]:
    """How many tokens each running row's draft state lacks (its whole context without one)."""
    return [len(seq.group.inputs) + len(seq.tokens) - (0 if seq.draft_state is None else seq.draft_state.fed)
            for seq in engine.running]


async def test_every_row_drafts_whatever_the_budget(model_dir):
    # 8 rows of k + 1 = 5 tokens a step exceed a budget of 6: a row's steady feed is not charged to it, so every
    # row keeps up and drafts each step (charged, the rows past the first two never drafted, further behind each
    # step).
    engine = engine_with(model_dir, max_running=8, prefill_chunk_tokens=4, prefill_token_budget=6,
                         speculative_config=draft_config(model_dir))
    params = SamplingParams(max_tokens=40, **GREEDY)
    outputs = Outputs()
    for i in range(8):
        outputs.add(f"r{i}", engine.submit([[10 + i, 11, 12, 13]], params))
    await step(engine, outputs, 6)  # the 32 prompt tokens, 6 a step
    assert len(engine.running) == 8
    for _ in range(4):
        await step(engine, outputs)
        assert all(seq.draft_state is not None for seq in engine.running)
        assert max(draft_gaps(engine)) <= K + 1, draft_gaps(engine)
    await run_out(engine, outputs)
    metrics = engine.metrics
    assert metrics.spec_accepted_tokens._value.get() == metrics.spec_draft_tokens._value.get()
    # Each row's 39 tokens after its first: 7 steps of k + 1, then 4, every step of every row with drafts.
    assert metrics.spec_drafts._value.get() == 8 * 8


async def test_the_choices_of_a_short_prompt_draft_among_rows_behind(model_dir):
    # A prompt at most k + 1 tokens ahead of the draft is fed whatever the budget, as any row's steady feed: its n
    # choices sharing it were queued as a group behind rows far behind, charged to the budget, and with a budget of
    # one piece a step never drafted.
    engine = engine_with(model_dir, max_running=10, prefill_chunk_tokens=16, prefill_token_budget=256,
                         speculative_config=draft_config(model_dir))
    engine.drafter.chunk_tokens = engine.drafter.budget_tokens = K + 2
    params = SamplingParams(max_tokens=30, **GREEDY)
    outputs = Outputs()
    for i in range(6):
        outputs.add(f"long{i}", engine.submit([list(range(20 + i, 80 + i))], params))
    await step(engine, outputs, 8)
    short = []
    propose = engine.drafter.propose

    def logged(running):
        drafts = propose(running)
        short.append([len(d) for seq, d in zip(running, drafts) if seq.group.inputs == [7, 8]])
        return drafts

    engine.drafter.propose = logged
    outputs.add("short", engine.submit([[7, 8]], params, n=2))
    await run_out(engine, outputs)
    assert [K, K] in short, short


async def test_rows_catch_up_in_turn(model_dir):
    # A budget of one piece a step: the rows far behind are served round robin, none waiting for the others to
    # be caught up.
    engine = engine_with(model_dir, max_running=3, prefill_token_budget=256,
                         speculative_config=draft_config(model_dir))
    chunk = engine.drafter.chunk_tokens = engine.drafter.budget_tokens = K + 2
    outputs = Outputs()
    for i in range(3):
        outputs.add(f"r{i}", engine.submit([list(range(20 + i, 50 + i))], SamplingParams(max_tokens=20, **GREEDY)))
    await step(engine, outputs)
    assert len(engine.running) == 3
    fed = []
    for _ in range(6):
        await step(engine, outputs)
        fed.append([0 if seq.draft_state is None else seq.draft_state.fed for seq in engine.running])
    # One piece a step, to each row in turn (served from the first row on, the first would take them all).
    assert all(max(row) - min(row) <= chunk for row in fed), fed
    assert fed[1] == [chunk] * 3 and fed[4] == [2 * chunk] * 3, fed


async def test_a_one_token_prefill_chunk_still_drafts(model_dir):
    # Caught up a token a step, a draft state would never gain on its row, which grows a token a step (k + 1
    # with drafts): no drafts, ever. Its pieces are k + 2 tokens at least, within a budget of one piece at least.
    prompt = list(range(30, 60))
    params = SamplingParams(max_tokens=30, **GREEDY)
    expected = await alone(model_dir, prompt, params)
    engine = engine_with(model_dir, prefill_chunk_tokens=1, prefill_token_budget=1,
                         speculative_config=draft_config(model_dir))
    outputs = Outputs(only=engine.submit([prompt], params))
    await run_out(engine, outputs)
    assert (outputs.tokens["only", 0], outputs.text["only", 0]) == expected[0]
    metrics = engine.metrics
    assert metrics.spec_accepted_tokens._value.get() == metrics.spec_draft_tokens._value.get() > 0


def count_draft_tokens(engine) -> list[int]:
    """How many tokens the engine's draft model is fed, counted as it runs."""
    fed = [0]
    engine.drafter.model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.__setitem__(0, fed[0] + kwargs["input_ids"].numel()), with_kwargs=True)
    return fed


async def test_the_choices_of_a_prompt_share_its_draft_prefill(model_dir):
    # n = 4 choices catch up on their prompt as one (in pieces, over several steps), then each on its own tokens:
    # the draft is fed the prompt once, and each choice's tokens as a request of n = 1 has them fed (greedy: the
    # four are that request's tokens). Before, each choice fed the whole prompt again. A draft equal to the target
    # still has every draft accepted: a shared state is each choice's own.
    prompt = list(range(20, 120))
    params = SamplingParams(max_tokens=12, **GREEDY)
    fed, tokens, drafted = {}, {}, {}
    for n in (1, 4):
        engine = engine_with(model_dir, prefill_chunk_tokens=32, speculative_config=draft_config(model_dir))
        counted = count_draft_tokens(engine)
        outputs = Outputs(only=engine.submit([prompt], params, n=n))
        await run_out(engine, outputs)
        fed[n], tokens[n] = counted[0], [outputs.tokens["only", i] for i in range(n)]
        metrics = engine.metrics
        assert metrics.spec_accepted_tokens._value.get() == metrics.spec_draft_tokens._value.get() > 0
        drafted[n] = metrics.spec_drafts._value.get()
    assert tokens[4] == tokens[1] * 4 and len(tokens[1][0]) == 12
    assert drafted[4] == 4 * drafted[1] > 0  # drafting as soon as alone
    assert fed[4] - len(prompt) == 4 * (fed[1] - len(prompt)), fed


async def test_seeded_choices_sharing_a_draft_prefill_sample_as_without_drafts(model_dir, drafts):
    # Two prompts of n choices each at once, the prompts caught up in pieces under a budget that serves one piece a
    # step: every choice's tokens are plain decoding's.
    prompts = [list(range(20, 90)), list(range(40, 95))]
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=11, ignore_eos=True)
    expected = [await alone(model_dir, prompt, params, n=3) for prompt in prompts]
    engine = engine_with(model_dir, prefill_chunk_tokens=16, prefill_token_budget=16,
                         speculative_config=draft_config(drafts["other"]))
    counted = count_draft_tokens(engine)
    outputs = Outputs(only=engine.submit(prompts, params, n=3))
    await run_out(engine, outputs)
    for p, choices in enumerate(expected):
        for i, (ids, text) in choices.items():
            assert (outputs.tokens["only", 3 * p + i], outputs.text["only", 3 * p + i]) == (ids, text), (p, i)
    assert engine.metrics.spec_drafts._value.get() > 0
    # Each prompt fed once, not once a choice (three times: 375 tokens and more), then the choices' few tokens.
    assert counted[0] < 2 * sum(map(len, prompts)), counted[0]


async def test_the_step_time_includes_the_drafts(model_dir):
    # retnet_decode_step_seconds is a step's whole time, the draft model's forwards included, whether the step
    # then verifies drafts or (a row still catching up) decodes one token.
    engine = engine_with(model_dir, prefill_chunk_tokens=16, speculative_config=draft_config(model_dir))
    propose, pause = engine.drafter.propose, 0.2

    def slow_propose(running):
        time.sleep(pause)
        return propose(running)

    engine.drafter.propose = slow_propose
    outputs = Outputs(only=engine.submit([list(range(30, 50))], SamplingParams(max_tokens=12, **GREEDY)))
    await run_out(engine, outputs)
    registry = engine.metrics.registry
    steps = registry.get_sample_value("retnet_decode_step_seconds_count")
    assert steps >= 3 and engine.metrics.spec_drafts._value.get() < steps  # both kinds of step
    assert registry.get_sample_value("retnet_decode_step_seconds_sum") >= pause * steps


def test_settings(model_dir, tmp_path):
    # vLLM infers draft_model from a model given without a method.
    config = ServeSettings(model=str(model_dir), speculative_config=json.dumps(
        {"model": str(tmp_path), "num_speculative_tokens": 3})).speculative
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", str(tmp_path), 3)
    for value, message in [
        ({"method": "draft_model", "num_speculative_tokens": 2}, "method 'draft_model' needs model"),
        ({"method": "draft_model", "model": "", "num_speculative_tokens": 2}, "method 'draft_model' needs model"),
        ({"model": "x"}, "num_speculative_tokens is required"),
        ({"model": "x", "num_speculative_tokens": 0}, "num_speculative_tokens must be a whole number >= 1; got 0"),
        ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "prompt_lookup_max applies only "
         "to method 'ngram'"),
        ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
         "prompt_lookup_max and prompt_lookup_min apply only to method 'ngram'"),
        ({"method": "ngram", "model": "x", "num_speculative_tokens": 2}, "model is only read by method "
         "'draft_model'"),
        ({"method": "eagle", "model": "x", "num_speculative_tokens": 2}, "got 'eagle'"),
        ({"model": "x", "num_speculative_tokens": 2, "revision": 3}, "revision must be a branch, tag or commit"),
        ({"method": "ngram", "num_speculative_tokens": 2, "revision": "v1"}, "revision is only read by method "
         "'draft_model'"),
    ]:
        with pytest.raises(ValueError, match="speculative_config") as info:
            ServeSettings(model=str(model_dir), speculative_config=json.dumps(value))
        assert message in str(info.value), value


@pytest.mark.parametrize("case", ["vocab", "tokenizer", "missing", "no config", "classifier"])
def test_startup_refusals(case, model_dir, drafts, tmp_path):
    from retnet.serve.app import create_app

    from .conftest import make_settings

    vocab = RetNetConfig.from_pretrained(model_dir).vocab_size
    path, message = {
        "vocab": (drafts["vocab"], f"has a vocabulary of {vocab + 8} tokens, the target --model"),
        "tokenizer": (tmp_path / "tok", "is not the target's"),
        "missing": (tmp_path / "nope", "no such directory"),
        "no config": (tmp_path, "has no config.json"),
        "classifier": (tmp_path / "cls", "is a classifier"),
    }[case]
    if case == "classifier":
        path.mkdir()
        config = json.loads((model_dir / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "architectures": ["RetNetForSequenceClassification"]}))
    if case == "tokenizer":
        # Another corpus's tokenizer under a vocabulary of the target's size: the size check alone passed it.
        from retnet.tokenization import train_byte_level_bpe

        save_draft(path, model_dir)
        other = train_byte_level_bpe(["zzzz qqqq wwww xxxx " * 50, "completely different corpus 12345\n" * 30],
                                     vocab_size=384, min_frequency=1)
        other.save_pretrained(path)
        assert RetNetConfig.from_pretrained(path).vocab_size == vocab
    with pytest.raises(StartupError) as info:
        create_app(make_settings(model_dir, speculative_config=draft_config(path)))
    assert message in str(info.value) and "--speculative-config's model" in str(info.value)
    assert str(path) in str(info.value)
    if case == "vocab":
        assert f"one of {vocab}" in str(info.value) and str(model_dir) in str(info.value)
    if case == "tokenizer":
        assert str(path / "tokenizer.json") in str(info.value)
        assert str(model_dir / "tokenizer.json") in str(info.value)


def test_a_draft_tokenizer_differing_in_added_tokens_only_is_warned_about(model_dir, tmp_path, caplog):
    # A fine-tune that renamed a reserved special token keeps every other id's meaning: its base model's draft is
    # still a good one, so it is served, with a warning naming the id.
    from .conftest import make_settings

    path = save_draft(tmp_path / "renamed", model_dir)
    raw = json.loads((path / "tokenizer.json").read_text())
    raw["added_tokens"][1]["content"] = "<|tool|>"
    vocab = raw["model"]["vocab"]
    raw["model"]["vocab"] = {("<|tool|>" if token == "<|pad|>" else token): i for token, i in vocab.items()}
    (path / "tokenizer.json").write_text(json.dumps(raw))
    with caplog.at_level("WARNING", logger="retnet.serve"):
        settings = resolve_draft_model(make_settings(model_dir, speculative_config=draft_config(path)))
    assert settings.speculative.model == str(path)
    assert [r.getMessage() for r in caplog.records if "added tokens" in r.getMessage()] == [
        f"--speculative-config's model {str(path)!r}: its tokenizer ({path / 'tokenizer.json'}) differs from the "
        f"target's ({model_dir / 'tokenizer.json'}) only in added tokens or in ids one of them lacks: id 1: "
        "'<|tool|>' vs '<|pad|>'; drafts near those tokens are unlikely to be accepted"]


def test_a_hub_id_draft_at_a_revision(model_dir, drafts, hub_cache):
    # vLLM's revision key: the draft's hub snapshot at that revision, as --revision is --model's.
    from .conftest import make_settings

    hub_cache("acme/draft", drafts["vocab"])  # main: refused (another vocabulary)
    v1 = hub_cache("acme/draft", drafts["other"], revision="v1")
    spec = {"model": "acme/draft", "num_speculative_tokens": K}
    settings = resolve_draft_model(make_settings(model_dir, speculative_config={**spec, "revision": "v1"}))
    assert (settings.speculative.model, settings.speculative.revision) == (str(v1), "v1")
    with pytest.raises(StartupError, match="has a vocabulary of"):
        resolve_draft_model(make_settings(model_dir, speculative_config=spec))


def test_a_real_server_with_a_draft_model(model_dir, adapter_dir, server_process):
    plain = asyncio.run(plain_answers(model_dir, adapter_dir))["greedy"]["repeats"]["choices"][0]["text"]
    proc = server_process("--speculative-config", draft_config(model_dir))
    with running_servers(proc):
        body = {"model": "micro", "prompt": REPEATS, "max_tokens": 24, "logprobs": 2, **GREEDY}
        answer = httpx.post(proc.url + "/v1/completions", json=body, timeout=60).json()
        metrics = httpx.get(proc.url + "/metrics", timeout=10).text
    assert answer["choices"][0]["text"] == plain
    drafted, proposed, accepted = spec_counts(metrics)
    assert drafted > 0 and accepted == proposed > 0
