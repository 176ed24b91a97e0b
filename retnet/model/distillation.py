"""Knowledge distillation straight from two models' hidden states, without either's ``[B, T, vocab]`` logits.

``linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels)`` is, per target token (a label
that is not −100 after the shift), ``alpha · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 − alpha) · CE(s)`` with
``s = hidden @ weight.T`` the student's logits and ``t = teacher_hidden @ teacher_weight.T`` the teacher's, averaged
over those tokens (Hinton et al., 2015: T² keeps the soft targets' gradients on the scale of the hard ones' as T
grows). ``kind="reverse_kl"`` swaps the KL's arguments (mode-seeking: the student concentrates on the teacher's
likeliest tokens). As :func:`retnet.model.loss.linear_cross_entropy`, both models' logits exist a chunk of target
tokens at a time, each chunk's gradients (for the student's hidden states and head) are computed as soon as its loss
is, and the backward pass only scales them; tokens that are not targets are never projected.

:class:`Distillation` carries the teacher's side into ``RetNetForCausalLM.forward(distill=...)``, where the student's
head is at hand (an FSDP2-sharded head is whole only inside its forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retnet.model.loss import CHUNK_BYTES, IGNORE_INDEX, scaled_saved_gradients

DISTILL_KINDS = ("kl", "reverse_kl")
# The temperatures whose T²·KL the fp32 loss computes: below, T² leaves float32's normal range (the loss comes out
# 0, then nan once logits / T overflow); above, the log-softmaxes of logits / T, all within float32's rounding of
# log(vocab), no longer resolve the KL (1% off at 1e3, 30% at 1e4, then even negative; nan past 1e19)
DISTILL_TEMPERATURES = (1e-18, 1e3)


def _chunk_tokens(vocab_size: int) -> int:
    # up to four [chunk, vocab] fp32 buffers live at once (the student's logits, later their gradient; the two
    # log-softmaxes; a softmax): at half linear_cross_entropy's chunk, no more than its own peak (its fp32 logits
    # and logsumexp's temporary of them)
    return max(1, CHUNK_BYTES // (8 * vocab_size))


class _LinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor,
                temperature: float, alpha: float, reverse: bool, chunk: int, grad_enabled: bool):
        # zeros: the tokens that are not targets get no gradient, and are never visited below
        grad_hidden = torch.zeros_like(hidden) if grad_enabled and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if grad_enabled and ctx.needs_input_grad[1] else None
        grads = grad_hidden is not None or grad_weight is not None
        sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)  # T²·KL, CE
        inverse = torch.where(denominator == 0, 0.0, 1.0 / denominator)
        ctx.late_mean = False
        scale = temperature * temperature
        # The [chunk, vocab] buffers are the peak: each is freed (none outlives its chunk), or overwritten in place,
        # as soon as it has served, and the teacher's logits come once the student's side needs only its gradient's.
        for start in range(0, rows.shape[0], chunk):
            index = rows[start:start + chunk]
            target = targets[start:start + chunk]
            inputs = hidden[index]
            logits = F.linear(inputs, weight)  # the head's dtype (bf16 under autocast), as the unfused head
            dtype, student = logits.dtype, logits.float()
            # fp16, as in linear_cross_entropy: (q − p) / a micro-batch's share of an accumulated count underflows
            # fp16 before GradScaler's scale, which comes only in backward here; 1 / denominator comes there too.
            ctx.late_mean = dtype == torch.float16
            del logits
            log_norm = torch.logsumexp(student, dim=-1)
            sums[1] += (log_norm - student.gather(1, target[:, None]).squeeze(1)).sum()
            # the student's soft distribution (÷ 1 is exact: no copy for it)
            log_q = F.log_softmax(student / temperature if temperature != 1 else student, dim=-1)
            hard = None
            if grads and alpha < 1:  # the hard part's gradient, softmax(s) − one-hot, over the student's logits
                hard = student.sub_(log_norm[:, None]).exp_()
                hard.scatter_add_(1, target[:, None], torch.full_like(hard[:, :1], -1.0))
            del student
            teacher = F.linear(teacher_hidden[index], teacher_weight).float()
            log_p = F.log_softmax(teacher.div_(temperature) if temperature != 1 else teacher, dim=-1)
            del teacher
            if reverse:  # KL(q ‖ p): d/ds = (q ⊙ (log q − log p − KL)) / T per token
                q = log_q.exp()
                gap = log_q.sub_(log_p)
                del log_q, log_p
                divergence = (q * gap).sum(-1)
                soft = q.mul_(gap.sub_(divergence[:, None]))
                del q, gap
            else:  # KL(p ‖ q): d/ds = (q − p) / T per token
                p = log_p.exp()
                divergence = log_p.sub_(log_q).mul_(p).sum(-1)  # p ⊙ (log p − log q), in log p's buffer
                del log_p
                soft = log_q.exp_().sub_(p)
                del log_q, p
            sums[0] += scale * divergence.sum()
            if not grads:
                del soft
                continue
            # T² · (1/T): the soft part's gradient; the hard part's (1 − alpha) of it
            grad_logits = soft.mul_(alpha * temperature) if alpha else None
            del soft
            if hard is not None:
                grad_logits = hard.mul_(1.0 - alpha) if grad_logits is None else grad_logits.add_(hard, alpha=1 - alpha)
            del hard
            if not ctx.late_mean:
                grad_logits.mul_(inverse)
            grad_logits = grad_logits.to(dtype)  # in the head's matmul dtype, as its backward
            if grad_hidden is not None:
                grad_hidden[index] = (grad_logits @ weight).to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ inputs
            del grad_logits  # else alive through the next chunk's peak
        ctx.save_for_backward(grad_hidden, grad_weight, inverse)
        ctx.weight_dtype = weight.dtype
        parts = sums / denominator
        ctx.mark_non_differentiable(parts)
        return alpha * parts[0] + (1.0 - alpha) * parts[1], parts

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, grad_parts: torch.Tensor):
        grad_hidden, grad_weight, inverse = ctx.saved_tensors
        scale = grad_output.float() * inverse if ctx.late_mean else grad_output.float()
        grads = scaled_saved_gradients(grad_hidden, grad_weight, scale, ctx.weight_dtype,
                                       "linear_distillation_loss (distill.teacher)")
        return *grads, *[None] * 10


def linear_distillation_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.LongTensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    kind: str = "kl",
    chunk_tokens: int | None = None,
    shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, parts)``: the mean distillation loss (fp32) and, detached, ``[T²·KL, CE]``, each the mean of its
    term (so ``loss = alpha · parts[0] + (1 − alpha) · parts[1]``).

    ``hidden_states`` ``[B, T, D]`` and ``weight`` ``[vocab, D]`` are the student's (final hidden states and LM
    head), ``teacher_hidden_states`` ``[B, T, D']`` and ``teacher_weight`` ``[vocab, D']`` the teacher's for the
    same tokens (no gradient flows to them); ``labels`` ``[B, T]`` unshifted (``shifted``: already moved left), −100
    ignored, ``num_items_in_batch`` replaces the mean's denominator, as in ``linear_cross_entropy``, whose mean this
    is at ``alpha`` 0. ``chunk_tokens`` target tokens are projected at a time (default: 128 MiB of one model's fp32
    logits a chunk)."""
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"linear_distillation_loss: hidden_states must be [B, T, D] and labels [B, T]; got "
                         f"{list(hidden_states.shape)} and {list(labels.shape)}")
    if teacher_hidden_states.shape[:2] != hidden_states.shape[:2]:
        raise ValueError(f"linear_distillation_loss: the teacher's hidden states cover other tokens: "
                         f"{list(teacher_hidden_states.shape)}, the student's {list(hidden_states.shape)}")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"linear_distillation_loss: the teacher's vocabulary has {teacher_weight.shape[0]} tokens, "
                         f"the student's {weight.shape[0]}: distillation compares their distributions token by token")
    if kind not in DISTILL_KINDS:
        raise ValueError(f"linear_distillation_loss: kind must be one of {DISTILL_KINDS}; got {kind!r}")
    # (inf would make T² · KL inf · 0 = nan, both softmaxes uniform; nan fails every comparison)
    low, high = DISTILL_TEMPERATURES
    if not low <= temperature <= high or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"linear_distillation_loss: temperature must be finite and > 0, in [{low:g}, {high:g}] (where "
                         f"float32 computes T² · KL), and alpha in [0, 1]; got {temperature!r} and {alpha!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"linear_distillation_loss: chunk_tokens must be at least 1; got {chunk_tokens}")
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    teacher_hidden = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1]).detach()
    if not shifted:
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    flat = labels.reshape(-1).to(hidden.device)
    # The one host sync: the targets' count sizes the chunks (the other tokens are never projected). The
    # denominator is then filled on the device, not copied there (a copy from the host waits for the device).
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    if num_items_in_batch is None or not isinstance(num_items_in_batch, torch.Tensor):
        count = rows.shape[0] if num_items_in_batch is None else num_items_in_batch
        denominator = torch.full((), float(count), dtype=torch.float32, device=hidden.device)
    else:
        denominator = num_items_in_batch.to(device=hidden.device, dtype=torch.float32)
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0])
    return _LinearDistillation.apply(hidden, weight, teacher_hidden, teacher_weight.detach(), rows, flat[rows],
                                     denominator, float(temperature), float(alpha), kind == "reverse_kl", chunk,
                                     torch.is_grad_enabled())


