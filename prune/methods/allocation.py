"""How a global sparsity budget is spread over the linears: ``prune.apply(..., allocation=...)``.

- ``"uniform"``: every linear at the target sparsity (Wanda's and SparseGPT's published setting).
- ``"owl"`` (Outlier-Weighed Layerwise sparsity, arXiv 2310.05175): per attention block ``l``, the
  outlier ratio ``D_l`` is the share of entries of Wanda's metric ``A = |W| · ‖x‖`` (over all the
  block's selected linears) above ``M × mean(A)``. ``D`` is rescaled to ``[0, 2λ]`` and shifted so
  that the keep ratios ``1 − s_l`` average ``1 − s``: more outliers, less sparsity, in a band ``2λ``
  wide around the target (not symmetric when ``D`` is skewed). Published defaults ``M = 5``,
  ``λ = 0.08``. ``‖x‖`` is sink-weighted when sink-aware. The shift averages over blocks weighted by
  their size (the paper's blocks are all the same size, where the two coincide).
- ``"sensitivity"`` (this project's, measured on the model): every linear is pruned by the chosen
  method at candidate sparsities ``s + δ``, ``δ ∈ {−r, −r/2, 0, r/2, r}`` (``r = sensitivity_range``),
  and its relative reconstruction error under the Gram matrix of its calibration inputs (over all the
  recorded denoising steps; sink-weighted when sink-aware; :mod:`prune.methods.layer_error`) is measured.
  Errors are interpolated linearly between candidates and the summed error is minimised under the
  global budget within ``[s − r, s + r]`` by greedy marginal allocation (optimal for convex curves):
  each step gives ``r / 10`` more sparsity to the linear whose error grows least per pruned weight.
- ``{regex: sparsity}``: the first pattern that fully matches a linear's name sets its sparsity, the
  others keep the target; a callable ``f(name, weight) -> sparsity | None`` does the same. A user's
  allocation is taken as given: its global sparsity is theirs.

The computed allocations (owl, sensitivity) then become whole per-row prune counts ``k_l`` (masks
prune ``int(in · s)`` per row) and the counts are adjusted, largest remainder first, until the zeros
of all selected weights equal ``s`` of them to within one row of one linear (uniform pruning's
``int(in · s)`` per row can fall short of ``s`` by up to one weight per row).
Allocation applies to unstructured pruning only: ``N:M`` fixes every group's count.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

ALLOCATIONS = ("uniform", "owl", "sensitivity")
# Added to k / in so that int(in · s) recovers k whatever the float rounding of the division.
_COUNT_EPS = 1e-9
# The sensitivity solver moves sparsity in steps of range / _SOLVER_STEPS.
_SOLVER_STEPS = 10


def describe(allocation) -> str:
    """The name recorded in ``settings``: a built-in's name, ``"mapping"`` or ``"callable"``."""
    if isinstance(allocation, str):
        return allocation
    return "mapping" if isinstance(allocation, Mapping) else "callable"


def check(allocation, pattern_kind: str, owl_m: float, owl_lambda: float, sensitivity_range: float) -> None:
    """Refuse what no allocation can honour, naming the fix."""
    if isinstance(allocation, str):
        if allocation not in ALLOCATIONS:
            raise ValueError(
                f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}, a {{name regex: sparsity}} "
                "mapping or a callable (name, weight) -> sparsity"
            )
    elif not isinstance(allocation, Mapping) and not callable(allocation):
        kind = type(allocation).__name__
        raise ValueError(f"allocation must be a string, a mapping or a callable, got {kind}")
    if allocation != "uniform" and pattern_kind != "unstructured":
        raise ValueError(
            f"allocation={describe(allocation)!r} spreads unstructured sparsity over the layers; an N:M or "
            "structured pattern fixes every layer's ratio. Use allocation='uniform' or "
            "pattern='unstructured'."
        )
    if not (isinstance(owl_m, (int, float)) and owl_m > 0):
        raise ValueError(f"owl_m must be > 0 (the paper's M = 5), got {owl_m!r}")
    if not (isinstance(owl_lambda, (int, float)) and 0 <= owl_lambda < 0.5):
        raise ValueError(f"owl_lambda must be in [0, 0.5) (the paper's λ = 0.08), got {owl_lambda!r}")
    if not (isinstance(sensitivity_range, (int, float)) and 0 < sensitivity_range < 0.5):
        raise ValueError(f"sensitivity_range must be in (0, 0.5), got {sensitivity_range!r}")


