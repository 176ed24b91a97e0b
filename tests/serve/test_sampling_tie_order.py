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
