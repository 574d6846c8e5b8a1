"""A process group from ``torchrun``'s environment, for ``attnprobe prune`` (data-parallel, rank 0 writes).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with more than one process
:func:`init_from_env` starts the default group (NCCL when the run uses CUDA, else gloo). Everything
else (sharded recording, split pruning work) follows from ``torch.distributed.is_initialized()`` in
attnprobe and prune.
"""

from __future__ import annotations

import os

import torch


def init_from_env(device: str | None) -> tuple[int, int, str | None]:
    """``(rank, world size, this rank's device)``; starts the group when torchrun launched several.

    ``device="cuda"`` (no index) becomes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if not torch.distributed.is_initialized():
        cuda = device is not None and device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world, device


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def close() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
