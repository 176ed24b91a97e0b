"""The decode step's batched sampling equals the row-by-row rules it replaced, bit for bit: penalties and biases
applied to every row at once, logprobs scored for the rows asking only, each row's draw written in place."""

from __future__ import annotations

import random

import torch

from retnet.serve.sampling import (
    PENALISED_LOGIT_LIMIT,
    RowSampler,
    SamplingParams,
    _add_biases,
    _penalise,
    sample_step,
)

VOCAB = 97


def penalised_row(logits: torch.Tensor, row: RowSampler) -> torch.Tensor:
    """The per-row rule (CTRL's repetition penalty on the seen tokens, then OpenAI's presence and frequency)."""
    p = row.params
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = row.seen
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / p.repetition_penalty,
                                   logits[seen] * p.repetition_penalty).clamp(-PENALISED_LOGIT_LIMIT,
                                                                              PENALISED_LOGIT_LIMIT)
    if p.presence_penalty or p.frequency_penalty:
        logits -= p.frequency_penalty * row.counts + p.presence_penalty * (row.counts > 0).float()
    return logits


def random_params(rng: random.Random, seed: int) -> dict:
    kw = {"seed": seed, "temperature": rng.choice([0.0, 0.0, 0.7, 1.0, 1.3])}
    if rng.random() < 0.4:
        kw["top_p"] = rng.choice([0.5, 0.9])
    if rng.random() < 0.3:
        kw["top_k"] = rng.choice([1, 5, 200])
    if rng.random() < 0.2:
        kw["min_p"] = 0.05
    if rng.random() < 0.5:
        kw["repetition_penalty"] = rng.choice([0.5, 1.3, 2.0, 1e-9])
    if rng.random() < 0.4:
        kw["presence_penalty"] = rng.choice([0.0, 0.5, -1.0])
    if rng.random() < 0.4:
        kw["frequency_penalty"] = rng.choice([0.0, 0.3, 2.0])
    if rng.random() < 0.3:
        kw["logit_bias"] = {rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(rng.randrange(1, 5))}
    if rng.random() < 0.5:
        kw["logprobs"] = rng.choice([0, 1, 5])
    if rng.random() < 0.2:
        kw["bad_words_ids"] = [[3, 4], [5, 6, 7]]
    return kw


def random_logits(generator: torch.Generator, rows: int, rng: random.Random) -> torch.Tensor:
    logits = torch.randn(rows, VOCAB, generator=generator) * rng.choice([1.0, 5.0, 30.0])
    if rng.random() < 0.3:
        logits[:, -5:] = float("-inf")  # a padded vocabulary's rows
    return logits


def test_batched_penalties_and_biases_equal_the_per_row_rules():
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        rows = []
        for i in range(rng.randrange(1, 9)):
            params = SamplingParams(**{**random_params(rng, i), "repetition_penalty": rng.choice([1.0, 0.5, 1.3, 1e-9]),
                                       "presence_penalty": rng.choice([0.0, 0.5]),
                                       "frequency_penalty": rng.choice([0.0, -0.3, 2.0])})
            row = RowSampler(params, [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 12))], VOCAB)
            for _ in range(rng.randrange(0, 6)):
                row.record(rng.randrange(VOCAB))
            rows.append(row)
        logits = random_logits(generator, len(rows), rng)
        expected = logits.clone()
        for i, row in enumerate(rows):
            if row.bias_ids is not None:
                expected[i, row.bias_ids] += row.bias_values
            if row.params.needs_penalties:
                expected[i] = penalised_row(expected[i], row)
        batched = logits.clone()
        biased = [i for i, row in enumerate(rows) if row.bias_ids is not None]
        if biased:
            _add_biases(batched, biased, rows)
        penalised = [i for i, row in enumerate(rows) if row.params.needs_penalties]
        if penalised:
            _penalise(batched, penalised, rows)
        assert torch.equal(batched.view(torch.int32), expected.view(torch.int32))  # bits, -inf and -0.0 included


