"""The causal-LM loss straight from the hidden states, without the ``[B, T, vocab]`` logits.

``linear_cross_entropy(hidden, weight, labels)`` equals ``causal_lm_loss(hidden @ weight.T, labels)``. The
logits of a training batch are its largest activation by far (8 × 2048 tokens at vocab 50k: 1.6 GB in bf16,
twice that again for their fp32 upcast and their gradient); here they exist a chunk of tokens at a time, and
each chunk's gradients (for the hidden states and the head's weight) are computed as soon as its loss is, so
the backward pass only scales them. The FLOPs are those of the unfused head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._C import _functions
from torch.distributed.tensor import DTensor, Partial, Shard

IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 28  # fp32 logits per chunk: 256 MiB, a few thousand tokens at usual vocabularies


def _chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, denominator: torch.Tensor,
                chunk: int, grad_enabled: bool, mesh=None, vocab_start: int = 0) -> torch.Tensor:
        # ``mesh``: ``weight`` is this rank's rows ``vocab_start ..`` of a head split over the mesh's ranks (the
        # vocabulary-parallel head of tensor parallelism); ``hidden`` is the same on every rank.
        # needs_input_grad says requires_grad even under no_grad: without grad mode only the loss is computed
        grad_hidden = torch.empty_like(hidden) if grad_enabled and ctx.needs_input_grad[0] else None
        # fp32: a sum over every chunk, as the unfused head's weight gradient sums over every token in one matmul
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if grad_enabled and ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # No token counts (all labels −100): zero gradients, as F.cross_entropy's mean (its loss is nan alike)
        inverse = torch.where(denominator == 0, 0.0, 1.0 / denominator)
        grads = grad_hidden is not None or grad_weight is not None
        ctx.late_mean = False
        # Counted in chunks, not range(0, N, chunk): dynamo specializes such a range on N, and a compiled loss was
        # traced again for every new token count (a batch of another length), up to its recompile limit
        for index in range(-(-hidden.shape[0] // chunk)):
            start = index * chunk
            rows = hidden[start:start + chunk]
            target = labels[start:start + chunk]
            logits = F.linear(rows, weight)  # the head's dtype (bf16 under autocast), as the unfused head
            logits_fp32 = logits.float()
            # fp16 (its range, unlike bf16's, is not fp32's): p / 16k tokens would underflow before GradScaler's
            # scale, which the unfused head's backward applies ahead of its fp16 matmuls but which comes only
            # in backward here. So fp16 matmuls take the gradient of the sum; 1 / denominator comes in backward.
            ctx.late_mean = logits.dtype == torch.float16
            valid = target != IGNORE_INDEX
            local_target = target - vocab_start
            # the tokens whose target row this rank holds; without a mesh every valid one, so that an id past the
            # vocabulary fails in gather as in the unfused loss (the mesh's are checked before the loop)
            here = valid & (local_target >= 0) & (local_target < weight.shape[0]) if mesh is not None else valid
            safe_target = torch.where(here, local_target, 0)
            if mesh is None:
                # One log_softmax kernel (the max, the sum of exponentials, the output), where logsumexp and then
                # the softmax's subtraction took five passes over the logits and a temporary of their size: on a
                # CPU the head's elementwise work was a fifth of its time, and scaled worse than its matmuls
                log_probs = torch.log_softmax(logits_fp32, dim=-1)
                total -= torch.where(valid, log_probs.gather(1, safe_target[:, None]).squeeze(1), 0.0).sum()
                del logits_fp32  # (logits itself when fp32: the exponentials below are taken of log_probs)
            else:
                log_norm = torch.logsumexp(logits_fp32, dim=-1)
                picked = torch.where(here, logits_fp32.gather(1, safe_target[:, None]).squeeze(1), 0.0)
                log_norm, picked = _combine_vocab_shards(log_norm, picked, mesh)
                total += torch.where(valid, log_norm - picked, 0.0).sum()
                # this rank's columns of the log-softmax, over the whole vocabulary (logits_fp32: not used again)
                log_probs = logits_fp32.sub_(log_norm[:, None]) if grads else None
                del logits_fp32
            matmul_dtype = logits.dtype
            del logits  # as below
            if not grads:
                del log_probs
                continue
            # d loss / d logits = (softmax − one-hot) / denominator on the tokens that count, 0 elsewhere
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(1, safe_target[:, None], -here[:, None].to(grad_logits.dtype))
            grad_logits.mul_(valid[:, None] if ctx.late_mean else (valid * inverse)[:, None])
            # in the head's matmul dtype, as the unfused backward (autocast casts the fp32 operands alike)
            grad_logits = grad_logits.to(matmul_dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ rows
            del log_probs, grad_logits  # else alive through the next chunk's peak
        if mesh is not None and grad_hidden is not None:
            # each rank's rows of the head give a part of the hidden states' gradient: summed once, not per chunk
            grad_hidden = DTensor.from_local(grad_hidden, mesh, [Partial()], run_check=False).full_tensor()
        ctx.save_for_backward(grad_hidden, grad_weight, inverse)
        ctx.weight_dtype = weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, inverse = ctx.saved_tensors
        scale = grad_output.float() * inverse if ctx.late_mean else grad_output.float()
        return (*scaled_saved_gradients(grad_hidden, grad_weight, scale, ctx.weight_dtype),
                None, None, None, None, None, None)


def _combine_vocab_shards(log_norm: torch.Tensor, picked: torch.Tensor, mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's log-sum-exp over its rows of the vocabulary and its target logits (0 where another rank holds
    the target) combined into the whole vocabulary's: one all-gather of ``[2, N]`` a chunk (a max all-reduce then
    a sum, as Megatron's vocab-parallel cross-entropy takes, would be two)."""
    mine = torch.stack([log_norm, picked])[None]
    every = DTensor.from_local(mine, mesh, [Shard(0)], run_check=False).full_tensor()  # [ranks, 2, N]
    return torch.logsumexp(every[:, 0], dim=0), every[:, 1].sum(dim=0)


