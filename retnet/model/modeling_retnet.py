"""RetNet (Sun et al., 2023, "Retentive Network: A Successor to Transformer for Large Language Models").

Ordered like transformers' ``modeling_llama.py``: norms and position encoding, the multi-scale retention
layer, the FFN, the decoder block, then ``RetNetPreTrainedModel``, ``RetNetModel``, ``RetNetForCausalLM``
and ``RetNetForSequenceClassification``. Retention itself (parallel, chunkwise, recurrent) lives in :mod:`retnet.kernels`; this
file only projects, positions, masks and normalises around it.
"""

from __future__ import annotations

import dataclasses
import logging as logging_std
import math
import numbers
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import GenerationMixin, PreTrainedModel
from transformers import __version__ as transformers_version
from transformers.cache_utils import Cache
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.generation import candidate_generator
from transformers.generation import utils as generation_utils
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import ModelOutput, SequenceClassifierOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from retnet import kernels
from retnet.kernels.checks import CU_SEQLENS_NAMES, SharedHostOffsets, is_cu_seqlens, log_decay_tensor
from retnet.kernels.naive import inplace_state_refusal
from retnet.model.activations import _GSMELU_PARAMETERS, SAU, GeneralizedSmeLU, get_activation
from retnet.model.cache import RetNetCache
from retnet.model.configuration_retnet import RETENTION_MODES, RetNetConfig
from retnet.model.context_parallel import ContextShard, add_incoming, incoming_state
from retnet.model.distillation import Distillation
from retnet.model.loss import linear_cross_entropy

try:  # transformers' guarded initialisers leave weights that were loaded from a checkpoint untouched
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers 5.x
    from torch.nn import init

logger = logging.get_logger(__name__)

# transformers renamed the generation kwarg `past_key_values` to `cache` in 5.2x; accept both, emit the
# one this transformers expects.
CACHE_KWARG = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", []) else "past_key_values"
# transformers 5.25 rolls recurrent caches back after assisted decoding's verification: it asks them to record
# their past (activate_past_recording) and crops them. Before that it refused stateful models' assisted decoding.
# (5.17 already has a Cache.activate_past_recording, without the argument, and still refuses stateful models:
# get_recurrent_states_to_keep came with the rollback.)
ASSISTED_ROLLBACK = hasattr(Cache, "get_recurrent_states_to_keep")

# Without Triton the chunkwise reference hands a K×V state from chunk to chunk in Python; the parallel form
# is faster up to here (at head dims 128/256) and its T² memory is still small.
REFERENCE_PARALLEL_MAX_LEN = 256


# ----------------------------------------------------------------------------------------------------------
# Norms and position encoding
# ----------------------------------------------------------------------------------------------------------
class RetNetRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (no .float() or .to() calls where the dtype is already right: a decode step is mostly such calls)
        fp32 = hidden_states.dtype == torch.float32
        normed = F.rms_norm(hidden_states if fp32 else hidden_states.float(), (hidden_states.shape[-1],), eps=self.eps)
        out = normed * (self.weight if self.weight.dtype == torch.float32 else self.weight.float())
        return out if fp32 else out.to(hidden_states.dtype)


def build_norm(config: RetNetConfig, size: int) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RetNetRMSNorm(size, eps=config.rms_norm_eps)
    return nn.LayerNorm(size, eps=config.rms_norm_eps)


class RetNetHeadNorm(nn.Module):
    """Per-head normalisation of the retention output (the paper's GroupNorm, one group per head).

    It makes each head's output scale-free, which is why retention needs no row stabiliser: a per-row
    scalar on a head's output is cancelled here.
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float, norm_type: str):
        super().__init__()
        self.num_heads, self.head_dim, self.eps, self.norm_type = num_heads, head_dim, eps, norm_type
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        """o: [B, T, H, V] -> [B, T, H·V]. Under tensor parallelism H is this rank's heads and ``weight`` a
        DTensor sharded along them (:mod:`retnet.model.tensor_parallel`): its local rows are this rank's."""
        shape = (self.head_dim,)
        # (no .float() or .to() calls where the dtype is already right: a decode step is mostly such calls)
        of = o if o.dtype == torch.float32 else o.float()
        normed = F.rms_norm(of, shape, eps=self.eps) if self.norm_type == "rmsnorm" else F.layer_norm(
            of, shape, eps=self.eps
        )
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight  # (dynamo: not hasattr)
        out = normed.flatten(-2) * (weight if weight.dtype == torch.float32 else weight.float())
        return out if out.dtype == o.dtype else out.to(o.dtype)


# xPos scales q by ζ^(n/base) and k by ζ^(−n/base) (ζ < 1 per key dimension, the smallest 0.4/1.4): at a large
# position n one underflows and the other overflows (fp32 from n ≈ 71·base, fp16 from n ≈ 8.9·base). Only n − m
# enters q_n·k_m, so positions are taken relative to a frame near the tokens; a frame moves forward by scaling
# the state's key rows by ζ^(shift/base) (a decay, ≤ 1). Within one frame the scales stay within this factor:
XPOS_MAX_GROWTH = 2.0**8
# and a (fp32) state returned for a cache whose offsets lag behind the positions grows by at most this:
XPOS_MAX_STATE_GROWTH = 2.0**64
# A packed row runs each sequence in one frame (the kernels take no per-sequence frames), so there the limit is
# the dtype's range rather than a comfortable margin: scales within 2^100 keep q, k, kᵀv and the fp32/bf16
# state finite (28 k positions at base 512, about where an absolute frame overflowed before). fp16 models scale
# q and k in fp32 (their retention runs in fp32), so the same holds for them.
XPOS_PACKED_MAX_GROWTH = 2.0**100
XPOS_MIN_ZETA = 0.4 / 1.4


class XPosFrameError(ValueError):
    """A packed (or padded) sequence reaches past the one xPos frame a packed forward gives it (:func:`xpos_span`
    at :data:`XPOS_PACKED_MAX_GROWTH`): raised by the forward, for what the data holds, so that a training run can
    stop on it with its message alone."""


def xpos_span(config: RetNetConfig, growth: float = XPOS_MAX_GROWTH) -> int:
    """Positions one xPos frame covers with q/k scales within ``growth`` (2 240 at ``xpos_scale_base=512``,
    chunk_size 64, for :data:`XPOS_MAX_GROWTH`); a multiple of ``chunk_size`` when it is longer than a chunk."""
    span = int(math.log(growth) * config.xpos_scale_base / -math.log(XPOS_MIN_ZETA))
    if span >= config.chunk_size:
        span -= span % config.chunk_size
    return max(span, 1)


@dataclass
class RetNetPositionPiece:
    """One run of tokens in one xPos frame: the rotation (and xPos scale) of its q and k, and the factor that
    moves the state carried into it from the previous frame into its own."""

    tokens: slice  # stop None: to the end of the sequence
    cos: torch.Tensor  # [B, t, 1, K] float32
    sin: torch.Tensor  # [B, t, 1, K] float32
    scale: torch.Tensor | None  # [B, t, 1, K] float32 ζ^(n/base), None without xPos
    state_shift: torch.Tensor | None  # [N, 1, K, 1] float32, None when the frame does not move
    # sin with its first half negated (RetNetPositionEncoding.apply), formed with the piece, outside the layers: a
    # checkpointed layer's recomputation then runs the ops its forward ran
    signed_sin: torch.Tensor | None = None

    def __post_init__(self):
        if self.signed_sin is None:
            half = self.sin.shape[-1] // 2
            self.signed_sin = torch.cat((-self.sin[..., :half], self.sin[..., half:]), -1)


