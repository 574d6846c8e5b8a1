"""Cached block inputs of the block-wise engine, in host memory or on disk, one step at a time.

The block-wise engine (:mod:`prune.engine.blockwise`) keeps, for every calibration step, the current block's
input: the hidden states, which change after every block, and the other arguments of the block's call
(rotary tables, attention masks, position ids), which do not. For LLaDA-8B at the paper's recipe
(128 windows × 10 noise levels × 4096 tokens, hidden 4096, bf16) the hidden states alone are 40 GiB.

- Arguments equal in every step (rotary tables; masks when there is no padding) are kept once:
  :class:`_SharedInputs` compares each step's tensors with those already kept under the same argument
  and reuses the kept one. Padding masks differ per step and are kept per step.
- :class:`BlockInputCache` (``offload_device`` a torch device, ``"cpu"`` by default) keeps every step's
  hidden states on that device, as the engine always did.
- :class:`DiskBlockInputCache` (``offload_device="disk"``) writes each step's hidden states, and its
  per-step arguments, to safetensors files in a temporary directory (under ``cache_dir``, default the
  system's temporary directory), read back memory-mapped one step at a time. A background thread
  loads step i + 1 while step i runs; a block's new output for step i replaces step i's file (written
  beside it, then renamed over it). The directory is deleted when the cache closes, also after an
  error. Host memory is then a few steps' hidden states, whatever the number of steps.

Reading a step back gives the very tensors that were written (safetensors stores the bytes), so the
engine computes exactly what it computes with the in-memory cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

DISK = "disk"
# Distinct values kept once per argument: a mask without padding (and a shorter last batch's) is one
# or two values; a padding mask that differs per step stops being compared after these.
_SHARED_PER_ARGUMENT = 2


def check_offload(offload_device: Any, cache_dir: str | os.PathLike | None) -> None:
    """Refuse an ``offload_device`` that is neither a torch device nor ``"disk"``, and a bad ``cache_dir``.

    Raises:
        ValueError: naming the bad value and the accepted ones.
    """
    if offload_device == DISK:
        if cache_dir is not None and not Path(cache_dir).is_dir():
            raise ValueError(
                f"cache_dir={str(cache_dir)!r} is not an existing directory; create it, or pass "
                "cache_dir=None to use the system's temporary directory."
            )
        return
    if cache_dir is not None:
        raise ValueError(
            f"cache_dir= is where offload_device='disk' writes the cached block inputs, but "
            f"offload_device={offload_device!r}; pass offload_device='disk' with it, or drop cache_dir=."
        )
    try:
        torch.device(offload_device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"offload_device={offload_device!r} is neither a torch device (e.g. 'cpu', 'cuda:1') nor "
            f"'{DISK}' (cached block inputs in memory-mapped files, see cache_dir=)."
        ) from None


def host_device(offload_device: Any) -> torch.device:
    """Where tensors that must stay in memory go: ``offload_device``, or the CPU for ``"disk"``."""
    return torch.device("cpu") if offload_device == DISK else torch.device(offload_device)


def open_cache(offload_device: Any = "cpu", cache_dir: str | os.PathLike | None = None) -> BlockInputCache:
    """An empty cache for ``offload_device`` (a torch device, or ``"disk"`` under ``cache_dir``)."""
    check_offload(offload_device, cache_dir)
    if offload_device == DISK:
        return DiskBlockInputCache(cache_dir)
    return BlockInputCache(torch.device(offload_device))


def _map_leaves(value: Any, fn: Callable[[str, Any], Any], leaf: tuple[type, ...], path: str) -> Any:
    """``value`` with every ``leaf`` inside (tuples, lists, dicts) replaced by ``fn(path, leaf)``."""
    if isinstance(value, leaf):
        return fn(path, value)
    if isinstance(value, tuple):
        return tuple(_map_leaves(v, fn, leaf, f"{path}.{i}") for i, v in enumerate(value))
    if isinstance(value, list):
        return [_map_leaves(v, fn, leaf, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _map_leaves(v, fn, leaf, f"{path}.{k}") for k, v in value.items()}
    return value


class _SharedInputs:
    """Argument tensors equal across steps, kept once: ``intern`` returns the kept equal tensor."""

    def __init__(self) -> None:
        self._kept: dict[str, list[Tensor]] = {}

    def intern(self, path: str, tensor: Tensor) -> Tensor | None:
        """The kept tensor equal to ``tensor`` (keeping it now if there is room), or None."""
        kept = self._kept.setdefault(path, [])
        for candidate in kept:
            same_kind = candidate.shape == tensor.shape and candidate.dtype == tensor.dtype
            if same_kind and candidate.device == tensor.device and torch.equal(candidate, tensor):
                return candidate
        if len(kept) < _SHARED_PER_ARGUMENT:
            kept.append(tensor)
            return tensor
        return None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kept in self._kept.values() for t in kept)


class BlockInputCache:
    """Every step's cached block input in memory on ``device``, equal arguments kept once.

    Entries are the engine's step inputs (dataclasses with ``hidden``, ``args`` and ``kwargs``).
    Iterating yields them in step order; :meth:`replace_hidden` sets a step's hidden states to the
    current block's output (the next block's input).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._entries: list[Any] = []
        self._shared = _SharedInputs()

    def __enter__(self) -> BlockInputCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._entries)

    def _intern(self, path: str, tensor: Tensor) -> Tensor:
        shared = self._shared.intern(path, tensor)
        return tensor if shared is None else shared

    def add(self, entry: Any) -> None:
        """Append one step's input (its tensors already on this cache's device)."""
        args = _map_leaves(entry.args, self._intern, (Tensor,), "args")
        kwargs = _map_leaves(entry.kwargs, self._intern, (Tensor,), "kwargs")
        self._entries.append(replace(entry, args=args, kwargs=kwargs))

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._entries))

    def replace_hidden(self, index: int, hidden: Tensor) -> None:
        """Step ``index``'s hidden states become ``hidden`` (moved to this cache's device)."""
        self._entries[index].hidden = hidden.to(self.device)

    def shared_nbytes(self) -> int:
        """Bytes of the argument tensors kept once for all steps."""
        return self._shared.nbytes()

    def close(self) -> None:
        self._entries.clear()


