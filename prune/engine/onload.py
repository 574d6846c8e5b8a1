"""Move parts of a model between devices, and nested inputs with them.

Onloading (``prune.apply(..., sequential=True, device="cuda:0")``) keeps the model where it lives (the
CPU) and brings one block at a time to the device: :func:`onloaded` moves every parameter and buffer of
the given modules, except those under ``exclude``, and puts each back on its own original device when
the block is done. Parameters keep their identity (``param.data`` is swapped), so optimizer-free
references such as tied embeddings and the caller's dict of linears stay valid.

On a machine without an accelerator, ``device="cpu"`` moves nothing, so this path would never run in
tests: the *moving device* (:mod:`prune.engine.moving_device`; ``ATTNPROBE_MOVING_DEVICE=1`` or
``with moving_device():``) makes every onload copy into fresh storage and poison the host copies with
NaN while the block is away, exactly as a real move would expose a stale view of a weight.

Weights that accelerate has offloaded (meta tensors whose values live in a hook's weights map) cannot
be moved or pruned here: :func:`check_materialized` refuses them with a pointer to ``device=``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from prune.engine import moving_device as moving_device_mod
from prune.engine.moving_device import Departure, moving_device

__all__ = ["block_device", "check_materialized", "moving_device", "onloaded", "streamed", "to_device"]


def to_device(value: Any, device: torch.device | str | None) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``; None = unchanged."""
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _tensors(modules: Iterable[nn.Module], exclude: Iterable[nn.Module]):
    """(owner, name, tensor, is_parameter) of every parameter and buffer, each once, outside ``exclude``."""
    skip = {id(m) for root in exclude for m in root.modules()}
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in skip:
                continue
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    yield module, name, param, True
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and id(buf) not in seen:
                    seen.add(id(buf))
                    yield module, name, buf, False


@contextmanager
def onloaded(
    modules: nn.Module | Iterable[nn.Module],
    device: torch.device | str | None,
    *,
    exclude: Iterable[nn.Module] = (),
    write_back: bool = True,
) -> Iterator[None]:
    """Within the block, the parameters and buffers of ``modules`` (minus ``exclude``) live on ``device``.

    On exit (also after an error) each tensor is its original one again, on its original device; with
    ``write_back`` the values it was given meanwhile (pruned weights) are first copied into it, without
    allocating new host memory. ``device=None`` moves nothing. Under the moving device
    (:mod:`prune.engine.moving_device`: ``ATTNPROBE_MOVING_DEVICE=1`` or :func:`moving_device`) every tensor
    is
    copied into fresh storage (on its own device when ``device=None``) and its host copy is NaN while
    away, as a real move would make any stale view of it.
    """
    moving = moving_device_mod.enabled()
    if device is None and not moving:
        yield
        return
    target = torch.device(device) if device is not None else None
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    moved: list[tuple[nn.Module, str, Tensor, bool, Tensor, Departure | None]] = []
    try:
        for module, name, tensor, is_param in _tensors(modules, list(exclude)):
            original = tensor.data if is_param else tensor  # a buffer comes back as itself
            departure = Departure(original, target) if moving else None
            if departure is not None:
                away = departure.away
            elif tensor.device == target:
                continue
            else:
                away = original.to(target, non_blocking=True)
            if is_param:
                tensor.data = away
            else:
                setattr(module, name, away)
            moved.append((module, name, tensor, is_param, original, departure))
        yield
    finally:
        for module, name, tensor, is_param, original, departure in reversed(moved):
            current = tensor.data if is_param else getattr(module, name)
            if departure is not None:
                departure.come_back(current, write_back)
            elif write_back:
                original.copy_(current)
            if is_param:
                tensor.data = original
            else:
                setattr(module, name, original)


@contextmanager
def streamed(model: nn.Module, blocks: Iterable[nn.Module], device: torch.device | str) -> Iterator[None]:
    """Run whole-model forwards with one block at a time on ``device`` (weights are only read).

    The parts outside ``blocks`` (embeddings, final norm, head) stay on ``device`` for the duration;
    each block is moved there by a pre-hook when it is called and dropped again (its host tensors
    restored, nothing copied back) when it returns. A forward then needs the device memory of one block
    plus the rest of the model, and moves each block's weights to the device once per forward; use a
    larger batch per forward to spread that transfer. This is how a model that does not fit the device
    is recorded (attention mass for sink weights) with the ordinary recorder.

    Example (not run here: it needs a CUDA device to be worth it; the tests run it on the CPU):
        >>> with streamed(model, model.model.layers, "cuda:0"):                    # doctest: +SKIP
        ...     with attnprobe.record(model, "runs/calib", linear_stats=False):
        ...         attnprobe.calibrate(model, ids, mask_token_id=126336)
    """
    blocks = list(blocks)
    handles = []
    open_blocks: dict[int, Any] = {}

    def enter(module, args):
        context = onloaded(module, device, write_back=False)
        context.__enter__()
        open_blocks[id(module)] = context

    def leave(module, args, output):
        context = open_blocks.pop(id(module), None)
        if context is not None:
            context.__exit__(None, None, None)

    try:
        with onloaded(model, device, exclude=blocks, write_back=False):
            for block in blocks:
                handles.append(block.register_forward_pre_hook(enter))
                handles.append(block.register_forward_hook(leave, always_call=True))
            yield
    finally:
        while handles:
            handles.pop().remove()
        for context in list(open_blocks.values()):
            context.__exit__(None, None, None)


def check_materialized(linears: dict[str, nn.Module]) -> None:
    """Refuse linears whose weights are not real tensors (accelerate's offloading leaves meta ones)."""
    offloaded = [name for name, m in linears.items() if m.weight.is_meta]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} linear weights (e.g. {offloaded[0]}) are on the meta device: accelerate has "
            "offloaded them (device_map with 'cpu'/'disk' offload, or cpu_offload), so their values live "
            "in its hooks and cannot be pruned in place. Load the model on the CPU without offloading "
            "(device_map=None or device_map='cpu') and let prune onload it block by block: "
            "prune.apply(model, store, sparsity, sequential=True, device='cuda:0')."
        )


def block_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device if it set one, else its first weight's."""
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
