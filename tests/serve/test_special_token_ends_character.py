"""A token-id prompt that ends inside a UTF-8 character, then a special token: the special token ends the
character, as the echo shows it, and the completion's text and ``text_offset`` start after it."""

import pytest

from tests.serve.test_detokenize_fuzz_paths import byte_tokens
from tests.serve.test_sentencepiece import check_offsets, streamed_completion

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("skip", [True, False])
async def test_a_special_token_ends_the_character_a_token_id_prompt_leaves_unfinished(open_app, skip):
    # "€" is e2 82 ac: the prompt ends with its first two bytes and EOS, the model is made to write its last.
    # With EOS left out of the text (skip_special_tokens, the default), the decoding joined that byte to the
    # prompt's two across it: the "€" took the place of the U+FFFD the prompt's text ends with, and the
    # completion's text was empty while its text_offset counted the byte's U+FFFD.
    async with open_app() as client:
        tok = client.app.state.serving.tokenizer
        e2, x82, xac = byte_tokens(tok, "€")
        ids = [*tok.encode("Hello"), e2, x82, tok.eos_token_id]
        req = {"prompt": ids, "max_tokens": 1, "logprobs": 0, "temperature": 0, "ignore_eos": True,
               "logit_bias": {str(xac): 100}, "skip_special_tokens": skip}
        echo = tok.decode(ids)  # the echo of token ids shows special tokens (vLLM's)
        assert echo == "Hello\ufffd<|endoftext|>"
        for echoed in (False, True):
            both = {**req, "echo": echoed}
            whole = (await client.post("/v1/completions", json=both)).json()["choices"][0]
            stream = streamed_completion((await client.post("/v1/completions", json={**both, "stream": True})).text)
            for choice in (whole, stream):
                # What HF's decode of it all gives with the special token shown, where it ends the character.
                assert choice["text"] == (echo if echoed else "") + "\ufffd"
                assert tok.decode([*ids, xac], skip_special_tokens=False).endswith("<|endoftext|>\ufffd")
                lp = choice["logprobs"]
                assert lp["tokens"][-1] == "bytes:\\xac"
                assert lp["text_offset"][-1] == len(echo)
                if echoed:
                    check_offsets(choice["text"], lp["tokens"], lp["text_offset"], 0)
