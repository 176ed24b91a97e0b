"""Randomised differential checks of streaming detokenisation: the text the engine streams, token by token through
IncrementalDetokenizer and StopStrings, is the text decoding all the generated ids at once gives (a non-streaming
response's), cut at the first stop string, for byte-level BPE, SentencePiece-style and WordPiece tokenizers."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from retnet.serve.detokenize import IncrementalDetokenizer, StopStrings, unfinished_character
from retnet.serve.engine import Engine
from retnet.tokenization import TokenBytes, train_byte_level_bpe
from tests.serve.conftest import CORPUS
from tests.serve.test_sentencepiece import sentencepiece_tokenizer

TEXTS = ["東京 🙂", " héllo wörld", "e\u0301\u0308x", "👨\u200d👩\u200d👧 family", " café naïve", "\n\t  x", " world"]


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT's scheme: the decoder joins words with a space, except ``##`` pieces that continue one."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]", "[SEP]"],
                                        show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]")


def build(kind: str) -> PreTrainedTokenizerFast:
    if kind == "bpe":
        tokenizer = train_byte_level_bpe(CORPUS, vocab_size=384, min_frequency=1)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
        tokenizer.add_tokens(["<tool_call>", " hello there"])
        return tokenizer
    if kind == "wordpiece":
        return wordpiece_tokenizer()
    return sentencepiece_tokenizer(kind)


@pytest.fixture(scope="module", params=["bpe", "llama2", "metaspace", "wordpiece"])
def tokenizer(request):
    return build(request.param)


def engine_of(tokenizer) -> Engine:
    """The engine's tokenizer side alone (no model): its token bytes, the special tokens decoding skips."""
    engine = Engine.__new__(Engine)
    engine.tokenizer, engine.token_bytes = tokenizer, TokenBytes(tokenizer)
    engine.skipped_ids = set(tokenizer.all_special_ids)
    return engine


def unfinished(tokenizer, context) -> int:
    """The engine's count of the prompt's last tokens that hold a character it leaves unfinished."""
    return engine_of(tokenizer).unfinished_tail(context) if context else 0


def streamed(tokenizer, context, generated, stops=(), include=False, skip=True) -> str:
    """What the engine's _advance streams for ``generated`` after the prompt ``context``, concatenated."""
    detok = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=skip),
                                   **engine_of(tokenizer).detokenizer_context(context, skip))
    stop_strings = StopStrings(list(stops), include)
    text = ""
    for token in generated:
        text += stop_strings.push(detok.push(token))
        if stop_strings.stopped:
            return text
    text += stop_strings.push(detok.flush())
    return text if stop_strings.stopped else text + stop_strings.flush()


def closed(tokenizer, context, skip) -> list[int]:
    """``context`` with a letter before its last special token where that token ends a character left unfinished
    before it: a special token ends the character before it (the prompt's text shows it as U+FFFD, and HF's decode
    with special tokens shown), but one that decoding drops (``skip``) leaves the bytes on both sides of it to one
    decode, which joins them; a letter there ends the character as the token does."""
    special = set(tokenizer.all_special_ids)
    last = max((at for at, token in enumerate(context) if token in special), default=None)
    if not skip or last is None:
        return context
    token_bytes = TokenBytes(tokenizer)
    if not unfinished_character(b"".join(token_bytes(t) for t in context[:last] if t not in special)):
        return context
    return context[:last] + tokenizer.encode("a", add_special_tokens=False) + context[last:]


def decoded_whole(tokenizer, context, generated, stops=(), include=False, skip=True) -> str:
    """The same text from one decode of everything: what ``generated`` adds after the prompt's whole characters,
    cut at the stop string that ends first (the longest of those ending together)."""
    context = closed(tokenizer, context, skip)
    whole = context[: len(context) - unfinished(tokenizer, context)]
    text = tokenizer.decode(context + generated, skip_special_tokens=skip)[
        len(tokenizer.decode(whole, skip_special_tokens=skip)):]
    hits = [(at + len(stop), at) for stop in stops if (at := text.find(stop)) >= 0]
    if not hits:
        return text
    end, start = min(hits)
    return text[: end if include else start]


