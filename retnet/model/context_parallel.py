"""Context parallelism: one long (packed) row split along time across the ranks of a group.

Each rank runs its piece of the row through every layer. Retention is the only op that looks back in time,
and what it carries forward is one fixed-size state per sequence, so a rank needs from its predecessors only
the state their pieces leave behind, not their tokens (ring attention passes every key and value around).
Per retention layer a rank computes its piece from a zero state, keeping the state its last sequence ends
with; the group all-gathers those states; each rank folds the states of the pieces before it into the state
its first sequence starts from,

    S_in(r) = Σ_{j<r} S_last(j) · Π_{j<i<r} γ^{L_i} (only while pieces i hold one continuing sequence),

and adds that state's share to its first sequence's outputs, ``scale · γ^{t+1} · q_t S_in`` (the state is
linear in its start, so this equals running the piece from ``S_in``). Gradients flow back through the
gather: its backward all-reduces the states' gradients, so every piece's keys and values learn from the
later pieces that read them. Positions continue across pieces (a sequence's first token on rank r is at
the position its earlier pieces end at), so the pieces' losses add up to the whole row's.

xPos (q·ζ^(n/base), k·ζ^(−n/base) per key dimension) cannot take a sequence's positions from its start when that
lies pieces back: the scales overflow far from it. As a cache's state is kept, each piece's sequences count xPos
positions from their first token on it (its origin; unpacked, the piece then runs in frames of ``xpos_span`` from
there, as one process runs a long input), and each returns its final state moved into the frame of the position
after the piece, where the next piece's origin is. The fold moves a state carried through a continuing piece of
length L by ζ^(L/base) on its key rows beside γ^L, and the incoming state, in this rank's origin, moves into each
later frame of the piece by the factor the piece's own state moves by there. Every factor is a decay (≤ 1), so
nothing overflows however long the row.

One gather of ``[B, H, K, V]`` fp32 per layer and direction; nothing else crosses ranks. Run the collectives
on a group of their own (``torch.distributed.new_group``), so data-parallel all-reduces never interleave.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from retnet.kernels.checks import CU_SEQLENS_NAMES, is_cu_seqlens

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ContextShard:
    """This rank's piece of a row split along time into ``size`` pieces, and every piece's layout.

    ``lengths``: each piece's token count, in order. ``offsets``: per piece, how many tokens of its first
    sequence lie on earlier pieces (0: it starts a sequence, no state comes in). ``single``: per piece,
    whether it holds one sequence only, so that a state coming in also passes through it to the next piece.
    For unpacked rows (``[B, T]``, one sequence per row) every piece is single and offsets are the pieces'
    starts. ``group``: the process group of the ``size`` ranks, in piece order (None: the default group).
    ``first_length``: the tokens of this piece's first sequence (None: the model reads it from the piece's
    ``cu_seqlens``, or takes the whole piece when unpacked)."""

    rank: int
    size: int
    lengths: tuple[int, ...]
    offsets: tuple[int, ...]
    single: tuple[bool, ...]
    group: dist.ProcessGroup | None = None
    first_length: int | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"ContextShard: rank must be in [0, size) with size >= 1; got rank={self.rank}, "
                             f"size={self.size}")
        for name in ("lengths", "offsets", "single"):
            if len(getattr(self, name)) != self.size:
                raise ValueError(f"ContextShard: {name} needs one entry per piece ({self.size}); "
                                 f"got {len(getattr(self, name))}")
        if self.offsets[0] != 0:
            raise ValueError(f"ContextShard: the first piece has nothing before it (offsets[0] = 0); "
                             f"got {self.offsets[0]}")
        if min(self.lengths) < 1:
            raise ValueError(f"ContextShard: every piece needs at least one token; got lengths {self.lengths}")
        if self.first_length is not None and not 1 <= self.first_length <= self.length:
            raise ValueError(f"ContextShard: first_length must be in [1, {self.length}] (this piece's length); "
                             f"got {self.first_length}")

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    @property
    def offset(self) -> int:
        return self.offsets[self.rank]


def shard_sequences(input_ids: torch.Tensor, labels: torch.Tensor | None, rank: int, size: int,
                    cu_seqlens: torch.Tensor | None = None,
                    group: dist.ProcessGroup | None = None) -> tuple[dict[str, torch.Tensor], ContextShard, int]:
    """Cut ``input_ids`` ``[B, T]`` (and unshifted ``labels``, −100 ignored) into ``size`` equal pieces along
    time and return this rank's: ``(inputs, shard, targets)``.

    ``inputs`` holds ``input_ids`` ``[B, T/size]``, ``shift_labels`` (the labels already moved left on the
    whole row, so a piece's last token predicts the next piece's first) and, for a packed row (``cu_seqlens``
    ``[N + 1]``, B = 1), the piece's own ``cu_seqlens``; pass them with ``context_parallel=shard`` to
    ``RetNetForCausalLM``. ``targets``: the whole row's labels that count (the same on every rank), the
    ``num_items_in_batch`` under which the pieces' losses add up to the row's mean."""
    if input_ids.dim() != 2:
        raise ValueError(f"shard_sequences: input_ids must be [B, T]; got {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard_sequences: rank must be in [0, size) with size >= 1; got rank={rank}, size={size}")
    if length % size:
        raise ValueError(f"shard_sequences: a row of {length} tokens does not split into {size} equal pieces "
                         f"(context parallel size {size}); make the row length a multiple of it")
    piece = length // size
    start, end = rank * piece, (rank + 1) * piece
    inputs = {"input_ids": input_ids[:, start:end]}
    targets = 0
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"shard_sequences: labels must match input_ids {tuple(input_ids.shape)}; "
                             f"got {tuple(labels.shape)}")
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        inputs["shift_labels"] = shifted[:, start:end]
        targets = int((shifted != IGNORE_INDEX).sum())
    if cu_seqlens is None:
        shard = ContextShard(rank, size, (piece,) * size, tuple(p * piece for p in range(size)), (True,) * size,
                             group, piece)
        return inputs, shard, targets
    if batch != 1:
        raise ValueError(f"shard_sequences: cu_seqlens needs the sequences packed into one row (B=1); got B={batch}")
    if not is_cu_seqlens(cu_seqlens):
        # (a list failed on an AttributeError; a float tensor's offsets became the shard's floats)
        got = (f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor)
               else type(cu_seqlens).__name__)
        raise ValueError(f"shard_sequences: cu_seqlens must be a 1-D integer torch.Tensor of [N + 1] offsets "
                         f"({CU_SEQLENS_NAMES}); got {got}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length or any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"shard_sequences: cu_seqlens must rise strictly from 0 to the row length {length}; "
                         f"got {bounds}")
    offsets, single = [], []
    for p in range(size):
        first = bisect.bisect_right(bounds, p * piece) - 1  # the sequence piece p starts in
        offsets.append(p * piece - bounds[first])
        single.append(bounds[first + 1] >= (p + 1) * piece)
    inside = [b - start for b in bounds if start < b < end]
    inputs["cu_seqlens"] = torch.tensor([0, *inside, piece], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    shard = ContextShard(rank, size, (piece,) * size, tuple(offsets), tuple(single), group,
                         inside[0] if inside else piece)
    return inputs, shard, targets


class _GatherStates(torch.autograd.Function):
    """All-gather of each rank's state ``[B, H, K, V]`` -> ``[size, B, H, K, V]``; the backward sums every
    rank's gradient for a slot and hands each rank its own (an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, state: torch.Tensor, shard: ContextShard) -> torch.Tensor:
        ctx.shard = shard
        state = state.contiguous()
        gathered = [torch.empty_like(state) for _ in range(shard.size)]
        dist.all_gather(gathered, state, group=shard.group)
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.shard.group)
        return grad[ctx.shard.rank], None


