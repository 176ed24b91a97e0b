"""fp32 PyTorch references for retention, in its three equivalent forms.

All three share one signature and layout with the Triton ops in ``chunk.py`` / ``recurrent.py``, and their
input rules (``checks.py``: a call one path refuses, the other refuses with the same error):

    q, k: [B, T, H, K]    v: [B, T, H, V]    log_decay: [H] (natural log of γ_h, float32, < 0)
    initial_state / final_state: [B, H, K, V] float32 (or [N, H, K, V] with ``cu_seqlens``)

The recurrence they all compute is

    S_t = γ · S_{t-1} + k_tᵀ v_t,        o_t = scale · q_t S_t,        scale = K^-1/2 by default.

The decay is kept in log space and only exponentiated as ``exp(n · log γ)`` for a distance n, because
γ = 1 - 2^(-5-h) rounds to exactly 1.0 in bf16 from head 4 (and in fp32 from head 20): a decay mask
built from a rounded γ would stop decaying, and one built in low precision leaks future tokens.
No row stabiliser is applied: the per-head norm that follows retention in the model would cancel it.

They compute in fp32 under autocast too (it is turned off inside them): autocast would otherwise run their
matmuls in bf16/fp16 and hand back a low-precision final state, where the state is fp32 everywhere (the
model's cache keeps it, and decoding adds to it token by token).
"""

from __future__ import annotations

import functools
import itertools

import torch

from retnet.kernels.checks import (
    check_chunk_size,
    check_inputs,
    contents_mark,
    host_offsets,
    shares_host_offsets,
    unchanged_since,
    usable_log_decay,
)

# Padding the packed sequences into one batch does at most this many times the packed row's work; beyond
# it (one long document among many short ones) they run one by one.
MAX_PADDING_FACTOR = 2.0


def _fp32(op):
    """Run a reference op with autocast off on q's device: its ``.float()`` inputs then stay fp32 through every
    matmul, and its final state is fp32 as documented (under CPU or CUDA autocast a matmul would return bf16)."""

    @functools.wraps(op)
    def wrapper(q, *args, **kwargs):
        # (a non-tensor q goes on to the input rules' ValueError; a device autocast does not know, "meta" say,
        # has no autocast to turn off)
        device_type = q.device.type if isinstance(q, torch.Tensor) else None
        if (device_type is None or not _autocast_available(device_type)
                or not torch.is_autocast_enabled(device_type)):
            return op(q, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return op(q, *args, **kwargs)

    return wrapper


_AUTOCAST_AVAILABLE: dict[str, bool] = {}


def _autocast_available(device_type: str) -> bool:
    """Whether torch has an autocast for ``device_type``: fixed per device type, so asked once rather than on
    every op call (a decode step makes one per layer). A dict rather than ``functools.cache``, which dynamo
    traces through with a warning under ``torch.compile``."""
    if torch.compiler.is_compiling():  # traced: the store below would fail the dict's guard on the next call
        return torch.amp.is_autocast_available(device_type)
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return available


# The shapes below come from cu_seqlens' values: under torch.compile every batch would be a new graph with
# new dynamic shapes (and inductor fails on them), so varlen always runs eagerly.
@torch.compiler.disable
def _varlen(form, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, **kw):
    """Run ``form`` on the N sequences packed into a varlen row (B=1): as one right-padded batch when that
    wastes little, else one by one."""
    host = host_offsets(cu_seqlens)  # read once per forward (checks.SharedHostOffsets), not per layer
    log_decay = usable_log_decay(log_decay)  # (γ = 0: the padded batch's final states form 0 · ln γ)
    count, longest = len(host.offsets) - 1, host.longest
    if count > 1 and longest > 0 and count * longest <= MAX_PADDING_FACTOR * q.shape[1]:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        return _padded_batch(form, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens,
                             lengths, longest, **kw)
    return _per_sequence(form, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, **kw)


def _padded_batch(form, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, lengths,
                  longest, **kw):
    """The packed sequences as a ``[N, longest]`` batch padded on the right: a causal output never sees the
    padding after it, so the outputs are exact. The padding would decay the final states, so those are formed
    directly: ``S_n = γ^{L_n} S0_n + Σ_{s < L_n} γ^{L_n − 1 − s} k_sᵀ v_s``."""
    steps = torch.arange(longest, device=q.device)
    valid = steps[None] < lengths[:, None]  # [N, longest]
    rows = (cu_seqlens[:-1].long()[:, None] + steps[None]).clamp(max=q.shape[1] - 1)
    # The padding repeats real tokens (the next sequence's): set to 0, not multiplied by a 0/1 mask, so that an inf
    # or NaN there (0 · inf) stays out of the other sequences' outputs, final states and gradients, as unpacked.
    padding = ~valid[..., None, None]
    qb, kb, vb = (x[0][rows].masked_fill(padding, 0) for x in (q, k, v))
    o, _ = form(qb, kb, vb, log_decay, scale, initial_state, False, **kw)
    # Each packed token's place in the padded [N · longest] rows (segments are contiguous and in order). Not
    # o[valid]: a boolean index sizes its output from the data, a device sync per layer.
    length = q.shape[1]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths, output_size=length)
    token = torch.arange(length, device=q.device)
    out = o.flatten(0, 1).index_select(0, segment * longest + token - cu_seqlens[:-1].long()[segment])[None]
    if not output_final_state:
        return out, None
    to_end = (lengths[:, None] - 1 - steps[None]).clamp(min=0).float()
    weights = torch.exp(to_end[..., None] * log_decay.float()) * valid[..., None]  # [N, longest, H]
    final = torch.einsum("nlh,nlhk,nlhv->nhkv", weights, kb.float(), vb.float())
    if initial_state is not None:
        through = torch.exp(lengths.float()[:, None] * log_decay.float())  # [N, H]
        final = final + through[..., None, None] * initial_state.float()
    return out, final


