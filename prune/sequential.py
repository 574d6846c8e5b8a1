"""Sequential calibration: block statistics measured on inputs that went through pruned blocks.

Wanda and SparseGPT as published prune block by block, feeding each block the calibration inputs
propagated through the blocks already pruned. Here the calibration inputs are the store's recorded
``input_ids`` of every step. For block i the model runs up to block i only (a forward hook on the
block stops it), so nothing but one block's statistics is held in memory; the price is i + 1 block
forwards per step for block i, about L²/2 block forwards for L blocks.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attnprobe import discover, reduce_inputs
from prune.statistics import SinkSettings, step_weights


class _StopForward(Exception):
    """Raised after the block being measured has run: the rest of the forward is not needed."""


def _blocks_in_order(model: nn.Module, linear_names: list[str]) -> list[tuple[str, list[str]]]:
    blocks = sorted(set(discover(model).blocks.values()), key=list(dict(model.named_modules())).index)
    grouped = []
    for block in blocks:
        members = [n for n in linear_names if block == "" or n.startswith(block + ".")]
        if members:
            grouped.append((block, members))
    return grouped


def _feeds(store) -> list[tuple[Tensor, Tensor]]:
    feeds = []
    for step in range(store.num_steps):
        ids = store.input_ids(step)
        if ids is None:
            raise ValueError(
                f"step {step} of {store.path} has no input_ids, so it cannot be replayed; record the "
                "calibration with save_input_ids=True, or prune with sequential=False"
            )
        feeds.append((ids, store.valid(step)))
    return feeds


def block_statistics(
    model: nn.Module,
    store,
    linear_names: list[str],
    *,
    sink_aware: bool,
    settings: SinkSettings,
    hessians: bool,
    progress: bool = True,
) -> Iterator[tuple[list[str], dict[str, dict[str, Tensor]]]]:
    """Yield, block by block, the statistics of its linears on the current (partially pruned) model.

    The caller prunes the yielded block before asking for the next one; each block's statistics are
    measured when the generator resumes, so they see every earlier block as pruned.

    Yields:
        ``(linear names, {name: {"sumsq": (sequences, in), "hessian": (in, in)}})``: per-(sample, step)
        sums of squares, sink-weighted when ``sink_aware``; the Hessian ``2/N · Σ x̃ x̃ᵀ`` with
        ``hessians``.
    """
    feeds = _feeds(store)
    weights = step_weights(store, settings) if sink_aware else {}
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    for block, names in tqdm(_blocks_in_order(model, linear_names), desc="sequential", disable=not progress):
        collected: dict[str, dict[str, list[Tensor] | Tensor]] = {}
        current: dict[str, Tensor] = {}

        def on_linear(module, args, name):
            x = args[0].detach()
            seen = current.get("seen", {})
            hit = seen.get(id(args[0]))
            if hit is not None and hit[1]() is args[0]:
                collected[name] = collected[hit[0]]
                return
            seen[id(args[0])] = (name, weakref.ref(args[0]))
            current["seen"] = seen
            valid, w = current["valid"], current["weights"]
            no_candidates = torch.zeros(0, 2, dtype=torch.long, device=x.device)
            stats = reduce_inputs(x, valid, w, no_candidates, hessians=hessians)
            entry = collected.setdefault(name, {"sumsq": [], "hessian": None, "nsamples": 0})
            entry["sumsq"].append(stats["wsumsq" if sink_aware else "sumsq"])
            if hessians:
                gram = stats["weighted" if sink_aware else "plain"]
                entry["hessian"] = gram if entry["hessian"] is None else entry["hessian"] + gram
            entry["nsamples"] += x.shape[0]

        def stop(module, args, output):
            raise _StopForward

        handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: on_linear(m, a, n)) for n in names]
        handles.append(modules[block].register_forward_hook(stop))
        try:
            for step, (ids, valid) in enumerate(feeds):
                ids, valid = ids.to(device), valid.to(device)
                w = weights[step].to(device) if sink_aware else torch.ones(valid.shape, device=device)
                current.clear()
                current.update(valid=valid, weights=w)
                kwargs = {"input_ids": ids}
                if not bool(valid.all()):
                    kwargs["attention_mask"] = valid.long()
                try:
                    with torch.no_grad():
                        model(**kwargs)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        out = {}
        for name, entry in collected.items():
            result = {"sumsq": torch.cat(entry["sumsq"])}
            if hessians:
                result["hessian"] = entry["hessian"] * (2.0 / max(entry["nsamples"], 1))
            out[name] = result
        yield names, out