# Run eagerly inside a compiled layer (train.compile): traced, the gather and its backward's all-reduce became one
# graph whose partitioner moved the all-reduce into the forward on a rank whose gradient there is a constant (rank
# 0, a piece starting a sequence) but not on the others, so the ranks' collectives no longer matched and hung.
@torch.compiler.disable
def incoming_state(last_state: torch.Tensor, log_decay: torch.Tensor, shard: ContextShard,
                   carry_shifts: torch.Tensor | None = None) -> torch.Tensor:
    """The state ``[B, H, K, V]`` fp32 this rank's first sequence starts from, given the state ``last_state``
    its own last sequence ends with (from a zero start). Every rank of the group must call it, in the same
    order: it all-gathers, and in backward all-reduces.

    xPos: ``carry_shifts`` ``[size, 1, K, 1]``, per piece the factor ζ^(L/base) on the key rows that moves a
    state from the frame at the piece's first position to the frame at the position after its last; every rank's
    ``last_state`` is in the frame of the position after its piece, and the state returned is in the frame of
    this rank's first position. Each factor is a decay (≤ 1), so the fold stays finite however far from the
    document's start the pieces lie."""
    gathered = _GatherStates.apply(last_state.float(), shard) if shard.size > 1 else last_state.float()[None]
    # Built from the gathered states even where none is read (rank 0, a piece that starts a sequence): every
    # rank then takes part in the backward's all-reduce, which would otherwise wait for it forever.
    state = gathered[0] * 0
    for piece in range(shard.rank):
        if shard.single[piece] and shard.offsets[piece] > 0:  # a continuing sequence carries the state through
            carry = torch.exp(log_decay * shard.lengths[piece])[None, :, None, None]
            state = state * (carry if carry_shifts is None else carry * carry_shifts[piece])
        else:
            state = state * 0
        state = state + gathered[piece]
    return state if shard.offset > 0 else state * 0


