"""One-shot pruning in a process group: each rank plans a share of the linears, then all share them.

Planning one linear (Wanda's mask selection, SparseGPT's solve) needs only that linear's weight and
statistics, so the linears split across ranks with no communication until the end. The split is
deterministic: linears sorted by cost (largest first, then by name) go one by one to the least loaded
rank (longest-processing-time scheduling). Then, for every linear in order, its owner broadcasts the
mask (and SparseGPT's reconstructed weight), so every rank ends with the same plan and writes the
same pruned model. A failure on any rank is raised on every rank before any weight changes.
Without a process group (or with one rank) this is the plain loop.

Block-wise sequential pruning (:mod:`prune.engine.blockwise`) is data-parallel instead, as llm-compressor's
sequential pipeline is: :func:`share_steps` gives each rank the contiguous share of the calibration
steps that :func:`attnprobe.distributed.shard_range` names, every rank runs each block over its share,
and :func:`all_reduce_block_statistics` (the engine's per-block hook) sums the block's statistics
over the ranks before the block is pruned; the block's linears are then planned with
:func:`plan_linears` like one-shot's, from sums that are identical on every rank.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attnprobe import (
    all_gather_object,
    all_reduce_sum_,
    broadcast_tensor,
    check_agreement,
    raise_if_any_failed,
    rank,
    shard_range,
    world_size,
)

Plan = dict[str, tuple[Tensor, Tensor | None]]
if TYPE_CHECKING:
    from prune.engine.block_stats import BlockStatistics

PlanOne = Callable[[str, nn.Linear], tuple[Tensor, Tensor | None, dict[str, Any]]]


def assign_owners(costs: dict[str, int], world: int) -> dict[str, int]:
    """Owner rank of each linear: largest cost first, each to the least loaded rank (ties: lowest rank).

    Example:
        >>> assign_owners({"a": 4, "b": 3, "c": 2, "d": 1}, 2)
        {'a': 0, 'b': 1, 'c': 1, 'd': 0}
    """
    loads = [(0, r) for r in range(world)]
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        load, owner = heapq.heappop(loads)
        owners[name] = owner
        heapq.heappush(loads, (load + costs[name], owner))
    return {name: owners[name] for name in costs}


def _cost(module: nn.Linear, method: str) -> int:
    out_f, in_f = module.weight.shape
    # SparseGPT inverts an (in, in) Hessian and sweeps the weight through it; the rest is per weight.
    return out_f * in_f + (in_f * in_f * (in_f + out_f) // 64 if method == "sparsegpt" else 0)


def plan_linears(
    linears: dict[str, nn.Linear], plan_one: PlanOne, *, method: str, progress: bool = True
) -> tuple[Plan, list[dict[str, Any]]]:
    """Plan every linear (``plan_one(name, module) -> (mask, new weight or None, report row)``).

    In a process group every rank must call this with the same linears; each plans its share and
    receives the others'. Nothing is written to the model here.

    Returns:
        ``({name: (mask, new weight or None)}, report rows)`` in the order of ``linears``.
    """
    world, me = world_size(), rank()
    if world == 1:
        plan, rows = {}, []
        for name, module in tqdm(linears.items(), desc=f"prune {method}", disable=not progress):
            mask, new_weight, row = plan_one(name, module)
            plan[name] = (mask, new_weight)
            rows.append(row)
        return plan, rows
    check_agreement(
        (method, list(linears)),
        "prune.apply's method and selected linears",
        "Call prune.apply with the same arguments on every rank of the process group.",
    )
    owners = assign_owners({name: _cost(module, method) for name, module in linears.items()}, world)
    mine: Plan = {}
    my_rows: dict[str, dict[str, Any]] = {}
    error: BaseException | None = None
    try:
        todo = [name for name in linears if owners[name] == me]
        for name in tqdm(todo, desc=f"prune {method} (rank {me})", disable=not progress):
            mask, new_weight, row = plan_one(name, linears[name])
            mine[name] = (mask, new_weight)
            my_rows[name] = row
    except (ValueError, RuntimeError) as err:
        error = err
    raise_if_any_failed(error, "prune.apply")
    rows_by_name: dict[str, dict[str, Any]] = {}
    for part in all_gather_object(my_rows):
        rows_by_name.update(part)
    plan: Plan = {}
    with_weights = method == "sparsegpt"
    for name, module in linears.items():
        owner = owners[name]
        mask, new_weight = mine.get(name, (None, None))
        shape = tuple(module.weight.shape)
        mask = broadcast_tensor(mask, owner, shape=shape, dtype=torch.bool)
        if with_weights:
            dtype = module.weight.dtype  # sparsegpt_prune returns the weight in the weight's dtype
            new_weight = broadcast_tensor(new_weight, owner, shape=shape, dtype=dtype)
        # The owner keeps its own tensors (on the weight's device); the others take the broadcast copy.
        plan[name] = mine[name] if owner == me else (mask, new_weight)
    return plan, [rows_by_name[name] for name in linears]


def all_reduce_block_statistics(stats: BlockStatistics) -> BlockStatistics:
    """Sum one block's statistics over the ranks, in place (every accumulator is a plain sum).

    Every rank must call it for the same block; ranks that saw different input groups or shapes
    are refused on every rank before any tensor moves (a mismatch would hang or mix the sums).
    """
    layout = [(name, list(g.members), tuple(g.total.shape)) for name, g in stats.groups.items()]
    check_agreement(
        layout,
        "the block's input groups (name, members, shape)",
        "Every rank must run the same model over its share of the same calibration store.",
    )
    for tensor in stats.tensors():
        all_reduce_sum_(tensor)
    return stats


def share_steps(steps: list) -> tuple[list, Callable | None]:
    """This rank's share of the calibration steps and the statistics hook that combines the shares.

    Without a process group, or with fewer steps than ranks (a rank would see no input at all), every
    rank keeps every step and nothing is combined: the result is the same, only slower.
    """
    world = world_size()
    if world == 1 or len(steps) < world:
        return steps, None
    share = shard_range(len(steps))
    return steps[share.start : share.stop], all_reduce_block_statistics
