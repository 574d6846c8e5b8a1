"""Block-wise sequential calibration and pruning: one block forward per block and step, O(blocks).

Wanda and SparseGPT as published prune block by block, each block calibrated on inputs that went
through the blocks already pruned. Rerunning the model up to block b for every b costs about L²/2
block forwards; this engine, like SparseGPT's reference code and llm-compressor's sequential pipeline,
costs O(L):

1. **Capture.** For every calibration step the model runs once with a pre-hook on the first block that
   stores that block's arguments and keyword arguments (hidden states, position embeddings, masks)
   and raises to stop the forward. The hidden states are cached on ``offload_device`` (CPU by
   default; ``"disk"``: memory-mapped files, :mod:`prune.engine.block_cache`) in the model's dtype; arguments
   equal in every step are kept once; KV caches handed to the block are dropped.
2. **Block by block.** Block b runs over the cached inputs of every step with pre-hooks on its linears
   accumulating their input statistics (:mod:`prune.engine.block_stats`, float32, in place, on the block's
   device); :func:`_finish_block_statistics` completes them (the hook point for data parallelism);
   the caller prunes the block; block b runs again over the same inputs, now pruned, and its outputs
   replace the cache: block b + 1's inputs. So each block runs twice per step, and only one block's
   statistics (Hessians) exist at any time.
3. **Onloading.** With ``device=`` the model may live on the CPU: the parts outside the blocks
   (embeddings, rotary tables) visit the device for the capture, then each block visits it in turn.

In a process group each rank runs its share of the steps; a rank that raises keeps its error until the
next collective (before the block's statistics are all-reduced, and at the end), where every rank
learns of it and raises (:func:`attnprobe.distributed.raise_if_any_failed`), so none waits for the
group's timeout.

The blocks must form one chain: consecutive entries of one ``nn.ModuleList``, each block's output
(its first output for tuples) being the next block's hidden-state input. Models whose attention
blocks are not one chain (an encoder and a decoder) are refused with a pointer to one-shot pruning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attnprobe import discover, raise_if_any_failed, world_size
from prune.engine.block_cache import BlockInputCache, open_cache
from prune.engine.block_stats import BlockStatistics
from prune.engine.onload import block_device, onloaded, to_device

logger = logging.getLogger(__name__)

# Keyword arguments that carry a KV cache into a block: a cache would grow with every step run.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


@dataclass(frozen=True)
class CalibrationStep:
    """One recorded step: what the model is fed and how its token rows are weighted.

    Attributes:
        input_ids: (batch, tokens) token ids.
        valid: bool (batch, tokens), False on padding.
        weights: float32 (batch, tokens) sink weights ``w = 1 − s``, or None for 1 everywhere.
    """

    input_ids: Tensor
    valid: Tensor
    weights: Tensor | None = None

    def model_kwargs(self, device: torch.device | str) -> dict[str, Tensor]:
        """The top-level forward's arguments (the padding mask only where there is padding)."""
        kwargs = {"input_ids": self.input_ids.to(device)}
        if not bool(self.valid.all()):
            kwargs["attention_mask"] = self.valid.long().to(device)
        return kwargs

    def row_weights(self, device: torch.device | str) -> Tensor:
        """Per-token weights of the statistics: sink weight (or 1) times the padding mask."""
        keep = self.valid.to(device=device, dtype=torch.float32)
        return keep if self.weights is None else self.weights.to(device, torch.float32) * keep


@dataclass
class Block:
    """A repeated unit of the model and the selected linears inside it (possibly none)."""

    name: str
    module: nn.Module
    linears: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class _BlockInput:
    """One step's cached input of the current block: hidden states apart, the rest as captured."""

    hidden: Tensor
    args: tuple
    kwargs: dict[str, Any]
    slot: int | str  # where the hidden states go: an index into args or a keyword

    def run(self, block: nn.Module, device: torch.device) -> Tensor:
        args, kwargs = list(to_device(self.args, device)), to_device(self.kwargs, device)
        hidden = self.hidden.to(device)
        if isinstance(self.slot, int):
            args[self.slot] = hidden
        else:
            kwargs[self.slot] = hidden
        output = block(*args, **kwargs)
        return output[0] if isinstance(output, (tuple, list)) else output


def steps_from_store(store, settings=None) -> list[CalibrationStep]:
    """The store's recorded steps, with sink weights from its attention mass when ``settings`` is given.

    Only ``input_ids``, ``valid`` and (for sink weights) every layer's attention mass are read: a store
    recorded with attention alone (no linear statistics, no Hessians) is enough.
    """
    from prune.engine.statistics import step_weights

    weights = step_weights(store, settings) if settings is not None else {}
    steps = []
    for step in range(store.num_steps):
        ids = store.input_ids(step)
        if ids is None:
            raise ValueError(
                f"step {step} of {store.path} has no input_ids, so it cannot be replayed; record the "
                "calibration with save_input_ids=True, or prune with sequential=False"
            )
        steps.append(CalibrationStep(ids, store.valid(step), weights.get(step)))
    return steps