def _check_value(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"the allocation gives {name} sparsity {value!r}; each must be in [0, 1)")
    return float(value)


def user_sparsities(allocation, weights: dict[str, Tensor], sparsity: float) -> dict[str, float]:
    """Per-linear sparsity of a ``{regex: sparsity}`` mapping or a callable; unmatched keep ``sparsity``."""
    out = {}
    for name, weight in weights.items():
        if isinstance(allocation, Mapping):
            value = next((v for p, v in allocation.items() if re.fullmatch(p, name)), None)
        else:
            value = allocation(name, weight)
        out[name] = sparsity if value is None else _check_value(name, value)
    return out


def owl_ratios(weights: dict[str, Tensor], norms: dict[str, Tensor], blocks: dict[str, str], m: float):
    """Outlier ratio ``D_l`` of every block: share of ``|W| · ‖x‖`` entries above ``m ×`` their mean."""
    metrics: dict[str, list[Tensor]] = {}
    for name, weight in weights.items():
        if name in norms:
            metric = weight.detach().to(torch.float32).abs() * norms[name].to(weight.device, torch.float32)
            metrics.setdefault(blocks[name], []).append(metric.flatten())
    ratios = {}
    for block, parts in metrics.items():
        total = sum(float(p.sum()) for p in parts)
        count = sum(p.numel() for p in parts)
        threshold = m * total / max(count, 1)
        ratios[block] = sum(int((p > threshold).sum()) for p in parts) / max(count, 1)
    return ratios


def owl_sparsities(
    ratios: dict[str, float], sizes: dict[str, int], sparsity: float, lam: float
) -> dict[str, float]:
    """Per-block sparsity: ``D`` rescaled to ``[0, 2λ]``, shifted so the keep ratios average ``1 − s``."""
    low, high = min(ratios.values()), max(ratios.values())
    scaled = {b: (d - low) / (high - low) * 2 * lam if high > low else 0.0 for b, d in ratios.items()}
    total = sum(sizes[b] for b in scaled)
    mean = sum(scaled[b] * sizes[b] for b in scaled) / total
    return {b: min(max(1 - (v - mean + 1 - sparsity), 0.0), 0.99) for b, v in scaled.items()}


def candidate_sparsities(sparsity: float, spread: float) -> list[float]:
    """The candidates at which ``"sensitivity"`` measures each linear's error."""
    return [min(max(sparsity + f * spread, 0.0), 0.99) for f in (-1.0, -0.5, 0.0, 0.5, 1.0)]


def _interpolate(curve: list[tuple[float, float]], s: float) -> float:
    points = sorted(curve)
    for (s0, e0), (s1, e1) in zip(points, points[1:]):
        if s <= s1:
            return e0 if s1 == s0 else e0 + (e1 - e0) * (s - s0) / (s1 - s0)
    return points[-1][1]


def sensitivity_sparsities(
    curves: dict[str, list[tuple[float, float]]], sizes: dict[str, int], sparsity: float, spread: float
) -> dict[str, float]:
    """Minimise ``Σ_l e_l(s_l)`` s.t. ``Σ_l n_l s_l = s Σ_l n_l``, ``s_l ∈ [s − r, s + r]``, greedily."""
    low, high = max(sparsity - spread, 0.0), min(sparsity + spread, 0.99)
    step = spread / _SOLVER_STEPS
    level = {name: low for name in curves}
    budget = (sparsity - low) * sum(sizes[n] for n in curves)  # weights still to prune

    def cost(name: str) -> float:  # error added per pruned weight by the next step
        s = level[name]
        return (_interpolate(curves[name], s + step) - _interpolate(curves[name], s)) / (sizes[name] * step)

    heap = [(cost(n), n) for n in curves]
    heapq.heapify(heap)
    while heap and budget > 0:
        _, name = heapq.heappop(heap)
        move = min(step, high - level[name], budget / sizes[name])
        level[name] += move
        budget -= move * sizes[name]
        if level[name] < high - 1e-12:
            heapq.heappush(heap, (cost(name), name))
    return level


