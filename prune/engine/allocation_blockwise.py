"""Measure what an allocation needs block by block, on the dense model, one block on the device.

Sequential pruning (``sequential=True``) has no store statistics to read, so ``"owl"`` (input norms,
when the store has none) and ``"sensitivity"`` (every linear's error curve) run the block-wise engine
(:mod:`prune.engine.blockwise`) once over the recorded steps before pruning: each block's statistics are
accumulated, every linear is measured, and nothing is written. The cost is one more pass of the
engine (two block forwards per step and block) and, for sensitivity, one method solve per candidate
sparsity and linear. In a process group the steps are shared and the statistics summed, as when
pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from prune.engine.block_experts import ExpertBlockStatistics
from prune.engine.blockwise import prune_blockwise, steps_from_store
from prune.engine.distributed import share_steps

# (name, module, its input statistics) -> the measurement kept for that linear
PerLinear = Callable[[str, Any, Any], Any]


def measure_dense(
    model: nn.Module,
    store,
    linears: dict[str, Any],
    per_linear: PerLinear,
    *,
    statistic: str,
    sink_settings=None,
    device=None,
    offload_device="cpu",
    cache_dir=None,
    progress: bool = False,
) -> dict[str, Any]:
    """``{name: per_linear(name, module, statistics)}`` for every linear whose block saw its input.

    Args:
        model: the dense model (left unchanged).
        store: the calibration store whose steps are replayed.
        linears: the selected linears (or expert slices).
        per_linear: the measurement, called while the linear's block is on its compute device.
        statistic: ``"sumsq"`` or ``"hessian"`` (:mod:`prune.engine.block_stats`).
        sink_settings: sink weights of the rows (sink-aware), or None.
        device, offload_device, cache_dir: onloading and the block-input cache, as in ``prune.apply``.
        progress: show a progress bar.
    """
    steps, finish = share_steps(steps_from_store(store, sink_settings))
    out: dict[str, Any] = {}

    def visit(block, stats) -> None:
        for name in block.linears:
            group = stats.of(name)
            if group is not None and not stats.starved(name):
                out[name] = per_linear(name, linears[name], group)

    prune_blockwise(
        model,
        steps,
        list(linears),
        visit,
        statistic=statistic,
        device=device,
        offload_device=offload_device,
        cache_dir=cache_dir,
        finish_statistics=finish,
        statistics=ExpertBlockStatistics,
        progress=progress,
    )
    return out