def test_a_prompt_ending_in_skipped_special_tokens_keeps_the_first_words_space(tokenizer):
    # The window of context tokens the detokenizer decodes with was the prompt's last 6: all skipped special
    # tokens here, so the decoder saw "▁are" open a text and dropped its space; decoding everything keeps it.
    vocab = tokenizer.get_vocab()
    word = next((token for token in ("▁are", "are") if token in vocab), None)
    generated = [vocab[word]] if word else tokenizer.encode(" are", add_special_tokens=False)
    context = tokenizer.encode("Hello", add_special_tokens=False) + [tokenizer.eos_token_id] * 8
    assert streamed(tokenizer, context, generated) == decoded_whole(tokenizer, context, generated) == " are"


def test_the_window_past_special_tokens_is_bounded(tokenizer):
    # Every push decodes the window until text comes out: reaching back across all of a prompt's 10,000 special
    # tokens, each token streamed after it decoded them all again (30 ms a token at 100,000).
    decoded = []

    def decode(ids):
        decoded.append(len(ids))
        return tokenizer.decode(ids, skip_special_tokens=True)

    context = tokenizer.encode("Hello", add_special_tokens=False) + [tokenizer.eos_token_id] * 10_000
    detokenizer = IncrementalDetokenizer(decode, context)
    assert len(detokenizer.ids) <= 64
    decoded.clear()
    for _ in range(10):
        detokenizer.push(tokenizer.eos_token_id)
    assert max(decoded) <= 64 + 10


@pytest.mark.parametrize("kind", ["llama2", "metaspace"])
@pytest.mark.parametrize("cut", [0, 1, 3])
def test_byte_fallback_characters_after_a_prompt_of_byte_tokens_are_not_replaced(kind, cut):
    # The prompt's last 6 tokens began inside the ZWJ's bytes: ByteFallback decodes a run holding an invalid
    # part as U+FFFD for each byte, so the 👧 the generated byte tokens add to that run (or finish, when the
    # prompt ends inside it: ``cut``) streamed as U+FFFD.
    sp = build(kind)
    as_bytes = [sp.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in "👨\u200d👩👧".encode()]
    context = sp.encode("Hi", add_special_tokens=False) + as_bytes[: len(as_bytes) - 4 + cut]
    generated = as_bytes[len(as_bytes) - 4 + cut :]
    assert streamed(sp, context, generated) == decoded_whole(sp, context, generated) == "👧"


def test_seeded_rounds_stream_what_one_decode_gives(tokenizer):
    rng = random.Random(1234)
    special = sorted(tokenizer.all_special_ids)
    # A SentencePiece byte run that is not valid UTF-8 as a whole decodes to one U+FFFD per byte token (HF's
    # ByteFallback), even its bytes that were whole characters and were streamed as such: those runs are left
    # out, characters split across byte tokens (and ending the prompt) are not.
    byte_fallback = "<0x41>" in tokenizer.get_vocab()
    rounds = 0
    while rounds < 150:
        pieces = [tokenizer.encode(rng.choice(TEXTS), add_special_tokens=False) for _ in range(rng.randint(1, 4))]
        ids = [token for piece in pieces for token in piece]
        ids = [rng.choice(special) if rng.random() < 0.1 else token for token in ids]
        split = rng.randint(0, len(ids) - 1)
        context = ids[:split] + [rng.choice(special)] * rng.choice([0, 0, 7])
        generated = ids[split:]
        skip = rng.random() < 0.5
        if byte_fallback and "\ufffd" in tokenizer.decode(context + generated, skip_special_tokens=skip):
            continue
        whole = tokenizer.decode(generated, skip_special_tokens=skip)
        stops = []
        for _ in range(rng.randint(0, 2)):
            if whole:
                at = rng.randrange(len(whole))
                stops.append(whole[at : at + rng.randint(1, 4)])
        include = rng.random() < 0.5
        case = (context, generated, stops, include, skip)
        assert streamed(tokenizer, *case) == decoded_whole(tokenizer, *case), case
        rounds += 1