def to_counts(
    targets: dict[str, float], shapes: dict[str, tuple[int, int]], sparsity: float
) -> dict[str, float]:
    """Whole per-row counts whose zeros equal ``sparsity`` of all weights within one row of one linear.

    Args:
        targets: the continuous per-linear sparsity.
        shapes: ``(out, in)`` of every linear.
        sparsity: the global target.

    Returns:
        ``{name: k / in + ε}``, so that ``int(in · s)`` is exactly ``k``.
    """
    goal = round(sparsity * sum(rows * cols for rows, cols in shapes.values()))
    counts = {n: min(max(int(targets[n] * shapes[n][1]), 0), shapes[n][1] - 1) for n in targets}
    remainder = {n: targets[n] * shapes[n][1] - counts[n] for n in targets}
    diff = goal - sum(shapes[n][0] * counts[n] for n in counts)
    # Largest remainder first when adding rows of zeros, smallest first when removing them. Each move
    # brings |diff| strictly closer to 0, so the loop ends.
    while diff != 0:
        direction = 1 if diff > 0 else -1
        movable = [
            n for n in counts if shapes[n][0] <= abs(diff) and 0 <= counts[n] + direction <= shapes[n][1] - 1
        ]
        if not movable:
            break
        name = max(movable, key=lambda n: direction * remainder[n])
        counts[name] += direction
        remainder[name] -= direction
        diff -= direction * shapes[name][0]
    return {n: counts[n] / shapes[n][1] + _COUNT_EPS for n in counts}


def global_sparsity(masks: dict[str, Tensor]) -> float:
    """Zeros over all selected weights of a set of keep-masks."""
    total = sum(m.numel() for m in masks.values())
    return math.nan if not total else sum(int((~m).sum()) for m in masks.values()) / total


def block_names(model, names) -> dict[str, str]:
    """The attention block of every linear (the longest block name prefixing it; "" for the root)."""
    from attnprobe import discover

    blocks = sorted(set(discover(model).blocks.values()), key=len, reverse=True)
    return {n: next((b for b in blocks if b and n.startswith(b + ".")), "") for n in names}


NormsFn = Callable[[], dict[str, Tensor]]
# (candidate sparsities) -> {name: [(sparsity, relative error), ...]}
CurvesFn = Callable[[list[float]], dict[str, list[tuple[float, float]]]]


def resolve(
    allocation,
    model,
    weights: dict[str, Tensor],
    sparsity: float,
    *,
    norms: NormsFn,
    curves: CurvesFn,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    spread: float = 0.1,
) -> dict[str, float] | None:
    """Per-linear sparsity of ``allocation`` (None for uniform), computed allocations in whole counts.

    Args:
        allocation: ``"uniform"``, ``"owl"``, ``"sensitivity"``, a mapping or a callable.
        model: the model (for its blocks).
        weights: ``{name: (out, in) weight}`` of the selected linears (or expert slices).
        sparsity: the global target.
        norms: returns Wanda's input norm of every linear (OWL's ``‖x‖``), measured on the dense model.
        curves: returns every linear's relative error at each candidate sparsity (sensitivity).
        owl_m, owl_lambda: OWL's ``M`` and ``λ``.
        spread: the sensitivity's ``r``.
    """
    if allocation == "uniform":
        return None
    if not isinstance(allocation, str):
        return user_sparsities(allocation, weights, sparsity)
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
    sizes = {n: rows * cols for n, (rows, cols) in shapes.items()}
    if allocation == "owl":
        blocks = block_names(model, weights)
        ratios = owl_ratios(weights, norms(), blocks, owl_m)
        block_sizes: dict[str, int] = {}
        for name, block in blocks.items():
            block_sizes[block] = block_sizes.get(block, 0) + sizes[name]
        per_block = owl_sparsities(ratios, block_sizes, sparsity, owl_lambda) if ratios else {}
        targets = {n: per_block.get(blocks[n], sparsity) for n in weights}
    else:
        measured = curves(candidate_sparsities(sparsity, spread))
        solved = sensitivity_sparsities(measured, sizes, sparsity, spread) if measured else {}
        targets = {n: solved.get(n, sparsity) for n in weights}  # unmeasured linears: the target
    return to_counts(targets, shapes, sparsity)
