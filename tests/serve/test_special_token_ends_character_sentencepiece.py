"""A SentencePiece token-id prompt whose only text is a character a special token ends: the first generated word
is not the start of the text, and keeps its space, as the logprob token that wrote it has it."""

import pytest

from tests.serve.test_detokenize_fuzz_paths import byte_tokens
from tests.serve.test_sentencepiece import model_dir, streamed_completion  # noqa: F401  (the module's fixture)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("prompt", ["unfinished", "U+FFFD"])
async def test_the_first_word_after_a_character_a_special_token_ends_keeps_its_space(open_app, prompt):
    # The tokens of the character EOS ends ("€"'s first two bytes) left the decoding's window, and nothing with text
    # was left before the generated "▁are": SentencePiece decoded it as a text's first word, "are". A real U+FFFD
    # (its three bytes, a whole character) was cut the same way, taken for an unfinished one.
    async with open_app() as client:
        tok = client.app.state.serving.tokenizer
        are = tok.convert_tokens_to_ids("▁are")
        held = byte_tokens(tok, "€")[:2] if prompt == "unfinished" else tok.encode("\ufffd", add_special_tokens=False)
        ids = [tok.bos_token_id, *held, tok.eos_token_id]
        req = {"prompt": ids, "max_tokens": 1, "logprobs": 0, "temperature": 0, "ignore_eos": True,
               "logit_bias": {str(are): 100}}
        whole = (await client.post("/v1/completions", json=req)).json()["choices"][0]
        stream = streamed_completion((await client.post("/v1/completions", json={**req, "stream": True})).text)
        for choice in (whole, stream):
            assert choice["logprobs"]["tokens"] == [" are"]
            assert choice["text"] == " are"
