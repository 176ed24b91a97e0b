"""The pieces without a server: stop strings, incremental detokenisation, the sampler, the state caches."""

import math

import pytest
import torch

from retnet.model import RetNetCache
from retnet.serve.detokenize import IncrementalDetokenizer, StopStrings, unfinished_character
from retnet.serve.sampling import RowSampler, SamplingParams, sample_step
from retnet.serve.sequence import RequestHandle
from retnet.serve.state_cache import PrefixCache, PrefixEntry, SessionBusy, SessionStore


def feed(stops, pieces):
    s = StopStrings(stops)
    out = "".join(s.push(p) for p in pieces)
    return out + ("" if s.stopped else s.flush()), s.stopped


def test_stop_string_split_across_pieces_is_never_emitted():
    assert feed(["END"], ["abc E", "N", "D more"]) == ("abc ", True)
    assert feed(["\n\n"], ["line\n", "\nnext"]) == ("line", True)


def test_held_back_prefix_is_released_when_it_does_not_complete():
    s = StopStrings(["STOP"])
    assert s.push("go ST") == "go "  # "ST" could begin STOP
    assert s.push("AR") == "STAR"
    assert not s.stopped


def test_earliest_of_several_stops_wins():
    assert feed(["yz", "b"], ["a", "bcxyz"]) == ("a", True)


def test_the_stop_that_completes_first_wins_however_the_text_is_split():
    # "bc" is complete at "abc", before "abcd" is: the cut must not depend on whether "abcd" came as one
    # token or several.
    for pieces in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        s = StopStrings(["abcd", "bc"])
        out = ""
        for piece in pieces:
            out += s.push(piece)
            if s.stopped:
                break
        assert (out, s.stopped) == ("a", True), pieces