@dataclass(frozen=True)
class _StepTensor:
    """Placeholder for an argument tensor stored in its step's file under ``key``."""

    key: str


def _savable(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, no two sharing storage (position_ids is a view of cache_position): what
    safetensors writes. A lone tensor is not copied beyond its move to the CPU."""
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _load(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as f:  # memory-mapped; copied out per tensor
        return {key: f.get_tensor(key) for key in f.keys()}


class DiskBlockInputCache(BlockInputCache):
    """Every step's cached block input in safetensors files under a temporary directory.

    Args:
        cache_dir: where the temporary directory is made (None: the system's temporary directory).
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        super().__init__(torch.device("cpu"))
        self.path = Path(tempfile.mkdtemp(prefix="prune-block-inputs-", dir=cache_dir))
        # Deleted on close(), and by this finalizer if the cache is dropped without closing.
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prune-prefetch")
        self._has_args: list[bool] = []

    def _hidden_file(self, index: int) -> Path:
        return self.path / f"hidden-{index:06d}.safetensors"

    def _args_file(self, index: int) -> Path:
        return self.path / f"args-{index:06d}.safetensors"

    def _write(self, path: Path, tensors: dict[str, Tensor]) -> None:
        partial = path.with_suffix(".partial")
        try:
            save_file(_savable(tensors), str(partial))
            os.replace(partial, path)  # a reader of the old file keeps its own copy
        except OSError as err:
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            raise OSError(
                f"could not write the block-input cache file {path} ({err}); every step needs about "
                f"{size / 2**20:.1f} MiB there. Pass cache_dir= on a disk with room, or "
                "offload_device='cpu' to keep the cache in memory."
            ) from err

    def add(self, entry: Any) -> None:
        index = len(self._entries)
        per_step: dict[str, Tensor] = {}

        def keep(path: str, tensor: Tensor) -> Tensor | _StepTensor:
            shared = self._shared.intern(path, tensor.to("cpu"))
            if shared is not None:
                return shared
            key = f"t{len(per_step)}"
            per_step[key] = tensor
            return _StepTensor(key)

        args = _map_leaves(entry.args, keep, (Tensor,), "args")
        kwargs = _map_leaves(entry.kwargs, keep, (Tensor,), "kwargs")
        if per_step:
            self._write(self._args_file(index), per_step)
        self._write(self._hidden_file(index), {"hidden": entry.hidden})
        self._has_args.append(bool(per_step))
        self._entries.append(replace(entry, hidden=None, args=args, kwargs=kwargs))

    def _read(self, index: int) -> Any:
        skeleton = self._entries[index]
        per_step = _load(self._args_file(index)) if self._has_args[index] else {}

        def fill(path: str, placeholder: _StepTensor) -> Tensor:
            return per_step[placeholder.key]

        return replace(
            skeleton,
            hidden=_load(self._hidden_file(index))["hidden"],
            args=_map_leaves(skeleton.args, fill, (_StepTensor,), "args"),
            kwargs=_map_leaves(skeleton.kwargs, fill, (_StepTensor,), "kwargs"),
        )

    def __iter__(self) -> Iterator[Any]:
        count = len(self._entries)
        pending: Future | None = self._loader.submit(self._read, 0) if count else None
        try:
            for index in range(count):
                entry = pending.result()
                # the next step loads while the caller runs this one
                pending = self._loader.submit(self._read, index + 1) if index + 1 < count else None
                yield entry
        finally:
            if pending is not None:
                pending.cancel()

    def replace_hidden(self, index: int, hidden: Tensor) -> None:
        self._write(self._hidden_file(index), {"hidden": hidden})

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._cleanup()
        super().close()
