"""Packed varlen prefill with a cache: several prompts, each continuing its own state, in one forward.

The server prefills a burst of prompts this way; it must give every prompt exactly what running it alone
would: the same last-token logits, per-layer states and positions, and the same continuation after.
"""

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from retnet.model import RetNetCache

MODES = ("parallel", "chunkwise", "auto")
# Odd, different lengths (none a multiple of the test model's chunk size of 8), and different histories: a
# 5-token prefix, none at all, a 9-token prefix.
PROMPT_LENGTHS = (13, 7, 21)
PREFIX_LENGTHS = (5, 0, 9)
DECODE_STEPS = 6


def _ids(length: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randint(2, 101, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)


def _history(model, length: int, seed: int, mode: str) -> RetNetCache:
    """A one-row cache after ``length`` tokens (a zero state at offset 0 when ``length`` is 0)."""
    device = model.device
    if length == 0:
        return RetNetCache.zeros(model.config, 1, device)
    return model(_ids(length, seed, device), use_cache=True, retention_mode=mode).cache


def _greedy(model, cache: RetNetCache, first: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` batched greedy recurrent steps from ``first`` ``[B]``: (tokens ``[B, steps]``, logits)."""
    tokens, logits = [first], []
    for _ in range(steps):
        out = model(tokens[-1][:, None], cache=cache, use_cache=True, retention_mode="recurrent")
        logits.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens[1:], dim=1), torch.stack(logits, dim=1)


def _packed_vs_alone(model, mode: str, alone: bool = True):
    """(each prompt run alone on its history: [(last logits, cache)], or [] without ``alone``; the packed run)."""
    prompts = [_ids(n, seed=100 + i, device=model.device) for i, n in enumerate(PROMPT_LENGTHS)]
    histories = [_history(model, n, seed=i, mode=mode) for i, n in enumerate(PREFIX_LENGTHS)]

    runs = []
    for prompt, history in zip(prompts, histories):
        if alone:
            out = model(prompt, cache=history.clone(), use_cache=True, retention_mode=mode)
            runs.append((out.logits[0, -1], out.cache))

    lengths = torch.tensor(PROMPT_LENGTHS)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(model.device)
    packed = model(torch.cat(prompts, dim=1), cache=RetNetCache.concat(histories), use_cache=True,
                   retention_mode=mode, cu_seqlens=cu_seqlens, logits_to_keep=cu_seqlens[1:] - 1)
    return runs, packed


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_packed_prefill_with_caches_equals_each_prompt_alone(tiny_model, mode):
    alone, packed = _packed_vs_alone(tiny_model, mode)
    assert packed.logits.shape == (1, len(PROMPT_LENGTHS), tiny_model.config.vocab_size)
    expected_offsets = [p + n for p, n in zip(PREFIX_LENGTHS, PROMPT_LENGTHS)]
    assert packed.cache.offsets.tolist() == expected_offsets
    assert packed.cache.seen_tokens == max(expected_offsets)
    rows = packed.cache.split()
    for i, ((logits, cache), row) in enumerate(zip(alone, rows)):
        torch.testing.assert_close(packed.logits[0, i], logits, rtol=0, atol=1e-5)
        assert row.offsets.tolist() == cache.offsets.tolist() == [expected_offsets[i]]
        for layer, (got, want) in enumerate(zip(row.states, cache.states)):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"prompt {i}, layer {layer}")


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_greedy_decoding_from_split_caches_equals_decoding_from_individual_prefills(tiny_model, mode):
    alone, packed = _packed_vs_alone(tiny_model, mode)
    first = packed.logits[0].argmax(-1)
    assert first.tolist() == [logits.argmax().item() for logits, _ in alone]
    # The split rows go back together into one decode batch, as the server's running batch takes them.
    batched_tokens, batched_logits = _greedy(tiny_model, RetNetCache.concat(packed.cache.split()), first,
                                             DECODE_STEPS)
    for i, (_, cache) in enumerate(alone):
        tokens, logits = _greedy(tiny_model, cache, first[i : i + 1], DECODE_STEPS)
        assert batched_tokens[i].tolist() == tokens[0].tolist()
        torch.testing.assert_close(batched_logits[i], logits[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_packed_prefill_into_an_empty_cache_starts_every_prompt_at_zero(tiny_model):
    prompts = [_ids(n, seed=n) for n in PROMPT_LENGTHS]
    cu_seqlens = torch.tensor([0, 13, 20, 41])
    packed = tiny_model(torch.cat(prompts, dim=1), use_cache=True, cu_seqlens=cu_seqlens,
                        logits_to_keep=cu_seqlens[1:] - 1, retention_mode="chunkwise")
    assert packed.cache.offsets.tolist() == list(PROMPT_LENGTHS)
    for i, (prompt, row) in enumerate(zip(prompts, packed.cache.split())):
        out = tiny_model(prompt, use_cache=True, retention_mode="chunkwise")
        torch.testing.assert_close(packed.logits[0, i], out.logits[0, -1], rtol=0, atol=1e-5)
        for got, want in zip(row.states, out.cache.states):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_packed_prefill_on_the_triton_kernels_matches_the_reference(tiny_model, monkeypatch):
    pytest.importorskip("triton")
    # the packed forward on the histories each backend gave (the tests above check the packed run against each prompt
    # run alone)
    # compiled on a GPU (Triton runs CPU tensors only interpreted), interpreted here
    model = copy.deepcopy(tiny_model).cuda() if torch.cuda.is_available() else tiny_model
    monkeypatch.setenv("RETNET_KERNELS", "torch")
    reference = _packed_vs_alone(model, "chunkwise", alone=False)[1]
    monkeypatch.setenv("RETNET_KERNELS", "triton")
    fast = _packed_vs_alone(model, "chunkwise", alone=False)[1]
    torch.testing.assert_close(fast.logits, reference.logits, rtol=1e-4, atol=1e-4)
    assert fast.cache.offsets.tolist() == reference.cache.offsets.tolist()
    for got, want in zip(fast.cache.states, reference.cache.states):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_zero_cache_rows_have_the_state_shape_and_offset_zero(tiny_model):
    config = tiny_model.config
    cache = RetNetCache.zeros(config, 3)
    assert cache.batch_size == 3 and cache.offsets.tolist() == [0, 0, 0] and cache.seen_tokens == 0
    shape = (3, config.num_attention_heads, config.head_dim, config.value_head_dim)
    assert all(s.shape == shape and s.dtype == torch.float32 and not s.any() for s in cache.states)


@torch.no_grad()
def test_packed_prefill_refuses_a_mask_a_wider_batch_and_a_cache_of_another_size(tiny_model):
    ids = _ids(12, seed=0)
    cu_seqlens = torch.tensor([0, 5, 12])
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(ids, attention_mask=torch.ones_like(ids), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match=r"B=1.*got B=2"):
        tiny_model(ids.expand(2, -1), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match=r"2 sequences.*2 rows.*got 3"):
        tiny_model(ids, cache=RetNetCache.zeros(tiny_model.config, 3), use_cache=True, cu_seqlens=cu_seqlens)


class _HostReads(TorchDispatchMode):
    """Counts what reads a tensor's values back to the host (a device sync on a GPU): item/int/bool, ops whose
    output size depends on the data, and (patched in by :func:`_count_host_reads`) ``tolist``."""

    SIZED_BY_DATA = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        self.count += (
            func is aten._local_scalar_dense.default
            or func in self.SIZED_BY_DATA
            or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None)
            or (func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]))
        )
        return func(*args, **kwargs)


@contextlib.contextmanager
def _count_host_reads(monkeypatch):
    reads = _HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        reads.count += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with reads:
        yield reads
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent", "auto"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_a_packed_forward_reads_cu_seqlens_back_a_bounded_number_of_times(model_factory, monkeypatch, mode,
                                                                          use_cache):
    """Each layer's ops read cu_seqlens to the host to check it and size their work (three device syncs a layer
    on a GPU): they now share one read per forward, so the count does not grow with the depth."""
    ids = torch.cat([_ids(n, seed=n) for n in PROMPT_LENGTHS], dim=1)
    counts = {}
    for layers in (1, 4):
        model = model_factory(num_hidden_layers=layers)
        cu_seqlens = torch.tensor([0, 13, 20, 41])
        with torch.no_grad(), _count_host_reads(monkeypatch) as reads:
            model(ids, cu_seqlens=cu_seqlens, retention_mode=mode, use_cache=use_cache)
        counts[layers] = reads.count
    assert counts[1] == counts[4] <= 2, counts  # (with a cache, one more: the longest row's offset)


def test_a_checkpointed_packed_training_step_reads_cu_seqlens_back_a_bounded_number_of_times(model_factory,
                                                                                                monkeypatch):
    """Gradient checkpointing runs each layer again in backward: it shares the forward's read too."""
    ids = torch.cat([_ids(n, seed=n) for n in PROMPT_LENGTHS], dim=1)
    counts, grads = {}, {}
    for layers in (1, 4):
        model = model_factory(num_hidden_layers=layers).train()
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        cu_seqlens = torch.tensor([0, 13, 20, 41])
        with _count_host_reads(monkeypatch) as reads:
            model(ids, labels=ids, cu_seqlens=cu_seqlens, retention_mode="chunkwise").loss.backward()
        counts[layers] = reads.count
        grads[layers] = model.model.embed_tokens.weight.grad
    assert counts[1] == counts[4] <= 2, counts
    # unchanged results: the same step without checkpointing
    plain = model_factory(num_hidden_layers=4).train()
    plain(ids, labels=ids, cu_seqlens=torch.tensor([0, 13, 20, 41]), retention_mode="chunkwise").loss.backward()
    torch.testing.assert_close(grads[4], plain.model.embed_tokens.weight.grad, rtol=1e-5, atol=1e-7)


@torch.no_grad()
def test_cu_seqlens_written_in_place_between_forwards_is_checked_again(tiny_model):
    ids = _ids(12, seed=0)
    cu_seqlens = torch.tensor([0, 5, 12])
    first = tiny_model(ids, cu_seqlens=cu_seqlens).logits
    cu_seqlens[1] = 7  # still valid: other documents, other logits
    second = tiny_model(ids, cu_seqlens=cu_seqlens).logits
    alone = torch.cat([tiny_model(ids[:, :7]).logits, tiny_model(ids[:, 7:]).logits], dim=1)
    torch.testing.assert_close(second, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)
    cu_seqlens[2] = 11  # no longer ends at T
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, never decrease and end at T=12; got \[0, 7, 11\]"):
        tiny_model(ids, cu_seqlens=cu_seqlens)