def test_incremental_detokenizer_matches_full_decode(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Unicode: café, 東京 🙂 and def add(a, b):\n    return a + b"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(lambda x: tok.decode(x, skip_special_tokens=True))
    streamed = "".join(detok.push(i) for i in ids) + detok.flush()
    assert streamed == text


def test_unfinished_character_is_a_valid_beginning_at_the_end():
    assert unfinished_character("Hello €".encode()[:-1]) == b"\xe2\x82"
    assert unfinished_character("🙂".encode()[:3]) == b"\xf0\x9f\x99"
    assert unfinished_character(b"\x82\xe2") == b"\xe2"  # a stray continuation byte, then a beginning
    for whole_or_broken in (b"", b"ok", "€".encode(), b"\xff", b"\xe2\x41", b"\xe0\x80"):
        assert unfinished_character(whole_or_broken) == b"", whole_or_broken


def test_a_context_ending_inside_a_character_leaves_it_to_the_next_tokens(model_dir):
    # A prompt of token ids may end anywhere; byte-level tokens may also end one character and begin the next
    # ("±ä": the end of 東, the start of 京). Wherever it is cut, the text shown for the prompt (without its
    # unfinished tail) plus the text the tokens after it stream is the whole text, with no U+FFFD.
    engine = standalone_engine(model_dir)
    text = "a 東京 🙂 and €5"
    ids = engine.tokenizer.encode(text)
    held = [engine.unfinished_tail(ids[:cut]) for cut in range(len(ids) + 1)]
    assert max(held) >= 2 and held[0] == held[-1] == 0
    for cut in range(len(ids) + 1):
        detok = IncrementalDetokenizer(engine._decode, ids[:cut], unfinished=held[cut])
        shown = engine._decode(ids[: cut - held[cut]])
        streamed = "".join(detok.push(t) for t in ids[cut:]) + detok.flush()
        assert shown + streamed == text and "\ufffd" not in shown, (cut, shown, streamed)


def test_token_bytes_and_labels_for_a_character_split_across_tokens(model_dir):
    from transformers import AutoTokenizer

    from retnet.tokenization import TokenBytes, characters_started

    tok = AutoTokenizer.from_pretrained(model_dir)
    token_bytes = TokenBytes(tok)
    text = "naïve 中文 🙂 ok"  # 中文 is not in the tokenizer's corpus: its bytes are separate tokens
    ids = tok.encode(text)
    assert b"".join(token_bytes(i) for i in ids) == text.encode("utf-8")
    assert sum(characters_started(token_bytes(i)) for i in ids) == len(text)
    labels = [token_bytes.label(i) for i in ids]
    assert "bytes:\\xe4" in labels and "bytes:\\xb8" in labels  # the three bytes of 中: e4 b8 ad
    assert all("\ufffd" not in label for label in labels)
    assert token_bytes.label(tok.eos_token_id) == tok.eos_token


def test_token_bytes_of_a_sentencepiece_byte_fallback_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from retnet.tokenization import TokenBytes

    vocab = {"<unk>": 0, "▁hi": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    token_bytes = TokenBytes(tok)
    assert token_bytes(2 + 0xE4) == b"\xe4" and token_bytes.label(2 + 0xE4) == "bytes:\\xe4"
    assert token_bytes(1) == b" hi" and token_bytes.label(1) == " hi"


def test_sampler_is_row_independent_and_seeded():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.01, seed=7)
    alone = [sample_step(logits[i : i + 1], [RowSampler(params, [], 50)]).tokens[0] for i in range(4)]
    together = sample_step(logits, [RowSampler(params, [], 50) for _ in range(4)]).tokens
    assert alone == together


def test_a_seeded_row_samples_the_same_next_to_a_row_that_truncates():
    # One request without top_p/top_k/min_p, batched with one that uses top_p: same seed, same tokens.
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    truncating = SamplingParams(temperature=1.0, top_p=0.5, seed=5)
    for seed in range(10):
        plain = SamplingParams(temperature=1.0, seed=seed)
        alone = sample_step(logits[:1], [RowSampler(plain, [], 50)]).tokens[0]
        together = sample_step(logits, [RowSampler(plain, [], 50), RowSampler(truncating, [], 50)]).tokens
        assert together[0] == alone, seed
        assert together[1] == sample_step(logits[1:], [RowSampler(truncating, [], 50)]).tokens[0]


def test_truncation_candidates_settle_a_row_only_when_its_rules_drop_the_next_token():
    """A truncating row draws from its most probable tokens (TRUNCATION_CANDIDATES, and one more) when its rules drop
    that one more (so all after it); otherwise from more, or its whole vocabulary sorted."""
    from retnet.serve.sampling import _kept

    top_three = torch.tensor([[0.5, 0.25, 0.125]])  # of a vocabulary of 4: 0.5, 0.25, 0.125, 0.125
    for params, settled in ((SamplingParams(top_p=0.75), True), (SamplingParams(top_p=0.7500001), False),
                            (SamplingParams(top_k=2), True), (SamplingParams(top_k=3), False),
                            (SamplingParams(min_p=0.3), True), (SamplingParams(min_p=0.25), False),
                            # top_k 3 renormalises over a fourth token the three do not hold: unknown mass
                            (SamplingParams(top_k=3, top_p=0.1), False), (SamplingParams(min_p=0.3, top_p=0.9), True),
                            (SamplingParams(top_k=2, top_p=0.9), True)):
        keep, done = _kept(top_three, [params], vocab=4)
        assert done.tolist() == [settled], params
    keep, done = _kept(torch.tensor([[0.5, 0.25, 0.125, 0.125]]), [SamplingParams(top_p=0.8)], vocab=4)
    assert done.tolist() == [True] and keep.tolist() == [[True, True, True, False]]


def test_rows_on_the_candidates_and_sorted_rows_sample_the_same_alone_or_together():
    torch.manual_seed(0)
    vocab = 9000  # the 64 and the 1024 candidates both taken (a vocabulary of 8 times them at least)
    logits = torch.randn(5, vocab) * torch.tensor([[3.0], [0.01], [3.0], [1.0], [1.0]])
    settings = [SamplingParams(top_k=20, seed=1), SamplingParams(top_p=0.99, seed=2),  # 64 candidates; sorted
                SamplingParams(top_p=0.5, min_p=0.05, seed=3), SamplingParams(seed=4),
                SamplingParams(top_p=0.2, seed=5)]  # 1024 candidates
    for step in range(5):
        alone = [sample_step(logits[i : i + 1], [RowSampler(settings[i], [], vocab)]).tokens[0] for i in range(5)]
        together = sample_step(logits, [RowSampler(params, [], vocab) for params in settings]).tokens
        assert together == alone, step
        logits = logits.roll(7, -1)


def test_a_long_sorted_row_keeps_the_same_tokens_alone_or_in_a_batch_on_two_threads():
    """top_p's renormalising total is the row's own: a sum over a row of 32k tokens or more is split between
    threads, rounded apart from the same row's sum in a batch, which moved top_p's cut at a boundary."""
    from retnet.serve.sampling import _kept

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vocab = 50_000
        for seed in range(3):
            torch.manual_seed(seed)
            probs = torch.randn(2, vocab).softmax(-1).sort(-1, descending=True).values
            kept = probs[:1] * (torch.arange(vocab) < 40_000)
            mass_before = (kept / kept.cumsum(-1)[:, -1:]).cumsum(-1) - kept / kept.cumsum(-1)[:, -1:]
            for rank in (5_000, 10_000, 20_000, 30_000):  # top_p exactly at a token's mass before it
                params = SamplingParams(top_k=40_000, top_p=mass_before[0, rank].item())
                alone, _ = _kept(probs[:1], [params], vocab)
                paired, _ = _kept(probs, [params, SamplingParams(top_k=30_000, top_p=0.999)], vocab)
                assert torch.equal(alone[0], paired[0]), (seed, rank)
    finally:
        torch.set_num_threads(threads)


def test_top_k_one_is_greedy_and_penalties_change_the_choice():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    assert sample_step(logits, [RowSampler(SamplingParams(top_k=1, seed=1), [], 4)]).tokens == [1]
    row = RowSampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), [1], 4)
    assert sample_step(logits, [row]).tokens == [2]  # token 1 was in the prompt: 5.0 / 2 < 4.9
    row = RowSampler(SamplingParams(temperature=0.0, frequency_penalty=2.0), [], 4)
    assert [sample_step(logits, [row]).tokens[0] for _ in range(2)] == [1, 2]


