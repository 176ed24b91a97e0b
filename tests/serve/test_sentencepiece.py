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