# Tokens of q whose fp32 copy (and the share's) live at once, in elements of the largest per-token slice
# [B, H, max(K, V)]: 4 MiB of fp32 per temporary, whatever the piece's length.
SHARE_CHUNK_ELEMENTS = 1 << 20


def _share_chunks(q: torch.Tensor, state: torch.Tensor, length: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the chunks of time ``_IncomingShare`` takes ``length`` tokens in."""
    batch, _, heads, k_dim = q.shape
    step = max(1, SHARE_CHUNK_ELEMENTS // (batch * heads * max(k_dim, state.shape[-1])))
    return [(start, min(start + step, length)) for start in range(0, length, step)]


class _IncomingShare(torch.autograd.Function):
    """``o + share``, ``share[:, t] = decay[t] · q_t S`` over the first ``decay.shape[0]`` tokens, in fp32 a chunk
    of time at a time: neither the forward nor the backward holds an fp32 copy of the whole of ``q`` or of the
    share (saved for the backward it keeps ``q`` itself, which the retention kernel saves anyway)."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, q: torch.Tensor, state: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, state, decay)
        out = o.clone()
        for start, end in _share_chunks(q, state, decay.shape[0]):
            share = torch.einsum("bthk,bhkv->bthv", q[:, start:end].float(), state)
            out[:, start:end] += share.mul_(decay[None, start:end, :, None])  # summed in fp32, rounded once
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, state, decay = ctx.saved_tensors
        grad_q = torch.zeros_like(q) if ctx.needs_input_grad[1] else None
        grad_state = torch.zeros_like(state) if ctx.needs_input_grad[2] else None
        with torch.autocast(grad.device.type, enabled=False):
            for start, end in _share_chunks(q, state, decay.shape[0]):
                scaled = grad[:, start:end].float() * decay[None, start:end, :, None]  # d share [B, c, H, V]
                if grad_q is not None:
                    grad_q[:, start:end] = torch.einsum("bthv,bhkv->bthk", scaled, state).to(q.dtype)
                if grad_state is not None:
                    grad_state += torch.einsum("bthk,bthv->bhkv", q[:, start:end].float(), scaled)
        return grad, grad_q, grad_state, None


# Eager inside a compiled layer too: its chunks of time are counted from first_length in Python, so dynamo guarded on
# the exact length, and each new one (a packed piece's first sequence: a new length every micro-batch) compiled the
# part of the layer after the state exchange again, up to torch's recompile limit.
@torch.compiler.disable
def add_incoming(o: torch.Tensor, q: torch.Tensor, state: torch.Tensor, log_decay: torch.Tensor, scale: float,
                 first_length: int, start: int = 0) -> torch.Tensor:
    """``o`` ``[B, T, H, V]`` plus the share of ``state`` ``[B, H, K, V]`` in the first ``first_length`` tokens'
    outputs: ``scale · γ^{start+t+1} · q_t S`` (``q`` ``[B, T, H, K]``, rotated as retention reads it; ``start``:
    the piece's tokens before ``o``'s first, run in an earlier xPos frame, the state moved into ``q``'s)."""
    steps = torch.arange(start + 1, start + first_length + 1, device=q.device, dtype=torch.float32)
    decay = scale * torch.exp(steps[:, None] * log_decay[None, :])  # [T1, H]
    # fp32 under autocast too: a long-context state can exceed fp16's range (the kernels keep it fp32 alike); a
    # chunk of time at a time, without an fp32 copy of the whole q (twice a bf16 q, kept for the backward)
    with torch.autocast(q.device.type, enabled=False):
        return _IncomingShare.apply(o, q, state.float(), decay)


@dataclass(frozen=True)
class ContextGroup:
    """This rank's place among the ``size`` ranks of a group that split each packed row of sequences along time:
    ``rank`` its piece, ``group`` their process group. Post-training (DPO, reward models) reads a value per
    sequence (its summed completion log-prob, its score at its last token): each rank computes its pieces' part
    and :meth:`sum` adds them up on every rank. GRPO reads one per completion token (its log-prob): each rank
    fills in those its piece predicts, zeros elsewhere, and :meth:`sum` gives every rank all of them."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def shard(self, input_ids: torch.Tensor,
              cu_seqlens: torch.Tensor) -> tuple[dict[str, torch.Tensor], ContextShard, int]:
        """This rank's piece of the packed row ``input_ids`` ``[1, N]`` of the sequences ``cu_seqlens``:
        ``(inputs, shard, start)``, ``inputs`` the piece's ``input_ids`` and ``cu_seqlens`` (pass them with
        ``context_parallel=shard``), ``start`` the row position of its first token. A row whose length the pieces
        do not divide (its sequences' lengths vary) gets a sequence of padding at its end: no state crosses into
        it, and nothing reads it."""
        padding = -input_ids.shape[1] % self.size
        if padding:
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([input_ids.shape[1] + padding])])
            input_ids = F.pad(input_ids, (0, padding))
        inputs, shard, _ = shard_sequences(input_ids, None, self.rank, self.size, cu_seqlens, self.group)
        return inputs, shard, self.rank * shard.length

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the group, on every rank. Differentiable: the backward sums the ranks' gradients
        and hands each its piece's, so each rank's loss must be its share (1 / ``size``) of a loss every rank
        computes whole from the sum."""
        return _SumOverGroup.apply(values, self.group)


class _SumOverGroup(torch.autograd.Function):
    """An all-reduce (sum) whose backward all-reduces the gradient: every rank's loss reads the whole sum, so each
    rank's share of the gradient of every piece is summed back to the piece. (torch.distributed.nn's all_reduce,
    which does the same, is deprecated in torch 2.13 and warns on every call.)"""

    @staticmethod
    def forward(ctx, values: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        values = values.clone()
        dist.all_reduce(values, group=group)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


__all__ = ["ContextGroup", "ContextShard", "add_incoming", "incoming_state", "shard_sequences"]