@dataclass
class RetNetPositionEncoding:
    """The position encoding of one forward, computed once and shared by every layer (their rotations are the
    same): the pieces of the sequence, each in its own xPos frame, and the factor that moves the final state
    into the frame the cache keeps it in (``None``: it stays)."""

    pieces: list[RetNetPositionPiece]
    final_shift: torch.Tensor | None
    # Context parallelism with xPos: per piece of the row, the factor ``[size, 1, K, 1]`` that moves a state carried
    # through it from the frame at its start into the frame at its end (incoming_state's fold).
    context_shifts: torch.Tensor | None = None
    # Assisted decoding's snapshot (split_at): each layer leaves here its state after piece `keep_state_after`.
    keep_state_after: int | None = None
    kept_states: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def split_at(self, index: int) -> RetNetPositionEncoding:
        """This encoding (one piece: no xPos frames) in two pieces at token ``index``, each layer keeping its
        state between them: what :meth:`RetNetModel.forward` records as the cache's snapshot, for the price of a
        second retention call per layer rather than a second pass through the model."""
        (piece,) = self.pieces
        head = RetNetPositionPiece(slice(0, index), piece.cos[:, :index], piece.sin[:, :index], None, None)
        tail = RetNetPositionPiece(slice(index, piece.tokens.stop), piece.cos[:, index:], piece.sin[:, index:],
                                   None, None)
        return RetNetPositionEncoding([head, tail], self.final_shift, keep_state_after=0)

    @staticmethod
    def apply(piece: RetNetPositionPiece, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k ``[B, t, H, K]`` -> rotated (and xPos-scaled) q, k in their dtype, computed in fp32."""
        if q.shape[-1] % 2 or q.shape != k.shape:
            qf, kf = q.float(), k.float()
            q_rot = qf * piece.cos + _rotate_half(qf) * piece.sin
            k_rot = kf * piece.cos + _rotate_half(kf) * piece.sin
        else:
            # The same products, in a third of the ops (every layer runs this on each decoding step): q and k in
            # one tensor, and rotate_half(x) · sin as x with its halves swapped (one roll) times sin with its
            # first half negated (kept on the piece, which all layers share): -(x₂ · s) either way, bit for bit.
            qk = torch.stack((q.float(), k.float()))
            q_rot, k_rot = qk * piece.cos + qk.roll(q.shape[-1] // 2, -1) * piece.signed_sin
        if piece.scale is not None:
            # ζ^(n/base) on q and ζ^(−n/base) on k: the product depends only on the distance.
            q_rot, k_rot = q_rot * piece.scale, k_rot / piece.scale
        return q_rot.to(q.dtype), k_rot.to(k.dtype)


class RetNetRotaryEmbedding(nn.Module):
    """θ-shift (rotary) positions on q and k, with optional xPos scaling (Sun et al., 2022).

    Angles are computed from the positions in float64 (fp32 would be off by up to ~0.06 rad at position 10⁶),
    the rotation in fp32, once per forward for all layers (:class:`RetNetPositionEncoding`). The xPos scale
    takes positions relative to a frame (see :data:`XPOS_MAX_GROWTH`); a state moves from one frame to a later
    one by a factor on its key rows. The inverse frequencies are cached per device rather than registered as a
    buffer, so checkpoints hold no derived tensors.
    """

    def __init__(self, config: RetNetConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(inverse frequencies [K/2], ln ζ [K]), float64."""
        if device not in self._tables:
            pair = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device)
            # float(): a whole rope_theta of 2**63 or more (config.json may write it so; the config takes any finite
            # number) is a Python int torch cannot convert (OverflowError naming no field)
            inv_freq = 1.0 / float(self.config.rope_theta) ** (pair / self.head_dim)
            log_zeta = torch.log((pair + 0.4 * self.head_dim) / (1.4 * self.head_dim))
            self._tables[device] = (inv_freq, torch.cat([log_zeta] * 2))
        return self._tables[device]

    def forward(self, position_ids: torch.Tensor, xpos: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                packed: bool = False, starts_at_origin: bool = False) -> RetNetPositionEncoding:
        """position_ids ``[B, T]``; ``xpos`` (with ``use_xpos``): ``(relative [B, T], target [N] or None)``, each
        token's position relative to its sequence's origin (the frame the initial state is in) and the frame,
        relative to the same origin, the final state is returned in. Unpacked, the tokens run in pieces of
        :func:`xpos_span` positions, each in its own frame; ``packed`` rows run in one frame, the origin
        (RetNetModel checked that their positions stay within reach of it). ``starts_at_origin``: every row's
        first relative position is 0 (the model's own positions), so the first piece's frame is the origin."""
        inv_freq, log_zeta = self._table(position_ids.device)
        angles = position_ids.double()[:, :, None, None] * inv_freq  # [B, T, 1, K/2]
        cos = torch.cat([angles.cos()] * 2, -1).float()
        sin = torch.cat([angles.sin()] * 2, -1).float()
        length = position_ids.shape[1]
        if xpos is None:
            # slice(0, None), not slice(0, length): dynamo specializes a slice holding a symbolic length (a guard
            # Eq(T, 13)), so a compiled whole model was traced again for every new sequence length
            return RetNetPositionEncoding([RetNetPositionPiece(slice(0, None), cos, sin, None, None)], None)
        relative, target = xpos
        span = max(length, 1) if packed else xpos_span(self.config)
        pieces, frame = [], relative.new_zeros(relative.shape[0])
        # The count of pieces, not range(0, length, span), and the last piece to the end (as the one piece
        # above): dynamo guards on that count, rather than on the length
        count = -(-max(length, 1) // span)
        for number in range(count):
            start = number * span
            tokens = slice(start, start + span if number < count - 1 else None)
            state_shift = None
            if length and not packed and (start or not starts_at_origin):
                # Skipped when the frame stays: a multiply by ones would be a whole pass over each layer's state.
                new_frame = relative[:, start]
                state_shift = self.state_factor(new_frame - frame)
                frame = new_frame
            scale = torch.exp((relative[:, tokens] - frame[:, None]).double()[:, :, None, None]
                              / float(self.config.xpos_scale_base) * log_zeta).float()  # (as rope_theta)
            pieces.append(RetNetPositionPiece(tokens, cos[:, tokens], sin[:, tokens], scale, state_shift))
        final_shift = None if target is None else self.state_factor(target - frame)
        return RetNetPositionEncoding(pieces, final_shift)

    def state_factor(self, shift: torch.Tensor) -> torch.Tensor:
        """``[N, 1, K, 1]`` fp32: a state ``[N, H, K, V]`` times it moves ``shift`` ``[N]`` positions later
        (key rows × ζ^(shift/base), a decay)."""
        _, log_zeta = self._table(shift.device)
        return torch.exp(shift.double()[:, None] / float(self.config.xpos_scale_base) * log_zeta).float()[:, None, :, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Retention and FFN
# ----------------------------------------------------------------------------------------------------------
def resolve_retention_mode(mode: str, length: int, q: torch.Tensor) -> str:
    """``auto``: recurrent for single-token steps; else chunkwise on the Triton path, and on the reference
    path parallel up to :data:`REFERENCE_PARALLEL_MAX_LEN` tokens (faster there), chunkwise beyond."""
    if mode not in RETENTION_MODES:
        raise ValueError(f"retention_mode must be one of {RETENTION_MODES}; got {mode!r}")
    if mode != "auto":
        return mode
    if length == 1:
        return "recurrent"
    if kernels.use_triton(q) or length > REFERENCE_PARALLEL_MAX_LEN:
        return "chunkwise"
    return "parallel"


def _inplace_state_allowed(q, k, v, initial_state) -> bool:
    """Whether the kernels take ``update_state_inplace`` for this call: asked of a cache, a state that breaks their
    rules is replaced as usual, not refused; nor is a traced graph's input written behind it."""
    return not torch.compiler.is_compiling() and inplace_state_refusal(q, k, v, initial_state) is None


class RetNetMultiScaleRetention(nn.Module):
    """Multi-scale retention: per-head decays γ_h, per-head norm, swish output gate (paper §2.2)."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.value_head_dim = config.value_head_dim
        qk_size, v_size = self.num_heads * self.head_dim, self.num_heads * self.value_head_dim
        self.q_proj = nn.Linear(config.hidden_size, qk_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, qk_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, v_size, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, v_size, bias=False) if config.use_output_gate else None
        self.o_proj = nn.Linear(v_size, config.hidden_size, bias=False)
        self.o_proj.is_residual_output = True
        self.head_norm = (
            RetNetHeadNorm(self.num_heads, self.value_head_dim, config.rms_norm_eps, config.norm_type)
            if config.use_head_norm
            else None
        )
        # The heads this module runs are heads head_start .. head_start + num_heads of the config's: all of them,
        # or a tensor-parallel rank's (select_heads).
        self.head_start = 0
        self._log_decay: dict[torch.device, torch.Tensor] = {}

    def select_heads(self, start: int, count: int) -> None:
        """Run heads ``start .. start + count`` only (tensor parallelism: :mod:`retnet.model.tensor_parallel`
        shards the projections and the head norm to match): the views, the decays and the state
        ``[B, count, K, V]`` follow."""
        if not 0 <= start < start + count <= self.config.num_attention_heads:
            raise ValueError(f"select_heads: heads {start}..{start + count} are not within the "
                             f"{self.config.num_attention_heads} of config.num_attention_heads")
        self.head_start, self.num_heads = start, count
        if self.head_norm is not None:
            self.head_norm.num_heads = count
        self._log_decay = {}

    def log_decay(self, device: torch.device) -> torch.Tensor:
        """ln γ of this module's heads, [H] float32 (fixed, not a parameter; kept in log space, see
        kernels/naive.py)."""
        if device not in self._log_decay:
            decays = self.config.log_decays()[self.head_start:self.head_start + self.num_heads]
            # Not an inference tensor when the first forward runs under torch.inference_mode(): one keeps no
            # version counter, so the ops (which re-read ln γ only after an in-place write or a swap of its data) would take a write made
            # to it inside inference_mode (say a positive ln γ, a state growing as γᵀ) as already checked. (Traced
            # by torch.compile it may still be one; the ops check nothing while compiling anyway.)
            with torch.inference_mode(False):
                self._log_decay[device] = log_decay_tensor(decays, device)  # (checked here, not read back by ops)
        return self._log_decay[device]

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: RetNetPositionEncoding,
        token_mask: torch.Tensor | None,
        initial_state: torch.Tensor | None,
        output_final_state: bool,
        mode: str,
        cu_seqlens: torch.Tensor | None = None,
        packed_rows: tuple[torch.Tensor, torch.Tensor] | _PaddingInFront | None = None,
        context: ContextShard | None = None,
        update_state_inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``positions``: the forward's :class:`RetNetPositionEncoding`; each of its pieces runs in its own xPos
        frame, the state carried from piece to piece. ``packed_rows``: ``(index, row_cu_seqlens)`` of the real
        tokens of a padded batch (see :func:`_pack_padded_rows`); retention then runs on those alone, one packed
        sequence per row (in one piece); compiled, a :class:`_PaddingInFront` order of each row instead.
        ``context``: this rank's piece of a row split across ranks
        (:mod:`retnet.model.context_parallel`); its first sequence then also reads the state the earlier pieces
        leave, and no state is returned. ``update_state_inplace``: the caller owns ``initial_state`` alone (see
        :attr:`RetNetCache.update_in_place`); a recurrent step in one piece may write its new state over it."""
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, length, self.num_heads, self.value_head_dim)
        out_dtype = v.dtype
        if v.dtype == torch.float16:
            # Retention sums over the context with weights up to 1/(1 − γ) (4096 at the paper's head 7): a trained
            # model's outputs pass fp16's 65504 at a few thousand tokens, and the ops return them in v's dtype, inf
            # (NaN after the head norm). In fp32 they reach the head norm, which brings them back to its scale.
            q, k, v = q.float(), k.float(), v.float()
        mode = resolve_retention_mode(mode, length, q)
        # (the forward opts in only without a snapshot, packing or a context shard; in one piece, nothing else
        # holds a state between two of them)
        update_state_inplace = update_state_inplace and len(positions.pieces) == 1
        outputs, rotated_q, state = [], [], initial_state
        for number, piece in enumerate(positions.pieces):
            if state is not None and piece.state_shift is not None:
                state = state * piece.state_shift
            tokens = piece.tokens
            if tokens.start == 0 and tokens.stop in (None, length):  # (one piece, a decode step's: no slicing ops)
                q_piece, k_piece, v_piece, mask_piece = q, k, v, token_mask
            else:
                q_piece, k_piece, v_piece = q[:, tokens], k[:, tokens], v[:, tokens]
                mask_piece = None if token_mask is None else token_mask[:, tokens]
            q_piece, k_piece = positions.apply(piece, q_piece, k_piece)
            last = number == len(positions.pieces) - 1
            o, state = self._retain(q_piece, k_piece, v_piece, mask_piece, state,
                                    output_final_state or not last or context is not None, mode, cu_seqlens,
                                    packed_rows, update_state_inplace)
            if number == positions.keep_state_after:
                positions.kept_states.append(state)
            outputs.append(o)
            if context is not None:
                rotated_q.append(q_piece)
        if context is not None:
            outputs = self._add_context_share(outputs, rotated_q, state, positions, context, cu_seqlens)
            state = None
        o = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)
        if state is not None and positions.final_shift is not None:
            state = state * positions.final_shift
        o = (self.head_norm(o) if self.head_norm is not None else o.flatten(-2)).to(out_dtype)
        if self.g_proj is not None:
            o = F.silu(self.g_proj(hidden_states)) * o
        return self.o_proj(o), state

    def _add_context_share(self, outputs, rotated_q, state, positions, context, cu_seqlens) -> list[torch.Tensor]:
        """``outputs`` (per piece of ``positions``) plus the share of the state the earlier ranks' pieces leave
        this rank's first sequence; ``state``: the one this rank's pieces end with, from a zero start.

        With xPos the first sequence runs in frames counted from this rank's first position (its origin), and
        ``positions.final_shift`` returns each sequence's state in the frame of the position after the piece: the
        last one is gathered in the frame the next rank's first sequence starts in. The incoming state, in this
        rank's origin, moves into each later frame of the piece by the factor the state itself moves by there."""
        log_decay = self.log_decay(rotated_q[0].device)
        last_state, final_shift = state, positions.final_shift
        if cu_seqlens is not None:  # the packed row's last sequence
            last_state, final_shift = state[-1:], None if final_shift is None else final_shift[-1:]
        if final_shift is not None:
            last_state = last_state * final_shift
        incoming = incoming_state(last_state, log_decay, context, positions.context_shifts)
        outputs = list(outputs)
        for number, piece in enumerate(positions.pieces):
            start = piece.tokens.start
            stop = start + piece.cos.shape[1]  # (tokens.stop may be None)
            if start >= context.first_length:
                break
            if piece.state_shift is not None:
                incoming = incoming * piece.state_shift
            outputs[number] = add_incoming(outputs[number], rotated_q[number], incoming, log_decay,
                                           self.head_dim ** -0.5, min(stop, context.first_length) - start,
                                           start)
        return outputs

    def _retain(self, q, k, v, token_mask, initial_state, output_final_state, mode, cu_seqlens, packed_rows,
                update_state_inplace=False):
        """Retention of rotated q, k -> (o [B, T, H, V], final state or None); ``update_state_inplace`` where the
        kernels' rules for it hold (else a new state, silently: it only saves an allocation)."""
        batch, length = q.shape[:2]
        if token_mask is not None:
            # A padded position writes nothing into the state (its kᵀv is zero).
            k = k * token_mask[:, :, None, None].to(k.dtype)
        log_decay = self.log_decay(q.device)
        in_front = packed_rows if isinstance(packed_rows, _PaddingInFront) else None
        if in_front is not None:
            packed_rows = None
            order = in_front.order[:, :, None, None]
            q, k, v = (x.gather(1, order.expand(x.shape)) for x in (q, k, v))
        if packed_rows is not None:
            # The decay runs per position, padding included: a pad after real tokens (or after a cached state)
            # would decay the state it does not write to. Packed, the pads are simply not there.
            index, cu_seqlens = packed_rows
            q, k, v = (x.flatten(0, 1)[index][None] for x in (q, k, v))
        common = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        if mode == "parallel":
            o, state = kernels.parallel_retention(q, k, v, log_decay, **common)
        elif mode == "chunkwise":
            o, state = kernels.chunk_retention(q, k, v, log_decay, chunk_size=self.config.chunk_size, **common)
        else:
            if update_state_inplace and _inplace_state_allowed(q, k, v, initial_state):
                common["update_state_inplace"] = True
            o, state = kernels.recurrent_retention(q, k, v, log_decay, **common)
        if packed_rows is not None:
            o = o.new_zeros(batch * length, *o.shape[2:]).index_copy(0, index, o[0]).view(batch, length, *o.shape[2:])
        if in_front is not None:  # back in place, 0 at the padding as packed (q there may be anything)
            o = torch.zeros_like(o).scatter(1, order.expand(o.shape), o).masked_fill(
                ~in_front.real[:, :, None, None], 0)
        return o, state


class RetNetMLP(nn.Module):
    """The FFN: ``down(act(up(x)))``, or with ``ffn_glu`` ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        name, kwargs = config.layer_activation(layer_idx)
        self.act_fn = get_activation(name, **kwargs)
        width = config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=config.ffn_bias) if config.ffn_glu else None
        self.up_proj = nn.Linear(config.hidden_size, width, bias=config.ffn_bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.ffn_bias)
        self.down_proj.is_residual_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class RetNetDecoderLayer(nn.Module):
    """Pre-norm block: x + Retention(Norm(x)), then + FFN(Norm(·))."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.retention_norm = build_norm(config, config.hidden_size)
        self.retention = RetNetMultiScaleRetention(config, layer_idx)
        self.ffn_norm = build_norm(config, config.hidden_size)
        self.mlp = RetNetMLP(config, layer_idx)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, positions, token_mask, initial_state, output_final_state, mode, cu_seqlens,
                packed_rows=None, context=None, update_state_inplace=False):
        retained, state = self.retention(
            self.retention_norm(hidden_states), positions, token_mask, initial_state, output_final_state,
            mode, cu_seqlens, packed_rows, context, update_state_inplace,
        )
        if self.dropout.training and self.dropout.p > 0:
            hidden_states = hidden_states + self.dropout(retained)
            return hidden_states + self.dropout(self.mlp(self.ffn_norm(hidden_states))), state
        # Dropout that drops nothing returns its input: two module calls per layer saved (decoding runs in eval).
        hidden_states = hidden_states + retained
        return hidden_states + self.mlp(self.ffn_norm(hidden_states)), state


# ----------------------------------------------------------------------------------------------------------
# Pretrained model, base model, causal LM
# ----------------------------------------------------------------------------------------------------------
class _CacheAlias:
    """Outputs carry the cache under the field name this transformers uses (``cache`` from 5.2x,
    ``past_key_values`` before); both names read it."""

    @property
    def cache(self) -> RetNetCache | None:
        return self.get(CACHE_KWARG)

    @property
    def past_key_values(self) -> RetNetCache | None:
        return self.get(CACHE_KWARG)