def find_blocks(model: nn.Module, linear_names: list[str]) -> list[Block]:
    """The model's attention blocks in execution order, with the selected linears of each.

    Raises:
        ValueError: if the blocks are not consecutive entries of one ``nn.ModuleList``.
    """
    modules = dict(model.named_modules())
    order = list(modules)
    names = sorted(set(discover(model).blocks.values()), key=order.index)
    parents = {name.rpartition(".")[0] for name in names}
    parent = next(iter(parents))
    chain = len(parents) == 1 and "" not in names and isinstance(modules.get(parent), nn.ModuleList)
    if chain:
        indices = [int(name.rpartition(".")[2]) for name in names]
        chain = indices == list(range(indices[0], indices[0] + len(indices)))
    if not chain:
        raise ValueError(
            f"sequential pruning feeds each block's output to the next block, but the attention blocks of "
            f"{type(model).__name__} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) are not "
            "consecutive entries of one nn.ModuleList (e.g. an encoder and a decoder). Prune this model "
            "one-shot from the store: prune.apply(..., sequential=False)."
        )
    blocks = []
    for name in names:
        # An expert slice (<experts>.<param>.<e>) is no module: None here, measured by the statistics.
        linears = {n: modules.get(n) for n in linear_names if n.startswith(name + ".")}
        blocks.append(Block(name, modules[name], linears))
    stray = set(linear_names) - {n for b in blocks for n in b.linears}
    if stray:
        raise ValueError(
            f"linears outside the attention blocks cannot be pruned sequentially: {sorted(stray)[:5]}"
        )
    return blocks


def _input_device(model: nn.Module) -> torch.device:
    """Where the top-level inputs go: the input embedding's device (the first block's for LLaDA)."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    if isinstance(embedding, nn.Module):
        return block_device(embedding)
    return block_device(model)


def _split_inputs(name: str, args: tuple, kwargs: dict, offload: torch.device | str) -> _BlockInput:
    """Take the hidden states out of a block's call; drop KV caches; move the rest to ``offload``."""
    kwargs = dict(kwargs)
    for key, value in kwargs.items():
        # transformers names it past_key_values, past_key_value or (5.2x) cache; LLaDA layer_past
        if key in _CACHE_KWARGS or type(value).__name__.endswith("Cache"):
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    args = list(args)
    if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
        slot: int | str = 0
        hidden = args[0]
        args[0] = None
    elif isinstance(kwargs.get("hidden_states"), Tensor):
        slot, hidden = "hidden_states", kwargs.pop("hidden_states")
        kwargs["hidden_states"] = None
    else:
        raise ValueError(
            f"block {name} was called without hidden states as its first argument or as hidden_states=; "
            "block-wise pruning cannot tell which input to propagate. Use sequential=False."
        )
    return _BlockInput(
        hidden.detach().to(offload), to_device(tuple(args), offload), to_device(kwargs, offload), slot
    )


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    first: Block,
    steps: list[CalibrationStep],
    *,
    device: torch.device | str | None,
    offload_device: torch.device | str = "cpu",
    cache: BlockInputCache | None = None,
) -> BlockInputCache:
    """The first block's inputs for every step, each from one forward stopped at that block.

    They are added to ``cache`` (default: a new in-memory cache on ``offload_device``) and it is returned.
    """
    cache = cache if cache is not None else open_cache(offload_device)
    host = cache.device  # "disk" caches go through the CPU

    def grab(module, args, kwargs):
        cache.add(_split_inputs(first.name, args, kwargs, host))
        raise _StopForward

    handle = first.module.register_forward_pre_hook(grab, with_kwargs=True)
    input_device = torch.device(device) if device is not None else _input_device(model)
    try:
        for index, step in enumerate(steps):
            try:
                model(**step.model_kwargs(input_device))
            except _StopForward:
                continue
            raise RuntimeError(f"the forward of step {index} finished without calling block {first.name}")
    finally:
        handle.remove()
    return cache


def _finish_block_statistics(stats: BlockStatistics) -> BlockStatistics:
    """Complete one block's statistics before the block is pruned; returns them.

    On one process there is nothing to do. This is the single place where statistics gathered on
    several processes (each over its share of the calibration steps) are combined: every tensor of
    ``stats.tensors()`` is a plain sum, so an all-reduce (sum) of each gives the statistics of all data.
    """
    return stats


PruneBlock = Callable[[Block, "BlockStatistics | None"], None]


