"""The recurrent-state cache: what a RetNet carries from one decoding step to the next.

Unlike a Transformer's KV cache it does not grow with the context: per layer it is one fp32 state
``[B, H, K, V]`` (the retention recurrence S_t = γ S_{t−1} + k_tᵀ v_t), plus per sequence the count of real
(non-padding) tokens seen, which gives the next token's rotary position. That is all ``generate()`` and the
server need, and why a decoding step costs O(1) in the context length.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch


class RetNetCache:
    """Per-layer fp32 retention states and per-sequence positions.

    Attributes:
        states: one ``[B, H, K, V]`` float32 tensor per layer (``None`` until the layer first runs).
        offsets: ``[B]`` int64, real tokens seen per sequence (the next token's position).
        seen_tokens: columns consumed so far, padding included (what ``generate`` slices its inputs by). For
            rows of different lengths (after a packed ``cu_seqlens`` forward, ``concat``) it is the longest
            row's count, the width a padded batch of them would have.
    """

    # Read by transformers' generation utilities: the state is not a sliceable KV cache.
    is_compileable = False
    # Opt-in for a decode loop that owns these state tensors (the server's batch: Engine._decode_step):
    # a one-token recurrent step then writes each layer's new state over the old one rather than allocating it
    # (kernels' update_state_inplace). Off by default, as every copy of a cache (clone, select, concat, split,
    # zeros) starts: a state a user or another cache holds (a snapshot, a prefix entry, a split's view) is never
    # written behind their back. The model falls back to a new tensor where the write could reach one
    # (see RetNetModel.forward).
    update_in_place = False

    def __init__(self, num_layers: int):
        self.states: list[torch.Tensor | None] = [None] * num_layers
        self.offsets: torch.Tensor | None = None
        self.seen_tokens = 0
        # Assisted decoding (activate_past_recording): how many tokens a crop may take back, and the cache as it
        # was before the last forward that fed more than one token (see record_snapshot).
        self.recording = 0
        self.snapshot: RetNetCache | None = None
        # After a crop: how many of the next forward's tokens were fed before (kept ones the snapshot predates).
        self.refeed = 0
        # A draft model's cache (_prepare_cache_for_generation): transformers' candidate generators hand its generate
        # the whole sequence every round, so a crop further back than the snapshot can go back to nothing, every token
        # fed again, rather than fail. Assisted generation across tokenizers (tokenizer=, assistant_tokenizer=) counts
        # the draft's tokens to crop in the target's tokens and asks for such crops (see crop).
        self.restartable = False

    # -- what transformers' generate() asks of a cache --------------------------------------------------------
    def __len__(self) -> int:
        return len(self.states)

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` (beam search); in place."""
        self.snapshot = None  # of the old rows
        self.states = [None if s is None else s.index_select(0, beam_idx.to(s.device)) for s in self.states]
        if self.offsets is not None:
            self.offsets = self.offsets.index_select(0, beam_idx.to(self.offsets.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices``, or where a boolean mask of ``batch_size`` rows is true, as transformers' caches
        index them; in place."""
        picked = self.select(indices)  # a cast to long would read a mask's True/False as the rows 1 and 0
        self.snapshot = None  # of the old rows
        self.states, self.offsets = picked.states, picked.offsets

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.snapshot = None  # of the old rows
        self.states = [None if s is None else s.repeat_interleave(repeats, dim=0) for s in self.states]
        if self.offsets is not None:
            self.offsets = self.offsets.repeat_interleave(repeats, dim=0)

    # -- rolling back rejected draft tokens (transformers' assisted decoding) --------------------------------
    # A recurrent state cannot drop its last tokens: S_t folds them in. So the cache keeps itself as it was before
    # the forward that fed the draft tokens (a copy of the lists: the model replaces states, never writes into
    # them), and a crop goes back to that and leaves the accepted tokens unseen: get_seq_length() says so, and
    # the next forward feeds them again with the new ones. That forward keeps its snapshot after the tokens fed
    # again (`refeed`; inside each layer, or in two passes in xPos frames: RetNetModel.forward): they stay, so the
    # next crop goes back to the new tokens only, and their outputs are left out (transformers has them). So does a long first forward after activate_past_recording (a prompt),
    # its snapshot `recording + 1` tokens before its end; a later one keeps it before all of its tokens, as
    # transformers may draft more than `recording` then.
    @property
    def is_croppable(self) -> bool:
        return self.recording > 0

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        """Keep what :meth:`crop` needs to take back up to ``recurrent_states_to_keep`` tokens (at least one)."""
        self.recording = max(1, int(recurrent_states_to_keep or 1))
        self.snapshot, self.refeed = None, 0

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return self.recording

    def record_snapshot(self, states: list[torch.Tensor] | None = None, offsets: torch.Tensor | None = None,
                        seen_tokens: int | None = None) -> None:
        """The model calls this (only while recording) before a forward that may be cropped, or with the states
        its layers kept partway through one (and the offsets and count there)."""
        snapshot = RetNetCache(len(self.states))
        if states is None:
            states, offsets, seen_tokens = list(self.states), self.offsets, self.seen_tokens
        snapshot.states, snapshot.offsets, snapshot.seen_tokens = states, offsets, seen_tokens
        self.snapshot = snapshot

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (transformers' convention, 0 removes none; a positive
        value keeps that many, as ``DynamicCache.crop(max_length)``). The state returns to the snapshot before them, so
        :meth:`get_seq_length` can then be lower than asked: the tokens between are fed again next."""
        seen = self.seen_tokens
        target = seen + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, seen)
        if target >= seen:
            return
        if (self.snapshot is None or self.snapshot.seen_tokens > target) and self.restartable and self.recording:
            # (a draft's: its next forward gets the whole sequence, the first `target` tokens fed again)
            self.restart(refeed=target)
            return
        if self.snapshot is None or self.snapshot.seen_tokens > target:
            kept = "none" if self.snapshot is None else f"one at {self.snapshot.seen_tokens} tokens"
            raise ValueError(
                f"crop({tokens_to_remove}) asks the cache to go back from {seen} to {target} tokens, but a recurrent "
                f"state can only return to a snapshot and it holds {kept}: call activate_past_recording before the "
                "forward whose tokens are to be taken back"
            )
        restored = self.snapshot
        self.states, self.offsets, self.seen_tokens = list(restored.states), restored.offsets, restored.seen_tokens
        self.refeed = target - restored.seen_tokens

    def restart(self, refeed: int = 0) -> None:
        """Back to nothing seen (no states, no offsets, no snapshot), keeping the recording: the next forward feeds
        the whole sequence, its first ``refeed`` tokens counted as answered (their outputs left out)."""
        self.states = [None] * len(self.states)
        self.offsets, self.seen_tokens, self.snapshot, self.refeed = None, 0, None, refeed

    # -- what the server's batching engine needs ------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return 0 if self.offsets is None else self.offsets.shape[0]

    def select(self, indices: Sequence[int] | torch.Tensor | slice) -> RetNetCache:
        """A new cache with rows ``indices`` (copies of those rows only; the original is unchanged); a boolean
        mask of ``batch_size`` rows selects the rows where it is true, a slice the rows it spans. A negative index
        counts from the end, as Python's do."""
        if isinstance(indices, slice):  # (torch.as_tensor: "Could not infer dtype of slice")
            indices = torch.tensor(range(self.batch_size)[indices], dtype=torch.long)
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:  # a cast to long would read True/False as the rows 1 and 0
            if indices.shape != (self.batch_size,):
                raise ValueError(f"select got a boolean mask of {indices.shape[0] if indices.dim() else 0} rows for "
                                 f"a cache of {self.batch_size} rows")
            indices = indices.nonzero().squeeze(-1)
        elif indices.numel():  # ([] is a float tensor, and selects no row)
            # index_select took a float index as its integer part (0.5: row 0), and a negative one raised a bare
            # IndexError
            if indices.is_floating_point() or indices.is_complex():
                shown = indices.tolist() if indices.numel() <= 8 else f"a {indices.dtype} tensor"
                raise ValueError(f"select takes integer row indices (or a boolean mask); got {shown}")
            if indices.dim() > 1:
                raise ValueError(f"select takes a list of row indices; got shape {list(indices.shape)}")
            if self.offsets is not None:  # (a cache no forward filled has no rows to check against)
                rows = self.batch_size
                outside = indices[(indices < -rows) | (indices >= rows)]
                if outside.numel():
                    raise ValueError(f"select got row index {outside[0].item()} for a cache of {rows} rows")
                indices = torch.where(indices < 0, indices + rows, indices)
        out = RetNetCache(len(self.states))
        out.states, out.offsets, out.seen_tokens = self.states, self.offsets, self.seen_tokens
        out.reorder_cache(indices.long())  # index_select: new tensors
        return out

    def clone(self) -> RetNetCache:
        out = RetNetCache(len(self.states))
        out.states = [None if s is None else s.clone() for s in self.states]
        out.offsets = None if self.offsets is None else self.offsets.clone()
        out.seen_tokens = self.seen_tokens
        # (the snapshot's tensors are never written, so the copy may share them; not the snapshot itself, which
        # `to` moves in place)
        out.recording, out.snapshot, out.refeed = self.recording, copy.copy(self.snapshot), self.refeed
        out.restartable = self.restartable
        return out

    @classmethod
    def zeros(cls, config, batch_size: int, device: torch.device | str | None = None) -> RetNetCache:
        """``batch_size`` rows that have seen nothing: zero states ``[B, H, K, V]`` fp32, offsets 0.

        What a sequence that starts from scratch contributes when it is stacked (``concat``) with sequences
        that already have a state; ``config`` is the model's :class:`RetNetConfig`.
        """
        shape = (batch_size, config.num_attention_heads, config.head_dim, config.value_head_dim)
        out = cls(config.num_hidden_layers)
        out.states = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in out.states]
        out.offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        return out

    @classmethod
    def concat(cls, caches: Sequence[RetNetCache]) -> RetNetCache:
        """Stack the rows of several caches (each already run through every layer) into one batch."""
        if not caches:
            raise ValueError("concat needs at least one cache")
        num_layers = len(caches[0])
        if any(len(c) != num_layers or c.offsets is None for c in caches):
            raise ValueError("concat needs caches of the same layer count, each already filled by a forward pass")
        for layer in range(num_layers):
            shapes = {tuple(c.states[layer].shape[1:]) for c in caches}
            kinds = {(c.states[layer].dtype, c.states[layer].device) for c in caches}
            if len(shapes) > 1 or len(kinds) > 1:  # else torch.cat's message, which names no cache
                raise ValueError(f"concat needs caches of one model: layer {layer}'s states are "
                                 f"{sorted(shapes)} per row (heads, key dim, value dim), "
                                 f"{sorted(str(k) for k in kinds)}; caches of another model, dtype or device "
                                 f"cannot be batched together")
        out = cls(num_layers)
        out.states = [torch.cat([c.states[i] for c in caches]) for i in range(num_layers)]
        out.offsets = torch.cat([c.offsets for c in caches])
        out.seen_tokens = max(c.seen_tokens for c in caches)
        return out

    def split(self) -> list[RetNetCache]:
        """One single-row cache per sequence (views into this cache's tensors)."""
        rows = []
        if self.offsets is None:  # nothing run yet: batch_size 0
            return rows
        for b, seen in enumerate(self.offsets.tolist()):  # one device sync, not one per row
            row = RetNetCache(len(self.states))
            row.states = [s[b : b + 1] for s in self.states]
            row.offsets = self.offsets[b : b + 1]
            row.seen_tokens = seen
            rows.append(row)
        return rows

    def nbytes(self) -> int:
        """Bytes this cache holds (states and offsets): constant in the context length."""
        return sum(t.numel() * t.element_size() for t in (*self.states, self.offsets) if t is not None)

    def to(self, device: torch.device | str | None = None, *, dtype: torch.dtype | None = None) -> RetNetCache:
        """Move the cache to ``device``, in place. Only a device: the states are fp32 whatever the model's dtype,
        and the offsets count tokens (``to(torch.bfloat16)`` made them bf16, where 300 + 1 is 300)."""
        if dtype is not None:  # (refused as the positional one is, not with Python's unexpected-keyword TypeError)
            device = dtype
        if isinstance(device, torch.dtype):
            raise ValueError(f"RetNetCache.to takes a device, not a dtype; got {device} (the states stay float32 "
                             "for a model of any dtype, and the offsets int64)")
        if device is None:
            return self
        self.states = [None if s is None else s.to(device) for s in self.states]
        self.offsets = None if self.offsets is None else self.offsets.to(device)
        if self.snapshot is not None:
            self.snapshot.to(device)
        return self

    def __repr__(self) -> str:
        return f"RetNetCache(layers={len(self)}, batch={self.batch_size}, seen_tokens={self.seen_tokens})"


__all__ = ["RetNetCache"]