def test_top_p_applies_to_what_top_k_kept():
    # vLLM's and transformers' order: top_k first, then top_p over the renormalised top-k distribution.
    # Probabilities 0.3, 0.2 and 0.1 x 5: the top 2 renormalised are 0.6, 0.4, so top_p 0.5 keeps only the
    # first; measured against the whole distribution (0.3 < 0.5) it would keep the second as well.
    logits = torch.tensor([[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]]).log()
    rows = [RowSampler(SamplingParams(temperature=1.0, top_k=2, top_p=0.5, seed=seed), [], 7) for seed in range(32)]
    assert sample_step(logits.repeat(32, 1), rows).tokens == [0] * 32
    # Without top_k, top_p alone measures the whole distribution: 0.3 < 0.5 keeps the second (and no more).
    rows = [RowSampler(SamplingParams(temperature=1.0, top_p=0.5, seed=seed), [], 7) for seed in range(32)]
    assert set(sample_step(logits.repeat(32, 1), rows).tokens) == {0, 1}


def test_top_p_applies_to_what_min_p_kept():
    # vLLM's (V1) order: min_p first, then top_k and top_p over the renormalised distribution they kept.
    # Probabilities 0.5, 0.3 and 0.2: min_p 0.5 keeps 0.5 and 0.3 (>= 0.25), renormalised 0.625 and 0.375, so top_p
    # 0.6 keeps only the first; measured against the whole distribution (0.5 < 0.6) it would keep the second too.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    rows = [RowSampler(SamplingParams(temperature=1.0, min_p=0.5, top_p=0.6, seed=seed), [], 3) for seed in range(32)]
    assert sample_step(logits.repeat(32, 1), rows).tokens == [0] * 32
    rows = [RowSampler(SamplingParams(temperature=1.0, min_p=0.5, seed=seed), [], 3) for seed in range(32)]
    assert set(sample_step(logits.repeat(32, 1), rows).tokens) == {0, 1}


def test_a_vanishing_temperature_is_greedy():
    """1e-40 would overflow logits / temperature to inf and softmax to NaN (which sampled the last token)."""
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    for temperature in (1e-40, 1e-6):
        rows = [RowSampler(SamplingParams(temperature=temperature, seed=seed), [], 4) for seed in range(8)]
        assert sample_step(logits.repeat(8, 1), rows).tokens == [1] * 8