@torch.no_grad()
def prune_blockwise(
    model: nn.Module,
    steps: list[CalibrationStep],
    linear_names: list[str],
    prune_block: PruneBlock,
    *,
    statistic: str | None,
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    finish_statistics: Callable[[BlockStatistics], BlockStatistics] | None = None,
    statistics: Callable[[Block, str], BlockStatistics] | None = None,
    progress: bool = True,
) -> None:
    """Calibrate and prune ``model`` block by block, each block on the outputs of the pruned ones.

    Args:
        model: the model; with ``device`` it may live on the CPU (or any device).
        steps: the calibration steps (input ids, padding, sink weights).
        linear_names: the linears to prune; every block up to the last one holding any of them runs.
        prune_block: called once per pass of each block that holds selected linears, with the block
            and the pass's finished statistics (None when ``statistic`` is None), while the block is on
            its compute device; it plans the linears the pass measures (``stats.measures(name)``) and
            prunes the block in place after the last pass (``stats.last``); a block's weights must not
            change before that. Plain statistics have one pass.
        statistic: ``"sumsq"``, ``"norms"`` or ``"hessian"`` (:mod:`prune.engine.block_stats`), or None
            (magnitude pruning: no forward at all).
        device: onload each block (and, for the capture, the rest of the model) to this device;
            None computes every block where it lives.
        offload_device: where the cached block inputs live between blocks: a torch device, or
            ``"disk"`` for memory-mapped files read back one step at a time (:mod:`prune.engine.block_cache`).
        cache_dir: with ``offload_device="disk"``, where the temporary cache directory is made
            (default: the system's temporary directory).
        finish_statistics: replaces :func:`_finish_block_statistics` (e.g. an all-reduce).
        statistics: builds a block's statistics from ``(block, statistic)`` (default
            :class:`BlockStatistics` of its linears; :class:`prune.engine.block_experts.ExpertBlockStatistics`
            also measures routed experts).
        progress: show a progress bar over the blocks.
    """
    if device is not None and any(hasattr(m, "_hf_hook") for m in model.modules()):
        # accelerate's hooks move every input to the device they were given: they would fight onloading
        raise ValueError(
            f"device={device!r} onloads blocks itself, but this model carries accelerate hooks "
            "(dispatch_model / device_map). Either drop device= (each block then runs where accelerate "
            "put it), or load the model without a device_map (or remove the hooks with "
            "accelerate.hooks.remove_hook_from_module(model, recurse=True)) and keep device=."
        )
    finish = finish_statistics or _finish_block_statistics
    make_statistics = statistics or (lambda block, kind: BlockStatistics(block.linears, kind))
    every_block = find_blocks(model, linear_names)
    selected = [i for i, block in enumerate(every_block) if block.linears]
    if not selected:
        return
    blocks = every_block[: selected[-1] + 1]  # the blocks after the last selected one never run
    bar = tqdm(blocks, desc="prune block-wise", disable=not progress)
    if statistic is None:
        for block in bar:
            if block.linears:
                with onloaded(block.module, device):
                    prune_block(block, None)
        return
    with open_cache(offload_device, cache_dir) as cache:
        # In a process group, a rank that fails stops working and reports at the next collective (the
        # block's statistics all-reduce), where every rank raises its error: none waits for a timeout.
        failure: Exception | None = None
        try:
            with onloaded(model, device, exclude=[block.module for block in every_block]):
                capture_inputs(model, blocks[0], steps, device=device, cache=cache)
        except Exception as err:
            failure = _hold(err)
        for index, block in enumerate(bar):
            with onloaded(block.module, device):
                run_device = torch.device(device) if device is not None else block_device(block.module)
                if block.linears:
                    passes = _passes(make_statistics, block, statistic) if failure is None else [None]
                    for stats in passes:
                        failure = _prune_pass(
                            block, stats, steps, cache, run_device, failure, prune_block, finish
                        )
                        del stats  # one pass's statistics at a time
                if index + 1 < len(blocks) and failure is None:
                    try:
                        for number, entry in enumerate(cache):
                            cache.replace_hidden(number, entry.run(block.module, run_device))
                    except Exception as err:
                        failure = _hold(err)
        raise_if_any_failed(failure, "block-wise pruning")


def _passes(make_statistics, block, statistic):
    """One statistics pass, or (MoE SparseGPT) one per bounded group of experts: each pass's sums are
    planned from and freed before the next; the block is written after its last pass."""
    return make_statistics(block, statistic).passes()


def _prune_pass(block, stats, steps, cache, run_device, failure, prune_block, finish):
    """Gather one pass's statistics over every step, then plan (and after the last pass, write) the
    block. A failure is held until the collective (``finish``'s all-reduce) and returned."""
    if stats is not None and failure is None:
        try:
            with stats.hooks():
                for step, entry in zip(steps, cache):
                    stats.begin_step(step.row_weights(run_device))
                    entry.run(block.module, run_device)
        except Exception as err:
            failure = _hold(err)
    raise_if_any_failed(failure, "block-wise pruning")
    try:
        prune_block(block, finish(stats))
    except Exception as err:
        failure = _hold(err)
    return failure


def _hold(error: Exception) -> Exception:
    """``error``, kept until the next collective in a process group; raised at once on one process."""
    if world_size() == 1:
        raise error
    return error
