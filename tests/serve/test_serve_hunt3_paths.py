"""Serving core, third hunt: what the scheduler pays for its prefix cache."""

from __future__ import annotations

import random

from retnet.serve import state_cache
from retnet.serve.state_cache import PrefixCache


class _State:
    """A cached state as the prefix cache handles it (cloned on insert, counted by its bytes)."""

    def clone(self):
        return self

    def nbytes(self) -> int:
        return 1024


class _CountedKey(tuple):
    """A cache key that counts how often it is hashed (a tuple of token ids caches no hash: each hash is a pass
    over every token)."""

    hashes = 0

    def __hash__(self):
        _CountedKey.hashes += 1
        return super().__hash__()


def test_a_lookup_hashes_no_cached_prefix(monkeypatch):
    # The cache was an OrderedDict keyed by the prefixes' token tuples, and iterating its values looks every key
    # up again: each lookup hashed every cached prefix whole, on the scheduler's thread with the GIL held (64
    # entries of 8k tokens: ~6 ms for every prompt that arrived, whether or not one matched).
    monkeypatch.setattr(state_cache, "_key", lambda tokens, adapter, salt=None: _CountedKey(tokens))
    rng = random.Random(0)
    cache = PrefixCache(max_entries=64, max_bytes=1 << 30)
    shared = [rng.randrange(32000) for _ in range(50)]
    for i in range(32):  # prefixes of one long system prompt (they match up to their last token) ...
        cache.insert(shared + [i] * 4, _State(), None)
    for _ in range(32):  # ... and unrelated prompts
        cache.insert([rng.randrange(32000) for _ in range(54)], _State(), None)
    hit, miss = shared + [7] * 4 + [1, 2, 3], [rng.randrange(32000) for _ in range(57)]
    _CountedKey.hashes = 0
    for _ in range(32):
        assert cache.lookup(hit).tokens == tuple(shared + [7] * 4)
        assert cache.lookup(miss) is None
    # One hash per hit (the found entry moved to the end), none per entry looked at (old: 64 a lookup).
    assert _CountedKey.hashes <= 32 * 2
    # Still least recently used first: the entry found is the last one evicted.
    for i in range(63):
        cache.insert([10**6 + i] * 8, _State(), None)
    assert cache.lookup(hit).tokens == tuple(shared + [7] * 4)
    assert len(cache) == 64 and cache.evictions == 63