def test_each_row_samples_the_same_alone_as_in_any_batch():
    """Tokens, logprobs and alternatives of a row, step after step, whatever rows (greedy, sampled, truncating,
    penalised, scored or not) share its step."""
    rng = random.Random(1)
    generator = torch.Generator().manual_seed(1)
    for trial in range(25):
        kws = [random_params(rng, 100 * trial + i) for i in range(rng.randrange(2, 10))]
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 10))]
        together = [RowSampler(SamplingParams(**kw), prompt, VOCAB) for kw in kws]
        alone = [RowSampler(SamplingParams(**kw), prompt, VOCAB) for kw in kws]
        for _ in range(6):
            logits = random_logits(generator, len(kws), rng)
            batch = sample_step(logits, together)
            for i, row in enumerate(alone):
                one = sample_step(logits[i : i + 1], [row])
                assert batch.tokens[i] == one.tokens[0]
                if row.params.logprobs is None:
                    assert batch.logprobs is None or (batch.logprobs[i] is None and batch.top[i] == [])
                else:
                    assert batch.logprobs[i] == one.logprobs[0] and batch.top[i] == one.top[0]


def test_a_draw_written_in_place_is_the_value_rand_gives():
    in_place, fresh = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    draws = torch.empty(500, dtype=torch.float64)
    for j in range(500):
        draws[j : j + 1].uniform_(generator=in_place)
    expected = [torch.rand(1, generator=fresh, dtype=torch.float64).item() for _ in range(500)]
    assert draws.tolist() == expected


def test_a_step_over_no_rows_picks_nothing():
    """As before the batching: no row, no token (the greedy-only branch must still bind the picks)."""
    sample = sample_step(torch.zeros(0, VOCAB), [])
    assert sample.tokens == [] and sample.logprobs is None and sample.top is None


def test_a_row_that_adjusts_nothing_has_no_state_to_record():
    """sample_step records only the adjusting rows: whatever ``record`` keeps must be absent from a row whose
    ``adjusts`` is false (from the start, or once its min_tokens ban has lifted)."""
    def state(row):
        return [(name, getattr(row, name)) for name in RowSampler.__slots__ if name not in ("generator", "params")]

    ban = torch.tensor([3, 5])
    for params, ban_ids in [(SamplingParams(), None), (SamplingParams(temperature=0.0, logprobs=5), None),
                            (SamplingParams(min_tokens=2, seed=1, top_k=3, min_p=0.1), ban),
                            (SamplingParams(min_tokens=3, bad_words_ids=[[7]]), ban)]:
        row = RowSampler(params, [1, 2, 3], VOCAB, ban_ids=ban_ids)
        while row.adjusts:
            row.record(4)
        before = repr(state(row))
        for token in (0, 3, VOCAB - 1):
            row.record(token)
        assert repr(state(row)) == before, params


def test_recording_a_step_issues_no_torch_op_a_row():
    """A step's bookkeeping for penalised rows (their token counts) costs no torch call a row: an element write
    through torch's indexing cost 7-14 µs a row each step, more than the rest of the row's sampling. The counts
    the penalties then read are the same."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    calls = {}
    for n in (2, 12):
        rows = [RowSampler(SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5),
                           [1, 2, 3], VOCAB) for _ in range(n)]
        logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(n))
        with Count() as count:
            tokens = sample_step(logits, rows).tokens
        calls[n] = count.calls
        for row, token in zip(rows, tokens):
            assert row.counts[token] == 1 and row.counts.sum() == 1
            assert row.seen[token] and row.seen[[1, 2, 3]].all() and row.seen.sum() == 3 + (token not in (1, 2, 3))
    assert calls[12] == calls[2], calls


def test_a_streams_detokenizer_decodes_once_a_token(tokenizer):
    """Once text flows, the window before the newest token is the one token released last: its text comes from the
    engine's shared memo, so a token costs one decode call, not two, and the text streamed is the same."""
    from retnet.serve.detokenize import IncrementalDetokenizer
    from tests.serve.conftest import CORPUS

    calls = [0]

    def decode(ids):
        calls[0] += 1
        return tokenizer.decode(ids, skip_special_tokens=True)

    texts: dict[int, str] = {}
    prompt = tokenizer.encode("def add(a, b):\n")
    for text in dict.fromkeys(CORPUS):
        ids = tokenizer.encode(text)
        streams = []
        for memo in (None, texts, texts):  # the second pass with the memo finds every token's text in it
            detok = IncrementalDetokenizer(decode, prompt, texts=memo)
            calls[0] = 0
            streams.append("".join(detok.push(token) for token in ids) + detok.flush())
            used = calls[0]
        assert streams[0] == streams[1] == streams[2] == text
        if text.isascii():  # every token's text is whole: after the first, each push decodes its pair alone
            assert used == len(ids) + 2, (text, used)
