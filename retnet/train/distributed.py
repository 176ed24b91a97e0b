"""The process group from torchrun's environment, and a barrier that outlasts the default group's timeout."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from retnet.train.config import ConfigError
from retnet.train.config_base import launch_env_int


def init_distributed(device_kind: str) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from torchrun's environment; a plain process is rank 0 of 1.
    NCCL on CUDA, gloo on CPU."""
    setting = device_kind
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no CUDA device")
    rank, local_rank = launch_env_int("RANK", 0), launch_env_int("LOCAL_RANK", 0)
    world_size = launch_env_int("WORLD_SIZE", 1)
    # torch's env:// start needs both, as torchrun sets them. A WORLD_SIZE without RANK trained a lone process as
    # rank 0 of that world, on 1 / WORLD_SIZE of the global batch, its logged loss divided by WORLD_SIZE; a RANK
    # without WORLD_SIZE failed later on a TypeError traceback (a rank other than 0 of a world of 1).
    if world_size > 1 and not os.environ.get("RANK"):
        raise ConfigError(f"environment variable WORLD_SIZE is {world_size} but RANK is unset: each process of a "
                          f"{world_size}-rank launch needs both (torchrun sets them); unset WORLD_SIZE to train in a "
                          f"single process")
    if rank >= world_size:
        raise ConfigError(f"environment variable RANK is {rank} but WORLD_SIZE is "
                          f"{os.environ.get('WORLD_SIZE') or 'unset (1)'}: a rank must be below the world size "
                          f"(torchrun sets both); unset RANK to train in a single process")
    if world_size == 1 and local_rank:
        # torchrun gives a world of 1 local rank 0. A leftover LOCAL_RANK made a plain process leave the tokenizer
        # and token cache to a local rank 0 that does not exist (a fresh cache then failed as a missing tokenizer
        # directory) and take GPU LOCAL_RANK
        raise ConfigError(f"environment variable LOCAL_RANK is {local_rank} but WORLD_SIZE is "
                          f"{os.environ.get('WORLD_SIZE') or 'unset (1)'}: a single process is local rank 0 (torchrun "
                          f"sets them together); unset LOCAL_RANK to train in a single process (CUDA_VISIBLE_DEVICES "
                          f"picks its GPU)")
    if device_kind == "cuda" and local_rank >= torch.cuda.device_count():
        # More ranks on this node than GPUs it shows (torchrun's --nproc_per_node above the GPU count, or
        # CUDA_VISIBLE_DEVICES hiding some): set_device raised a bare "CUDA error: invalid device ordinal" traceback
        raise ConfigError(f"train.device is {setting!r} (CUDA) and this process is local rank {local_rank} (LOCAL_RANK), "
                          f"but torch sees {torch.cuda.device_count()} CUDA device(s) on this node: launch at most "
                          f"one process per GPU (torchrun --nproc_per_node)")
    device = torch.device("cuda", local_rank) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # (an empty RANK is an unset one, as for launch_env_int: env:// would refuse it as not set)
    if os.environ.get("RANK") and world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
        global _wait_group
        _wait_group = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))
    return rank, local_rank, world_size, device


def context_parallel_group(rank: int, world_size: int, size: int, stride: int = 1) -> Any:
    """The process group of this rank's context-parallel pieces: ranks ``g·size .. g·size + size − 1`` are group
    ``g`` (a node's GPUs, where its all-gathers are fastest, for a size up to the GPUs of a node). None for size 1.
    Under tensor parallelism (``stride`` = T: the ranks of a piece are T consecutive ones, a layer split across
    them) the group of a piece's ``t``-th rank holds the ``t``-th rank of each piece, the ones running the same
    heads: ranks ``g·size·T + c·T + t`` for ``c`` < ``size``.

    Every rank creates every group, in the same order (``new_group`` is a collective of the default group, even
    for the ranks outside the new one). A group of its own: its all-gathers then never interleave with the data-
    parallel all-reduces of the default group."""
    if size == 1:
        return None
    if world_size % (size * stride):
        raise ConfigError(f"train.context_parallel ({size}) must divide the world size ({world_size})"
                          + (f" / train.tensor_parallel ({stride})" if stride > 1 else ""))
    mine = None
    for start in range(0, world_size, size * stride):
        for offset in range(stride):
            ranks = list(range(start + offset, start + size * stride, stride))
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
    return mine