def test_min_tokens_masks_only_its_own_rows_and_only_until_then():
    # Row 0 bans tokens 1 and 2 (its stop tokens) for 2 tokens, with a repetition penalty (which clamps
    # logits) and a sampled draw; row 1, the same logits unbanned, is untouched and samples as it would alone.
    logits = torch.tensor([[0.0, 9.0, 8.0, -1.0]]).repeat(2, 1)
    ban = torch.tensor([1, 2])
    banned = RowSampler(SamplingParams(temperature=0.0, repetition_penalty=1.5, min_tokens=2), [1], 4, ban_ids=ban)
    free = SamplingParams(temperature=1.0, seed=3)
    alone = RowSampler(free, [], 4)
    expected = [sample_step(logits[1:], [alone]).tokens[0] for _ in range(3)]
    row = RowSampler(free, [], 4)
    steps = [sample_step(logits, [banned, row]).tokens for _ in range(3)]
    # Step 3 is free of the ban: 2, as token 1 (in the prompt) is penalised below it.
    assert [s[0] for s in steps] == [0, 0, 2] and [s[1] for s in steps] == expected
    sampled = [RowSampler(SamplingParams(temperature=2.0, seed=s, min_tokens=1), [], 4, ban_ids=ban)
               for s in range(16)]
    assert not {1, 2} & set(sample_step(logits[:1].repeat(16, 1), sampled).tokens)
    # min_tokens 0, or nothing to ban: the row is not touched at all.
    assert not RowSampler(SamplingParams(min_tokens=0), [], 4, ban_ids=ban).adjusts
    assert not RowSampler(SamplingParams(min_tokens=3), [], 4, ban_ids=torch.tensor([], dtype=torch.long)).adjusts


def test_an_included_stop_string_ends_the_text_however_it_is_split():
    for pieces in (["x ENDy"], ["x E", "N", "Dy z"], ["x ", "END", "y"]):
        s = StopStrings(["END"], include=True)
        out = ""
        for piece in pieces:
            out += s.push(piece)
            if s.stopped:
                break
        assert (out, s.stopped) == ("x END", True), pieces  # what followed it in the same piece is dropped


def test_allowed_tokens_and_bad_words_mask_only_their_own_rows():
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, -1.0]]).repeat(3, 1)
    blocked = torch.tensor([True, True, False, False, True])  # allowed: 2 and 3
    free = SamplingParams(temperature=1.0, seed=4)
    alone = RowSampler(free, [], 5)
    expected = [sample_step(logits[2:], [alone]).tokens[0] for _ in range(4)]
    # Row 0: allowed 2 and 3, greedy, +20 on the disallowed 4. Row 1: bad word [1, 1] (a 1 banned right
    # after a 1) and the single-token bad word 3 (in its mask). Row 2: untouched, samples as it would alone.
    allowed = RowSampler(SamplingParams(temperature=0.0, logit_bias={4: 20.0}), [1, 1], 5, blocked=blocked)
    bad = RowSampler(SamplingParams(temperature=0.0, bad_words_ids=[[1, 1], [3]]), [1], 5,
                     blocked=torch.tensor([False, False, False, True, False]))
    row = RowSampler(free, [], 5)
    steps = [sample_step(logits, [allowed, bad, row]).tokens for _ in range(4)]
    assert [s[0] for s in steps] == [2] * 4 and [s[2] for s in steps] == expected
    # The prompt's last 1 bans nothing (only the output is matched); then each 1 bans the next.
    assert [s[1] for s in steps] == [1, 2, 1, 2]
    # The multi-token ban yields when it would leave no token at all (the mask leaves only 1).
    only_one = torch.tensor([True, False, True, True, True])
    cornered = RowSampler(SamplingParams(temperature=1.0, seed=1, bad_words_ids=[[1, 1]]), [], 5, blocked=only_one)
    assert [sample_step(logits[:1], [cornered]).tokens[0] for _ in range(3)] == [1, 1, 1]


def test_stop_strings_are_not_looked_for_in_unsearched_text():
    s = StopStrings(["ab"])
    assert s.push("xab", search=False) == "xab" and not s.stopped
    assert s.push("c", search=False) == "c"
    # A stop wholly in the unsearched text is not found after it; one wholly after it is.
    assert s.push("b") == "b" and not s.stopped
    assert s.push("cab") == "c" and s.stopped


def test_a_stop_string_straddling_the_min_tokens_text_is_found():
    """vLLM finds a stop that starts in the first min_tokens tokens' text and ends after it: its start is held
    back, not released unsearched."""
    s = StopStrings(["abc"])
    assert s.push("xa", search=False) == "x"
    assert s.push("b", search=False) == ""
    assert s.push("c") == "" and s.stopped and s.text == "x"
    s = StopStrings(["abc"], include=True)
    assert s.push("xab", search=False) == "x"
    assert s.push("cz") == "abc" and s.stopped
    # A held start that does not become the stop is released once it cannot.
    s = StopStrings(["abc"])
    assert s.push("xab", search=False) == "x"
    assert s.push("d") == "abd" and not s.stopped
    assert s.flush() == ""


def _row_cache(value: float) -> RetNetCache:
    cache = RetNetCache(1)
    cache.states = [torch.full((1, 2, 2, 2), value)]
    cache.offsets = torch.tensor([3])
    return cache


