"""After ``prune.apply`` writes: read every targeted weight back from the model and check the plan holds.

A plan can be right and the model still dense: a write into a stale view (a fused expert slice taken
from host storage before its block was onloaded, then overwritten by the write-back) leaves the
weight unchanged while every report row says "pruned". So after writing, each targeted weight is read
back from the model wherever it lives now (host or device, a linear's weight or a fresh view of one
expert slice) and its zeros must cover the planned mask: every entry the mask prunes is zero. A weight
that fails makes :func:`prune.apply` restore every weight it wrote and raise :class:`WriteCheckError`,
naming the weights. The report's ``sparsity`` column is then measured from the weights read back,
not from the plan.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class WriteCheckError(RuntimeError):
    """Some pruned weights, read back from the model, are not zero where their masks prune."""


def uncovered(weights: dict[str, Any], masks: dict[str, Tensor]) -> list[str]:
    """Names whose weight (``weights[name].weight``, read now) is non-zero somewhere ``masks[name]`` prunes.

    Args:
        weights: ``{name: module}``: an ``nn.Linear`` or anything with a ``weight`` attribute (an
            expert slice view), read at call time.
        masks: ``{name: bool keep-mask (out, in)}``, True = kept.
    """
    bad = []
    for name, mask in masks.items():
        weight = weights[name].weight
        pruned = ~mask.to(device=weight.device, dtype=torch.bool)
        if bool((weight.detach()[pruned] != 0).any()):
            bad.append(name)
    return bad


def check_written(weights: dict[str, Any], masks: dict[str, Tensor]) -> None:
    """Raise :class:`WriteCheckError` naming every weight whose zeros do not cover its mask."""
    bad = uncovered(weights, masks)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise WriteCheckError(
            f"{len(bad)} pruned weight(s) read back from the model are not zero where their masks prune: "
            f"{shown}. The writes did not reach the model's weights (e.g. a view taken before the block "
            "was onloaded); every weight was restored. Please report this with the model class."
        )


def measured_rows(weights: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report rows with ``sparsity`` = the fraction of zeros of the weight read back from the model."""
    out = []
    for row in rows:
        weight = weights[row["layer"]].weight.detach()
        out.append({**row, "sparsity": float((weight == 0).sum()) / max(weight.numel(), 1)})
    return out
