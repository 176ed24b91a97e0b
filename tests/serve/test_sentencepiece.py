"""SentencePiece-style tokenizers (Llama 2, Mistral): ``▁`` stands for a space, and the decoder drops the one
that opens a text, so a token decoded alone (``▁world`` as ``world``) is not what it adds to a text. Logprob
labels, their ``bytes`` and ``text_offset`` must be what each token adds where it stands."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.tokenization import DEFAULT_CHAT_TEMPLATE, TokenBytes, characters_started

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
SPECIAL = ["<unk>", "<s>", "</s>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Hello world! How are you today? I am fine, thank you.\n",
    "The retention mechanism replaces attention with a decaying recurrence.\n",
    "Unicode: café, naïve, 東京, emoji 🙂 and more.\n",
] * 10


def sentencepiece_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """``llama2``: Llama 2's tokenizer.json (a normalizer writes ``▁``; Replace, ByteFallback, Fuse and Strip
    decode, with ``<0xNN>`` byte tokens); ``metaspace``: a Metaspace pre-tokenizer and decoder (which drops
    the space of a text's first token, not of the text). Either adds ``<s>`` before a text, as Llama's does."""
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=1, special_tokens=SPECIAL, show_progress=False)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(CORPUS, trainer=trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    if style == "llama2":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                             decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(SPECIAL)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def model_dir(request, tmp_path_factory):
    """Overrides conftest's for this module (``open_app`` serves it)."""
    path = tmp_path_factory.mktemp(f"retnet-{request.param}")
    tokenizer = sentencepiece_tokenizer(request.param)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          chunk_size=16, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                          initializer_range=0.2)
    torch.manual_seed(0)
    RetNetForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def words_only(client) -> dict:
    """Generation restricted to the tokens that are not single bytes: the random model's byte tokens make
    invalid UTF-8, which the ByteFallback decoder replaces by its own rule (a valid byte after an invalid one is
    U+FFFD too), not the text the tokens' bytes decode to."""
    vocab = client.app.state.serving.tokenizer.get_vocab()
    return {"allowed_token_ids": sorted(i for t, i in vocab.items() if not t.startswith("<"))}


def label_bytes(label: str) -> bytes:
    if label.startswith("bytes:"):
        return bytes(int(h, 16) for h in label[len("bytes:"):].split("\\x")[1:])
    return label.encode("utf-8")


def joined(labels: list[str]) -> str:
    return b"".join(label_bytes(t) for t in labels).decode("utf-8", errors="replace")


