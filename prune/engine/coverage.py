"""Coverage: which of each block's weights a pruning run considered, and the sparsity it achieved.

The per-linear report says how sparse each pruned matrix is; it cannot say what was *not* pruned. A
mixture-of-experts block whose fused experts nobody pruned looks perfect row by row while most of
its weights stay dense. So, per block (the repeated unit that holds an attention module):

- ``weights``: every weight-bearing parameter (two or more dimensions: linears, fused 3-D experts,
  routers, convolutions) of the block; norms, biases and buffers are not counted;
- ``considered``: the fraction of those weights that the run selected for pruning;
- ``sparsity``: zeros over *all* of those weights after the run, not a mean of per-linear figures;
- ``left_out``: every weight-bearing parameter (or part of one) not selected, with the reason:
  ``router`` (kept dense; a router that is an ``nn.Linear`` is pruned when ``targets=`` names it),
  ``excluded`` (the user's ``targets=`` / ``ignore=``), or ``no adapter`` (nothing in attnprobe/prune
  knows how to prune it).

Parameters left out with ``no adapter`` were left out by no choice of the user's: :func:`check`
warns, listing them, and with ``strict=True`` raises before any weight changes.
Embeddings and the LM head lie outside the blocks and are never pruned (nor counted).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from attnprobe import discover

ROUTER = "router: kept dense (an nn.Linear router is pruned when targets= names it)"
EXCLUDED = "excluded by targets=/ignore="
NO_ADAPTER = "no adapter: attnprobe cannot prune it"


def block_weights(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """``{block: {parameter name: parameter}}`` of the weight-bearing parameters of every block."""
    try:
        blocks = sorted(set(discover(model).blocks.values()), key=list(dict(model.named_modules())).index)
    except ValueError:
        return {}
    out: dict[str, dict[str, Tensor]] = {block: {} for block in blocks}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        block = next((b for b in blocks if b == "" or name.startswith(b + ".")), None)
        if block is not None:
            out[block][name] = param
    return out


def _parameter_of(name: str, slices: set[str]) -> tuple[str, int | None]:
    """Parameter holding the weight called ``name``, and the expert index for a fused slice."""
    if name in slices:
        param, expert = name.rsplit(".", 1)
        return param, int(expert)
    return f"{name}.weight", None


def _considered(params: dict[str, Tensor], names: Iterable[str], slices: set[str]) -> dict[str, Tensor]:
    """Per parameter, a bool over its first dimension (experts) or a 0-dim bool: what was selected."""
    out: dict[str, Tensor] = {}
    for name in names:
        param, expert = _parameter_of(name, slices)
        if param not in params:
            continue
        if expert is None:
            out[param] = torch.tensor(True)
        else:
            picked = out.setdefault(param, torch.zeros(params[param].shape[0], dtype=torch.bool))
            picked[expert] = True
    return out


def check(
    model: nn.Module,
    selected: Iterable[str],
    selectable: Iterable[str],
    routers: Iterable[str],
    slices: Iterable[str],
    *,
    strict: bool = False,
) -> dict[str, str]:
    """Find what the run leaves out of each block, warn (or, ``strict``, raise) for ``no adapter``.

    Args:
        model: the model to be pruned.
        selected: names of the weights that will be pruned (linear names, expert slice names).
        selectable: every name the user could have selected (the block linears, every expert slice).
        routers: router module names.
        slices: the expert slice names (``<experts>.<param>.<e>``).
        strict: raise ``ValueError`` instead of warning.

    Returns:
        ``{parameter name (with [experts] for part of a 3-D one): reason}``.
    """
    slices = set(slices)
    routers = set(routers)
    selectable_params = {_parameter_of(n, slices)[0] for n in selectable}
    left: dict[str, str] = {}
    for params in block_weights(model).values():
        considered = _considered(params, selected, slices)
        for name, param in params.items():
            picked = considered.get(name)
            if picked is not None and bool(picked.all()):
                continue
            label = name
            if picked is not None:  # part of a fused parameter
                missing = (~picked).nonzero().flatten().tolist()
                label = f"{name}[experts {missing}]"
            if any(name.startswith(r + ".") for r in routers):
                left[label] = ROUTER
            elif name in selectable_params:
                left[label] = EXCLUDED
            else:
                left[label] = NO_ADAPTER
    unknown = [name for name, reason in left.items() if reason == NO_ADAPTER]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        message = (
            f"{len(unknown)} weight-bearing parameter(s) of {type(model).__name__}'s blocks will not be "
            f"pruned because no adapter knows them: {shown}. The achieved sparsity in "
            "PruneResult.coverage counts them as dense."
        )
        if strict:
            raise ValueError(message + " (strict=True; nothing was changed.)")
        warnings.warn(message + " Pass strict=True to make this an error.", stacklevel=3)
    return left


def report(model: nn.Module, selected: Iterable[str], slices: Iterable[str], left_out: dict[str, str]) -> Any:
    """One row per block, and a total: weights, fraction considered, achieved sparsity, what was left.

    Returns:
        A pandas DataFrame with columns ``block``, ``weights``, ``considered``, ``zeros``,
        ``sparsity``, ``left_out``.
    """
    import pandas as pd

    slices = set(slices)
    selected = list(selected)
    rows = []
    for block, params in block_weights(model).items():
        considered = _considered(params, selected, slices)
        total = sum(p.numel() for p in params.values())
        chosen = 0
        for name, picked in considered.items():
            param = params[name]
            chosen += param.numel() if picked.dim() == 0 else int(picked.sum()) * param[0].numel()
        zeros = sum(int((p == 0).sum()) for p in params.values())
        mine = [f"{k} ({v})" for k, v in left_out.items() if k.split("[")[0] in params]
        rows.append(
            {
                "block": block,
                "weights": total,
                "considered": chosen / total if total else 0.0,
                "zeros": zeros,
                "sparsity": zeros / total if total else 0.0,
                "left_out": "; ".join(mine),
            }
        )
    table = pd.DataFrame(rows, columns=["block", "weights", "considered", "zeros", "sparsity", "left_out"])
    if len(table):
        weights = int(table["weights"].sum())
        considered = float((table["considered"] * table["weights"]).sum()) / max(weights, 1)
        zeros = int(table["zeros"].sum())
        total = {
            "block": "(all blocks)",
            "weights": weights,
            "considered": considered,
            "zeros": zeros,
            "sparsity": zeros / max(weights, 1),
            "left_out": f"{len(left_out)} parameter(s)",
        }
        table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    return table


def check_selection(model: nn.Module, selection: Iterable[str], *, strict: bool = False) -> dict[str, str]:
    """:func:`check` for a :func:`prune.apply` selection: selectable names are the block linears and
    every expert slice of ``model``."""
    from prune.engine import experts

    sets = experts.model_experts(model)
    slices = set(experts.fused_slices(model, sets))
    try:
        linears = discover(model).linears
    except ValueError:
        linears = ()
    return check(model, selection, [*linears, *slices], experts.router_names(sets), slices, strict=strict)


def report_selection(model: nn.Module, selection: Iterable[str], left_out: dict[str, str]) -> Any:
    """:func:`report` with ``model``'s expert slices."""
    from prune.engine import experts

    slices = experts.fused_slices(model, experts.model_experts(model))
    return report(model, selection, slices, left_out)