def _per_sequence(form, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, **kw):
    """Run ``form`` on each packed sequence of a varlen batch (B=1) and stitch the results."""
    outputs, states = [], []
    bounds = host_offsets(cu_seqlens).offsets
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, s = form(q[:, start:end], k[:, start:end], v[:, start:end], log_decay, scale, h0, True, **kw)
        outputs.append(o)
        states.append(s)
    if not outputs:  # cu_seqlens = [0]: no sequences, an empty row and no states (torch.cat refuses [])
        # The empty row as the form gives it unpacked, and the states as given: both in the graph of the inputs.
        o, _ = form(q, k, v, log_decay, scale, None, False, **kw)
        if not output_final_state:
            return o, None
        if initial_state is not None:
            return o, initial_state.to(torch.float32, copy=True)
        return o, q.new_zeros(0, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
    final = torch.cat(states) if output_final_state else None
    return torch.cat(outputs, dim=1), final


def _decay_powers(log_decay: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """γ_h^n for every head h and exponent n: [H, len(exponents)], computed as exp(n · log γ)."""
    return torch.exp(log_decay.float()[:, None] * exponents.float()[None, :])


def _causal_decay_mask(log_decay: torch.Tensor, length: int) -> torch.Tensor:
    """D[h, t, s] = γ_h^(t-s) for s <= t, else 0: [H, T, T] float32."""
    position = torch.arange(length, device=log_decay.device, dtype=torch.float32)
    distance = position[:, None] - position[None, :]
    exponent = log_decay.float()[:, None, None] * distance
    # -inf before exp (not a multiply by a 0/1 mask) so the upper triangle is exactly 0 and never inf*0.
    return torch.exp(exponent.masked_fill(distance < 0, float("-inf")))


@_fp32
@shares_host_offsets
def parallel_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Parallel form: O = scale · (Q Kᵀ ⊙ D) V (+ the initial state's contribution). O(T²) per head.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``: one dtype of float32, float16, bfloat16, K and V at most
            512 (the Triton ops' rules, ``checks.py``). log_decay: ``[H]`` float32, log γ per head (a constant:
            one that requires grad is refused under grad mode).
        scale: multiplies q·k: a float or a one-element tensor (read as a float; no gradient); defaults to
            ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` float32 state before the first token, or None for zeros.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` int offsets of N sequences packed into B=1; states are then ``[N, H, K, V]``.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32 or None)``.
    """
    scale = check_inputs("parallel_retention", q, k, v, log_decay, scale, initial_state, cu_seqlens)
    log_decay = usable_log_decay(log_decay)  # γ = 0 (ln γ = -inf) as such: no 0 · -inf at distance 0
    if cu_seqlens is not None:
        return _varlen(
            parallel_retention, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    length = q.shape[1]
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    scores = (qf @ kf.transpose(-1, -2)) * _causal_decay_mask(log_decay, length)
    o = scores @ vf
    steps = torch.arange(length + 1, device=q.device)
    if initial_state is not None:
        # o_t also sees γ^(t+1) S_0.
        decay_from_start = _decay_powers(log_decay, steps[1:])[None, :, :, None]
        o = o + (qf * decay_from_start) @ initial_state.float()
    final_state = None
    if output_final_state:
        decay_to_end = _decay_powers(log_decay, length - 1 - steps[:-1])[None, :, :, None]
        final_state = (kf * decay_to_end).transpose(-1, -2) @ vf
        if initial_state is not None:
            # (as fp32: a float64 state would otherwise promote the final state, fp32 on every other path)
            final_state = final_state + _decay_powers(log_decay, steps[-1:])[None, :, :, None] * initial_state.float()
    return (scale * o).transpose(1, 2).to(v.dtype), final_state


@_fp32
@shares_host_offsets
def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise recurrent form: parallel inside chunks of ``chunk_size``, recurrent across them. O(T·C).

    Same arguments and returns as :func:`parallel_retention`; T need not be a multiple of ``chunk_size``.

    All chunks of all sequences (the batch rows, or the sequences packed by ``cu_seqlens``) are computed
    as batched matmuls, in blocks of chunks whose K×V states fit :data:`STATE_BLOCK_BYTES` (so inference
    memory does not grow as T/C · K·V); the hand-over of the state from chunk to chunk is a loop for a batch's
    states below :data:`SMALL_STATE_ELEMENTS` (B·H·K·V), one [n, n] matmul per head and block at or above it. Each
    sequence is padded in front to whole chunks: in its first chunk, which starts ``pad`` zero tokens
    early, the queries see the initial state decayed by γ^(j+1−pad) and the state is carried on by
    γ^(C−pad), so the padding neither writes nor decays anything.
    """
    scale = check_inputs("chunk_retention", q, k, v, log_decay, scale, initial_state, cu_seqlens)
    chunk_size = check_chunk_size(chunk_size, "chunk_retention")
    log_decay = usable_log_decay(log_decay)  # γ = 0 (ln γ = -inf) as such: no 0 · -inf at distance 0
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[1] == 0:  # (see _without_tokens)
        return _without_tokens(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    # Chunks longer than the longest sequence only add padding, and a C×C decay mask that grows as C² whatever T
    # is (7 tokens in chunks of 2^14 took 7.6 GiB): cut to it, the result being the same.
    if cu_seqlens is None:  # one "sequence" spanning all batch rows: they share their chunking
        chunk_size = min(chunk_size, max(q.shape[1], 1))
        return _chunkwise(q, k, v, log_decay, scale, [initial_state], output_final_state, chunk_size, [q.shape[1]])
    lengths = host_offsets(cu_seqlens).lengths
    chunk_size = min(chunk_size, max(max(lengths, default=0), 1))
    initial = [None if initial_state is None else initial_state[i : i + 1] for i in range(len(lengths))]
    return _chunkwise_varlen(q, k, v, log_decay, scale, initial, output_final_state, chunk_size, lengths)


def _without_tokens(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens):
    """A call with T = 0, by the parallel form: its (empty) products tie o and the final state to q, k and v as in
    any other call, so ``o.sum().backward()`` gives them their (empty) gradients. Built from new zero tensors, as
    the chunkwise and recurrent forms would, o had no ``grad_fn`` and that backward raised."""
    return parallel_retention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


# The most bytes of chunk states (and as many of the chunks' kᵀv) the chunkwise reference forms at once.
STATE_BLOCK_BYTES = 64 * 2**20
# The most chunks whose states it forms from one another at once (the hand-over matmul grows as their square),
# for a batch's states (B·H·K·V elements) of at least SMALL_STATE_ELEMENTS (torch's grain for splitting an
# elementwise op across threads).
HAND_OVER_CHUNKS = 32
SMALL_STATE_ELEMENTS = 2**15


def _chunkwise(q, k, v, log_decay, scale, initial, output_final_state, chunk_size, lengths):
    """:func:`chunk_retention` of the sequences of ``lengths`` (one spanning all B rows, or those packed in
    B=1), with ``initial`` the initial state of each (or None); the final states are concatenated."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    counts = [-(-size // chunk_size) for size in lengths]  # chunks per sequence
    pads = [count * chunk_size - size for count, size in zip(counts, lengths, strict=True)]
    first_chunks = list(itertools.accumulate(counts, initial=0))[:-1]
    num_chunks = sum(counts)
    # Where each token sits in the padded row of num_chunks · chunk_size positions.
    token_starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    shifts = [first * chunk_size + pad - start
              for first, pad, start in zip(first_chunks, pads, token_starts, strict=True)]
    dest = torch.arange(length, device=q.device) + torch.repeat_interleave(
        torch.tensor(shifts, device=q.device, dtype=torch.long),
        torch.tensor(lengths, device=q.device, dtype=torch.long),  # long even when empty (cu_seqlens = [0])
        output_size=length)  # known: without it a CUDA tensor's sum would be read back

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] -> [B, H, chunks, C, D] float32 and contiguous, zeros at the padding."""
        x = x.float().transpose(1, 2)
        if num_chunks * chunk_size == length:  # a batch of whole chunks: no padding anywhere
            # (the last dim spelled out: with no elements, T = 0 or B = 0, a -1 would be ambiguous)
            return x.contiguous().view(batch, heads, num_chunks, chunk_size, x.shape[-1])
        padded = x.new_zeros(batch, heads, num_chunks * chunk_size, x.shape[-1]).index_copy(2, dest, x)
        return padded.view(batch, heads, num_chunks, chunk_size, x.shape[-1])

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    log_decay = log_decay.float()
    steps = torch.arange(chunk_size, device=q.device)
    chunk_pad = [0] * num_chunks  # the padding in front of each chunk: only a sequence's first has some
    for first, count, pad in zip(first_chunks, counts, pads, strict=True):
        if count:
            chunk_pad[first] = pad
    carry_exponents = [chunk_size - pad for pad in chunk_pad]  # (on the host, for _states_before)
    chunk_pad = torch.tensor(chunk_pad, device=q.device, dtype=torch.long)
    # Decays (all ≤ 1): inside a chunk; from a token to its chunk's end; from the chunk's start to a query.
    intra_decay = _causal_decay_mask(log_decay, chunk_size)[:, None]  # [H, 1, C, C]
    key_decay = _decay_powers(log_decay, chunk_size - 1 - steps)[:, None, :, None]  # [H, 1, C, 1]
    query_exponent = (steps[None] + 1 - chunk_pad[:, None]).clamp(min=0)  # [chunks, C]; padded queries are 0
    query_decay = torch.exp(log_decay[:, None, None] * query_exponent)[..., None]  # [H, chunks, C, 1]
    carry = _decay_powers(log_decay, chunk_size - chunk_pad).T[:, None, :, None, None]  # [chunks, 1, H, 1, 1]

    # Each chunk's sequence, and the chunks where sequences start and end.
    sequence_of = [i for i, count in enumerate(counts) for _ in range(count)]
    starts = {first: i for i, (first, count) in enumerate(zip(first_chunks, counts, strict=True)) if count}
    ends = {first + count - 1: i for i, (first, count) in enumerate(zip(first_chunks, counts, strict=True)) if count}
    finals = [None] * len(lengths)
    state = None  # the state after the previous block's last chunk
    # The chunks' kᵀv and the states before them are [B, H, K, V] each: formed for a block of chunks at a time
    # (at most STATE_BLOCK_BYTES of each), so that without autograd the memory does not grow as T/C · K·V.
    # States below torch's parallel grain are handed over chunk by chunk (each step a small single-threaded
    # op); larger ones by one [n, n] matmul per head (_states_before): the loop's 2n steps (and as many in its
    # backward) would each be a parallel region over the whole state, and its stack a copy of all of them. That
    # matmul grows as n², which blocks of at most HAND_OVER_CHUNKS (and about C) keep below the chunks' own kᵀv.
    state_elements = batch * heads * key_dim * value_dim
    small_states = state_elements < SMALL_STATE_ELEMENTS
    block = max(1, STATE_BLOCK_BYTES // max(1, state_elements * 4))
    if not small_states:  # (n·K·V a chunk for the hand-over, against C·K·V for its kᵀv; 8 at least, for the
        block = min(block, HAND_OVER_CHUNKS, max(chunk_size, 8))  # tiny chunks' sake: a block has its own set-up)
    outputs = []
    for begin in range(0, num_chunks, block):
        part = slice(begin, min(begin + block, num_chunks))
        qp, kp, vp = qc[:, :, part], kc[:, :, part], vc[:, :, part]
        intra = ((qp @ kp.transpose(-1, -2)) * intra_decay) @ vp
        writes = (kp * key_decay).transpose(-1, -2) @ vp  # each chunk's kᵀv decayed to its end: [B, H, n, K, V]
        if small_states:
            states = []  # the state before each chunk of the block
            for index, write in enumerate(writes.unbind(2), start=begin):
                if index in starts:
                    start_state = initial[starts[index]]
                    state = writes.new_zeros(write.shape) if start_state is None else start_state.float()
                states.append(state)
                state = carry[index] * state + write
                if index in ends:
                    finals[ends[index]] = state
            states = torch.stack(states, 2)
        else:
            entering = {} if state is None or begin in starts else {0: state}
            for index in range(part.start, part.stop):
                if index in starts and initial[starts[index]] is not None:
                    entering[index - begin] = initial[starts[index]].float()
            states = _states_before(writes, log_decay, carry_exponents[part], sequence_of[part], entering)
            for index in range(part.start, part.stop):
                if output_final_state and index in ends:
                    finals[ends[index]] = carry[index] * states[:, :, index - begin] + writes[:, :, index - begin]
            if part.stop < num_chunks and part.stop not in starts:  # (a state the next block's chunks continue)
                state = carry[part.stop - 1] * states[:, :, -1] + writes[:, :, -1]
        outputs.append(intra + (qp * query_decay[:, part]) @ states)
    if len(outputs) == 1:
        o = outputs[0]
    elif outputs:
        o = torch.cat(outputs, 2)
    else:  # no chunks at all (T = 0, or only empty sequences)
        o = qc.new_zeros(batch, heads, 0, chunk_size, value_dim)
    o = o.view(batch, heads, num_chunks * chunk_size, value_dim)
    if num_chunks * chunk_size != length:
        o = o.index_select(2, dest)
    o = o.transpose(1, 2)
    final_state = None
    if output_final_state:
        rows = batch if len(lengths) == 1 else 1
        for i, final in enumerate(finals):
            if final is None:  # an empty sequence: its state passes through (a copy, never the caller's tensor)
                finals[i] = (torch.zeros(rows, heads, key_dim, value_dim, device=q.device) if initial[i] is None
                             else initial[i].to(torch.float32, copy=True))
        if not finals:  # cu_seqlens = [0]: no sequences, no states (torch.cat refuses [])
            final_state = torch.zeros(0, heads, key_dim, value_dim, device=q.device)
        else:
            final_state = finals[0] if len(finals) == 1 else torch.cat(finals)
    return (scale * o).to(v.dtype), final_state


def _states_before(writes, log_decay, carry_exponents, sequence_of, entering):
    """The state before each chunk of a block, ``[B, H, n, K, V]``, from the chunks' decayed kᵀv ``writes``
    ``[B, H, n, K, V]``: chunk m's write reaches a later chunk j of its sequence decayed by γ^(e_{m+1} + … + e_{j−1})
    (``carry_exponents`` e, each C less the chunk's padding in front), and the states ``entering`` (local chunk →
    ``[B or 1, H, K, V]``: an initial state, or the one carried from the block before) by γ^(e_f + … + e_{j−1}).
    One [n, n] matmul per head rather than a loop of n multiply-adds: its backward is one matmul too, where the
    loop's was n steps and a copy of every state."""
    n = len(carry_exponents)
    device = writes.device
    before = torch.tensor(list(itertools.accumulate(carry_exponents, initial=0))[:-1], device=device,
                          dtype=torch.float32)  # the exponents' sum before each chunk
    sequence = torch.tensor(sequence_of, device=device)
    index = torch.arange(n, device=device)
    # -inf before exp (as in _causal_decay_mask), so that other sequences' and later chunks' weights are exactly 0
    reach = (index[:, None] > index[None, :]) & (sequence[:, None] == sequence[None, :])  # [j, m]
    exponent = before[:, None] - before[None, :] - torch.tensor(carry_exponents, device=device, dtype=torch.float32)
    mix = torch.exp((log_decay[:, None, None] * exponent).masked_fill(~reach, float("-inf")))  # [H, n, n]
    shape = writes.shape
    states = (mix @ writes.flatten(-2)).view(shape)
    if entering:
        firsts = torch.tensor(list(entering), device=device)
        reach = (index[:, None] >= firsts[None, :]) & (sequence[:, None] == sequence[firsts][None, :])  # [j, f]
        exponent = before[:, None] - before[firsts][None, :]
        weights = torch.exp((log_decay[:, None, None] * exponent).masked_fill(~reach, float("-inf")))  # [H, n, E]
        given = torch.stack(list(entering.values()), 2).flatten(-2)  # [B or 1, H, E, K·V]
        states = states + (weights @ given).view(given.shape[0], *shape[1:])
    return states


# The chunking comes from cu_seqlens' values: run eagerly, like _varlen.
_chunkwise_varlen = torch.compiler.disable(_chunkwise)


def _decay_factors(log_decay: torch.Tensor) -> torch.Tensor:
    """γ = exp(ln γ) as ``[1, H, 1, 1]`` fp32, the recurrent form's per-step factor. A decode step calls the op
    once per layer with the layer's same ln γ tensor: the factors are kept on it, for as long as it was neither
    written in place nor given other data (``checks.unchanged_since``; an inference tensor keeps no write counter,
    nor is anything kept while compiling, capturing a CUDA graph (kept there, they would be written only when the
    graph replays) or for a tensor in a graph: those compute them each call)."""
    # is_compiling() first: dynamo cannot trace is_inference(), a graph break in every traced call
    if torch.compiler.is_compiling() or log_decay.is_inference() or log_decay.requires_grad or (
            log_decay.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.exp(log_decay.float())[None, :, None, None]
    kept = getattr(log_decay, "_retnet_marked_decay_factors", None)
    # (not the write counter alone: Module.to() swaps a parameter's data without a write)
    if kept is not None and unchanged_since(kept[0], log_decay):
        return kept[1]
    # A plain tensor even when first asked under inference_mode (a generate before training, say): kept as an
    # inference tensor, every later step with grad failed "Inference tensors cannot be saved for backward".
    with torch.inference_mode(False):
        factors = torch.exp(log_decay.float())[None, :, None, None]
    log_decay._retnet_marked_decay_factors = (contents_mark(log_decay), factors)
    return factors


def inplace_state_refusal(q, k, v, initial_state, op: str = "recurrent_retention") -> str | None:
    """Why ``update_state_inplace=True`` can't be had for this call, or None: it needs an fp32 contiguous initial
    state, no gradient, and no inference tensor outside ``torch.inference_mode`` (the model asks before it opts in,
    and falls back to a new state where this says why not)."""
    if initial_state is None:
        return f"{op}: update_state_inplace=True needs an initial_state to update; got None"
    if initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
        return (f"{op}: update_state_inplace=True needs a contiguous float32 initial_state; "
                f"got {initial_state.dtype}, contiguous={initial_state.is_contiguous()}")
    if initial_state.is_inference() and not torch.is_inference_mode_enabled():
        # torch refuses this write (an inference tensor keeps no version counter, so a graph that saved it could
        # not notice); the Triton kernel writes through a raw pointer and would not be stopped.
        return (f"{op}: update_state_inplace=True can't write an inference tensor outside torch.inference_mode(); "
                "got an initial_state created under inference_mode (step under inference_mode too, or pass a clone)")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, initial_state)):
        return f"{op}: update_state_inplace=True is for inference: no input may require grad under grad mode"
    return None


def check_inplace_state(q, k, v, initial_state, op: str = "recurrent_retention") -> None:
    """What ``update_state_inplace=True`` needs (:func:`inplace_state_refusal`), refused by ValueError (checked
    after :func:`retnet.kernels.checks.check_inputs`, on both paths)."""
    refusal = inplace_state_refusal(q, k, v, initial_state, op)
    if refusal is not None:
        raise ValueError(refusal)


@_fp32
@shares_host_offsets
def recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    update_state_inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent form: one state update per token, O(1) in the context length. Used for decoding.

    Same arguments and returns as :func:`parallel_retention`, plus ``update_state_inplace``: write the
    final state into ``initial_state`` (fp32, contiguous) and return that tensor as the final state, for
    decode loops that keep their state buffers (no gradient; see :func:`check_inplace_state`).
    """
    scale = check_inputs("recurrent_retention", q, k, v, log_decay, scale, initial_state, cu_seqlens)
    if update_state_inplace:
        check_inplace_state(q, k, v, initial_state, "recurrent_retention")
    if q.shape[1] == 0 and not update_state_inplace:  # (an in-place step returns the caller's state as it is)
        return _without_tokens(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None:
        if update_state_inplace:
            o, state = recurrent_retention(q, k, v, log_decay, scale, initial_state, True, cu_seqlens)
            return o, initial_state.copy_(state)
        return _varlen(
            recurrent_retention, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    rows = batch * heads
    qf, kf, vf = q.float(), k.float(), v.float()
    decay = _decay_factors(log_decay)
    # Decoding is bound by passes over the K×V states: decay and update them in place (one pass each, no
    # materialised kᵀv) whenever autograd does not need the earlier ones, and never in the caller's tensor
    # unless asked to (the first decay writes a new one).
    tracked = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
        initial_state is not None and initial_state.requires_grad))
    if initial_state is None:
        state, owned = torch.zeros(batch, heads, key_dim, value_dim, device=q.device, dtype=torch.float32), True
    else:
        # Contiguous: the steps view the state as [B·H, K, V], and a permuted one (a state kept [H, B, K, V] and
        # transposed) raised a view error here, where the Triton op copies it to contiguous anyway.
        state, owned = initial_state.float().contiguous(), update_state_inplace
    outputs = []
    for t in range(length):
        state = state.mul_(decay) if owned and not tracked else state * decay
        owned = True
        flat = state.view(rows, key_dim, value_dim)
        # (one token, a decoding step: its [B, 1, H, D] rows are already the step's, no index)
        step_q, step_k, step_v = (qf, kf, vf) if length == 1 else (qf[:, t], kf[:, t], vf[:, t])
        step_k, step_v = step_k.reshape(rows, key_dim, 1), step_v.reshape(rows, 1, value_dim)
        flat = torch.baddbmm(flat, step_k, step_v) if tracked else flat.baddbmm_(step_k, step_v)
        state = flat.view(batch, heads, key_dim, value_dim)
        outputs.append(torch.bmm(step_q.reshape(rows, 1, key_dim), flat))
    # (T = 0 comes here only to update a state in place, which it leaves as it is; one token needs no stack)
    if length == 1:
        o = outputs[0].view(batch, 1, heads, value_dim)
    else:
        o = (torch.stack([x.view(batch, heads, value_dim) for x in outputs], dim=1) if outputs
             else vf.new_zeros(batch, 0, heads, value_dim))
    if update_state_inplace:
        return (scale * o).to(v.dtype), initial_state  # updated in place above (state is a view of it)
    return (scale * o).to(v.dtype), (state if output_final_state else None)
