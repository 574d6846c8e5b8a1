"""Find a model's attention modules, their blocks and the linears inside them.

Discovery is structural: nothing here knows a model family by name. An *attention module* is the
innermost module that either has a class name containing "attention"/"attn" or owns at least two
query/key/value projections as direct children (LLaDA's blocks, whose attention is a method of the
block itself). At run time the recorder attributes every ``scaled_dot_product_attention`` call to the
innermost attention module executing at that moment, so a candidate that never calls SDPA simply
never becomes a recorded layer.

A *block* is the repeated unit that holds an attention module: its nearest ancestor that sits directly
in an ``nn.ModuleList`` (a decoder layer), or the module itself when it sits there (LLaDA). The
``nn.Linear`` modules inside blocks are the ones whose inputs feed Wanda and SparseGPT statistics.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Targets = str | re.Pattern | Callable[[str, nn.Module], bool] | None

_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_PROJECTION_NAMES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "query",
        "key",
        "value",
        "q",
        "k",
        "v",
        "c_attn",
        "att_proj",
        "wqkv",
        "Wqkv",
        "to_q",
        "to_k",
        "to_v",
        "in_proj",
    }
)
# Classes whose names match the pattern but never hold attention itself.
_NOT_ATTENTION_CLASS = re.compile(r"norm|rotary|embedding|dropout|mask", re.IGNORECASE)


@dataclass(frozen=True)
class ModelLayout:
    """Where attention lives in a model.

    Attributes:
        attention: names of attention modules, in ``named_modules`` order.
        blocks: for each attention module, the name of its block ("" for the root).
        linears: names of the ``nn.Linear`` modules inside the blocks, in ``named_modules`` order.
    """

    attention: tuple[str, ...]
    blocks: dict[str, str]
    linears: tuple[str, ...]


def _looks_like_attention(module: nn.Module) -> bool:
    cls = type(module).__name__
    if _ATTENTION_CLASS.search(cls) and not _NOT_ATTENTION_CLASS.search(cls):
        return True
    children = {name for name, _ in module.named_children()}
    return len(children & _PROJECTION_NAMES) >= 2


def _matcher(targets: Targets) -> Callable[[str, nn.Module], bool]:
    if targets is None:
        return lambda name, module: _looks_like_attention(module)
    if callable(targets) and not isinstance(targets, re.Pattern):
        return targets
    pattern = re.compile(targets) if isinstance(targets, str) else targets
    return lambda name, module: pattern.fullmatch(name) is not None


def _innermost(names: list[str]) -> list[str]:
    """Drop every name that has another selected name below it."""
    return [n for n in names if not any(o.startswith(n + ".") for o in names if o != n and n)]


def _block_of(model: nn.Module, name: str) -> str:
    modules = dict(model.named_modules())
    parts = name.split(".") if name else []
    # Walk up from the attention module; the first module whose parent is a ModuleList is the block.
    for depth in range(len(parts), 0, -1):
        parent = ".".join(parts[: depth - 1])
        if isinstance(modules[parent], nn.ModuleList):
            return ".".join(parts[:depth])
    return ".".join(parts[:-1])


def candidate_names(model: nn.Module, limit: int = 12) -> list[str]:
    """Names worth suggesting when discovery finds nothing: modules with child linears."""
    found = [
        name
        for name, module in model.named_modules()
        if name and any(isinstance(c, nn.Linear) for c in module.children())
    ]
    return found[:limit]


def discover(model: nn.Module, targets: Targets = None) -> ModelLayout:
    """Find attention modules, blocks and block linears of ``model``.

    Args:
        model: any ``nn.Module``.
        targets: override discovery: a regex matched against full module names (``fullmatch``), or a
            predicate ``(name, module) -> bool``.

    Returns:
        The model's :class:`ModelLayout`.

    Raises:
        ValueError: if no module matches; the message lists candidate names and shows ``targets=``.

    Example:
        >>> discover(model).attention[:1]
        ('model.layers.0.self_attn',)
        >>> len(discover(model, targets=r"model\\.layers\\.[01]\\.self_attn").attention)
        2
    """
    match = _matcher(targets)
    selected = [name for name, module in model.named_modules() if match(name, module)]
    attention = _innermost(selected) if targets is None else selected
    if not attention:
        candidates = ", ".join(candidate_names(model)) or "(none: the model has no nn.Linear children)"
        how = "found none" if targets is None else f"targets={targets!r} matched nothing"
        raise ValueError(
            f"attnprobe could not find attention modules in {type(model).__name__} ({how}). "
            f"Modules with linear children: {candidates}. Pass the attention modules explicitly, e.g. "
            "attnprobe.record(model, targets=r'.*\\.self_attn') or "
            "targets=lambda name, module: name.endswith('attention')."
        )
    blocks = {name: _block_of(model, name) for name in attention}
    block_names = sorted(set(blocks.values()))
    linears = tuple(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(b == "" or name.startswith(b + ".") for b in block_names)
    )
    return ModelLayout(attention=tuple(attention), blocks=blocks, linears=linears)
