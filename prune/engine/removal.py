"""Dispatch of ``prune.apply`` for the patterns that remove whole units: ``"blocks"`` and ``"experts"``.

Both shrink the model into an ordinary dense checkpoint that serving engines load (fewer blocks, fewer
experts), scored from the calibration store: :mod:`prune.engine.blocks` (Block Influence over the denoising
trajectory) and :mod:`prune.engine.expert_removal` (REAP, frequency or output norm of each routed expert).
"""

from __future__ import annotations

from typing import Any

from torch import nn

DEFAULT_SCORES = {"blocks": "bi", "experts": "reap"}


def apply_removal(
    model: nn.Module,
    store,
    ratio: float,
    pattern: str,
    score: str | None,
    sink_aware: bool,
    settings,
    iterative: bool,
    keep_ends: bool,
    meta: dict[str, Any],
):
    """Score and remove blocks or experts; returns the :class:`prune.engine.apply.PruneResult`."""
    if meta.get("method") != "wanda" or meta.get("sequential"):
        raise ValueError(
            f"pattern={pattern!r} scores whole units with its own score= ; method= and sequential= do not "
            "apply. Leave them at their defaults."
        )
    score = score or DEFAULT_SCORES[pattern]
    if pattern == "blocks":
        from prune.engine.blocks import apply_blocks

        return apply_blocks(
            model,
            store,
            ratio,
            score=score,
            sink_aware=sink_aware,
            settings=settings,
            iterative=iterative,
            keep_ends=keep_ends,
            meta=meta,
        )
    if iterative:
        raise ValueError("iterative=True selects blocks; pattern='experts' scores every expert once.")
    from prune.engine.expert_removal import apply_experts

    return apply_experts(
        model, store, ratio, score=score, sink_aware=sink_aware, settings=settings, meta=meta
    )