@dataclass
class RetNetModelOutput(_CacheAlias, ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    if CACHE_KWARG == "cache":
        cache: RetNetCache | None = None
    else:
        past_key_values: RetNetCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RetNetCausalLMOutput(_CacheAlias, ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_KWARG == "cache":
        cache: RetNetCache | None = None
    else:
        past_key_values: RetNetCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RetNetSequenceClassifierOutput(_CacheAlias, SequenceClassifierOutputWithPast):
    """transformers' ``SequenceClassifierOutputWithPast`` (an instance of it) whose cache reads under both names.
    The fields are declared again so the cache field shadows the alias property of its own name."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_KWARG == "cache":
        cache: RetNetCache | None = None
    else:
        past_key_values: RetNetCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# The activation parameters (names under ``mlp.act_fn``) that exports and training checkpoints written before they
# became one-element tensors hold 0-dim: SAU's and a trainable gSmeLU's (a fixed gSmeLU has none)
FORMER_SCALAR_ACT_PARAMETERS = tuple(dict.fromkeys(("alpha", "log_sigma", *_GSMELU_PARAMETERS)))


class _FormerScalarToOneElement(ConversionOps):
    """An activation parameter written 0-dim (exports from before they became ``[1]``) loads as ``[1]``.

    ``SAU._load_from_state_dict`` (and gSmeLU's) do this for ``load_state_dict`` (training resumes), but
    transformers 5's ``from_pretrained`` sets parameters itself and refused the 0-dim ones as size mismatches; its
    checkpoint conversion mapping is the hook it offers for a model's older layouts. Saving keeps ``[1]`` (the
    reverse is this same op, which leaves a one-element tensor as it is)."""

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensors = next(iter(input_dict.values()))
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        return {target_patterns[0]: tensor.reshape(1) if tensor.dim() == 0 else tensor}

    @property
    def reverse_op(self) -> ConversionOps:
        return self


if get_checkpoint_conversion_mapping(RetNetConfig.model_type) is None:  # a reloaded module registered it already
    register_checkpoint_conversion_mapping(RetNetConfig.model_type, [
        WeightConverter(source_patterns=[pattern], target_patterns=[pattern],
                        operations=[_FormerScalarToOneElement()])
        for pattern in (f"mlp.act_fn.{name}" for name in FORMER_SCALAR_ACT_PARAMETERS)
    ])


class RetNetPreTrainedModel(PreTrainedModel):
    config_class = RetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetNetDecoderLayer"]
    _is_stateful = True

    def __init__(self, config: RetNetConfig, *inputs, **kwargs):
        # The config validated itself when built, but it is a mutable object: a field set since then
        # (config.chunk_size = 0) would otherwise surface as a shape error deep inside a layer.
        if isinstance(config, RetNetConfig):
            config.validate_retnet()
        super().__init__(config, *inputs, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, refusing up front a config that would not load, and a model with
        DTensor parameters (tensor parallelism, FSDP2) saved without ``state_dict=``: its own state dict holds each
        rank's shards, which safetensors fails on after config.json is written, leaving a half-written directory.
        (transformers' ``distributed_checkpoint=True``, a DCP writer called on every rank, is left to
        transformers.)"""
        if isinstance(self.config, RetNetConfig):
            # A field changed since the model was built (resize_token_embeddings below the pad id only warns)
            # would otherwise be written, and refused only when the checkpoint is loaded.
            try:
                self.config.validate_retnet()
            except ValueError as error:
                raise ValueError(f"save_pretrained: the config would not load: {error}") from None
        state_dict = kwargs.get("state_dict", args[1] if len(args) > 1 else None)
        if not kwargs.get("distributed_checkpoint") and torch.distributed.is_available():
            from torch.distributed.tensor import DTensor

            # the model's own state dict, or one given that is still its (model.state_dict() of a split model)
            tensors = self.named_parameters() if state_dict is None else state_dict.items()
            sharded = next((name for name, tensor in tensors if isinstance(tensor, DTensor)), None)
            if sharded is not None:
                raise ValueError(
                    f"save_pretrained: {sharded} is a DTensor (the model is parallelized or sharded), so its state "
                    f"dict holds this rank's shards. Gather it on every rank with state_dict = "
                    f"retnet.model.tensor_parallel.full_state_dict(model), then save on rank 0 only: "
                    f"model.save_pretrained(directory, state_dict=state_dict)")
        # Weight-only int8 (retnet.model.quantization): safetensors cannot write torchao's tensors ("Attempted to
        # access the data pointer on an invalid python storage"); the weights the model computes with are saved.
        from retnet.model.quantization import dequantized, is_quantized_tensor

        if state_dict is None and any(is_quantized_tensor(param) for param in self.parameters()):
            state_dict = self.state_dict()
        if state_dict is not None and any(is_quantized_tensor(value) for value in state_dict.values()):
            state_dict = dequantized(state_dict)
            if len(args) > 1:
                args = (args[0], state_dict, *args[2:])
            else:
                kwargs["state_dict"] = state_dict
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        """transformers' hook behind ``activation_checkpointing_enable(every_n_layers=N)`` (Trainer's
        ``gradient_checkpointing_kwargs={"every_n_layers": N}``): it picks the layers to checkpoint only among
        ``GradientCheckpointingLayer`` modules, which RetNet's layers are not (``RetNetModel.forward`` checkpoints
        them itself), so ``every_n_layers`` was silently ignored and every layer recomputed. ``RetNetModel`` keeps it
        and checkpoints layers 0, N, 2N, ... as transformers' models do."""
        every = kwargs.get("every_n_layers", 1)
        if enable and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"every_n_layers must be a positive integer; got {every!r}")
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable=enable, **kwargs)
        for module in self.modules():
            if isinstance(module, RetNetModel):
                module.checkpoint_every_n_layers = every if enable else 1

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # Residual-branch outputs scaled by 1/sqrt(2L) (GPT-2), so the residual stream's variance
            # does not grow with depth.
            is_residual_out = getattr(module, "is_residual_output", False)
            scale = (2 * self.config.num_hidden_layers) ** -0.5 if is_residual_out else 1.0
            init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            # padding_idx freezes that row, and nn.Embedding and transformers' models start it at zero: drawn
            # at random it would stay a random pad embedding for good. (A loaded checkpoint's row is its own.)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, (nn.LayerNorm, RetNetRMSNorm, RetNetHeadNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, SAU):
            init.constant_(module.alpha, module.init_alpha)
            init.constant_(module.log_sigma, math.log(module.init_sigma))
        elif isinstance(module, GeneralizedSmeLU) and module.trainable:
            # from_pretrained builds on the meta device: without this, parameters missing from a checkpoint
            # (one saved before trainable was set) would keep uninitialised memory.
            for key, value in module.init_values.items():
                init.constant_(getattr(module, key), value)

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, *args, **kwargs):
        """transformers' hook for ``attn_implementation`` (``from_pretrained``, the config, ``set_attn_implementation``):
        any implementation transformers knows is accepted and changes nothing, noted once. RetNet has no attention:
        retention runs on :mod:`retnet.kernels` (Triton on GPU) whatever is asked. Generic scripts (lm-eval, TRL,
        ...) pass ``attn_implementation`` for any model, and transformers' refusal ("does not support ... yet")
        would stop them. "eager" is kept so that nothing of another implementation (generate's flash-attention
        paths) switches on; an unknown name is refused as transformers refuses it, a typo being likelier there."""
        if attn_implementation is None:
            return "eager"
        name = attn_implementation.removeprefix("paged|")
        known = getattr(ALL_ATTENTION_FUNCTIONS, "valid_keys", ALL_ATTENTION_FUNCTIONS.keys)()
        if name != "eager" and name not in known and "/" not in name:  # "org/repo": a hub kernel's name
            raise ValueError(f"attn_implementation must be one of {['eager', *sorted(known)]} or a hub kernel "
                             f"(all run RetNet's retention, which has no attention to implement); got "
                             f"{attn_implementation!r}")
        if attn_implementation != "eager":
            logger.warning_once(f"attn_implementation={attn_implementation!r} has no effect on "
                                f"{type(self).__name__}: RetNet has no attention; its retention runs on "
                                f"retnet.kernels (Triton on GPU) whatever the attn_implementation")
        return "eager"

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False, *args, **kwargs):
        # What transformers' hook above calls in its own version (and a refactor might call directly): the same
        # answer either way.
        return self._check_and_adjust_attn_implementation(requested_attention, is_init_check)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The recurrent state is not a KV cache; the model builds its own RetNetCache.
        return False