def byte_tokens(tokenizer, text: str) -> list[int]:
    """``text``'s UTF-8 as one token a byte (byte-level BPE's single-byte tokens, SentencePiece's ``<0xNN>``)."""
    token_bytes = TokenBytes(tokenizer)
    single = {}
    for token in range(len(tokenizer)):
        if len(raw := token_bytes(token)) == 1:
            single.setdefault(raw[0], token)
    return [single[byte] for byte in text.encode()]


@pytest.mark.parametrize("kind", ["bpe", "llama2", "metaspace"])
@pytest.mark.parametrize("cut", [1, 2])
@pytest.mark.parametrize("inside", [False, True])
def test_a_special_token_after_a_prompts_unfinished_character_ends_it(kind, cut, inside):
    # The prompt ends with the first bytes of "€", then a special token the output leaves out (and with
    # ``inside`` one more within the character's bytes). The decoding joined the generated last bytes to those
    # across it: the "€" they made took the place of the U+FFFD the prompt's text ends with, and the
    # generated bytes streamed as nothing. The special token ends the character, as it does where it is shown:
    # the completion is what decoding it all with special tokens shown adds after the prompt's text.
    tokenizer = build(kind)
    euro = byte_tokens(tokenizer, "€")
    head = euro[:cut]
    if inside:
        head = [*head[:1], tokenizer.pad_token_id, *head[1:]]
    context = tokenizer.encode("Hi", add_special_tokens=False) + head + [tokenizer.eos_token_id]
    generated = euro[cut:] + tokenizer.encode(" world", add_special_tokens=False)
    shown = tokenizer.decode(context + generated, skip_special_tokens=False)
    expected = shown[len(tokenizer.decode(context, skip_special_tokens=False)):]
    assert expected.startswith("\ufffd" * (3 - cut)) and expected.endswith("world")
    assert streamed(tokenizer, context, generated) == decoded_whole(tokenizer, context, generated) == expected


@pytest.mark.parametrize(("kind", "case"), [
    *((kind, case) for kind in ("bpe", "llama2", "metaspace")
      for case in ("no other text", "a whole U+FFFD", "special token inside")),
    # (SentencePiece's byte-fallback decoder makes the run of the lone byte after the token and the generated ones
    # all U+FFFD, shown or not: the exception the seeded rounds leave out)
    ("bpe", "joined across"),
])
def test_special_tokens_end_the_prompts_characters_as_shown(kind, case):
    # A special token ends the character before it, as decoding with special tokens shown has it; the completion is
    # what that decoding adds after the prompt's text. The tokens of the character the token ended left the
    # window: with no text left before them, SentencePiece streamed "are" for " are" ("no other text"); a prompt
    # ending in a real U+FFFD (its 3 whole bytes) was taken for one ending in an unfinished character and cut too;
    # a special token within the prompt's last character ("special token inside") or before a token of the last
    # byte of 東 and the first of 京 ("joined across": the rest of 京 generated) was not seen, and the decoding
    # joined the bytes across it, losing the generated byte or the U+FFFD of 東's last byte.
    tokenizer = build(kind)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    euro, east = byte_tokens(tokenizer, "€"), tokenizer.encode("東京", add_special_tokens=False)
    hi, are = (tokenizer.encode(text, add_special_tokens=False) for text in ("Hi", " are"))
    context, generated = {
        "no other text": ([bos, *euro[:2], eos], are),
        "a whole U+FFFD": ([bos, *tokenizer.encode("\ufffd", add_special_tokens=False), eos], are),
        "special token inside": ([*hi, euro[0], eos, euro[1]], [euro[2], *are]),
        "joined across": ([*hi, east[0], eos, east[1]], [*east[2:], *are]),
    }[case]
    if case == "joined across":
        assert [TokenBytes(tokenizer)(token) for token in east] == [b"\xe6\x9d", b"\xb1\xe4", b"\xba\xac"]
    shown = tokenizer.decode(context + generated, skip_special_tokens=False)
    whole = context[: len(context) - unfinished(tokenizer, context)]
    expected = shown[len(tokenizer.decode(whole, skip_special_tokens=False)):]
    # (Llama 2's decoding puts a space after a special token shown)
    assert expected.endswith(" are") and expected[:-4].strip(" ") in {"", "\ufffd", "\ufffd京"}
    assert streamed(tokenizer, context, generated) == decoded_whole(tokenizer, context, generated) == expected
