"""The alternatives a logprobs request gets where logprobs tie (bf16 logits tie often): the same list whatever the
other rows of the step ask for, ranked by logprob then by ascending id, so that greedy's pick of equals comes first."""

import torch

from retnet.serve.sampling import RowSampler, SamplingParams, prompt_logprobs, sample_step

VOCAB = 300
TIED = [7, 40, 150, 201, 299]  # equally likely, more than any other token


def tied_logits(rows: int = 1) -> torch.Tensor:
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    logits[:, TIED] = 6.0
    logits[:, 11] = 5.5  # alone at the next rank
    return logits


def step_top(logits: torch.Tensor, ks: list[int]) -> list[list[tuple[int, float]]]:
    rows = [RowSampler(SamplingParams(temperature=0, logprobs=k), [], VOCAB) for k in ks]
    sample = sample_step(logits, rows)
    return sample.top, sample.tokens


def test_a_rows_alternatives_do_not_depend_on_the_k_of_the_rows_beside_it():
    logits = tied_logits(3)
    for k in (1, 2, 3, 5, 6, 8):
        alone, tokens = step_top(logits[:1], [k])
        assert tokens == [TIED[0]]  # greedy: the lowest id of the tie
        expected = [(i, alone[0][0][1]) for i in TIED][:k] + ([(11, alone[0][5][1])] if k > 5 else [])
        assert alone[0][:6] == expected
        for others in ([20], [20, 0], [1, 7]):
            batched, _ = step_top(logits[: 1 + len(others)], [k, *others])
            assert batched[0] == alone[0], (k, others)


def test_a_tie_at_the_kth_keeps_the_lowest_ids_whatever_topk_would_return():
    logits = torch.full((1, VOCAB), -3.0)
    logits[0, 250] = 1.0
    logits[0, [290, 3, 120]] = 0.5  # tied at the cut of k = 2 and k = 3
    for k, want in ((1, [250]), (2, [250, 3]), (3, [250, 3, 120]), (4, [250, 3, 120, 290])):
        top, _ = step_top(logits, [k])
        assert [token for token, _ in top[0]] == want
        top, _ = step_top(logits.expand(2, -1).contiguous(), [k, 20])
        assert [token for token, _ in top[0]] == want
    # Past the tokens likelier than the floor, the floor's tie (the rest of the vocabulary) by ascending id too.
    top, _ = step_top(logits, [6])
    assert [token for token, _ in top[0]] == [250, 3, 120, 290, 0, 1]


def test_prompt_alternatives_do_not_depend_on_k():
    logits = tied_logits(4)
    ids = [TIED[2]] * 4
    few = prompt_logprobs(logits, ids, 1)
    many = prompt_logprobs(logits, ids, 20)
    for (value, rank, top_one), (value_many, rank_many, top_many) in zip(few, many, strict=True):
        assert (value, rank) == (value_many, rank_many) == (value, 1)
        assert top_one == top_many[:1]
        assert [token for token, _ in top_many[:6]] == [*TIED, 11]


def test_a_one_token_prompt_has_no_alternatives_to_rank():
    assert prompt_logprobs(torch.zeros(0, VOCAB), [], 5) == []


def ranked(row: list[float], k: int) -> list[tuple[int, float]]:
    """The brute-force answer: every token sorted by logprob, then by id."""
    return sorted(((token, value) for token, value in enumerate(row)), key=lambda item: (-item[1], item[0]))[:k]


def heavily_tied(generator: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Logprobs of a few distinct values each (ties across every cut, longer than topk's slack), some rows with a
    -inf tail longer than the k asked (a grammar's mask), one row all -inf."""
    levels = torch.randint(1, 5, (rows, 1), generator=generator)
    logprobs = -torch.randint(0, 6, (rows, vocab), generator=generator).float() / levels
    for row in range(rows):
        if row % 3 == 1:  # only a few finite tokens
            allowed = torch.randperm(vocab, generator=generator)[: int(torch.randint(0, 4, (), generator=generator))]
            logprobs[row, [t for t in range(vocab) if t not in allowed.tolist()]] = float("-inf")
    logprobs[-1] = float("-inf")
    return logprobs


def test_alternatives_match_a_full_ranking_by_logprob_then_id_whatever_the_k_and_the_ties():
    from retnet.serve.sampling import _top_alternatives

    generator = torch.Generator().manual_seed(1)
    for vocab in (1, 3, 12, 40, 300):
        for _ in range(12):
            logprobs = heavily_tied(generator, 7, vocab)
            ks = torch.randint(0, vocab + 3, (7,), generator=generator).tolist()
            ks[0] = 0
            rows = logprobs.tolist()
            assert _top_alternatives(logprobs, ks) == [ranked(row, k) for row, k in zip(rows, ks)], (vocab, ks)
            small = [min(k, 3) for k in ks]  # a k well inside the topk the batch lists
            assert _top_alternatives(logprobs, small) == [ranked(row, k) for row, k in zip(rows, small)]
    # More tied rows than one block of the re-ranking (an echoed prompt's, of a flat model).
    logprobs = heavily_tied(generator, 150, 30)
    ks = torch.randint(1, 12, (150,), generator=generator).tolist()
    assert _top_alternatives(logprobs, ks) == [ranked(row, k) for row, k in zip(logprobs.tolist(), ks)]


def test_sampled_and_prompt_alternatives_match_a_full_ranking():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 3, (6, VOCAB), generator=generator).float()  # ~100 tokens tied at each level
    logits[2, 50:] = float("-inf")  # a -inf tail: fewer finite tokens than the largest k asked
    logits[3, 5:] = float("-inf")
    lp = logits.log_softmax(-1).tolist()
    ks = [1, 20, 70, 0, 150, 9]
    top, _ = step_top(logits, ks)
    assert top == [ranked(row, k) for row, k in zip(lp, ks)]
    for k in (1, 9, 70):
        scored = prompt_logprobs(logits, [0] * 6, k)
        assert [alternatives for _, _, alternatives in scored] == [ranked(row, k) for row in lp]