def scaled_saved_gradients(grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None, scale: torch.Tensor,
                           weight_dtype: torch.dtype, loss_name: str = "linear_cross_entropy "
                           "(config.fuse_linear_cross_entropy)") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of a loss that computed its gradients in its forward (``linear_cross_entropy``, the chunked
    distillation loss): the saved ``grad_hidden`` (``[N, D]``, the hidden states' dtype) and ``grad_weight``
    (``[vocab, D]``, fp32) times ``scale`` (a 0-dim fp32 tensor, the upstream gradient), the latter cast to
    ``weight_dtype``; under ``create_graph`` they raise if differentiated again, naming ``loss_name``."""
    with torch.no_grad():
        # fp32, as the unfused head's backward: grad_output cast to fp16 overflows at GradScaler's 65536
        if grad_hidden is not None:
            grad_hidden = (grad_hidden.float() * scale).to(grad_hidden.dtype)  # not in place: retain_graph
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(weight_dtype)
    if torch.is_grad_enabled():  # create_graph=True: the saved gradients have no graph to differentiate
        grad_hidden, grad_weight = _no_double_backward(grad_hidden, grad_weight, loss_name=loss_name)
    return grad_hidden, grad_weight


def _no_double_backward(*grads: torch.Tensor | None, loss_name: str) -> tuple[torch.Tensor | None, ...]:
    """The gradients, with a grad_fn that raises if differentiated (a gradient penalty, a Hessian product):
    without it they would be constants there, and the loss's curvature silently missing."""
    present = [grad for grad in grads if grad is not None]
    if not present:
        return grads
    raise_on_backward = _functions.DelayedError(
        f"{loss_name} has no double backward: its gradients are computed in the forward pass; differentiate the "
        f"unfused head's loss instead".encode(), len(present))
    wrapped = raise_on_backward(*[grad.detach().requires_grad_() for grad in present])
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return tuple(None if grad is None else next(wrapped) for grad in grads)


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.LongTensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    shifted: bool = False,
) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of the logits ``hidden_states @ weight.T``, computed ``chunk_tokens``
    tokens at a time (default: 256 MiB of fp32 logits a chunk).

    ``hidden_states`` ``[B, T, D]``, ``weight`` ``[vocab, D]`` (the LM head's, tied or not), ``labels`` ``[B, T]``
    unshifted (``shifted``: already moved left), −100 ignored; ``num_items_in_batch`` replaces the mean's
    denominator, as in ``causal_lm_loss``.

    ``weight`` may be a ``Shard(0)`` DTensor on a 1-D mesh (the vocabulary-parallel head of
    :func:`~retnet.model.tensor_parallel.parallelize_retnet`, ``vocab_parallel=True``), with ``hidden_states`` the
    same on every rank: each rank then computes the logits of its rows of the vocabulary only, the ranks exchange
    two numbers a token (their log-sum-exp and target logit) and the hidden states' gradient is all-reduced once;
    every rank returns the whole vocabulary's loss. A collective then: every rank of the mesh calls it.
    """
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"linear_cross_entropy: hidden_states must be [B, T, D] and labels [B, T]; got "
                         f"{list(hidden_states.shape)} and {list(labels.shape)}")
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    # the labels move left (the last position of each row predicts nothing), as in causal_lm_loss
    if not shifted:
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    targets = labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be at least 1; got {chunk_tokens}")
    mesh, vocab_start = None, 0
    if isinstance(weight, DTensor):
        mesh, vocab_start = weight.device_mesh, vocab_shard_start(weight)
        # A rank's chunk of logits is its rows' (rank 0's, the most: every rank must run as many chunks).
        chunk = chunk_tokens or _chunk_tokens(-(-weight.shape[0] // mesh.size()))
        # A target past the vocabulary would be no rank's, and count as a logit of 0 instead of failing as the
        # unfused loss does (one host sync a call)
        check_token_ids(targets, weight.shape[0], "labels", ignore=IGNORE_INDEX)
        weight = weight.to_local()  # its gradient goes back to the DTensor's Shard(0)
    else:
        chunk = chunk_tokens or _chunk_tokens(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, denominator, chunk, torch.is_grad_enabled(), mesh,
                                     vocab_start)


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str, ignore: int | None = None) -> None:
    """IndexError, as an unsplit lookup raises, for an id of ``ids`` outside ``[0, vocab_size)`` (``ignore`` aside):
    a vocabulary split across ranks would find it on no rank and go on with zeros."""
    bad = (ids < 0) | (ids >= vocab_size)
    if ignore is not None:
        bad &= ids != ignore
    if bad.any():
        raise IndexError(f"{what} hold id {int(ids[bad][0])}, outside the vocabulary [0, {vocab_size})")


def vocab_shard_start(weight: DTensor) -> int:
    """The first vocabulary row this rank holds of ``weight``, a ``Shard(0)`` DTensor on a 1-D mesh (uneven shards
    as torch cuts them: ``ceil(vocab / ranks)`` rows each, fewer on the last); ValueError for another layout."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # (DCP's, not public)

    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"a vocabulary-parallel weight must be sharded by rows (Shard(0)) on a 1-D mesh; got "
                         f"{tuple(weight.placements)} on a {weight.device_mesh.ndim}-D mesh")
    _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return int(offset[0])


__all__ = ["linear_cross_entropy"]