class Distillation:
    """The teacher's side of a distillation loss, for ``RetNetForCausalLM.forward(distill=...)``: its final hidden
    states for the forward's tokens and its LM head's weight, with the loss's settings (as
    :func:`linear_distillation_loss`). The forward leaves the loss's detached ``[T²·KL, CE]`` means in ``parts``.

    A plain object, not a dataclass: DDP and FSDP2 rebuild the dataclasses among a forward's inputs as they move or
    cast their tensors, and ``parts`` would be set on a copy."""

    __slots__ = ("alpha", "chunk_tokens", "hidden_states", "kind", "parts", "temperature", "weight")

    def __init__(self, hidden_states: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0,
                 alpha: float = 1.0, kind: str = "kl", chunk_tokens: int | None = None):
        self.hidden_states, self.weight = hidden_states, weight
        self.temperature, self.alpha, self.kind, self.chunk_tokens = temperature, alpha, kind, chunk_tokens
        self.parts: torch.Tensor | None = None

    def loss(self, hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.LongTensor,
             num_items_in_batch: int | torch.Tensor | None = None, shifted: bool = False,
             kept: slice | torch.Tensor | None = None, tokens: int | None = None) -> torch.Tensor:
        """The loss of the student's ``hidden_states`` and head ``weight`` (as :func:`linear_distillation_loss`).
        ``kept`` (``logits_to_keep``'s cut): the positions of the forward's ``tokens`` that ``hidden_states`` and
        ``labels`` hold; the teacher's hidden states, for all ``tokens``, are cut to the same positions."""
        teacher = self.hidden_states
        if kept is not None and teacher.shape[1] != hidden_states.shape[1]:
            # States given already cut to the kept positions are taken as they are (as before the cut existed)
            if teacher.shape[1] != tokens:
                # checked before the cut: a slice of other tokens' states can have the kept length, and misalign
                raise ValueError(f"distill with logits_to_keep: the teacher's hidden states cover {teacher.shape[1]} "
                                 f"tokens, the forward's input {tokens} and the kept positions "
                                 f"{hidden_states.shape[1]}: give the teacher's states for every input token (cut "
                                 f"to the same positions) or for the kept ones")
            teacher = teacher[:, kept if isinstance(kept, slice) else kept.to(teacher.device)]
        loss, self.parts = linear_distillation_loss(
            hidden_states, weight, teacher, self.weight, labels, num_items_in_batch,
            temperature=self.temperature, alpha=self.alpha, kind=self.kind, chunk_tokens=self.chunk_tokens,
            shifted=shifted)
        return loss


__all__ = ["DISTILL_KINDS", "DISTILL_TEMPERATURES", "Distillation", "linear_distillation_loss"]
