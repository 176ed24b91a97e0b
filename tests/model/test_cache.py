"""RetNetCache's bookkeeping: row selection, stacking and splitting, on hand-made states."""

import pytest
import torch

from retnet.model import RetNetCache


def test_an_empty_cache_splits_into_no_rows():
    cache = RetNetCache(2)
    assert cache.batch_size == 0
    assert cache.split() == []


def _filled(rows: int, layers: int = 2) -> RetNetCache:
    cache = RetNetCache(layers)
    cache.states = [torch.arange(rows * 6, dtype=torch.float32).view(rows, 1, 2, 3) + 100 * i for i in range(layers)]
    cache.offsets = torch.arange(rows, dtype=torch.long) + 3
    cache.seen_tokens = rows + 2
    return cache


def test_select_concat_split_and_reorder_keep_rows_and_offsets_together():
    cache = _filled(4)
    picked = cache.select([2, 0])
    assert picked.offsets.tolist() == [5, 3] and picked.seen_tokens == cache.seen_tokens
    assert torch.equal(picked.states[1], cache.states[1][[2, 0]])
    rows = cache.split()
    assert [r.seen_tokens for r in rows] == [3, 4, 5, 6]
    joined = RetNetCache.concat([rows[3], rows[1]])
    assert joined.offsets.tolist() == [6, 4] and joined.seen_tokens == 6
    assert torch.equal(joined.states[0], cache.states[0][[3, 1]])
    cache.reorder_cache(torch.tensor([1, 1, 0, 3]))
    assert cache.offsets.tolist() == [4, 4, 3, 6]
    assert torch.equal(cache.states[1][0], cache.states[1][1])


def test_select_takes_a_boolean_mask_as_a_mask():
    # torch.as_tensor(mask, dtype=long) would read True/False as the row indices 1/0
    cache = _filled(4)
    for mask in ([False, True, True, False], torch.tensor([False, True, True, False])):
        picked = cache.select(mask)
        assert picked.offsets.tolist() == [4, 5]
        assert torch.equal(picked.states[0], cache.states[0][1:3])
    with pytest.raises(ValueError, match=r"mask of 2 rows.*4 rows"):
        cache.select([True, False])


def test_concat_of_caches_of_other_models_or_dtypes_names_the_layer():
    """Rows of two models (other head sizes) or of two dtypes cannot share a batch: refused naming the layer and
    the shapes, not with torch.cat's message."""
    other = _filled(1)
    other.states = [state.reshape(1, 2, 1, 3) for state in other.states]  # another model's heads
    with pytest.raises(ValueError, match=r"layer 0's states are \[\(1, 2, 3\), \(2, 1, 3\)\] per row"):
        RetNetCache.concat([_filled(2), other])
    half = _filled(1)
    half.states = [state.half() for state in half.states]
    with pytest.raises(ValueError, match=r"concat needs caches of one model.*torch\.float16"):
        RetNetCache.concat([_filled(2), half])


def test_select_counts_negative_rows_from_the_end_and_refuses_what_is_no_row():
    # -1 raised a bare IndexError from index_select, and 0.5 selected row 0 (its integer part)
    cache = _filled(3)
    assert cache.select([-1, 0, -3]).offsets.tolist() == [5, 3, 3]
    assert torch.equal(cache.select(torch.tensor([-2])).states[0], cache.states[0][[1]])
    assert cache.select([]).batch_size == 0 and cache.select(2).offsets.tolist() == [5]
    for indices, message in [([0.5], r"integer row indices \(or a boolean mask\); got \[0\.5\]"),
                             (torch.tensor([1.0]), r"integer row indices .*got \[1\.0\]"),
                             ([3], "row index 3 for a cache of 3 rows"), ([0, -4], "row index -4 for a cache of 3"),
                             ([[0, 1]], r"a list of row indices; got shape \[1, 2\]")]:
        with pytest.raises(ValueError, match=message):
            cache.select(indices)
    picked = _filled(3)
    picked.batch_select_indices(torch.tensor([-1]))  # transformers' in-place form goes through select
    assert picked.offsets.tolist() == [5]


def test_select_takes_a_slice_as_python_does():
    # torch.as_tensor(slice(...)) raised "Could not infer dtype of slice"
    cache = _filled(4)
    assert cache.select(slice(1, 3)).offsets.tolist() == [4, 5]
    assert cache.select(slice(None, None, -2)).offsets.tolist() == [6, 4]
    assert torch.equal(cache.select(slice(-1, None)).states[0], cache.states[0][3:])
    assert cache.select(slice(9, 12)).batch_size == 0
