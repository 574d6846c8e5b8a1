"""A device that moves, on the CPU: onloading that copies and poisons, so the device path runs in tests.

With ``device="cpu"`` (or ``device=None``) :func:`prune.engine.onload.onloaded` has nothing to move, so the
path a real CPU → GPU onload takes (fresh device storage, compute there, write back, restore) never
runs on a machine without an accelerator, and code that holds a stale view of a host weight (taken
before its block was onloaded) goes unnoticed: it reads and writes host storage that the write-back
overwrites a moment later.

Under the *moving device* every onload behaves as a real move:

- each parameter and buffer of the onloaded modules is copied into fresh storage on the target
  (the tensor's own device when ``device=None``), even where it already lives;
- while the block is away its host tensors are **poisoned**: floating-point ones are filled with NaN
  (integer and bool buffers are only copied), so a stale read yields NaN and a stale write is lost;
- on exit the host tensors get the written-back values (``write_back=True``) or their values from
  before the move (``write_back=False``), exactly what a real device would leave.

It costs two extra copies of one block's tensors and is meant for tests and debugging. Enable it

- for a process and the processes it starts: the environment variable ``ATTNPROBE_MOVING_DEVICE=1``;
- in a ``with`` block (this thread/context only): ``with prune.engine.onload.moving_device(): ...``, which
  takes precedence over the environment (``moving_device(False)`` turns it off).

Example:
    >>> from prune.engine.onload import moving_device
    >>> with moving_device():
    ...     result = prune.apply(model, "runs/calib", 0.5, sequential=True, device="cpu", progress=False)
    >>> round(float(result.report["sparsity"].mean()), 3)  # every block really moved, and came back pruned
    0.5
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

ENV_VAR = "ATTNPROBE_MOVING_DEVICE"

# None: follow the environment variable; True/False: set by moving_device() in this context.
_override: ContextVar[bool | None] = ContextVar("attnprobe_moving_device", default=None)


def enabled() -> bool:
    """Whether onloads emulate a real move (:func:`moving_device` first, then the environment)."""
    chosen = _override.get()
    if chosen is not None:
        return chosen
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")


@contextmanager
def moving_device(enable: bool = True) -> Iterator[None]:
    """Within the block, every onload copies into fresh storage and poisons the host copies.

    Args:
        enable: True to emulate a moving device, False to turn the emulation off (whatever the
            environment says).
    """
    token = _override.set(enable)
    try:
        yield
    finally:
        _override.reset(token)


def poisonable(tensor: Tensor) -> bool:
    """Floating-point and complex tensors are poisoned with NaN; integer and bool ones only copied."""
    return tensor.is_floating_point() or tensor.is_complex()


class Departure:
    """One host tensor sent away: its device copy, and what the host gets back on return.

    Args:
        host: the tensor's storage on the host (``param.data`` or the buffer itself).
        target: the device to copy to; None = the tensor's own device.
    """

    def __init__(self, host: Tensor, target: torch.device | None) -> None:
        self.host = host
        self.away = host.to(target if target is not None else host.device, copy=True)
        self._before = host.clone() if poisonable(host) else None  # the host's values for write_back=False
        if self._before is not None:
            host.fill_(float("nan"))

    def come_back(self, current: Tensor, write_back: bool) -> None:
        """Give the host the device's values (``write_back``) or its own from before the move."""
        if write_back:
            self.host.copy_(current)
        elif self._before is not None:
            self.host.copy_(self._before)
        self._before = None