class RetNetModel(RetNetPreTrainedModel):
    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        # padding_idx freezes that row; a pad that is also the EOS (a usual choice for tokenizers without a
        # pad) would freeze the EOS, which opens every packed document, at its initial value.
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        padding_idx = None if config.pad_token_id in eos else config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(RetNetDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config, config.hidden_size)
        self.rotary_emb = RetNetRotaryEmbedding(config)
        self.gradient_checkpointing = False
        # With checkpointing on, the layers checkpointed are those whose index is a multiple of this
        # (activation_checkpointing_enable's every_n_layers; see _set_gradient_checkpointing).
        self.checkpoint_every_n_layers = 1
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RetNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        retention_mode: str | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: RetNetCache | None = None,
        context_parallel: ContextShard | None = None,
        **kwargs,
    ) -> RetNetModelOutput | tuple:
        """Run the decoder.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds`` ``[B, T, d]``).
            attention_mask: ``[B, T]`` or ``[B, past + T]`` (as ``generate`` passes it), 1 for real tokens,
                0 for padding; padded positions write nothing into the state. Left padding is supported.
            position_ids: ``[B, T]``; by default counted from the cache's per-sequence offsets over real tokens.
                Given without an attention mask or a cache, positions that restart (transformers'
                ``DataCollatorWithFlattening``) mark packed sequences, run as ``cu_seqlens`` (B=1).
            cache / past_key_values: a :class:`RetNetCache` to continue from (and update in place).
            use_cache: return the cache (a new one if none was given).
            retention_mode: overrides ``config.retention_mode`` for this call.
            cu_seqlens: ``[N + 1]`` offsets of N sequences packed into one row (B=1, no ``attention_mask``);
                no state crosses a boundary. Without a cache (or with a new, empty one) every sequence starts
                from a zero state at position 0. With a cache of N rows, sequence i continues row i: its
                initial state is ``cache.states[layer][i]``, its positions count from ``cache.offsets[i]``,
                and the final states ``[N, H, K, V]`` and offsets (each advanced by its sequence's length)
                go back into the cache. ``RetNetForCausalLM``'s ``logits_to_keep=cu_seqlens[1:] - 1`` then
                gives each sequence's last-token logits. Its values are read to the host (checked, and sizing
                the kernels' work) once per forward, whatever the depth.
            context_parallel: this rank's piece of a row split along time across a group of ranks (training;
                see :mod:`retnet.model.context_parallel` and its ``shard_sequences``). Every rank of the group
                runs its piece at once; positions continue from the earlier pieces (with xPos, each piece in
                frames of its own). No cache, attention mask or ``position_ids`` with it.
        """
        cache = cache if cache is not None else past_key_values
        _check_cache_and_outputs(cache, kwargs)
        cu_seqlens = _flattened_offsets(cu_seqlens, kwargs)
        snapshot_at, answered = None, 0  # assisted decoding: where the layers keep their states, outputs left out
        # Unset, they are the config's, as in transformers' models (from_pretrained(path, output_hidden_states=True)).
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        output_hidden_states = bool(output_hidden_states)
        asked_for_cache = use_cache is True
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        # (a [T] row of ids embedded to [T, d] was read as T rows of d tokens, and failed deep in a layer)
        given, name, shape, dims = (input_ids, "input_ids", "[B, T]", 2) if inputs_embeds is None else (
            inputs_embeds, "inputs_embeds", "[B, T, hidden_size]", 3)
        if given.dim() != dims:
            raise ValueError(f"{name} must be {shape} (a batch of one: x[None]); got shape {tuple(given.shape)}")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else self._embeds_in_model_dtype(
            inputs_embeds)
        batch, length = hidden_states.shape[:2]
        mode = retention_mode or self.config.retention_mode
        if attention_mask is not None and (
            attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length
        ):  # (before any split into pieces, so that the error names the input's length)
            raise ValueError(
                f"attention_mask must be [B, T] or [B, past + T] with B={batch}, T={length}; "
                f"got {tuple(attention_mask.shape)}"
            )
        if cache is not None and cache.recording:
            # Assisted decoding may crop this forward's last tokens (RetNetCache.crop): the cache is kept as it was
            # before them. A forward that begins with tokens fed again after a crop (kept for sure), or a long one
            # (a prompt), keeps it after those (each layer between two retention calls; in xPos frames, between
            # two passes), so that a crop never goes back further than that.
            # Only the first forward since the recording began (or since a draft's round began) is cut by the
            # count it was begun with: a "heuristic" schedule drafts more later, so a later forward keeps the
            # snapshot before all of it.
            if cu_seqlens is not None:  # (its rows would each need their own snapshot and re-fed count)
                raise ValueError("a recording cache (assisted decoding's, after activate_past_recording) takes no "
                                 "cu_seqlens: feed one sequence per row")
            refeed, cache.refeed = cache.refeed, 0
            if 0 < refeed < length:
                split = refeed
            else:
                split = length - cache.recording - 1 if cache.snapshot is None else 0
            if split > 0 and cu_seqlens is None and context_parallel is None:
                # The tokens fed again were answered before (transformers counts them as seen and splits the
                # outputs per token it fed): their outputs are left out.
                answered = split if refeed else 0
                if not self._snapshot_in_layers(attention_mask, length):
                    return self._forward_in_pieces([(0, split), (split, length)], hidden_states, attention_mask,
                                                   position_ids, cache, use_cache, output_hidden_states,
                                                   return_dict, mode, snapshot_before_last=True, answered=answered)
                snapshot_at = split
            elif length > 1 or cache.snapshot is None:  # (one token: a plain decoding step, nothing to take back)
                cache.record_snapshot()
        span = self._padded_xpos_pieces(hidden_states, attention_mask, position_ids, cu_seqlens, context_parallel,
                                        cache)
        if span is not None:
            return self._forward_in_pieces([(start, min(start + span, length)) for start in range(0, length, span)],
                                           hidden_states, attention_mask, position_ids, cache, use_cache,
                                           output_hidden_states, return_dict, mode)
        if context_parallel is not None:
            context_parallel = self._check_context(context_parallel, length, cache, asked_for_cache, attention_mask,
                                                   position_ids, cu_seqlens)
            use_cache = False
        cu_seqlens = _offsets_from_restarts(cu_seqlens, position_ids, given, attention_mask, cache, context_parallel)
        # Every layer's ops read the packed offsets on the host (to check them, to size their work): through
        # this, once per forward rather than a few device syncs per layer (retnet.kernels.checks).
        shared_offsets = SharedHostOffsets()
        if cu_seqlens is not None:
            _check_packed(cu_seqlens, batch, attention_mask, cache)
            # Offsets are often built on the host; the kernels take them only on the tokens' device.
            cu_seqlens = cu_seqlens.to(hidden_states.device)
            if mode == "auto" and not kernels.use_triton(hidden_states):
                # The reference runs a packed row sequence by sequence: pick the form for the longest one,
                # once for all layers (the read the layers' ops then share).
                mode = resolve_retention_mode(mode, shared_offsets.get(cu_seqlens).longest, hidden_states)

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # Checkpointed training makes no cache of its own (transformers turns use_cache off there), but one
        # passed in holds the state to continue from. The layers never write it (the loop below does, once),
        # so a replayed layer cannot update it twice.
        if use_cache and cache is None and not checkpointing:
            cache = RetNetCache(len(self.layers))
        if checkpointing and asked_for_cache and cache is None:
            # Asked for by name, a cache that is not returned is said so, as transformers' models do (they warn on
            # the config's default too, which every checkpointed training step would hit here).
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing in training: no cache "
                                "is returned (a cache passed in is continued and updated)")
        if cache is not None:
            _check_cache_fits(cache, len(self.layers), batch if cu_seqlens is None else None)

        token_mask = None
        if attention_mask is not None:
            # (not [:, -length:]: with no new tokens, -0 kept the whole [B, past] mask for a [B, 0] input)
            token_mask = attention_mask[:, attention_mask.shape[1] - length:]
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
                # Otherwise a broadcasting error deep in the rotary embedding, naming neither argument.
                raise ValueError(f"position_ids must be [B, T] (or [1, T]) with B={batch}, T={length}; "
                                 f"got {tuple(position_ids.shape)}")
            # A view: the xPos frames index the positions per row, by the batch's token indices when packed.
            position_ids = position_ids.expand(batch, -1)
        past_offsets = None if cache is None else cache.offsets
        custom_positions = position_ids is not None
        context_offsets = None
        if context_parallel is not None:  # the first sequence's positions go on from the earlier pieces
            rows = batch if cu_seqlens is None else len(cu_seqlens) - 1
            context_offsets = torch.zeros(rows, dtype=torch.long, device=hidden_states.device)
            context_offsets[0 if cu_seqlens is not None else slice(None)] = context_parallel.offset
        if position_ids is None:
            offsets = past_offsets if context_offsets is None else context_offsets
            position_ids = self._positions(batch, length, token_mask, offsets, cu_seqlens, hidden_states.device)
        packed_rows = None if token_mask is None else _pack_padded_rows(token_mask, past_offsets is not None)
        new_offsets = None
        if cache is not None:
            if cu_seqlens is None:
                real_tokens = length if token_mask is None else token_mask.sum(-1).long()
            else:
                real_tokens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(hidden_states.device, torch.long)
            rows = batch if cu_seqlens is None else len(cu_seqlens) - 1
            base = past_offsets if past_offsets is not None else torch.zeros(rows, dtype=torch.long,
                                                                             device=hidden_states.device)
            new_offsets = base + real_tokens
        xpos = None
        if self.config.use_xpos:
            origins, targets = past_offsets, new_offsets
            if context_offsets is not None:
                # As a cache's state is kept: every sequence of the piece counts its xPos positions from its first
                # token here (the first one's document may start pieces back, where the scales would overflow),
                # and its final state is returned in the frame after its last, where the next piece goes on.
                origins = context_offsets
                targets = origins + (length if cu_seqlens is None
                                     else (cu_seqlens[1:] - cu_seqlens[:-1]).to(origins.device, torch.long))
            xpos = self._xpos_frames(position_ids, origins, targets, cu_seqlens, packed_rows, custom_positions,
                                     context_parallel is not None)
        positions = self.rotary_emb(position_ids, xpos, packed=packed_rows is not None or cu_seqlens is not None,
                                    starts_at_origin=not custom_positions)
        if xpos is not None and context_parallel is not None:
            positions.context_shifts = self.rotary_emb.state_factor(
                torch.tensor(context_parallel.lengths, device=hidden_states.device))
        if snapshot_at is not None:
            positions = positions.split_at(snapshot_at)
            snapshot_offsets = (past_offsets if past_offsets is not None
                                else torch.zeros(batch, dtype=torch.long, device=hidden_states.device)) + snapshot_at

        all_hidden_states = ()
        packed = cu_seqlens is not None or (packed_rows is not None and not isinstance(packed_rows, _PaddingInFront))
        # Only a cache whose owner opted in, and never while it keeps a snapshot (record_snapshot and crop share
        # its tensors with the cache's list) or packed (the server's speculative step keeps the states from before
        # its packed verify forward; the reference would copy a packed step's states back anyway).
        in_place = (cache is not None and cache.update_in_place and not cache.recording and cache.snapshot is None
                    and snapshot_at is None and not packed and context_parallel is None and not checkpointing)
        for layer in self.layers:
            # Filled out here, not first inside a compiled layer: a checkpoint's recomputation would find it filled,
            # trace another graph and save other tensors than the forward did (CheckpointError in backward).
            layer.retention.log_decay(hidden_states.device)
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            initial_state = None if cache is None else cache.states[index]
            args = (hidden_states, positions, token_mask, initial_state, cache is not None, mode, cu_seqlens,
                    packed_rows, context_parallel, in_place)
            run = _sharing_host_offsets(layer.__call__, shared_offsets) if packed else layer.__call__
            if checkpointing and index % self.checkpoint_every_n_layers == 0:
                # (the recomputation in backward runs `run` again, so it shares the forward's read too)
                hidden_states, state = self._gradient_checkpointing_func(run, *args)
            else:
                hidden_states, state = run(*args)
            if cache is not None:
                cache.states[index] = state
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if answered:
            hidden_states = hidden_states[:, answered:]
            all_hidden_states = tuple(h[:, answered:] for h in all_hidden_states)

        if snapshot_at is not None:
            cache.record_snapshot(positions.kept_states, snapshot_offsets, cache.seen_tokens + snapshot_at)
        if cache is not None:
            cache.offsets = new_offsets
            if cu_seqlens is None:
                cache.seen_tokens += length
            else:
                # Packed sequences advance by different counts: keep the longest row's, the width a padded
                # batch of them would have (as concat and split keep it).
                cache.seen_tokens = int(cache.offsets.max())
        output = RetNetModelOutput(
            last_hidden_state=hidden_states,
            **{CACHE_KWARG: cache if use_cache else None},
            hidden_states=all_hidden_states if output_hidden_states else None,
        )
        return output if _return_dict(self.config, return_dict) else output.to_tuple()

    def _padded_xpos_pieces(self, hidden_states, attention_mask, position_ids, cu_seqlens, context_parallel, cache):
        """The width of the pieces to run a padded xPos batch in, when it is wider than one packed frame covers;
        else None. A padded batch runs packed, each row in one xPos frame, so a right-padded prompt longer than
        that (28 288 positions at ``xpos_scale_base=512``) was refused where the same prompt left-padded ran;
        run in pieces, the state carries from one to the next, as a chunked prefill does.

        Given ``position_ids`` run in the same pieces (each piece's columns of them): the pieces' frames follow the
        cache's offsets, so positions that number each row's real tokens on from them, as ``generate`` builds them
        from the mask, stay within every piece's frame, and each row gives what it gives alone (they were refused
        beyond one frame, though the same batch left-padded on a fresh state ran)."""
        length = hidden_states.shape[1]
        if (not self.config.use_xpos or attention_mask is None or attention_mask.dim() != 2
                or cu_seqlens is not None or context_parallel is not None):
            return None
        batch = hidden_states.shape[0]
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != length
                                         or position_ids.shape[0] not in (1, batch)):
            return None  # refused naming its shape by the forward, not by a piece of it
        if cache is not None and cache.offsets is not None and cache.offsets.shape[0] != batch:
            return None  # (a cache of other rows: the same)
        span = xpos_span(self.config, XPOS_PACKED_MAX_GROWTH)
        if length <= span:
            return None
        # (host reads, for long xPos inputs only) Left padding on a fresh state runs unpacked, in frames of its own.
        has_state = cache is not None and cache.offsets is not None
        if _pack_padded_rows(attention_mask[:, -length:], has_state) is None:
            return None
        if position_ids is not None:  # positions that fit one frame run in one forward, as before
            real = attention_mask[:, -length:] != 0
            pos = position_ids.expand(real.shape[0], -1).to(real.device).long()
            origin = (cache.offsets.to(real.device) if has_state else
                      pos.gather(1, real.int().argmax(-1)[:, None])[:, 0])
            rel = (pos - origin[:, None])[real]
            if rel.numel() == 0 or (int(rel.min()) >= 0 and int(rel.max()) < span):
                return None
        return span

    def _embeds_in_model_dtype(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` in the dtype ``embed_tokens`` gives (the layers' norms take no other): cast where
        transformers' LlamaForCausalLM takes them too (a narrower float into a wider model, as its norms promote; any
        float under autocast), else a ``ValueError`` naming both dtypes (a wider float into a narrower model, which
        would round them, and fp16 against bf16), where a layer raised a cryptic dtype error deep inside."""
        weight = getattr(self.embed_tokens, "weight", None)
        dtype, given = (self.dtype if weight is None else weight.dtype), inputs_embeds.dtype
        if given == dtype:
            return inputs_embeds
        if given.is_floating_point and (torch.promote_types(given, dtype) == dtype
                                        or torch.is_autocast_enabled(inputs_embeds.device.type)):
            return inputs_embeds.to(dtype)
        raise ValueError(f"inputs_embeds is {given}, the model is {dtype}: pass inputs_embeds.to({dtype}) (or run "
                         f"under torch.autocast)" if given.is_floating_point else
                         f"inputs_embeds must be floating point ({dtype}, the model's); got {given}")

    def _snapshot_in_layers(self, attention_mask, length) -> bool:
        """Whether assisted decoding's snapshot can be taken inside the layers (RetNetPositionEncoding.split_at):
        not in xPos frames (the state between two pieces is in the first's, not the cache's), nor through the
        packing a padded batch runs in (one host read of the mask), nor where a layer's recomputation would keep
        its state twice (checkpointed training)."""
        if self.config.use_xpos or (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return False
        return attention_mask is None or bool(attention_mask[:, -length:].all())

    def _forward_in_pieces(self, bounds, hidden_states, attention_mask, position_ids, cache, use_cache,
                           output_hidden_states, return_dict, mode, snapshot_before_last=False, answered=0
                           ) -> RetNetModelOutput | tuple:
        """:meth:`forward` over the columns ``bounds`` (``(start, end)`` pairs), one after the other, the state
        carried in ``cache`` (a new one if none was given, returned only with ``use_cache``).
        ``snapshot_before_last``: the cache records a snapshot before the last piece, and not otherwise.
        ``answered``: the outputs begin after this many columns."""
        length = hidden_states.shape[1]
        run_cache = cache if cache is not None else RetNetCache(len(self.layers))
        # As the unsplit forward: checkpointed training returns no cache of its own (its states hold the graph).
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        returns_cache = use_cache and (cache is not None or not checkpointing)
        if cache is None and not returns_cache and position_ids is not None and self.config.use_xpos:
            # The pieces' own cache goes to no caller, so its offsets need not count real tokens: starting at each
            # row's first real position, its frames follow the given positions, which may then start anywhere (a
            # returned cache's offsets hold the count, and positions far ahead of it are refused by name).
            mask = None if attention_mask is None else attention_mask[:, -length:] != 0
            first = (torch.zeros(hidden_states.shape[0], dtype=torch.long, device=position_ids.device) if mask is None
                     else mask.int().argmax(-1).to(position_ids.device))  # (a row of padding only: its column 0)
            run_cache.offsets = (position_ids.expand(hidden_states.shape[0], -1).gather(1, first[:, None])[:, 0].long()
                                 .to(hidden_states.device))
        recording, run_cache.recording = run_cache.recording, 0
        outputs = []
        try:
            for number, (start, end) in enumerate(bounds):
                if snapshot_before_last and number == len(bounds) - 1:
                    run_cache.record_snapshot()
                # forward itself, not self(...): the module's hooks run once, on the whole input
                outputs.append(RetNetModel.forward(self,
                    inputs_embeds=hidden_states[:, start:end],
                    attention_mask=None if attention_mask is None
                    else attention_mask[:, : attention_mask.shape[1] - (length - end)],
                    position_ids=None if position_ids is None else position_ids[:, start:end],
                    cache=run_cache, use_cache=True, output_hidden_states=output_hidden_states, return_dict=True,
                    retention_mode=mode,
                ))
        finally:
            run_cache.recording = recording
        all_hidden_states = None
        if output_hidden_states:
            all_hidden_states = tuple(torch.cat(layer, 1)[:, answered:]
                                      for layer in zip(*(o.hidden_states for o in outputs)))
        output = RetNetModelOutput(
            last_hidden_state=torch.cat([o.last_hidden_state for o in outputs], 1)[:, answered:],
            **{CACHE_KWARG: run_cache if returns_cache else None},
            hidden_states=all_hidden_states,
        )
        return output if _return_dict(self.config, return_dict) else output.to_tuple()

    def _xpos_frames(self, position_ids, past_offsets, new_offsets, cu_seqlens, packed_rows, custom_positions,
                     context_parallel=False):
        """``(relative, target)`` for the layers (see :meth:`RetNetMultiScaleRetention.forward`).

        A cached state is kept in the xPos frame of its next position, ``cache.offsets``: each sequence's
        positions count from there (its origin), and the final state is moved to the new offsets. Without a
        cached state the origin is position 0, or with ``position_ids`` given the sequence's first position.
        """
        length = position_ids.shape[1]
        device = position_ids.device
        segment = None
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device)
            segment = torch.searchsorted(cu_seqlens, torch.arange(length, device=device), right=True) - 1
        if past_offsets is not None:
            origin = past_offsets
        elif not custom_positions or length == 0:
            rows = position_ids.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
            origin = torch.zeros(rows, dtype=torch.long, device=device)
        elif cu_seqlens is None and packed_rows is not None:
            # A packed row's frame starts at its first real token's position: its first column may be padding,
            # whose position (0, or 1 in older transformers) says nothing of where the real tokens start.
            rows = torch.arange(position_ids.shape[0], device=device)
            if isinstance(packed_rows, _PaddingInFront):  # (a row of padding only: its column 0, as below)
                column = packed_rows.real.int().argmax(-1).to(device)
            else:
                index, row_offsets = packed_rows
                starts = index[row_offsets[:-1].clamp(max=max(index.numel() - 1, 0))] if index.numel() else None
                column = torch.zeros_like(rows) if starts is None else torch.where(
                    row_offsets[1:] > row_offsets[:-1], starts.to(device) - rows * length, 0)
            origin = position_ids[rows, column]
        elif cu_seqlens is None:
            origin = position_ids[:, 0]
        else:
            origin = position_ids[0, cu_seqlens[:-1].clamp(max=length - 1)]
        origin = origin.to(device, torch.long)
        relative = position_ids - (origin[:, None] if segment is None else origin[segment][None])
        target = None if new_offsets is None else new_offsets - origin
        growth = XPOS_PACKED_MAX_GROWTH
        span = xpos_span(self.config, growth)
        packed = packed_rows is not None or cu_seqlens is not None
        if packed and (custom_positions or length > span):
            # A packed row runs in one frame per sequence: its positions must stay within one span of it. Only
            # real tokens are packed, so padding's positions (generate gives them 0) do not count.
            real = (relative if packed_rows is None else relative[packed_rows.real]
                    if isinstance(packed_rows, _PaddingInFront) else relative.flatten()[packed_rows[0]])
            low, high = (int(real.min()), int(real.max())) if real.numel() else (0, 0)
            if low < 0 or high >= span:
                # A padded batch is already fed in pieces of `span` columns (_padded_xpos_pieces): only positions
                # that leave the frame get here, and feeding them in pieces would not help.
                advice = ("split the row across more context-parallel ranks (shorter pieces), or run it unpacked "
                          "(training: data.document_boundaries=false)"
                          if context_parallel else
                          "feed it in pieces with the cache, or unpacked" if packed_rows is None else
                          "a padded row's frame is at its cache's offsets (the real tokens it has seen; without a "
                          "cache, at its first real token's position): give position_ids that number each row's "
                          "real tokens on from there, as generate builds them from the attention_mask, or leave "
                          "position_ids out (the model counts them so)")
                raise XPosFrameError(
                    f"use_xpos: a packed or padded sequence reaches position {high if high >= span else low} from "
                    f"its start, but one forward covers at most {span} positions per sequence when packed "
                    f"(xpos_scale_base={self.config.xpos_scale_base}: q/k scales stay within "
                    f"{growth:g}); {advice}"
                )
        if custom_positions and target is not None and length:
            # Moving the (fp32) state into an earlier frame scales it by ζ^(−shift/base): from the cache's offsets
            # back to the frame of positions behind them (unpacked; packed rows were held to the offsets above),
            # and from the frame of the last positions back to the offsets it is returned at. One host read.
            ends = relative.max(-1).values if segment is None else torch.full_like(target, -(2**62)).scatter_reduce(
                0, segment, relative[0], "amax")
            behind = relative.new_zeros(()) if packed else -relative.min()
            ahead, behind = torch.stack([(ends - target).max(), behind]).tolist()
            limit = int(math.log(XPOS_MAX_STATE_GROWTH) * self.config.xpos_scale_base / -math.log(XPOS_MIN_ZETA))
            if behind > limit:
                raise ValueError(
                    f"use_xpos: position_ids run {behind} positions behind the cache's offsets (the next position by "
                    f"its count, which the state's xPos frame follows); at most {limit} are supported "
                    f"(xpos_scale_base={self.config.xpos_scale_base}). Pass positions that follow cache.offsets"
                )
            if ahead > limit:
                raise ValueError(
                    f"use_xpos: position_ids run {ahead} positions past the cache's offsets (the next position by "
                    f"its count, which the state's xPos frame follows); at most {limit} are supported "
                    f"(xpos_scale_base={self.config.xpos_scale_base}). Pass positions that follow cache.offsets, "
                    "or use_cache=False"
                )
        return relative, target

    def _check_context(self, shard: ContextShard, length, cache, use_cache, attention_mask, position_ids,
                       cu_seqlens) -> ContextShard:
        """Refuse what context parallelism cannot run; fill in the piece's first sequence length."""
        refused = {"a cache": cache is not None or use_cache is True, "an attention_mask": attention_mask is not None,
                   "position_ids (positions come from the shard)": position_ids is not None}
        for what, given in refused.items():
            if given:
                raise ValueError(f"context_parallel cannot take {what}")
        if length != shard.length:
            raise ValueError(f"context_parallel: piece {shard.rank} of {shard.size} has {shard.length} tokens "
                             f"(shard.lengths[{shard.rank}]); got {length}")
        if shard.first_length is None:
            first = length if cu_seqlens is None else int(cu_seqlens[1])  # one host read per forward
            shard = dataclasses.replace(shard, first_length=first)
        return shard

    @staticmethod
    def _positions(batch, length, token_mask, past_offsets, cu_seqlens, device) -> torch.Tensor:
        """Each sequence's real tokens numbered from its cache offset; padding gets the next real position."""
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device)
            steps = torch.arange(length, device=device)
            segment = torch.searchsorted(cu_seqlens, steps, right=True) - 1
            positions = steps - cu_seqlens[segment]
            return (positions if past_offsets is None else positions + past_offsets[segment])[None]
        start = torch.zeros(batch, 1, dtype=torch.long, device=device) if past_offsets is None else past_offsets[:, None]
        if token_mask is None:
            return start + torch.arange(length, device=device)[None]
        return start + (token_mask.long().cumsum(-1) - 1).clamp(min=0)


def _packed_from_positions(position_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    """``cu_seqlens`` of the sequences ``position_ids`` mark by restarting, as transformers' padding-free collator
    (``DataCollatorWithFlattening``) packs them into one row: a sequence starts wherever a position does not follow
    the one before by 1 (transformers' ``find_packed_sequence_indices``). None when they only count on.

    transformers' models keep such sequences apart by their attention mask; here the state would carry from one
    into the next, so they run as ``cu_seqlens``, each from a zero state."""
    if position_ids.dim() != 2 or position_ids.shape[1] != length or length < 2:
        return None  # refused by name further on (or a single position, which starts nothing)
    starts = position_ids[:, 1:] - position_ids[:, :-1] != 1
    return _offsets_from_starts(starts, length, lambda: (
        f"position_ids restart inside a row (row {int(starts.any(-1).nonzero()[0])}: a position that does not "
        "follow the one before by 1 starts a packed sequence, as transformers' DataCollatorWithFlattening makes "
        f"them); packed sequences run apart in one row (B=1), got B={batch}: pack them into one row, pass "
        "cu_seqlens, or give each sequence its own row with an attention_mask"
    ), batch=batch)


def _offsets_from_starts(starts: torch.Tensor, length: int, refusal_message: Callable[[], str],
                         batch: int = 1) -> torch.Tensor | None:
    """``cu_seqlens`` of a row of ``length`` tokens whose sequences begin after each True of ``starts``
    ``[rows, length - 1]``; None when none does. More than one row (or a ``batch`` of them) is refused with
    ``refusal_message()``, built only then (it may read the device)."""
    if not bool(starts.any()):  # one host read, only for inputs that can mark packed sequences
        return None
    if batch != 1 or starts.shape[0] != 1:
        raise ValueError(refusal_message())
    firsts = starts[0].nonzero().squeeze(-1) + 1
    edges = torch.tensor([0, length], dtype=firsts.dtype, device=firsts.device)
    return torch.cat([edges[:1], firsts, edges[1:]])


def _sharing_host_offsets(fn, shared: SharedHostOffsets):
    """``fn`` run with ``shared`` active: its retention ops read packed offsets through it."""

    def run(*args):
        with shared.active():
            return fn(*args)

    return run


def _flattened_offsets(cu_seqlens: torch.Tensor | None, kwargs: dict) -> torch.Tensor | None:
    """``cu_seqlens``, else transformers' packed offsets: ``DataCollatorWithFlattening(return_flash_attn_kwargs=
    True)`` marks the documents of a packed row by ``cu_seq_lens_q`` (which its flash-attention models honour), and
    without restarting position_ids nothing else would keep them apart. With ``return_seq_idx=True`` (and
    ``return_position_ids=False``) it marks them only by ``seq_idx``, what its recurrent models (Mamba-2's) read."""
    if cu_seqlens is None and kwargs.get("cu_seq_lens_q") is not None:
        return kwargs["cu_seq_lens_q"]
    if cu_seqlens is None and kwargs.get("seq_idx") is not None:
        return _packed_from_seq_idx(kwargs["seq_idx"])
    return cu_seqlens


def _offsets_from_restarts(cu_seqlens, position_ids, given, attention_mask, cache, context_parallel):
    """``cu_seqlens``, else the packed sequences restarting ``position_ids`` mark (``_packed_from_positions``) when
    nothing else places the tokens: no attention mask, cache or ``context_parallel``. ``given`` is the input
    (``input_ids`` or ``inputs_embeds``), refused by name further on when not at least ``[B, T]``. One rule for
    the backbone and the heads that score each packed sequence, so that they agree on what a row holds."""
    if (cu_seqlens is None and position_ids is not None and attention_mask is None and cache is None
            and context_parallel is None and given is not None and given.dim() >= 2):
        return _packed_from_positions(position_ids, given.shape[0], given.shape[1])
    return cu_seqlens


def _packed_from_seq_idx(seq_idx) -> torch.Tensor | None:
    """``cu_seqlens`` of the sequences ``seq_idx`` ``[1, T]`` numbers (a sequence starts wherever the number changes);
    None when it never does. Taken as a keyword like any other, it was ignored: the documents ran as one sequence,
    each one's state carried into the next."""
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.dim() != 2 or seq_idx.is_floating_point() \
            or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
        shape = tuple(seq_idx.shape) if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__
        raise ValueError(f"seq_idx must be an integer tensor [1, T] numbering the packed sequences of one row "
                         f"(DataCollatorWithFlattening's); got {shape}")
    starts = seq_idx[:, 1:] != seq_idx[:, :-1]
    return _offsets_from_starts(starts, seq_idx.shape[1], lambda: (
        f"seq_idx marks packed sequences in one row (B=1); got shape {tuple(seq_idx.shape)}: pack them into one "
        "row, or give each sequence its own row with an attention_mask"))


def _return_dict(config: RetNetConfig, return_dict: bool | None) -> bool:
    """A call's ``return_dict``, or when unset the config's (``config.return_dict = False`` gives tuples, as in
    transformers' models)."""
    return (getattr(config, "return_dict", True) if return_dict is None else return_dict) is not False


def _check_cache_and_outputs(cache, kwargs: dict) -> None:
    """Refuse, by name, what a recurrent state cannot give: a KV cache (``DynamicCache``, ``StaticCache``, ...)
    passed as the cache, and attention weights (retention forms none)."""
    if cache is not None and not isinstance(cache, RetNetCache):
        raise TypeError(
            f"RetNet carries a recurrent state, a RetNetCache, not a key/value cache; got {type(cache).__name__}. "
            "Pass no cache (the model makes its own) or the RetNetCache a previous call returned"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(
            "RetNet has no attention weights to output (retention is a decaying recurrence, not softmax "
            "attention); call it without output_attentions"
        )


def _check_cache_fits(cache: RetNetCache, num_layers: int, batch: int | None) -> None:
    """A cache of another model or batch would fail deep in a layer (or, with fewer layers, silently leave
    states out): refuse it naming both sizes. ``batch`` None: a packed row (``_check_packed`` checks it)."""
    if len(cache) != num_layers:
        raise ValueError(f"the cache has {len(cache)} layers, but the model has {num_layers}; pass a RetNetCache "
                         "this model returned (or none)")
    if batch is not None and cache.offsets is not None and cache.batch_size != batch:
        raise ValueError(
            f"the cache holds {cache.batch_size} rows, but the inputs are a batch of {batch}: each row continues "
            "its own state (a beam search returns its beams' states; cache.select(rows) keeps some rows)"
        )


@dataclass
class _PaddingInFront:
    """A padded batch on a fresh state as a compiled forward runs it (:func:`_pack_padded_rows`): ``order``
    ``[B, T]`` permutes each row so that its padding comes first (stably: the real tokens keep their order),
    ``real`` ``[B, T]`` is the mask in the row's own order."""

    order: torch.Tensor
    real: torch.Tensor


def _pack_padded_rows(token_mask: torch.Tensor, has_state: bool
                      ) -> tuple[torch.Tensor, torch.Tensor] | _PaddingInFront | None:
    """``(index, cu_seqlens)`` packing each row's real tokens as one sequence, when some padding would meet a
    non-zero state: padding after a real token, or any padding with a cached state. Leading padding on a fresh
    state decays only zeros, so it keeps the plain batched path (None).

    Compiled, on a fresh state: :class:`_PaddingInFront`. Whether and how to pack is read from the mask on the
    host (each read a graph break, and the packed sizes a shape from the data); moved in front of each row's real
    tokens, where it writes and decays nothing, padding needs neither, and the real tokens run as packed."""
    real = token_mask.bool()
    if not has_state and torch.compiler.is_compiling():
        return _PaddingInFront(torch.sort(real.to(torch.uint8), dim=1, stable=True).indices, real)
    if bool(real.all()):
        return None
    if not has_state and not bool((real[:, :-1] & ~real[:, 1:]).any()):
        return None
    index = real.flatten().nonzero().squeeze(-1)
    cu_seqlens = F.pad(real.sum(-1).cumsum(0), (1, 0))
    return index, cu_seqlens


def _check_packed(cu_seqlens: torch.Tensor, batch: int, attention_mask, cache: RetNetCache | None) -> None:
    """A packed row has no padding to mask, and a cache must hold one row per packed sequence."""
    if not isinstance(cu_seqlens, torch.Tensor):  # (a list of offsets failed on an AttributeError)
        raise ValueError(f"cu_seqlens must be a torch.Tensor of [N + 1] offsets; got {type(cu_seqlens).__name__}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs the sequences packed into one row (B=1); got B={batch}")
    if attention_mask is not None:
        raise ValueError("cu_seqlens takes no attention_mask: a packed row has no padding")
    if not is_cu_seqlens(cu_seqlens) or len(cu_seqlens) < 2:
        # the ops' rule, checked here before the positions are built from it (uint16 failed there on a RuntimeError
        # of torch's type promotion, a float tensor on the ops' error naming an op the caller never called)
        raise ValueError(f"cu_seqlens must be an integer tensor of {CU_SEQLENS_NAMES}, [N + 1] offsets with N >= 1; "
                         f"got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    sequences = len(cu_seqlens) - 1
    if cache is not None and cache.offsets is not None and cache.batch_size != sequences:
        raise ValueError(
            f"cu_seqlens packs {sequences} sequences, so the cache must hold {sequences} rows; "
            f"got {cache.batch_size}"
        )


class RetNetForCausalLM(RetNetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.model = RetNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RetNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        retention_mode: str | None = None,
        cu_seqlens: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: RetNetCache | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        context_parallel: ContextShard | None = None,
        distill: Distillation | None = None,
        **kwargs,
    ) -> RetNetCausalLMOutput | tuple:
        """Logits ``[B, T, vocab]`` (only the last ``logits_to_keep`` positions when an int > 0, only the
        positions it lists when an index tensor, e.g. ``cu_seqlens[1:] - 1`` for the last token of each packed
        sequence) and, with ``labels`` ``[B, T]``, the next-token cross-entropy with −100 ignored (nan when
        no label counts, all −100 or T = 0, on the fused head as on the plain one; see :func:`causal_lm_loss`).
        ``shift_labels`` ``[B, T]`` instead: labels already moved left (position t's is the token after t), as
        transformers names them; a piece of a row split by ``context_parallel`` needs them, its last token
        predicting the next piece's first. ``ignore_index`` (a keyword, as transformers' loss takes it): a label id
        ignored besides −100. ``distill`` (training, with labels): the loss is
        :func:`~retnet.model.distillation.linear_distillation_loss` towards its teacher's distribution instead
        (chunked like the fused head, whatever ``fuse_linear_cross_entropy`` says; no logits returned), its parts
        left in ``distill.parts``; with ``logits_to_keep`` over the kept positions, the teacher's states (given for
        every token) cut to them. Other arguments as :meth:`RetNetModel.forward`."""
        # A keyword, not a parameter (as in transformers' models): Trainer takes every parameter named like a label
        # for one it must be given, and without shift_labels in a batch evaluate() would compute no loss.
        shift_labels = kwargs.pop("shift_labels", None)
        # transformers' causal-LM loss takes it as a keyword too; left in kwargs it was dropped, and the tokens it
        # names (a pad id used as label) counted in the loss
        ignore_index = kwargs.pop("ignore_index", -100)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise ValueError(f"ignore_index must be an int label id; got ignore_index={ignore_index!r}")
        ignore_index = int(ignore_index)
        _check_cache_and_outputs(cache if cache is not None else past_key_values, kwargs)
        cu_seqlens = _flattened_offsets(cu_seqlens, kwargs)
        if distill is not None and ((labels is None and shift_labels is None) or not self.training):
            raise ValueError("distill needs labels (or shift_labels) and training mode: the validation loss is the "
                             "plain cross-entropy")
        if labels is not None and shift_labels is not None:
            raise ValueError("pass labels or shift_labels, not both")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            retention_mode=retention_mode,
            cu_seqlens=cu_seqlens,
            context_parallel=context_parallel,
        )
        hidden_states = outputs.last_hidden_state
        shifted = shift_labels is not None
        labels = shift_labels if shifted else labels
        if labels is not None and ignore_index != -100:
            # −100 stays ignored too: the losses below (fused, distilled, plain) know that one id only
            labels = labels.masked_fill(labels == ignore_index, -100)
        # Checked on every path: [T] labels for a batch of one raised an IndexError from the shift, and a [B, T']
        # batch cross_entropy's ValueError counting the flattened B·T logits against B·T' labels.
        if labels is not None and tuple(labels.shape) != tuple(hidden_states.shape[:2]):
            raise ValueError(f"{'shift_labels' if shifted else 'labels'} must be [B, T] like the inputs, "
                             f"{tuple(hidden_states.shape[:2])}; got {tuple(labels.shape)}")
        keeps_all = isinstance(logits_to_keep, int) and (logits_to_keep <= 0 or logits_to_keep >= hidden_states.shape[1])
        one_position = False
        if not keeps_all:
            # (a list of positions as a tensor: it indexes the labels too)
            kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else torch.as_tensor(logits_to_keep)
            # A 0-dim index gives [B, V] logits, as transformers' models index with it; the fused and distilled
            # losses, which need a time axis, refused it where the plain one ran. They take it as [1].
            one_position = not isinstance(kept, slice) and kept.dim() == 0
            if one_position:
                kept = kept.reshape(1)
            hidden_states = hidden_states[:, kept]
            if labels is not None:
                # Each kept position's loss is its next-token prediction: the labels move left first, then are cut
                # like the hidden states (else cross_entropy fails on B·k logits against B·T labels).
                if not shifted:
                    labels, shifted = F.pad(labels, (0, 1), value=-100)[:, 1:], True
                labels = labels[:, kept if isinstance(kept, slice) else kept.to(labels.device)]
        loss = logits = None
        if labels is not None and self.training and (self.config.fuse_linear_cross_entropy or distill is not None):
            # lm_head's own forward is skipped: a module hook on it (PEFT, quantization) would not run, so only
            # a plain Linear is fused.
            if type(self.lm_head) is not nn.Linear or self.lm_head.bias is not None:
                raise ValueError(f"{'distill' if distill is not None else 'fuse_linear_cross_entropy'} needs "
                                 f"lm_head to be a bias-free nn.Linear; it is {self.lm_head!r}"
                                 + ("" if distill is not None else ": set config.fuse_linear_cross_entropy = False"))
            if distill is not None:
                if isinstance(self.lm_head.weight, DTensor):
                    raise ValueError("distill is not supported with a vocabulary-parallel LM head (tensor "
                                     "parallelism's vocab_parallel): split the model without it")
                loss = distill.loss(hidden_states, self.lm_head.weight, labels, num_items_in_batch, shifted=shifted,
                                    kept=None if keeps_all else kept, tokens=outputs.last_hidden_state.shape[1])
            else:
                loss = linear_cross_entropy(hidden_states, self.lm_head.weight, labels, num_items_in_batch,
                                            shifted=shifted)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = causal_lm_loss(logits, labels, num_items_in_batch, shifted=shifted)
            if one_position:
                logits = logits[:, 0]
        output = RetNetCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_KWARG: outputs.cache},
            hidden_states=outputs.hidden_states,
        )
        return output if _return_dict(self.config, return_dict) else output.to_tuple()

    # -- generation -----------------------------------------------------------------------------------------
    def _validate_generation_mode(self, generation_mode, *args, **kwargs):
        """Assisted decoding (a draft model, prompt lookup) needs the verifier's rejected candidates taken back
        out of the state: RetNetCache.crop does it where transformers asks for it (5.25 on). Before, refused up
        front, not with transformers' later "Assisted decoding requires a cache"."""
        if generation_mode == GenerationMode.ASSISTED_GENERATION and not ASSISTED_ROLLBACK:
            raise ValueError(f"assisted generation of {type(self).__name__} needs transformers >= 5.25 (the first "
                             "to roll a recurrent state back after verifying the candidates); this is "
                             f"{transformers_version}")
        return super()._validate_generation_mode(generation_mode, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: RetNetCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        past_key_values: RetNetCache | None = None,
        **kwargs,
    ) -> dict:
        """Feed only the tokens the state has not seen: after the prefill, one token per step. The prefill
        (or each chunk of a chunked one) gets its tokens already cut to the new ones by :meth:`_prefill`."""
        cache = cache if cache is not None else past_key_values
        seen = 0 if cache is None else cache.get_seq_length()
        model_inputs: dict = {}
        embeds_prompt = kwargs.get("_embeds_prompt") if inputs_embeds is not None else None
        if embeds_prompt is not None:
            # Assisted decoding from inputs_embeds (_assisted_decoding): the sequence is the embedded prompt, then
            # input_ids' columns after the first `ids_width` (the prompt's ids given with the embeddings, or none).
            # transformers cuts or pads the mask to input_ids' columns; the whole sequence's is the prompt's, then
            # one real column for each token after it.
            ids_width, prompt_mask = embeds_prompt
            after, prompt_length = input_ids[:, ids_width:], inputs_embeds.shape[1]
            if prompt_mask is not None:
                attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(after.shape)], -1)
            if next_sequence_length and isinstance(cache, RetNetCache) and cache.recording:
                first = prompt_length + after.shape[1] - next_sequence_length - cache.refeed
            else:
                first = seen
            if first < prompt_length:
                # The first forward verifies the candidates after the prompt: the embeddings alone gave the prompt's
                # logits to verify them by (silently wrong tokens). A crop back into the prompt feeds its
                # embeddings again, not its ids.
                drafted = self.get_input_embeddings()(after.to(inputs_embeds.device)).to(inputs_embeds.dtype)
                model_inputs["inputs_embeds"] = torch.cat([inputs_embeds[:, first:], drafted], 1)
            else:
                model_inputs["input_ids"] = after[:, first - prompt_length:].contiguous()
        elif inputs_embeds is not None and (seen == 0 or is_first_iteration):
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            if next_sequence_length and isinstance(cache, RetNetCache) and cache.recording:
                # After a crop the state may be back before tokens transformers counts as seen (RetNetCache.crop):
                # those `refeed` go in again before the new ones. Counted from the end, not from the state's seen
                # columns: generating from inputs_embeds, input_ids lack the prompt's columns (the cache counts them).
                new_ids = input_ids[:, max(input_ids.shape[1] - next_sequence_length - cache.refeed, 0):]
            elif next_sequence_length:
                new_ids = input_ids[:, -next_sequence_length:]
            elif is_first_iteration and not (seen and isinstance(cache, RetNetCache) and cache.recording
                                             and not kwargs.get("_new_inputs_only")):
                new_ids = input_ids
            else:
                # No cache (all of them), or a chunk of an older transformers' chunked prefill (the mask ends at
                # the chunk), or assisted decoding's first forward on a cache continued from an earlier generate
                # (transformers passes the whole sequence and no count of new tokens; _prefill, which cut them
                # already, says so): the mask's columns past the state's.
                width = attention_mask.shape[-1] if attention_mask is not None else input_ids.shape[1]
                new = min(max(width - seen, 0), input_ids.shape[1])
                new_ids = input_ids[:, input_ids.shape[1] - new:]
            model_inputs["input_ids"] = new_ids.contiguous()
        model_inputs["cache"] = cache
        if seen:
            # peft's prompt learning (prompt tuning, p-tuning) wraps this method and reads the cache under its old
            # name to tell a decoding step from the prefill: without it every step prepended the virtual tokens
            # again, into the state (the tokens after the first were wrong). An empty cache stays unnamed there,
            # so the prefill still gets them. (The forward takes `cache` first: the same object.)
            model_inputs["past_key_values"] = cache
        model_inputs["attention_mask"] = attention_mask
        for key in ("use_cache", "output_hidden_states", "output_attentions", "retention_mode", "logits_to_keep",
                    "position_ids"):
            if key in kwargs:
                model_inputs[key] = kwargs[key]
        if model_inputs.get("position_ids") is not None:
            length = next(v for k, v in model_inputs.items() if k in ("input_ids", "inputs_embeds")).shape[1]
            model_inputs["position_ids"] = model_inputs["position_ids"][:, -length:]
        return model_inputs

    def generate(self, *args, **kwargs):
        if kwargs.get("cache_implementation") == "paged":
            # init_continuous_batching below refuses it either way; asked here, before transformers logs its switch
            # to continuous batching, so the refusal is the only thing the user sees
            self.init_continuous_batching()
        # Drafting for another model's assisted generation (assistant_model=): see _drafting_inputs.
        drafting = getattr(kwargs.get("generation_config"), "is_assistant", False)
        if drafting:
            kwargs = self._drafting_inputs(args, kwargs)
        aligned = None if drafting else _left_aligned(args, kwargs)
        if aligned is not None:
            args, kwargs, restore = aligned
        # transformers warns that right padding gives incorrect results; this model continues each right-padded
        # row from its last real token (_prefill), so that warning would mislead: it is dropped while this model
        # generates (in this thread: another model's generate elsewhere still gets it)
        _RIGHT_PADDING_HANDLED.depth = getattr(_RIGHT_PADDING_HANDLED, "depth", 0) + 1
        output = None
        try:
            output = super().generate(*args, **kwargs)
        finally:
            _RIGHT_PADDING_HANDLED.depth -= 1
            returned = output.get(CACHE_KWARG) if isinstance(output, ModelOutput) else None
            if not drafting:
                # An assisted run's cache goes back to the caller as a plain one (its snapshot would hold a
                # second set of states alive), also when it failed; a draft's keeps recording for the next round.
                for cache in (returned, kwargs.get("cache"), kwargs.get("past_key_values")):
                    if isinstance(cache, RetNetCache):
                        cache.recording, cache.snapshot, cache.refeed = 0, None, 0
        if drafting and not ASSISTED_ROLLBACK and returned is not None:
            output = dataclasses.replace(output, **{CACHE_KWARG: None})  # nothing for transformers to crop
        return output if aligned is None else restore(output)

    def init_continuous_batching(self, *args, **kwargs):
        # transformers' continuous batching (generate_batch, generate(cache_implementation="paged")) runs the model on
        # its paged key/value cache: every request failed inside its worker thread on the forward's refusal, logged
        # there, and generate returned the prompts without a new token.
        raise ValueError(
            "transformers' continuous batching (cache_implementation='paged', generate_batch, "
            f"init_continuous_batching) is not supported by {type(self).__name__}: it pages a key/value cache, and "
            "RetNet carries a fixed-size recurrent state instead. Generate a padded batch with generate() (any other "
            "cache_implementation is ignored), or serve the model with retnet-serve, which batches continuously"
        )

    @staticmethod
    def _drafting_inputs(args, kwargs) -> dict:
        """One round of drafting for another model's assisted generation. transformers keeps the draft's cache
        between rounds and crops from it the candidates the target rejected (RetNetCache.crop, recording since
        _prepare_cache_for_generation made it). Before transformers 5.25 it cropped without asking the cache to
        record: there each round starts afresh, the sequence so far prefilled again (one chunkwise pass), and
        generate hands no cache back."""
        if not ASSISTED_ROLLBACK:
            kwargs = {key: value for key, value in kwargs.items() if key not in ("cache", "past_key_values")}
        inputs = kwargs.get("input_ids", args[0] if args else None)
        for cache in (kwargs.get("cache"), kwargs.get("past_key_values")):
            if isinstance(cache, RetNetCache) and cache.recording:
                # The round's drafted tokens are cropped next: its first forward (the prefill, even of one token)
                # takes a snapshot before them, as the first forward of a recording does (RetNetModel.forward).
                cache.snapshot = None
                if cache.restartable and inputs is not None and cache.seen_tokens >= inputs.shape[-1]:
                    # Assisted generation across tokenizers crops by the target's token counts: it may leave the
                    # draft's cache uncropped, holding as many tokens as the round's sequence or more (some of them
                    # since replaced). The whole sequence is here: it is fed again from nothing, rather than refused
                    # as holding nothing new (a draft's tokens only ever cost time, the target verifies them).
                    cache.restart()
        if inputs is not None:
            width = inputs.shape[-1]
            # Without a cache transformers no longer grows these with the accepted tokens (all of them real).
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.shape[-1] < width:
                kwargs["attention_mask"] = F.pad(mask, (0, width - mask.shape[-1]), value=1)
        # The target's positions may follow another convention (3-D multimodal rotary ones) or lag the tokens:
        # this model counts its own from the mask.
        kwargs.pop("position_ids", None)
        return kwargs

    def _assisted_decoding(self, input_ids, *args, **kwargs):
        generation_config = kwargs.get("generation_config")
        if getattr(generation_config, "assistant_early_exit", None) is not None:
            # (transformers drafts with config.num_hidden_layers lowered; the forward runs every layer, and the
            # draft's cache of fewer layers was refused by a message naming no early exit)
            raise ValueError(f"assistant_early_exit is not supported by {type(self).__name__}: its forward runs "
                             "all of its layers; draft with assistant_model= or prompt_lookup_num_tokens= instead")
        # Continuing a cache from only the new tokens (the mask covering the whole sequence) cannot work there:
        # transformers' assisted loop cuts the mask to the inputs' width, which leaves the new tokens nothing to be
        # told apart from the seen ones by; the first forward would feed none of them. Refused, not a shape error.
        cache = kwargs.get(CACHE_KWARG)
        seen = cache.get_seq_length() if isinstance(cache, RetNetCache) else 0
        mask = kwargs.get("attention_mask")
        width = mask.shape[-1] if mask is not None else getattr(generation_config, "_mask_length", None)
        if seen and width is not None and width != input_ids.shape[1]:
            raise ValueError(
                f"assisted decoding continuing a cache (it has seen {seen} tokens) needs input_ids to be the whole "
                f"sequence, what the cache saw and then the new tokens; got {input_ids.shape[1]} input columns and "
                f"an attention_mask of {width}. transformers' assisted decoding cuts the mask to the inputs, so only "
                "the new tokens cannot be told from the seen ones"
            )
        # transformers' assisted loop verifies the first candidate with the logits of the prompt's last column and
        # appends the accepted tokens after it: after trailing padding (right padding, say a tokenizer's
        # pad_to_multiple_of) those are a padding column's, and the tokens differed from plain generate's, silently
        # (transformers' right-padding warning is dropped while this model generates, as _prefill handles it there).
        if mask is not None and mask.shape[-1] and bool((mask[:, -1] == 0).any()):
            raise ValueError(
                f"assisted decoding of {type(self).__name__} needs the prompt to end with a real token: its "
                "attention_mask ends in padding (right padding), and transformers' assisted loop would take the next "
                "token's logits from a padding column. Pass the prompt without its trailing padding, or left-padded"
            )
        _refuse_under_prompt_learning(self, "assisted decoding (assistant_model=, prompt_lookup_num_tokens=)")
        if kwargs.get("inputs_embeds") is not None:
            if kwargs.get("assistant_model") is not None and input_ids.shape[1] == 0:
                # transformers hands the draft the target's embeddings (of another width for a smaller draft: a
                # shape error), with no token of the prompt for it to read
                raise ValueError(
                    "assisted decoding with assistant_model= from inputs_embeds alone: the draft model gets no "
                    "token of the prompt, only the target's embeddings. Pass the prompt's input_ids with the "
                    "inputs_embeds (the draft reads the ids), or use prompt_lookup_num_tokens="
                )
            # (how many of input_ids' columns the embeddings stand for, and the prompt's mask: see
            # prepare_inputs_for_generation)
            kwargs["_embeds_prompt"] = (input_ids.shape[1], mask)
        return super()._assisted_decoding(input_ids, *args, **kwargs)

    def _get_candidate_generator(self, *args, **kwargs):
        # A draft model reads the prompt's token ids: the target's embeddings are not its own (transformers passes
        # them on to it), and the bookkeeping of _assisted_decoding is the target's.
        model_kwargs = kwargs.get("model_kwargs")
        if isinstance(model_kwargs, dict) and "_embeds_prompt" in model_kwargs:
            kwargs["model_kwargs"] = {key: value for key, value in model_kwargs.items()
                                      if key not in ("inputs_embeds", "_embeds_prompt")}
        generator = super()._get_candidate_generator(*args, **kwargs)
        if type(generator) is candidate_generator.AssistedCandidateGeneratorDifferentTokenizers:
            _crop_draft_cache_by_its_own_tokens(generator)
        return generator

    def _prepare_model_inputs(self, inputs=None, bos_token_id=None, model_kwargs=None):
        # An empty prompt would fail on an IndexError inside transformers' generate (its right-padding check, or
        # the empty logits of the first step).
        inputs_tensor, input_name, model_kwargs = super()._prepare_model_inputs(inputs, bos_token_id, model_kwargs)
        if inputs_tensor is not None and inputs_tensor.dim() >= 2 and inputs_tensor.shape[1] == 0:
            raise ValueError(
                f"generate got an empty prompt ({input_name} of shape {tuple(inputs_tensor.shape)}): it needs at "
                "least one token to condition on; pass a BOS token, or no inputs at all to start from "
                "generation_config.bos_token_id"
            )
        return inputs_tensor, input_name, model_kwargs

    def _prepare_special_tokens(self, generation_config, *args, **kwargs):
        # An empty list of stop ids (generate(eos_token_id=[]), a generation_config.json of []) means no EOS, as the
        # model's config reads it: transformers took its first id for the pad, an IndexError.
        if isinstance(generation_config.eos_token_id, list) and not generation_config.eos_token_id:
            generation_config.eos_token_id = None
        return super()._prepare_special_tokens(generation_config, *args, **kwargs)

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        # Continuing a cache, `input_ids` is the whole sequence or only the new tokens; the attention mask (or,
        # when transformers dropped an all-ones one, the width it recorded) covers the whole sequence, so its
        # columns past the state's are the new tokens. Cut them here, once, before a chunked prefill splits them.
        # The same holds for `inputs_embeds` (transformers passes the whole sequence's; the prefill embeds them).
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        seen = cache.get_seq_length() if isinstance(cache, RetNetCache) else 0
        if seen:
            embeds = model_kwargs.get("inputs_embeds")
            inputs = input_ids if embeds is None else embeds
            mask = model_kwargs.get("attention_mask")
            width = mask.shape[-1] if mask is not None else getattr(generation_config, "_mask_length", None)
            if width is None or width < 0:
                width = inputs.shape[1]
            new = min(max(width - seen, 0), inputs.shape[1])
            if new == 0:  # the forward would get no tokens and fail on an empty logits row
                raise ValueError(
                    f"the cache has seen {seen} tokens, but the inputs (and attention_mask) cover only {width} "
                    "columns, so none of them is new: pass the whole sequence (what the cache saw, then the new "
                    "tokens), or only the new tokens with an attention_mask covering the whole sequence. generate "
                    "feeds at least one token to get the next one's logits: a cache prefilled by hand should hold "
                    "all but the prompt's last token. generate updates the cache it is given in place: to continue "
                    "one cache more than once, pass a copy (cache.clone()) each time"
                )
            if mask is None or cache.offsets is None:
                mismatch = width - inputs.shape[1] > seen
            else:
                # Per row, real tokens: the mask's before the new columns must all be in the state. New tokens alone
                # that leave one out (the last a generate returned, which it never fed) would run on from the wrong
                # token, silently. (Fewer is fine: a finished row's padding, fed with a mask of ones, then inferred
                # as padding when the batch is generated further.) A row split from a padded batch's cache counts
                # no padding in `seen`: its new tokens alone are told apart so.
                mismatch = bool(((mask[:, :width - new] != 0).sum(-1) > cache.offsets.to(mask.device)).any())
            if mismatch:
                raise ValueError(
                    f"the attention_mask covers {width} columns and the inputs are its last {inputs.shape[1]}, but "
                    f"its real tokens before the {new} new columns are more than the cache holds (it has seen {seen} "
                    "columns): pass the whole sequence, or every token the cache has not seen with an attention_mask "
                    "covering the whole sequence (after a generate, the last token it returned is not in its cache "
                    "yet)"
                )
            if mask is not None and cache.offsets is not None:
                _warn_rows_without_new_tokens(mask[:, mask.shape[-1] - new:], cache.offsets)
            if embeds is None:
                input_ids = input_ids[:, input_ids.shape[1] - new:]
                # A draft model's later rounds are not first iterations to transformers; without a mask (dropped
                # when all ones) that would leave prepare_inputs_for_generation nothing to tell new tokens by.
                # They are all new now.
                args, kwargs = (), {**kwargs, "is_first_iteration": True}
                model_kwargs = {**model_kwargs, "_new_inputs_only": True}
            else:
                model_kwargs["inputs_embeds"] = embeds[:, embeds.shape[1] - new:]
        chunk_size = getattr(generation_config, "prefill_chunk_size", None)
        embeds = model_kwargs.get("inputs_embeds")
        width = (input_ids if embeds is None else embeds).shape[1]
        # Right padding: each row's state is that of its real tokens alone (the forward packs them), but its
        # first new token must come from the logits of its last real token, not of the trailing padding.
        last_real = _last_real_columns(model_kwargs.get("attention_mask"), width)
        if chunk_size is None or not isinstance(cache, RetNetCache):
            if last_real is None:
                return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
            keep = last_real.unique()  # sorted; the forward computes logits at these columns only
            outputs = super()._prefill(input_ids, generation_config, {**model_kwargs, "logits_to_keep": keep},
                                       *args, **kwargs)
            outputs.logits = _logits_at(outputs.logits, keep, last_real)[:, None]
            return outputs
        return self._chunked_prefill(input_ids, model_kwargs, chunk_size, last_real)

    def _chunked_prefill(self, input_ids, model_kwargs, chunk_size, last_real=None):
        _refuse_under_prompt_learning(self, "prefill_chunk_size")
        # transformers' own chunked prefill counts the chunks' mask columns from 0 (5.17), which ends the first
        # chunk's mask before the tokens a continued cache holds, and splits input_ids, which are empty with
        # inputs_embeds. The state carries any split, so the chunks are the new inputs' and the mask and
        # positions are cut to end where each chunk ends.
        embeds = model_kwargs.get("inputs_embeds")
        inputs = input_ids if embeds is None else embeds
        mask, positions = model_kwargs.get("attention_mask"), model_kwargs.get("position_ids")
        total = inputs.shape[1]
        # With right padding, the columns of the rows' last real tokens (one host read), and their logits.
        columns, picked = ([] if last_real is None else sorted(set(last_real.tolist()))), None
        for start in range(0, total, chunk_size):
            end = min(start + chunk_size, total)
            after = total - end  # new columns after this chunk
            chunk_kwargs = dict(model_kwargs)
            if mask is not None:
                chunk_kwargs["attention_mask"] = mask[:, : mask.shape[-1] - after]
            if positions is not None:
                chunk_kwargs["position_ids"] = positions[..., : positions.shape[-1] - after]
            if embeds is not None:
                chunk_kwargs["inputs_embeds"] = embeds[:, start:end]
            in_chunk = [column - start for column in columns if start <= column < end]
            if in_chunk:
                keep = torch.tensor(in_chunk, device=last_real.device)
                chunk_kwargs["logits_to_keep"] = keep
            model_inputs = self.prepare_inputs_for_generation(
                input_ids[:, start:end], next_sequence_length=end - start, is_first_iteration=True, **chunk_kwargs
            )
            outputs = self(**model_inputs, return_dict=True)
            if in_chunk:  # the rows whose last real token is in this chunk take their logits from it
                chunk_logits = _logits_at(outputs.logits, keep, last_real - start)
                here = ((last_real >= start) & (last_real < end))[:, None]
                picked = chunk_logits if picked is None else torch.where(here, chunk_logits, picked)
        if picked is not None:
            outputs.logits = picked[:, None]
        return outputs

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # The model numbers each row's real tokens from its cache's offsets itself: the same positions as the
        # mask's running count transformers would pass and grow by a copy every step. Given positions may start
        # anywhere, so with xPos every decoding step would check them on the host (a device sync) and move each
        # layer's state into their frame (a pass over it). Positions the caller passes are kept.
        return None

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # The model makes its own cache on the first forward; a chunked prefill needs it before (transformers
        # refuses `prefill_chunk_size` without one), so it gets an empty one here.
        # So does assisted decoding (it records and crops the cache), and a draft model's generate (its cache
        # is kept and cropped between rounds: it records from the start).
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        generation_mode = kwargs.get("generation_mode", args[0] if args else None)
        drafting = ASSISTED_ROLLBACK and getattr(generation_config, "is_assistant", False)
        if (
            (getattr(generation_config, "prefill_chunk_size", None) is not None
             or generation_mode == GenerationMode.ASSISTED_GENERATION or drafting)
            and generation_config.use_cache is not False
            and model_kwargs.get("cache") is None
            and model_kwargs.get("past_key_values") is None
        ):
            model_kwargs[CACHE_KWARG] = RetNetCache(self.config.num_hidden_layers)
            if drafting:
                model_kwargs[CACHE_KWARG].activate_past_recording(generation_config.num_assistant_tokens)
                model_kwargs[CACHE_KWARG].restartable = True  # (every round gets the whole sequence: RetNetCache.crop)
        return result

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # transformers repeats only tensors for beams / num_return_sequences; a cache passed in to continue
        # from must be repeated with its prompts, row by row.
        batch = None if input_ids is None else input_ids.shape[0]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        for key in ("cache", "past_key_values"):
            cache = model_kwargs.get(key)
            if expand_size > 1 and isinstance(cache, RetNetCache) and cache.batch_size > 0 and cache.batch_size == batch:
                cache.batch_repeat_interleave(expand_size)
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        # Without a cache (use_cache=False) the key must stay absent: beam search reorders whatever it holds.
        if outputs.cache is not None:
            model_kwargs[CACHE_KWARG] = outputs.cache
        return model_kwargs


# Trainer's label smoothing (label_smoothing_factor) moves the labels left only for the causal LMs whose class names
# this table of transformers' own lists; RetNet's, not there, was trained to predict each token itself. ("retnet" is
# no config name of transformers', so the lazy Auto mapping built on this table skips it, importing nothing.)
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(RetNetConfig.model_type, RetNetForCausalLM.__name__)


def _refuse_under_prompt_learning(model: RetNetForCausalLM, what: str) -> None:
    """peft's prompt learning (prompt tuning, p-tuning) generates through its own prepare_inputs_for_generation, set
    on the model: once the cache holds tokens it feeds only the last of the new ones, so a forward of several (a
    prefill chunk after the first, assisted decoding's candidates) dropped the others, silently."""
    wrapper = getattr(vars(model).get("prepare_inputs_for_generation"), "__self__", None)
    if getattr(getattr(wrapper, "active_peft_config", None), "is_prompt_learning", False):
        peft_type = wrapper.active_peft_config.peft_type
        raise ValueError(f"{what} is not supported with peft's prompt learning ({getattr(peft_type, 'value', peft_type)}): "
                         "peft's generation feeds one token per forward after the prefill; generate without it")


class _RightPaddingWarningFilter(logging_std.Filter):
    """Drops transformers' right-padding warning while a RetNetForCausalLM generates in the record's thread
    (:data:`_RIGHT_PADDING_HANDLED`)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return not (getattr(_RIGHT_PADDING_HANDLED, "depth", 0)
                    and record.getMessage().startswith("A decoder-only architecture is being used, but right-padding"))


_RIGHT_PADDING_HANDLED = threading.local()  # .depth: how many RetNet generate calls this thread is inside
logging.get_logger(generation_utils.__name__).addFilter(_RightPaddingWarningFilter())


def _left_aligned(args: tuple, kwargs: dict) -> tuple[tuple, dict, object] | None:
    """A right-padded prompt (padding after a real token: right padding, holes) given to ``generate`` as token ids
    with its ``attention_mask``, on no cache: ``(args, kwargs, restore)`` with each row's padding moved before its
    real tokens, and ``restore(output)`` giving ``generate``'s output its prompt columns back as given (the new tokens
    follow them, the hidden states of the prompt in its columns). None otherwise.

    The state and positions are the same either way (the forward runs each row's real tokens alone), and _prefill
    takes a right-padded row's first logits at its last real token; but transformers' logits processors read the
    context from ``input_ids``: with the padding between a row's prompt and its new tokens, ``no_repeat_ngram_size``
    (and multi-token ``sequence_bias`` / ``bad_words_ids``) matched n-grams across it, so a row repeated what its
    prompt alone forbade. Left-aligned, they read each row as its prompt alone, as transformers' models expect."""
    ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    mask = kwargs.get("attention_mask")
    cache = next((kwargs[name] for name in ("cache", "past_key_values") if kwargs.get(name) is not None), None)
    if (not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor) or ids.dim() != 2
            or mask.shape != ids.shape or ids.is_floating_point() or kwargs.get("inputs_embeds") is not None
            or kwargs.get("position_ids") is not None or kwargs.get("streamer") is not None
            or (cache is not None and (not isinstance(cache, RetNetCache) or cache.get_seq_length()))):
        return None  # (a continued cache's new columns, given positions, a streamer's prompt: as given)
    real = mask != 0
    if not bool((real[:, :-1] & ~real[:, 1:]).any()):
        return None  # no padding after a real token (one host read)
    order = torch.argsort(real.to(torch.int8), dim=-1, stable=True)  # padding first, the real tokens in order
    inverse = torch.argsort(order, dim=-1)
    aligned_ids, aligned_mask = ids.gather(1, order), mask.gather(1, order)
    if args:
        args = (aligned_ids, *args[1:])
    else:
        kwargs = {**kwargs, ("inputs" if "inputs" in kwargs else "input_ids"): aligned_ids}
    kwargs = {**kwargs, "attention_mask": aligned_mask}
    width = ids.shape[1]

    def restore(output):
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        rows = sequences.shape[0] // ids.shape[0]  # (beams, num_return_sequences: each prompt's rows together)
        sequences = torch.cat([ids.repeat_interleave(rows, 0).to(sequences.device), sequences[:, width:]], 1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        states = output.get("hidden_states")
        if states:
            # Every step's states that span the prompt (the first step's; each step's without a cache), their prompt
            # columns put back; each row of a tensor its prompt's (beams: num_beams rows a prompt, however many
            # sequences are returned)
            output.hidden_states = tuple(tuple(_unaligned(h, inverse, width) for h in step) for step in states)
        return output

    return args, kwargs, restore


def _unaligned(hidden: torch.Tensor, inverse: torch.Tensor, width: int) -> torch.Tensor:
    """``hidden`` ``[rows, T, D]`` of a left-aligned prompt with its first ``width`` columns in the prompt's order
    again (``inverse``: ``[B, width]``, each prompt's; its rows repeated for the prompt's rows in ``hidden``)."""
    if hidden.dim() != 3 or hidden.shape[1] < width or hidden.shape[0] % inverse.shape[0]:
        return hidden
    index = inverse.repeat_interleave(hidden.shape[0] // inverse.shape[0], 0).to(hidden.device)
    columns = torch.arange(width, hidden.shape[1], device=hidden.device).expand(index.shape[0], -1)
    index = torch.cat([index, columns], 1)
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


def _last_real_columns(attention_mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """``[B]`` each row's last real column among the mask's last ``width`` (the new inputs), when some row's
    columns end in padding after a real token (right padding); None when every row ends with a real token. A row
    with no real new token keeps the last column."""
    if attention_mask is None or width == 0:
        return None
    real = attention_mask[:, -width:] != 0
    if not bool((real.any(-1) & ~real[:, -1]).any()):  # one host read per generate, only with padding
        return None
    last = torch.where(real, torch.arange(width, device=real.device), -1).amax(-1)
    return torch.where(last < 0, width - 1, last)


def _warn_rows_without_new_tokens(new_mask: torch.Tensor, offsets: torch.Tensor) -> None:
    """A continued cache's row whose new columns are all padding has its next token's logits in the previous
    call's output, which the cache does not keep: it continues from a padding column's logits. That is what a row
    that finished (EOS, then padding) does when its batch is generated further, which transformers does too, so it
    is warned of, not refused. A row that has seen no real token either is an all-padding row, and not warned of."""
    if new_mask.shape[0] != offsets.shape[0]:
        return  # a batch of another size is refused by the forward, naming both sizes
    empty = (new_mask == 0).all(-1) & (offsets.to(new_mask.device) > 0)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        logger.warning(
            f"generate: rows {rows} of the batch have no real token among the new inputs (their attention_mask "
            "columns past the cache's are all 0, e.g. rows that finished and were padded): their next tokens come "
            "from a padding column's logits, not from the last token the cache saw, which it does not keep. For "
            "such a row to continue correctly give it at least one new token, or generate the others alone "
            "(cache.select(rows))"
        )


def _logits_at(logits: torch.Tensor, kept: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[B, V]``: row b's logits at column ``columns[b]``, from ``logits`` ``[B, N, V]`` computed at the sorted
    columns ``kept`` ``[N]`` only (``logits_to_keep``); a column not kept gives a nearby kept one's."""
    index = torch.searchsorted(kept, columns.to(kept.device)).clamp(max=len(kept) - 1)
    return logits[torch.arange(logits.shape[0], device=logits.device), index.to(logits.device)]


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None = None,
    shifted: bool = False,
) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over labels that are not −100; ``num_items_in_batch``
    replaces the mean's denominator when gradient accumulation needs a global count.

    With no label to predict (all −100, or T = 0) the mean is over nothing: nan, with zero gradients, as
    ``F.cross_entropy`` and transformers' causal-LM loss give it (and the fused head,
    ``config.fuse_linear_cross_entropy``, alike); with ``num_items_in_batch`` it is 0. ``shifted``: the labels
    are already moved left (transformers' ``shift_labels``)."""
    # The labels move left, not the logits: slicing [B, T, vocab] logits copies them forward and fills a
    # zero gradient as large backward (about a tenth of a CPU training step at vocab 16k). The last
    # position gets label −100 and drops out of the mean. Padded before the shift, as transformers does: a
    # pad after it would give a T = 0 batch B labels for its 0 logits.
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    if not shifted:
        labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    shift_labels = labels.reshape(-1).to(flat_logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, shift_labels, ignore_index=-100)
    total = F.cross_entropy(flat_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / num_items_in_batch


# ----------------------------------------------------------------------------------------------------------
# Sequence classification (classifiers, reward models)
# ----------------------------------------------------------------------------------------------------------
class RetNetForSequenceClassification(RetNetPreTrainedModel):
    """transformers' ``LlamaForSequenceClassification`` (``GenericForSequenceClassification``) on RetNet: a
    bias-free ``score`` ``Linear(hidden_size, num_labels)`` on the final hidden state of each row's last real
    token. ``from_pretrained`` of a ``RetNetForCausalLM`` checkpoint loads the backbone (``model.*``), leaves
    ``lm_head`` unused and initialises ``score``: the usual start of a reward model (``num_labels=1``)."""

    # The losses are transformers' per-batch means, which take no item count. Without this attribute Trainer
    # sees `**kwargs`, passes `num_items_in_batch` and skips its own division by the accumulation steps, so the
    # loss grows with their number (transformers#47688, open for Llama's head); False keeps that division.
    accepts_loss_kwargs = False

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = RetNetModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RetNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        retention_mode: str | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: RetNetCache | None = None,
        context_parallel: ContextShard | None = None,
        **kwargs,
    ) -> RetNetSequenceClassifierOutput | tuple:
        """Logits ``[B, num_labels]`` from each row's last real token (``[N, num_labels]``, one per packed
        sequence, with ``cu_seqlens``); with ``labels`` the loss of ``config.problem_type``, inferred as
        transformers does when unset (and then stored in the config): ``num_labels == 1`` regression (MSE,
        labels ``[B]``), integer labels single-label classification (cross-entropy, labels ``[B]``, −100
        ignored), else multi-label (BCE with logits, float labels ``[B, num_labels]``). The loss is fp32.

        The last real token is, in this order: with ``cu_seqlens`` each packed sequence's last token; with an
        ``attention_mask`` the last position where it is 1 (so a final EOS that is also the pad id counts, where
        transformers' rule would skip it, and B > 1 needs no ``pad_token_id``); with
        ``input_ids`` alone transformers' rule, the rightmost token that is not ``config.pad_token_id``
        (right or left padding); otherwise the last position, which needs B = 1 without a ``pad_token_id``
        (the ``ValueError`` transformers raises) and, with ``inputs_embeds``, is transformers' warned guess.
        With ``context_parallel`` (this rank's piece of a packed row split along time) each segment of the piece's
        ``cu_seqlens`` is scored at its last token on the piece: a sequence's score is that of the piece holding its
        end. Other arguments as :meth:`RetNetModel.forward`."""
        cache = cache if cache is not None else past_key_values
        _check_cache_and_outputs(cache, kwargs)
        cu_seqlens = _flattened_offsets(cu_seqlens, kwargs)
        # The backbone runs restarting positions (DataCollatorWithFlattening's) as packed sequences: each is
        # scored, as with cu_seqlens (only the row's last sequence was, the others' scores dropped).
        cu_seqlens = _offsets_from_restarts(cu_seqlens, position_ids, input_ids if input_ids is not None
                                            else inputs_embeds, attention_mask, cache, context_parallel)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            retention_mode=retention_mode,
            cu_seqlens=cu_seqlens,
            context_parallel=context_parallel,
        )
        hidden_states = outputs.last_hidden_state
        rows, last = self._last_tokens(input_ids, attention_mask, cu_seqlens, hidden_states)
        # Scoring only the pooled rows gives transformers' pooled logits (score is per position) without
        # projecting every position.
        logits = self.score(hidden_states[rows, last])

        loss = None
        if labels is not None:
            # In fp32, as the causal LM's: a bf16 MSE or BCE would round away small differences.
            loss = self.loss_function(labels=labels, pooled_logits=logits.float(), config=self.config)
        output = RetNetSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            **{CACHE_KWARG: outputs.cache},
            hidden_states=outputs.hidden_states,
        )
        return output if _return_dict(self.config, return_dict) else output.to_tuple()

    def _last_tokens(self, input_ids, attention_mask, cu_seqlens, hidden_states) -> tuple:
        """``(rows, positions)`` indexing the hidden states ``[B, T, d]`` at each sequence's last real token."""
        batch, length = hidden_states.shape[:2]
        device = hidden_states.device
        if cu_seqlens is not None:
            ends = cu_seqlens.to(device, torch.long)
            # An empty sequence has no last token: its index would silently pick the previous sequence's.
            if bool((ends[1:] <= ends[:-1]).any()):
                raise ValueError(f"cu_seqlens: every packed sequence needs a token to be scored; got offsets "
                                 f"{ends.tolist()}")
            return 0, ends[1:] - 1
        rows = torch.arange(batch, device=device)
        if attention_mask is not None:
            # The mask may cover a cache's past tokens too ([B, past + T]); the new tokens are its last T columns.
            real = attention_mask[:, -length:].to(device) != 0
        elif self.config.pad_token_id is None:
            if batch != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            return rows, -1
        elif input_ids is not None:
            real = input_ids.to(device) != self.config.pad_token_id
        else:
            logger.warning_once(
                f"{self.__class__.__name__} will not detect padding tokens in `inputs_embeds`. Results may be "
                "unexpected if using padding tokens in conjunction with `inputs_embeds.`"
            )
            return rows, -1
        # The rightmost real position, as transformers computes it (a row without one gives position 0).
        positions = torch.arange(length, device=device, dtype=torch.int32)
        return rows, (positions * real.to(torch.int32)).argmax(-1)



def _crop_draft_cache_by_its_own_tokens(generator) -> None:
    """Across tokenizers (``tokenizer=``, ``assistant_tokenizer=``) transformers crops the draft's cache by a count
    of the target's tokens (the length of the target's last candidates less the draft's new input), which leaves
    a draft's key/value cache holding tokens its next input replaced or lacks, or no new token at all: a Llama
    draft then failed on a forward of 0 tokens, or drafted from a cache of another sequence. Here the cache keeps
    the draft's tokens it holds that its next input starts with, as a crop within one tokenizer does. (A RetNet
    draft's cache copes on its own: ``RetNetCache.restartable``.) Only this class, not its sampling subclass
    (``UniversalSpeculativeDecodingGenerator``), which keeps transformers' own crop."""
    held = None  # the draft's tokens in its cache

    def update_past(assistant_input_ids, num_extra_tokens_to_remove=0):
        cache = generator.assistant_kwargs.get("cache")
        if cache is None or isinstance(cache, RetNetCache) or held is None:
            return type(generator)._update_past_and_masks(generator, assistant_input_ids, num_extra_tokens_to_remove)
        tokens = held[:, : assistant_input_ids.shape[1] - 1]  # the last input token is always fed
        differs = (tokens != assistant_input_ids[:, : tokens.shape[1]]).any(0).nonzero()
        extra = cache.get_seq_length() - (int(differs[0]) if len(differs) else tokens.shape[1])
        if extra > 0:  # (transformers' crop takes the count to drop)
            cache.crop(-extra)
        # the masks transformers' own update prepares after its crop
        length, kwargs = assistant_input_ids.shape[-1], generator.assistant_kwargs
        encoder_decoder = generator.assistant_model.config.is_encoder_decoder
        kwargs = candidate_generator._prepare_attention_mask(kwargs, length, encoder_decoder)
        kwargs = candidate_generator._prepare_position_ids(kwargs, length, encoder_decoder)
        generator.assistant_kwargs = candidate_generator._prepare_token_type_ids(kwargs, length)
        return True

    def get_candidates(input_ids, **kwargs):
        nonlocal held
        out = type(generator).get_candidates(generator, input_ids, **kwargs)
        cache = generator.assistant_kwargs.get("cache")
        previous = getattr(generator, "prev_assistant_ids", None)  # (a transformers without it: its own crop)
        held = None if cache is None or previous is None else previous[:, : cache.get_seq_length()].clone()
        return out

    generator._update_past_and_masks = update_past
    generator.get_candidates = get_candidates


__all__ = ["RetNetForCausalLM", "RetNetForSequenceClassification", "RetNetModel", "RetNetPreTrainedModel",
           "RetNetSequenceClassifierOutput", "causal_lm_loss"]

