"""See every ``scaled_dot_product_attention`` call without touching modeling code.

Models call SDPA in many ways: ``F.scaled_dot_product_attention`` from a block method (LLaDA),
through transformers' attention-interface registry, or through ``torch.nn.functional`` imported
under another name. All of them dispatch through ``__torch_function__``, so a
:class:`torch.overrides.TorchFunctionMode` sees them all, with the post-RoPE ``q`` and ``k`` exactly as
the kernel gets them. The mode only observes: it calls the original function with the original
arguments and returns its result untouched, which keeps logits bit-identical.

Torch-function modes form a per-thread stack, and leaving one pops whatever is on top. Two recordings
closed out of order would therefore pop each other's mode. :meth:`SdpaObserver.close` never pops
another observer: an observer closed while a later one is still open goes inert (it passes calls
through and reports nothing) and is popped when the observers above it have closed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

# Per thread, the observers opened and not yet popped, innermost last (modes are per thread too).
_OPEN = threading.local()


def _open_observers() -> list[SdpaObserver]:
    if not hasattr(_OPEN, "stack"):
        _OPEN.stack = []
    return _OPEN.stack


@dataclass(frozen=True)
class SdpaCall:
    """The arguments of one SDPA call, as the kernel received them."""

    query: Tensor  # (batch, q_heads, queries, head_dim)
    key: Tensor  # (batch, kv_heads, keys, head_dim)
    attn_mask: Tensor | None
    is_causal: bool
    scale: float | None
    enable_gqa: bool


def _bind(args: tuple, kwargs: dict) -> SdpaCall:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, args))
    bound.update(kwargs)
    return SdpaCall(
        query=bound["query"],
        key=bound["key"],
        attn_mask=bound["attn_mask"],
        is_causal=bool(bound["is_causal"]),
        scale=bound["scale"],
        enable_gqa=bool(bound["enable_gqa"]),
    )


class SdpaObserver(TorchFunctionMode):
    """A torch-function mode that hands each SDPA call to ``on_call`` and then runs it unchanged.

    Args:
        on_call: called with an :class:`SdpaCall` before the real kernel runs. Calls are observed only
            while this mode is active (the recorder enters it for the duration of ``record()``).
    """

    def __init__(self, on_call: Callable[[SdpaCall], None]) -> None:
        super().__init__()
        self._on_call: Callable[[SdpaCall], None] | None = on_call
        self.thread = threading.get_ident()

    def open(self) -> None:
        """Start observing SDPA calls made in this thread."""
        self.thread = threading.get_ident()
        self.__enter__()
        _open_observers().append(self)

    def close(self) -> None:
        """Stop observing; pop this mode, and inert ones below it, once no open observer is above it."""
        self._on_call = None
        stack = _open_observers() if threading.get_ident() == self.thread else []
        if self not in stack:
            return  # closed from another thread: it stays inert on its own thread's stack
        while stack and stack[-1]._on_call is None:
            stack.pop().__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self._on_call is not None:
            self._on_call(_bind(args, kwargs))
        return func(*args, **kwargs)