def test_prefix_cache_longest_match_and_lru_bound():
    cache = PrefixCache(max_entries=2, max_bytes=1 << 20)
    cache.insert([1, 2], _row_cache(1), None)
    cache.insert([1, 2, 3, 4], _row_cache(2), torch.zeros(5))
    assert cache.lookup([1, 2, 3, 4, 5]).tokens == (1, 2, 3, 4)
    assert cache.lookup([1, 2, 9]).tokens == (1, 2)
    assert cache.lookup([7]) is None
    cache.insert([5, 6], _row_cache(3), None)  # evicts the least recently used, (1, 2, 3, 4)
    assert cache.lookup([1, 2, 3, 4]).tokens == (1, 2)


def _entry_bytes(entry) -> int:
    """Every tensor a prefix entry keeps alive, counted here independently of the cache's own bookkeeping."""
    tensors = [*entry.cache.states, entry.cache.offsets, entry.logits]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def test_the_prefix_cache_byte_limit_counts_the_logits_each_entry_holds():
    # An entry keeps the [V] logits after its prefix besides its state; with a real vocabulary they outweigh
    # a small model's state, and a limit that counted the state alone was overrun many times over.
    logits = torch.zeros(1000)  # 4000 bytes, against the state's 32 and its offsets' 8
    full = _entry_bytes(PrefixEntry((), _row_cache(0), logits, 0))
    cache = PrefixCache(max_entries=100, max_bytes=3 * full)
    for i in range(10):
        cache.insert([i, i + 1], _row_cache(i), logits)
    assert len(cache) == 3 and list(cache.entries) == [(7, 8), (8, 9), (9, 10)]
    assert cache.nbytes == sum(_entry_bytes(e) for e in cache.entries.values()) <= cache.max_bytes

    # Logits given later to an entry that had none grow it, and what no longer fits is evicted.
    state_only = _entry_bytes(PrefixEntry((), _row_cache(0), None, 0))
    cache = PrefixCache(max_entries=100, max_bytes=full + state_only)
    cache.insert([1, 2], _row_cache(1), None)
    cache.insert([3, 4], _row_cache(2), None)
    cache.insert([1, 2], _row_cache(1), logits)
    assert len(cache) == 2 and cache.nbytes == full + state_only
    cache.insert([3, 4], _row_cache(2), logits)
    assert list(cache.entries) == [(3, 4)] and cache.entries[(3, 4)].logits is not None
    assert cache.nbytes == sum(_entry_bytes(e) for e in cache.entries.values()) <= cache.max_bytes
    # An entry that could never fit is refused whole.
    tiny = PrefixCache(max_entries=1, max_bytes=full - 1)
    tiny.insert([1, 2], _row_cache(1), logits)
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_sessions_busy_ttl_and_count_bound():
    store = SessionStore(max_sessions=1, max_bytes=1 << 20, ttl_s=60)
    session = store.acquire("a")
    try:
        store.acquire("a")
        raise AssertionError("a busy session must be refused")
    except SessionBusy:
        pass
    store.release("a", _row_cache(1), [5], tokens=3)
    assert store.acquire("a").pending == [5]
    store.release("a")
    store.acquire("b")
    store.release("b", _row_cache(2), [6], tokens=2)
    assert list(store.sessions) == ["b"]  # bounded to one: "a" evicted
    store.ttl_s = 0.0
    assert store.acquire("b").cache is None  # expired: starts afresh
    assert session is not None


class LateCancel(RequestHandle):
    """A request whose ``cancelled`` turns true at its ``cancel_at``-th look: a cancel from the event loop
    landing at a chosen point of a scheduler iteration (see :func:`cancel_late`)."""

    @property
    def cancelled(self):
        self.looks += 1
        return self.looks >= self.cancel_at

    @cancelled.setter
    def cancelled(self, value):
        pass


def cancel_late(handle: RequestHandle, cancel_at: int) -> None:
    handle.__class__, handle.looks, handle.cancel_at = LateCancel, 0, cancel_at


def standalone_engine(model_dir):
    """An engine whose scheduler the test drives itself (no thread): ``engine._iteration()``."""
    from transformers import AutoTokenizer

    from retnet.model import RetNetForCausalLM
    from retnet.serve.engine import Engine
    from retnet.serve.metrics import ServeMetrics
    from retnet.serve.settings import ServeSettings

    engine = Engine(ServeSettings(model=str(model_dir)), AutoTokenizer.from_pretrained(model_dir), ServeMetrics(),
                    model=RetNetForCausalLM.from_pretrained(model_dir))
    engine._load()
    engine.ready = True
    return engine


