"""Process-group helpers: rank, world size, the split of work across ranks, and a few collectives.

Every function is a no-op (rank 0 of a world of 1) unless ``torch.distributed`` is available and a
process group is initialized, so single-process code paths never change. The toolkit runs on the
engine users already launch (``torchrun``); it has no scheduler of its own.

The split is deterministic and documented: :func:`shard_range` gives rank ``r`` of ``W`` the ``r``-th
of ``W`` contiguous pieces of ``range(count)``, the first ``count % W`` pieces one item longer (the
convention of ``numpy.array_split`` and ``torch.tensor_split``). Contiguous pieces keep a sharded
store's steps, read rank after rank, in the order one process records them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is initialized in this process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of ranks in the default process group; 1 without one."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return torch.distributed.get_rank() if is_initialized() else 0


def shard_range(count: int, of_rank: int | None = None, world: int | None = None) -> range:
    """The contiguous share of ``range(count)`` that rank ``of_rank`` of ``world`` works on.

    Args:
        count: number of items (windows, batches, linears...).
        of_rank, world: default: this process's rank and the world size.

    Returns:
        A ``range``; the ranges of ranks 0..world-1 partition ``range(count)`` in order.

    Example:
        >>> [list(shard_range(5, r, 2)) for r in range(2)]
        [[0, 1, 2], [3, 4]]
    """
    of_rank = rank() if of_rank is None else of_rank
    world = world_size() if world is None else world
    if not 0 <= of_rank < world:
        raise ValueError(f"rank {of_rank} is outside a world of {world} ranks")
    base, extra = divmod(count, world)
    start = of_rank * base + min(of_rank, extra)
    return range(start, start + base + (1 if of_rank < extra else 0))


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; no-op without a process group)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _comm_device(tensor: Tensor) -> torch.device:
    # NCCL moves only CUDA tensors; gloo moves CPU tensors everywhere. Stay where the data is if we can.
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        if tensor.device.type == "cuda":
            return tensor.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensor(
    tensor: Tensor | None, src: int, *, shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """Rank ``src``'s ``tensor`` (of ``shape`` and ``dtype``, known to every rank) on every rank.

    Bool tensors travel as uint8 (not every backend moves bool). The result is on the device the
    backend communicates on (CPU for gloo, the current CUDA device for NCCL).
    """
    if world_size() == 1:
        return tensor
    wire = torch.uint8 if dtype == torch.bool else dtype
    like = tensor if tensor is not None else torch.empty(0)
    device = _comm_device(like)
    if rank() == src:
        buffer = tensor.detach().to(device=device, dtype=wire).contiguous()
    else:
        buffer = torch.empty(shape, dtype=wire, device=device)
    torch.distributed.broadcast(buffer, src=src)
    return buffer.to(dtype) if wire != dtype else buffer


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op without a process group)."""
    if world_size() == 1:
        return tensor
    device = _comm_device(tensor)
    if tensor.device == device:
        torch.distributed.all_reduce(tensor)
        return tensor
    moved = tensor.to(device)
    torch.distributed.all_reduce(moved)
    return tensor.copy_(moved)


def check_agreement(value: Any, what: str, fix: str) -> None:
    """Raise on every rank unless all ranks passed the same ``value`` (a small picklable summary)."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        differing = [r for r, v in enumerate(values) if v != values[0]]
        raise ValueError(
            f"the ranks disagree on {what}: rank(s) {differing} differ from rank 0 ({values[0]!r} vs "
            f"{values[differing[0]]!r}). {fix}"
        )


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective error check: if any rank failed ``what``, raise on every rank (the same message).

    A rank whose own ``error`` is set re-raises it; the others raise ``RuntimeError`` naming the
    failed rank and its message. Every rank must call this, so that none waits for a failed peer.
    """
    summaries = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, s) for r, s in enumerate(summaries) if s is not None]
    if not failed:
        return
    if error is not None:
        raise error
    first_rank, message = failed[0]
    raise RuntimeError(f"{what} failed on rank {first_rank} ({message}); nothing was changed on this rank.")


def _launched_world() -> int | None:
    """The world size ``torchrun`` (or another launcher setting RANK and WORLD_SIZE) gave this process,
    or None when launched plainly."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun, which sets "
            "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."
        ) from None


def init_from_env(
    backend: str | None = None, *, init_method: str | None = None, timeout: timedelta | None = None
) -> bool:
    """Initialize the default process group when this process was launched by ``torchrun``.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; under it this
    starts the group (``env://`` unless ``init_method`` is given). With NCCL each process first takes
    ``cuda:LOCAL_RANK`` as its current device. Launched plainly (no ``RANK``/``WORLD_SIZE``), or when a
    group already exists, it does nothing.

    Args:
        backend: default NCCL when CUDA is available, else gloo.
        init_method: e.g. ``"file:///tmp/rendezvous"``; default ``env://`` (torchrun's variables).
        timeout: the group's collective timeout (default: torch's).

    Returns:
        True if this call started the group (the caller then destroys it, see :func:`group_from_env`).

    Example:
        >>> started = init_from_env()  # plain python: no group, returns False
        >>> started
        False
    """
    if is_initialized() or _launched_world() is None:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    options: dict[str, Any] = {"init_method": init_method or "env://"}
    if timeout is not None:
        options["timeout"] = timeout
    torch.distributed.init_process_group(backend, **options)
    return True


@contextmanager
def group_from_env(backend: str | None = None, **options: Any) -> Iterator[bool]:
    """:func:`init_from_env` for the duration of the block; destroys the group it started on exit.

    Yields whether a process group of more than one rank is in use. This is how a script (the hub
    recipe, ``attnprobe``'s command line) runs both plainly and under ``torchrun``.

    Example:
        >>> with group_from_env() as distributed:  # doctest: +SKIP
        ...     result = prune.apply(model, store, 0.5, sequential=True)
        ...     if rank() == 0:
        ...         prune.save_masks(result.masks, "masks.safetensors")
    """
    started = init_from_env(backend, **options)
    try:
        yield world_size() > 1
    finally:
        if started and is_initialized():
            torch.distributed.destroy_process_group()