def data_parallel_group(rank: int, world_size: int, group_size: int) -> Any:
    """The process group of the ranks holding this rank's place in every group of ``group_size`` consecutive ranks
    (ranks ``p``, ``p + group_size``, ...): the data-parallel ranks among which a context-parallel piece's pairs are
    dealt (the DPO reference pass gathers over them, the evaluation of pairs sums over them: each pair once, not
    once a piece). None for ``group_size`` 1 (the world). A collective of the default group, as ``new_group`` is."""
    if group_size == 1:
        return None
    mine = None
    for place in range(group_size):
        ranks = list(range(place, world_size, group_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def tensor_parallel_mesh(device: torch.device, world_size: int, size: int) -> Any:
    """The 2-D ``("dp", "tp")`` DeviceMesh of tensor parallelism over ``size`` ranks, None for size 1: ranks
    ``g·size .. g·size + size − 1`` are tensor-parallel group ``g`` (a node's GPUs, where a layer's all-reduces are
    fastest) and ``mesh["dp"]`` links the ranks holding the same slice in every group (the trainer averages their
    gradients over it, or FSDP2 shards over it). A collective of the default group, as ``new_group`` is."""
    if size == 1:
        return None
    if world_size % size:
        raise ConfigError(f"train.tensor_parallel ({size}) must divide the world size ({world_size})")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size // size, size), mesh_dim_names=("dp", "tp"))
    # A reduction over both dimensions (the gradient norm of FSDP2's 2-D shards) then takes one all-reduce over every
    # rank instead of one a dimension in a row, which torch 2.13 warns of (a private method: older torch without it
    # reduces in a row, as before)
    both = mesh["dp", "tp"]
    if hasattr(both, "_flatten"):
        both._flatten("dp_tp")
    return mesh


def copy_full_state(full: Any, local: Any) -> Any:
    """``full``, a full (unsharded) model or optimizer state dict that every rank holds, copied into ``local``, the
    same state dict as torch's ``get_state_dict`` gives it for the split model, in place: each DTensor's local tensor
    takes its own box of the full tensor, each other tensor the full one; returns ``local`` with ``full``'s keys (a
    key only one of them holds is left for ``set_state_dict`` to refuse or skip) and its other values (an optimizer's
    ``param_groups``). No communication. Then ``set_state_dict`` loads it as it loads a sharded checkpoint.

    Torch's ``set_model_state_dict(..., full_state_dict=True)`` cuts the full tensors with ``distribute_tensor``, which
    refuses (a bare AssertionError in torch 2.13) FSDP2's uneven shards of a tensor-parallel slice: a ``_StridedShard``
    of a dimension whose slice the dp ranks do not divide (the gate and up projections' 35 rows over 2 dp ranks when
    ``intermediate_size`` is 70 and ``tensor_parallel`` 2). The boxes come from the function torch's distributed
    checkpoint cuts its shards with, so a full checkpoint loads as the sharded one of the same model does."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # (DCP's, not public)

    if isinstance(local, DTensor):
        shape, offset = compute_local_shape_and_global_offset(full.shape, local.device_mesh, local.placements)
        piece = full[tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))]
        # copy_ broadcasts: a box of another shape (a layout this cut does not know) must not load quietly
        if piece.shape != local.to_local().shape:
            raise ValueError(f"the full checkpoint's tensor of shape {list(full.shape)} cuts into {list(piece.shape)} "
                             f"for this rank, whose piece is {list(local.to_local().shape)} ({local.placements})")
        local.to_local().copy_(piece)
        return local
    if torch.is_tensor(local) and torch.is_tensor(full) and local.shape == full.shape:
        local.copy_(full)
        return local
    if isinstance(local, dict) and isinstance(full, dict):
        return {key: copy_full_state(value, local[key]) if key in local else value for key, value in full.items()}
    return full


def is_distributed() -> bool:
    """Whether this process is one rank of a process group (torchrun with more than one process)."""
    return dist.is_available() and dist.is_initialized()


# The ranks wait here while local rank 0 downloads and tokenizes the dataset (hours for a large one) and rank 0
# writes a checkpoint or the export: longer than the default group's timeout (10 minutes for NCCL). A group of its
# own, so the training collectives keep their timeout and a rank that hangs in one is still reported.
WAIT_TIMEOUT = datetime.timedelta(days=2)
_wait_group: tuple[Any, Any] | None = None  # (the default group it belongs with, the group)


def barrier() -> None:
    """Wait for every rank, for up to WAIT_TIMEOUT."""
    if is_distributed():
        # the default group where the process group was made elsewhere (not by init_distributed)
        mine = _wait_group is not None and _wait_group[0] is dist.group.WORLD
        dist.barrier(group=_wait_group[1] if mine else None)
