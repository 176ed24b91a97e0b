"""Public retention ops. The model calls only these.

Each op picks its implementation per call: the Triton kernels for CUDA tensors, the fp32 PyTorch
references (``naive.py``) elsewhere. ``RETNET_KERNELS=torch`` or ``=triton`` forces one (``triton`` on
CPU tensors needs ``TRITON_INTERPRET=1`` set before triton is imported).
Both paths apply one set of input rules (``checks.py``): what one accepts the other accepts, and what
one refuses the other refuses with the same ``ValueError``. ``cu_seqlens`` is read to the host (a device
sync) once per op call, or once for all the calls made under a ``checks.SharedHostOffsets`` (one per model
forward, so the count does not grow with the depth); a tensor written in place since is read again.

On a GPU each kernel autotunes its launch config on the first call per shape (cached on disk);
``RETNET_AUTOTUNE=0`` launches each kernel's default config instead (no tuning, one compile per shape).

Triton is imported lazily, on the first call that dispatches to it, so ``import retnet`` works without
triton installed and tests can set ``TRITON_INTERPRET`` first.

- ``chunk_retention``: Triton chunkwise kernels (``chunk.py``), forward and backward.
- ``recurrent_retention``: the fused Triton recurrent kernel (``recurrent.py``), forward only; with
  inputs that require grad it is served by the Triton chunkwise op (same function, has a backward).
- ``parallel_retention``: there is no Triton parallel-form kernel; on the Triton path it is served by
  the Triton chunkwise op, which computes the same function in O(T) memory instead of O(T²).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from retnet.kernels import naive

__all__ = ["chunk_retention", "parallel_retention", "recurrent_retention", "use_triton"]


def use_triton(x) -> bool:
    """Whether the Triton kernels serve a call on tensor ``x``."""
    choice = os.environ.get("RETNET_KERNELS", "").strip().lower() or "auto"  # set but empty: the default
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"RETNET_KERNELS must be auto, torch or triton; got {choice!r}")
    if choice == "torch" or not isinstance(x, torch.Tensor):
        return False  # (a non-tensor q goes to the reference, whose input rules refuse it with a ValueError)
    if (choice == "triton" or x.is_cuda) and not torch.compiler.is_compiling() and not _triton_installed():
        # (else a ModuleNotFoundError from deep inside the first layer, naming neither the setting nor the way out;
        # compiling, torch's own kernels need triton, so it is there)
        raise ValueError(
            f"RETNET_KERNELS={choice}: {x.device} tensors go to the Triton kernels, but triton is not installed: "
            "pip install 'retnet-stack[triton]', or set RETNET_KERNELS=torch for the PyTorch references"
        )
    if choice == "triton":
        if not x.is_cuda and not _kernels_interpreted():
            # Compiled kernels can't read host memory: Triton would fail deep in its launcher with a
            # message naming neither the device nor the fix ("0 active drivers" without a GPU).
            raise ValueError(
                f"RETNET_KERNELS=triton on {x.device} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or pass CUDA tensors, or use RETNET_KERNELS=torch|auto"
            )
        return True
    return x.is_cuda


@functools.cache  # (the ops ask per call, a decode step once per layer)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels_interpreted() -> bool:
    """Whether the kernels were defined under Triton's interpreter (``@triton.jit`` decides at import, so the
    kernel modules are asked rather than today's ``TRITON_INTERPRET``)."""
    from triton.runtime.interpreter import InterpretedFunction

    from retnet.kernels import chunk

    return isinstance(chunk._load_tile, InterpretedFunction)


def parallel_retention(q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Parallel form; see :func:`retnet.kernels.naive.parallel_retention` for shapes.

    On the Triton path this is the Triton chunkwise op (identical result, linear cost).
    """
    if use_triton(q):
        from retnet.kernels.chunk import chunk_retention as triton_chunk_retention

        try:
            return triton_chunk_retention(
                q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens
            )
        except ValueError as error:  # the chunk op's input checks name it: the caller called this one
            message = str(error)
            if message.startswith("chunk_retention: "):
                raise ValueError("parallel_retention: " + message.removeprefix("chunk_retention: ")) from None
            raise
    return naive.parallel_retention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def chunk_retention(
    q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False, chunk_size=64, cu_seqlens=None
):
    """Chunkwise form; see :func:`retnet.kernels.naive.chunk_retention` for shapes."""
    if use_triton(q):
        from retnet.kernels.chunk import chunk_retention as triton_chunk_retention

        return triton_chunk_retention(
            q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens
        )
    return naive.chunk_retention(
        q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens
    )


def recurrent_retention(
    q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    update_state_inplace=False,
):
    """Recurrent form; see :func:`retnet.kernels.naive.recurrent_retention` for shapes and
    ``update_state_inplace`` (the final state written over ``initial_state``)."""
    if use_triton(q):
        from retnet.kernels.recurrent import recurrent_retention as triton_recurrent_retention

        return triton_recurrent_retention(
            q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, update_state_inplace
        )
    return naive.recurrent_retention(
        q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, update_state_inplace
    )
