"""How often the fused linear cross-entropy goes over a chunk's logits, besides its three matmuls."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from retnet.model.loss import linear_cross_entropy


class _LogitOps(TorchDispatchMode):
    """The ops that read or write a ``[tokens, vocab]`` tensor (a chunk's logits, or their gradient)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = torch.Size(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in (*args, *(kwargs or {}).values(), out) if isinstance(a, torch.Tensor)]
        if any(t.shape in (self.shape, self.shape[::-1]) for t in tensors):
            self.ops.append(func.overloadpacket.__name__)
        return out


def test_the_softmax_of_a_chunk_takes_one_kernel_and_its_gradient_three_in_place_passes():
    # The chunk's loss was logsumexp (max, a shifted copy, exp, sum) then the softmax's subtraction and exp again:
    # on a CPU these passes (and the logits-sized temporary) were a fifth of the head's time.
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, 12, generator=generator, requires_grad=True)
    weight = torch.randn(97, 12, generator=generator, requires_grad=True)
    labels = torch.randint(0, 97, (2, 8), generator=generator)
    labels[0, :3] = -100
    with _LogitOps((16, 97)) as seen:
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    matmuls = [op for op in seen.ops if op in ("mm", "addmm")]
    rest = [op for op in seen.ops if op not in ("mm", "addmm", "t", "view", "_to_copy", "detach", "alias")]
    # the logits, then the gradients of the hidden states and of the weight
    assert len(matmuls) == 3, seen.ops
    assert rest == ["_log_softmax", "gather", "exp_", "scatter_add_", "mul_"], seen.ops
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
