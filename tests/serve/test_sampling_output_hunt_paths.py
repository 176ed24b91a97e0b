"""Hunted paths of the completions and chat routes' sampling and output options."""

import json

import pytest

pytestmark = pytest.mark.anyio


def _streamed(body: str) -> dict:
    """One choice's SSE chunks joined: its text and its logprobs' tokens and offsets."""
    text, tokens, offsets = "", [], []
    for line in body.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:])["choices"]:
            text += choice["text"]
            if choice["logprobs"]:
                tokens += choice["logprobs"]["tokens"]
                offsets += choice["logprobs"]["text_offset"]
    return {"text": text, "logprobs": {"tokens": tokens, "text_offset": offsets}}


async def test_echo_offsets_after_a_special_token_that_ends_a_character(open_app):
    # A token-id prompt holding a character's first byte, then a special token, then a continuation byte: the echo
    # (the ids decoded, special tokens shown) breaks the character at the special token, U+FFFD before it and after
    # it. The offsets took the special token as absent from the text and joined the two bytes into one character,
    # so it and every token after it pointed characters too early.
    async with open_app() as client:
        engine = client.app.state.engine
        by_bytes = {engine.token_bytes(t): t for t in range(engine.token_bound)}
        eos = client.app.state.serving.tokenizer.eos_token
        ids = [by_bytes[b"\xc3"], engine.primary_eos, by_bytes[b"\xa9"], by_bytes[b"a"]]
        req = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
        whole = (await client.post("/v1/completions", json=req)).json()["choices"][0]
        streamed = _streamed((await client.post("/v1/completions", json={**req, "stream": True})).text)
        for choice in (whole, streamed):
            assert choice["text"] == f"\ufffd{eos}\ufffda"
            assert choice["logprobs"]["text_offset"] == [0, 1, 1 + len(eos), 2 + len(eos)]
