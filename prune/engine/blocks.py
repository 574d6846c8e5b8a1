"""Block removal: ``prune.apply(model, store, ratio, pattern="blocks")`` drops whole transformer blocks.

Which blocks: the ``round(ratio · n)`` (half up) with the lowest Block Influence
(:mod:`prune.engine.block_influence`), never the first or the last block unless ``keep_ends=False``.

- One shot (``iterative=False``, the default): the scores of the dense model, read from the store, no
  forward pass; ShortGPT's procedure.
- Iterative (``iterative=True``): remove the lowest block, re-measure BI of the pruned model on the
  store's recorded inputs (one forward per recorded step, with the sink weights of the dense recording),
  repeat. It sees how the remaining blocks compensate, at the cost of one pass over the calibration per
  removed block.

The model loses the blocks in place: the block list (an ``nn.ModuleList``) is rebuilt without them, and
what the forward and ``from_pretrained`` read follows, so ``prune.save_pretrained`` writes an ordinary,
shorter checkpoint: the config's layer count (``num_hidden_layers``, LLaDA's ``n_layers``), per-layer lists
(``layer_types``), Qwen-MoE's ``mlp_only_layers``/``decoder_sparse_step`` (rewritten as the explicit list
of dense layers) and every ``layer_idx``/``layer_id`` attribute inside the kept blocks (renumbered).
Everything is planned before anything changes: a refusal leaves the model as it was.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnprobe import CosineProbe
from prune.engine.block_influence import BlockScores, block_influence

logger = logging.getLogger(__name__)

_LAYER_COUNT = ("num_hidden_layers", "n_layers", "num_layers", "n_layer")
_LAYER_INDEX = ("layer_idx", "layer_id", "layer_number")


@dataclass
class BlockPlan:
    """Which blocks go, and the scores that chose them (JSON-able through ``vars``)."""

    blocks: list[str]
    removed: list[str]
    scores: list[float]
    iterative: bool
    rounds: list[dict[str, float]] = field(default_factory=list)  # iterative: the scores of each round


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the model's attention blocks, and its name.

    Raises:
        ValueError: the blocks are not the entries of one ``nn.ModuleList``.
    """
    from attnprobe import discover

    modules = dict(model.named_modules())
    blocks = sorted({b for b in discover(model).blocks.values() if b}, key=list(modules).index)
    parents = {b.rpartition(".")[0] for b in blocks}
    parent = next(iter(parents)) if len(parents) == 1 else None
    container = modules.get(parent) if parent is not None else None
    if not isinstance(container, nn.ModuleList) or len(container) != len(blocks):
        raise ValueError(
            f"pattern='blocks' removes entries of the model's block list, but the attention blocks "
            f"{blocks[:3]}... are not the entries of one nn.ModuleList; this architecture is not supported."
        )
    return parent, container


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def removal_count(ratio: float, n_blocks: int, keep_ends: bool) -> int:
    """``round(ratio · n)`` half up, checked against the blocks that may go."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1) (0.25 removes a quarter of the blocks), got {ratio!r}")
    count = _round_half_up(ratio * n_blocks)
    removable = n_blocks - 2 if keep_ends else n_blocks - 1
    if count > removable:
        raise ValueError(
            f"ratio={ratio} removes {count} of {n_blocks} blocks, but only {max(removable, 0)} may go "
            f"({'the first and the last are kept; pass keep_ends=False to allow them, ' if keep_ends else ''}"
            "at least one block stays). Use a smaller ratio."
        )
    return count


def _lowest(scores: list[float], allowed: list[int], count: int) -> list[int]:
    order = sorted(allowed, key=lambda i: (scores[i], i))  # ties towards the lower index
    return sorted(order[:count])


def _config_updates(config: Any, n_blocks: int, kept: list[int]) -> dict[str, Any]:
    """The config attributes that change when only the ``kept`` blocks (old indices) remain."""
    updates: dict[str, Any] = {}
    if config is None:
        return updates
    for name in _LAYER_COUNT:
        if getattr(config, name, None) == n_blocks:
            updates[name] = len(kept)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n_blocks:
        updates["layer_types"] = [types[i] for i in kept]
    step = getattr(config, "decoder_sparse_step", None)
    dense = getattr(config, "mlp_only_layers", None)
    if isinstance(step, int) and isinstance(dense, (list, tuple)) and getattr(config, "num_experts", 0):
        # Which layers are MoE is decided by the layer index at build time: keep each kept layer's kind.
        was_dense = [i in dense or (i + 1) % step != 0 for i in kept]
        updates["decoder_sparse_step"] = 1
        updates["mlp_only_layers"] = [new for new, d in enumerate(was_dense) if d]
    return updates


def _renumber(block: nn.Module, index: int) -> None:
    for module in block.modules():
        for attr in _LAYER_INDEX:
            if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
                setattr(module, attr, index)


def _configs(model: nn.Module) -> list[Any]:
    found = [getattr(model, "config", None), getattr(getattr(model, "model", None), "config", None)]
    return list({id(c): c for c in found if c is not None}.values())


def remove_blocks(model: nn.Module, removed: list[int]) -> None:
    """Drop the blocks at ``removed`` (indices into the block list) in place; the config follows."""
    parent, container = block_list(model)
    n = len(container)
    kept = [i for i in range(n) if i not in set(removed)]
    updates = _config_updates(getattr(model, "config", None), n, kept)
    owner_name, _, attr = parent.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    new = nn.ModuleList([container[i] for i in kept])
    if isinstance(owner, nn.ModuleDict):
        owner[attr] = new
    else:
        setattr(owner, attr, new)
    for index, block in enumerate(new):
        _renumber(block, index)
    for config in _configs(model):
        for key, value in updates.items():
            setattr(config, key, value)


@contextmanager
def _blocks_removed(model: nn.Module, removed: list[int]) -> Iterator[None]:
    """``remove_blocks`` for the duration of the block, then the model exactly as it was."""
    parent, container = block_list(model)
    owner_name, _, attr = parent.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    indices = [(m, a, getattr(m, a)) for m in container.modules() for a in _LAYER_INDEX if hasattr(m, a)]
    keys = (*_LAYER_COUNT, "layer_types", "decoder_sparse_step", "mlp_only_layers")
    saved = [(c, {k: getattr(c, k) for k in keys if hasattr(c, k)}) for c in _configs(model)]
    try:
        remove_blocks(model, removed)
        yield
    finally:
        if isinstance(owner, nn.ModuleDict):
            owner[attr] = container
        else:
            setattr(owner, attr, container)
        for module, name, value in indices:
            setattr(module, name, value)
        for config, state in saved:
            for key, value in state.items():
                setattr(config, key, value)


@torch.no_grad()
def _remeasure(model: nn.Module, store, blocks: list[str], sink_aware: bool, settings) -> list[float]:
    """BI of the current (pruned) model on the store's recorded inputs, dense recording's sink weights."""
    from prune.engine.statistics import step_weights

    weights = step_weights(store, settings) if sink_aware else {}
    device = next(model.parameters()).device
    num = torch.zeros(len(blocks), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for step in range(store.num_steps):
        ids, valid = store.input_ids(step), store.valid(step)
        if ids is None:
            raise ValueError(
                f"iterative=True re-runs the recorded inputs, and step {step} of {store.path} has no input "
                "ids (recorded with save_input_ids=False); record again or use iterative=False."
            )
        with CosineProbe(model, blocks) as probe:
            model(input_ids=ids.to(device), attention_mask=valid.to(device).long())
        u = valid.double() * (weights[step].double() if sink_aware else 1.0)
        den += u.sum()
        for col, block in enumerate(blocks):
            num[col] += (u * probe.cos[block][0].cpu().double()).sum()
    return (1 - num / den).tolist()


def _select_iteratively(model, store, names, scores, allowed, count, sink_aware, settings):
    """Remove the lowest block, re-measure the rest on the recorded inputs, repeat; model unchanged."""
    removed: list[int] = []
    rounds: list[dict[str, float]] = []
    live = dict(zip(range(len(names)), scores))  # old index -> current BI
    for _ in range(count):
        rounds.append({names[i]: value for i, value in live.items()})
        pick = min((i for i in allowed if i in live), key=lambda i: (live[i], i))
        removed.append(pick)
        del live[pick]
        if len(removed) == count:
            break
        kept = sorted(live)
        with _blocks_removed(model, removed):
            parent, _ = block_list(model)
            values = _remeasure(
                model, store, [f"{parent}.{j}" for j in range(len(kept))], sink_aware, settings
            )
        live = dict(zip(kept, values))
    return sorted(removed), rounds


def apply_blocks(
    model: nn.Module,
    store,
    ratio: float,
    *,
    score: str,
    sink_aware: bool,
    settings,
    iterative: bool,
    keep_ends: bool,
    meta: dict[str, Any],
):
    """``prune.apply(..., pattern="blocks")``: score, select, remove (see the module docstring)."""
    import pandas as pd

    from prune.engine.planning import PruneResult

    if store is None:
        raise ValueError("pattern='blocks' scores blocks from a calibration store; pass one.")
    start = time.perf_counter()
    parent, container = block_list(model)
    names = [f"{parent}.{i}" for i in range(len(container))]
    count = removal_count(ratio, len(names), keep_ends)
    result: BlockScores = block_influence(store, names, score=score, sink_aware=sink_aware, settings=settings)
    scores = result.score.tolist()
    allowed = list(range(1, len(names) - 1)) if keep_ends else list(range(len(names)))
    rounds: list[dict[str, float]] = []
    removed = _lowest(scores, allowed, count)
    if iterative and count > 1:
        removed, rounds = _select_iteratively(
            model, store, names, scores, allowed, count, sink_aware, settings
        )
    remove_blocks(model, removed)  # every choice made: only now change the model
    per_step = {
        f"step {s} (mask {r:.2f})" if r is not None else f"step {s}": result.per_step[row].tolist()
        for row, (s, r) in enumerate(zip(result.steps, result.mask_ratio))
    }
    report = pd.DataFrame(
        {"layer": names, "score": scores, "removed": [i in removed for i in range(len(names))], **per_step}
    )
    logger.info(
        "removed blocks %s of %d (BI %s)", removed, len(names), [round(scores[i], 4) for i in removed]
    )
    plan = BlockPlan(names, [names[i] for i in removed], scores, iterative, rounds)
    settings_out = {
        **meta,
        "score": score,
        "iterative": iterative,
        "keep_ends": keep_ends,
        "removed_blocks": plan.removed,
        "seconds": time.perf_counter() - start,
    }
    return PruneResult(masks={}, report=report, settings=settings_out, plan=plan)