@pytest.mark.anyio
async def test_a_cancel_landing_anywhere_in_an_iteration_frees_the_slot_once(model_dir):
    # The event loop cancels while the scheduler thread runs: wherever the flag turns on, one release.
    engine = standalone_engine(model_dir)
    for cancel_at in range(1, 16):
        handle = engine.submit([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        cancel_late(handle, cancel_at)
        with torch.inference_mode():
            while engine.waiting or engine.prefilling or engine.joining or engine.running:
                engine._iteration()
        assert engine.in_system == 0, cancel_at


@pytest.mark.anyio
async def test_a_request_submitted_as_the_engine_dies_is_refused_not_left_hanging(model_dir):
    from retnet.serve.sequence import EngineUnavailable

    engine = standalone_engine(model_dir)
    lock = engine.cond

    class DiesWhileWaitedFor:
        """The scheduler thread dies (and fails every queued request) just before submit gets the lock."""

        def __enter__(self):
            engine.cond = lock
            engine.failure = "simulated"
            engine._fail_all(engine.dead)
            return lock.__enter__()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)

    engine.cond = DiesWhileWaitedFor()
    with pytest.raises(EngineUnavailable):
        engine.submit([[5, 6, 7]], SamplingParams(max_tokens=2))
    assert not engine.waiting and engine.in_system == 0


def test_api_keys_from_the_environment_as_a_comma_list_or_json(monkeypatch):
    from retnet.serve.settings import ServeSettings

    for value, keys in (("k1,k2", ["k1", "k2"]), ("k1", ["k1"]), ('["k1", "k2"]', ["k1", "k2"])):
        monkeypatch.setenv("RETNET_API_KEYS", value)
        assert ServeSettings(model="x").api_keys == keys
    monkeypatch.delenv("RETNET_API_KEYS")
    assert ServeSettings(model="x", api_keys="a, b").api_keys == ["a", "b"]  # the --api-keys flag


def test_default_max_tokens_never_exceeds_the_limit():
    # Over the limit, every request that left out max_tokens was refused, naming a field it never sent.
    from retnet.serve.settings import ServeSettings

    assert ServeSettings(model="x", max_tokens_limit=100).default_max_tokens == 100  # follows a lowered limit
    assert ServeSettings(model="x", max_tokens_limit=100, default_max_tokens=50).default_max_tokens == 50
    with pytest.raises(ValueError, match=r"default_max_tokens \(--default-max-tokens\) must be <= "
                       r"max_tokens_limit \(--max-tokens-limit, 100\); got 200"):
        ServeSettings(model="x", max_tokens_limit=100, default_max_tokens=200)


def test_a_steps_outputs_reach_every_request_with_one_wake_up_of_the_loop():
    # Each call_soon_threadsafe writes the loop's self-pipe: a decode step of 64 streams did it 64 times.
    import asyncio

    from retnet.serve.sequence import emit_all

    async def main():
        loop = asyncio.get_running_loop()
        wake_ups = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: wake_ups.append(args) or original(*args)
        handles = [RequestHandle(loop, 1) for _ in range(3)]
        emit_all([(handle, [f"step1-{i}"]) for i, handle in enumerate(handles)])
        emit_all([(handles[0], ["step2"])])
        await asyncio.sleep(0)
        received = [[handle.queue.get_nowait() for _ in range(handle.queue.qsize())] for handle in handles]
        return len(wake_ups), received

    wake_ups, received = asyncio.run(main())
    assert wake_ups == 2
    assert received == [[["step1-0"], ["step2"]], [["step1-1"]], [["step1-2"]]]


@pytest.mark.parametrize("temperature", [0.0, 1e-5, 1.0])
def test_an_extreme_repetition_penalty_stays_finite(temperature):
    # 5 / 1e-38 is past fp32's range: inf logits made softmax NaN (and the multinomial draw fail).
    params = SamplingParams(repetition_penalty=1e-38, temperature=temperature, seed=0, logprobs=0)
    row = RowSampler(params, prompt_ids=[3, 4], vocab_size=8)
    logits = torch.tensor([[0.5, 1.0, 2.0, 5.0, -4.0, 0.0, 1.5, 0.1]])
    sample = sample_step(logits, [row])
    assert sample.tokens == [3]  # the seen positive logit, multiplied up
    assert all(math.isfinite(value) for value in sample.logprobs)