def sse(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: {")]


def streamed_completion(text: str) -> dict:
    choice = {"text": "", "logprobs": {"tokens": [], "text_offset": [], "top_logprobs": []}}
    for chunk in sse(text):
        for part in chunk["choices"]:
            choice["text"] += part["text"]
            for key in choice["logprobs"]:
                choice["logprobs"][key] += (part["logprobs"] or {}).get(key, [])
    return choice


def check_offsets(text: str, tokens: list[str], offsets: list[int], start: int) -> None:
    """Each token's offset is ``start`` plus the characters begun by the tokens before it, and its text stands
    there."""
    position = start
    for token, offset in zip(tokens, offsets, strict=True):
        assert offset == position, (token, offset, position, text)
        if not token.startswith("bytes:"):
            assert text[offset:].startswith(token), (token, offset, text)
        position += characters_started(label_bytes(token))


def test_token_bytes_are_what_a_token_adds_inside_a_text(model_dir):
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    token_bytes = TokenBytes(tok)
    text = "Hello world, café 中文 ok"  # 中文 is not in the corpus: byte-fallback tokens (Llama 2's style)
    ids = tok.encode(text, add_special_tokens=False)
    are = tok.convert_tokens_to_ids("▁are")
    assert token_bytes(are) == b" are" and token_bytes.label(are) == " are"
    # Opening a text, a token loses the space its ▁ stands for, as decoding the text drops it.
    assert token_bytes.start(ids[0]) == b"Hello" and token_bytes(ids[0]) == b" Hello"
    assert token_bytes.start(ids[0]) + b"".join(token_bytes(i) for i in ids[1:]) == text.encode("utf-8")
    # The BOS is a special token: its text, wherever it stands.
    assert token_bytes(tok.bos_token_id) == token_bytes.start(tok.bos_token_id) == b"<s>"


async def test_completion_logprob_tokens_rebuild_the_text_and_offsets_index_it(open_app):
    prompt = "Hello world, 中文 how are"
    async with open_app() as client:
        req = {"prompt": prompt, "max_tokens": 12, "logprobs": 2, **GREEDY, **words_only(client)}
        whole = (await client.post("/v1/completions", json=req)).json()["choices"][0]
        streamed = streamed_completion((await client.post("/v1/completions", json={**req, "stream": True})).text)
        for choice in (whole, streamed):
            lp = choice["logprobs"]
            assert joined(lp["tokens"]) == choice["text"]
            check_offsets(prompt + choice["text"], lp["tokens"], lp["text_offset"], len(prompt))
            for token, top in zip(lp["tokens"], lp["top_logprobs"]):
                assert token in top
        assert streamed["logprobs"] == {k: whole["logprobs"][k] for k in streamed["logprobs"]}
        assert any(t.startswith(" ") for t in whole["logprobs"]["tokens"])


@pytest.mark.parametrize("prompt", ["Hello world, café 中文", ""])
async def test_echoed_prompt_tokens_rebuild_it(open_app, prompt):
    # The prompt's first token opens the text: its ▁ is no space there. With "" the prompt is the BOS alone
    # and the first generated token opens the text.
    async with open_app() as client:
        req = {"prompt": prompt, "max_tokens": 6, "logprobs": 1, "echo": True, **GREEDY, **words_only(client)}
        whole = (await client.post("/v1/completions", json=req)).json()["choices"][0]
        streamed = streamed_completion((await client.post("/v1/completions", json={**req, "stream": True})).text)
        for choice in (whole, streamed):
            lp = choice["logprobs"]
            assert choice["text"].startswith(prompt) and lp["tokens"][0] == "<s>"
            assert joined(lp["tokens"][1:]) == choice["text"]
            check_offsets(choice["text"], lp["tokens"][1:], lp["text_offset"][1:], 0)
        assert streamed["logprobs"]["tokens"] == whole["logprobs"]["tokens"]
        assert streamed["logprobs"]["text_offset"] == whole["logprobs"]["text_offset"]


async def test_chat_logprob_bytes_rebuild_the_content(open_app):
    async with open_app() as client:
        req = {"messages": [{"role": "user", "content": "Hello world, how are you?"}], "max_tokens": 12,
               "logprobs": True, "top_logprobs": 2, **GREEDY, **words_only(client)}
        whole = (await client.post("/v1/chat/completions", json=req)).json()["choices"][0]
        content = whole["message"]["content"]
        entries = whole["logprobs"]["content"]
        assert b"".join(bytes(e["bytes"]) for e in entries) == content.encode("utf-8")
        assert joined([e["token"] for e in entries]) == content
        for entry in entries:
            assert all(bytes(t["bytes"]) == label_bytes(t["token"]) for t in entry["top_logprobs"])
        chunks = sse((await client.post("/v1/chat/completions", json={**req, "stream": True})).text)
        streamed = [e for c in chunks for ch in c["choices"] for e in ((ch.get("logprobs") or {}).get("content") or [])]
        assert "".join(ch["delta"].get("content", "") for c in chunks for ch in c["choices"]) == content
        assert streamed == entries


def byte_token(tokenizer, byte: int) -> int:
    return tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>")


async def completion_both_ways(client, req: dict) -> list[dict]:
    """The one choice of ``req``, whole and streamed (its chunks joined)."""
    whole = (await client.post("/v1/completions", json=req)).json()["choices"][0]
    streamed = streamed_completion((await client.post("/v1/completions", json={**req, "stream": True})).text)
    return [whole, streamed]


async def test_a_token_id_prompt_is_labelled_as_its_echo_shows_it(open_app):
    # A prompt of token ids is echoed as its decoding, BOS included (vLLM's echo): "<s> Hello ...", where ▁Hello
    # keeps its space, as inside any text; decoded without a BOS, the prompt's first token opens the text and
    # drops it, as with a text prompt. Either way the labels rebuild the echo and the offsets index it.
    prompt = "Hello world, café 中文"
    async with open_app() as client:
        tok = client.app.state.serving.tokenizer
        ids = tok.encode(prompt)
        assert tok.convert_ids_to_tokens(ids[:2]) == ["<s>", "▁Hello"]
        req = {"max_tokens": 4, "logprobs": 1, "echo": True, **GREEDY, **words_only(client)}
        by_text = (await client.post("/v1/completions", json={**req, "prompt": prompt})).json()["choices"][0]
        text_labels = by_text["logprobs"]["tokens"]
        assert text_labels[:2] == ["<s>", "Hello"]
        for choice in await completion_both_ways(client, {**req, "prompt": ids}):
            lp = choice["logprobs"]
            assert choice["text"] == tok.decode(ids) + by_text["text"][len(prompt):]
            assert choice["text"].startswith("<s> Hello world")
            assert lp["tokens"] == ["<s>", " Hello", *text_labels[2:]]
            assert joined(lp["tokens"]) == choice["text"]
            check_offsets(choice["text"], lp["tokens"], lp["text_offset"], 0)
        # Without the BOS: as the text without it (add_special_tokens false), whose encoding these ids are.
        alone = {**req, "prompt": prompt, "add_special_tokens": False}
        by_text = (await client.post("/v1/completions", json=alone)).json()["choices"][0]
        assert by_text["logprobs"]["tokens"][0] == "Hello"
        for choice in await completion_both_ways(client, {**req, "prompt": ids[1:]}):
            assert choice["text"] == by_text["text"]
            assert choice["logprobs"]["tokens"] == by_text["logprobs"]["tokens"]
            assert choice["logprobs"]["text_offset"] == by_text["logprobs"]["text_offset"]


@pytest.mark.parametrize("echo", [True, False])
async def test_a_token_id_prompt_ending_inside_a_character_is_finished_by_the_completion(open_app, echo):
    # "€" is e2 82 ac: the prompt ends with its first two bytes, and the first generated token is its last. That
    # token's text is the whole "€" (not U+FFFD, no byte lost), and the echo leaves the two bytes to it (they
    # are not shown twice, once broken). text_offset is the same with or without the echo.
    async with open_app() as client:
        tok = client.app.state.serving.tokenizer
        ids = [*tok.encode("Hello"), byte_token(tok, 0xE2), byte_token(tok, 0x82)]
        # A bias of 100 decides the token: the character's last byte.
        req = {"prompt": ids, "max_tokens": 1, "logprobs": 0, "echo": echo,
               "logit_bias": {str(byte_token(tok, 0xAC)): 100}, **GREEDY}
        echoed = (await client.post("/v1/completions", json={**req, "echo": True})).json()["choices"][0]
        for choice in await completion_both_ways(client, req):
            assert choice["text"] == ("<s> Hello€" if echo else "€")
            lp = choice["logprobs"]
            assert lp["tokens"][-1] == "bytes:\\xac"
            # The token finishing a character begun before it is placed after it, as inside a completion.
            assert lp["text_offset"][-1] == len("<s> Hello€") == echoed["logprobs"]["text_offset"][-1]
            if echo:
                assert lp["tokens"][-3:] == ["bytes:\\xe2", "bytes:\\x82", "bytes:\\xac"]
                check_offsets(choice["text"], lp["tokens"], lp["text_offset"], 0)


@pytest.mark.parametrize("echo", [True, False])
async def test_a_character_a_token_id_prompt_leaves_broken_is_shown_once(open_app, echo):
    # The next token is no byte that could finish the prompt's last character: the completion shows it broken,
    # as decoding the whole does, and the echo does not show it too. With nothing generated (max_tokens 0) the
    # echo is the prompt's decoding, the broken character in it.
    async with open_app() as client:
        tok = client.app.state.serving.tokenizer
        ids = [*tok.encode("Hello"), byte_token(tok, 0xE2), byte_token(tok, 0x82)]
        hello = tok.convert_tokens_to_ids("▁Hello")
        req = {"prompt": ids, "max_tokens": 2, "echo": echo, "logit_bias": {str(hello): 100}, **GREEDY}
        generated = (await client.post("/v1/completions", json={**req, "return_token_ids": True})).json()
        assert generated["choices"][0]["token_ids"] == [hello, hello]
        for choice in await completion_both_ways(client, req):
            assert choice["text"] == ("<s> Hello" if echo else "") + "\ufffd\ufffd Hello Hello"
            assert tok.decode([*ids, hello, hello]) == "<s> Hello\ufffd\ufffd Hello Hello"
        scored = {**req, "max_tokens": 0, "echo": True, "logprobs": 0}
        for choice in await completion_both_ways(client, scored):
            assert choice["text"] == tok.decode(ids) == "<s> Hello\ufffd\ufffd"
            check_offsets(choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"], 0)
