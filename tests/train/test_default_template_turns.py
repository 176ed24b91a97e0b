"""The default chat template ends every message with the EOS: an answer in the middle of a multi-turn conversation
is trained to stop where the server stops (it ended with "\\n" only, and a fine-tuned model, served, ran on from its
first answer into the next turns' text), the conversation closes on the template's own EOS (no EOS after EOS), and
the server's prompt for a later turn, sent whole or continued in a session after the EOS the model generated, is
the prefix training saw before that turn."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from transformers import AutoTokenizer

from retnet.tokenization import DEFAULT_CHAT_TEMPLATE, train_byte_level_bpe
from retnet.train.chat import (
    BOUNDARY,
    TARGET,
    ChatEncoder,
    check_conversations,
    render_default,
    template_identity,
)
from tests.serve.conftest import CORPUS, save_micro_model, serve_app

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 10+20?"}, {"role": "assistant", "content": "30 🙂 東京"},
    {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."},
    {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Goodbye!"},
]
ANSWERS = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A micro model and a BPE trained on code and the rendered conversation, saved as the launcher exports them
    (the tokenizer carries the default template)."""
    texts = CORPUS + [render_default(check_conversations("c", "messages", [CONVERSATION])[0])] * 5
    return save_micro_model(tmp_path_factory.mktemp("turns"), train_byte_level_bpe(texts, vocab_size=400,
                                                                                    min_frequency=1))


def encoded(tokenizer) -> tuple[list[int], np.ndarray, list[tuple[int, int]]]:
    """The conversation's ids and flags as chat training encodes it, and each run of targets as [start, end)."""
    ids, flags = ChatEncoder(tokenizer).encode(check_conversations("set.jsonl", "messages", [CONVERSATION]))
    target = (flags & TARGET) != 0
    runs, start = [], None
    for k, on in enumerate([*target.tolist(), False]):
        if on and start is None:
            start = k
        elif not on and start is not None:
            runs.append((start, k))
            start = None
    return ids.tolist(), flags, runs


def test_every_assistant_turn_ends_on_an_eos_target(export):
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # what the BPE a run trains exports
    eos = tokenizer.eos_token_id
    ids, flags, runs = encoded(tokenizer)
    # one run of targets per answer: its content, then the EOS it is trained to stop on (mid-conversation too)
    assert [tokenizer.decode(ids[lo:hi]) for lo, hi in runs] == [
        CONVERSATION[i]["content"] + tokenizer.eos_token for i in ANSWERS]
    assert all(ids[hi - 1] == eos for _, hi in runs)
    # after a mid-conversation answer's EOS the next turn is prompt, no target
    assert all(not flags[hi] & TARGET and ids[hi] != eos for _, hi in runs[:-1])
    # the conversation closes on the template's EOS: one boundary, the last token, and no EOS after an EOS
    assert np.flatnonzero(flags & BOUNDARY).tolist() == [len(ids) - 1] and ids[-1] == eos
    assert not any(a == b == eos for a, b in itertools.pairwise(ids))
    assert ids.count(eos) == len(CONVERSATION)  # the template's, one a message


def test_the_token_cache_of_the_old_default_template_is_rebuilt(export):
    """A cache key of before (default template ending messages with "\\n", EOS appended after the template's)
    differs: the tokenizer without a template of its own renders with the new default."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    tokenizer.chat_template = None
    identity = template_identity(tokenizer)
    assert identity["chat_template"] == DEFAULT_CHAT_TEMPLATE and "{{ eos_token }}" in DEFAULT_CHAT_TEMPLATE
    assert identity.get("closing_eos") == 1


def test_the_servers_prompt_for_a_later_turn_is_trainings_prefix(export):
    """The prompt the server runs for turn 2 (the history and the next question, with the generation prompt) is
    the ids training saw before the second answer; and so is a session's: turn 1 ended by the EOS the model
    generated (forced here), turn 2 sending only the new question."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    eos = tokenizer.eos_token_id
    ids, _, runs = encoded(tokenizer)
    second = ANSWERS[1]
    prefix = ids[: runs[1][0]]
    common = {"max_tokens": 1, "temperature": 0, "return_token_ids": True}

    async def serve():
        async with serve_app(export) as client:
            async def chat(**request):
                response = await client.post("/v1/chat/completions", json={**common, **request})
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]

            fresh = await chat(messages=CONVERSATION[:second])
            # turn 1 in a session: the first answer prefilled, the model made to end it with the EOS (as one
            # trained on the template does), then turn 2 sends only its question
            first = await chat(messages=CONVERSATION[:second - 1], continue_final_message=True,
                               add_generation_prompt=False, logit_bias={str(eos): 100}, session_id="turns")
            then = await chat(messages=CONVERSATION[second - 1:second], session_id="turns")
            return fresh, first, then

    fresh, first, then = asyncio.run(serve())
    assert fresh["prompt_token_ids"] == prefix
    assert first["token_ids"] == [eos] and first["finish_reason"] == "stop"
    assert first["prompt_token_ids"] + first["token_ids"] + then["prompt_token_ids"] == prefix
