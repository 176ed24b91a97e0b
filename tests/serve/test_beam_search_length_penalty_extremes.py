"""A beam search's length_penalty far from 1: the ranking ``cum_logprob / length ** length_penalty`` holds where
the power leaves the floats (it failed with a 500 after the search had run)."""

import math

import pytest

from retnet.serve.beam_search import Beam, beam_rank, beam_score, best_beams

pytestmark = pytest.mark.anyio


def test_beam_rank_orders_as_the_formula_and_past_the_floats():
    cases = [(-3.0, 5), (-3.0, 9), (-0.5, 2), (-7.25, 12), (0.0, 4), (-1e-9, 30)]
    for penalty in (-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 7.0):
        by_score = sorted(cases, key=lambda c: beam_score(*c, penalty))
        assert sorted(cases, key=lambda c: beam_rank(*c, penalty)) == by_score, penalty
    # 12 ** 400 is past the floats: longer beams win, as the formula's limit says
    beams = [Beam([1] * k, -2.0 * k) for k in (1, 3, 2)]
    assert [len(b.tokens) for b in best_beams(beams, 3, 9, 400.0)] == [3, 2, 1]
    assert [len(b.tokens) for b in best_beams(beams, 3, 9, -400.0)] == [1, 2, 3]
    assert [len(b.tokens) for b in best_beams(beams, 2, 9, 1e308)] == [3, 2]


@pytest.mark.parametrize("penalty", [400.0, -400.0])
async def test_a_search_of_an_extreme_length_penalty_answers_ranked(open_app, penalty):
    async with open_app() as client:
        engine = client.app.state.engine
        prompt = "Hello world"
        first = (await client.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 1, "temperature": 0, "return_token_ids": True,
        })).json()["choices"][0]["token_ids"][0]
        engine.eos_ids = {first}  # beams end at different lengths
        r = await client.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 6, "n": 3, "logprobs": 0, "use_beam_search": True,
            "return_token_ids": True, "length_penalty": penalty,
        })
        assert r.status_code == 200, r.text
        prompt_tokens = len(engine.tokenizer.encode(prompt))
        lengths, ranks = [], []
        for c in r.json()["choices"]:
            length = prompt_tokens + len(c["token_ids"]) - (c["finish_reason"] == "stop")
            lengths.append(length)
            ranks.append(beam_rank(math.fsum(c["logprobs"]["token_logprobs"]), length, penalty))
        assert ranks == sorted(ranks, reverse=True)
        assert lengths == sorted(lengths, reverse=penalty > 0)
        # a large penalty puts the longest beams first, a large negative one the shortest: the EOS as first token
        assert lengths[0] == (prompt_tokens + 6 if penalty > 0 else prompt_tokens)
