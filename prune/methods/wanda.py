"""Wanda and magnitude pruning scores (pure tensor functions).

Wanda (arXiv 2306.11695) scores weight ``W_ij`` by ``|W_ij| * ||X_j||``: its magnitude times the norm
of input column ``j`` over the calibration tokens. The published code keeps a per-column *scaler*,
the mean over calibration sequences of ``sum_t x_tj**2``, and uses ``sqrt(scaler)`` as the norm. The
Sink-Aware Pruning reference code (arXiv 2602.17664) instead sums per-sample L2 norms of the
sink-down-weighted activations. Both are per-input-column norms, so both feed :func:`wanda_scores`.
The two are the :data:`ACCUMULATIONS` ``"wanda"`` and ``"reference"``, defined here once:
:func:`accumulation_term` and :func:`finish_norm` stream them over steps (``prune.engine.statistics``),
:func:`act_norm_from_sumsq` builds either from all per-sample sums of squares at once.

Scores are returned in float32 whatever the weight's dtype; masks come from :mod:`prune.methods.masks`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prune.methods.masks import check_matrix

# How per-sample sums of squares become one input norm: "wanda" = sqrt(mean_s sumsq[s]) (arXiv
# 2306.11695), "reference" = sum_s sqrt(sumsq[s]) (the Sink-Aware Pruning public code).
ACCUMULATIONS = ("wanda", "reference")


def check_accumulation(accumulate: str) -> None:
    """Raise a ValueError naming the valid choices unless ``accumulate`` is one of :data:`ACCUMULATIONS`."""
    if accumulate not in ACCUMULATIONS:
        raise ValueError(f"unknown accumulate {accumulate!r}; choose one of {ACCUMULATIONS}")


def accumulation_term(sumsq: Tensor, accumulate: str = "wanda") -> Tensor:
    """What ``(samples, in)`` sums of squares add to a running total: ``Σ_s sumsq`` or ``Σ_s sqrt(sumsq)``.

    Example:
        >>> accumulation_term(torch.tensor([[1.0, 4.0], [9.0, 4.0]]), "reference").tolist()
        [4.0, 4.0]
    """
    check_accumulation(accumulate)
    stat = sumsq.detach().to(torch.float32)
    return stat.sum(dim=0) if accumulate == "wanda" else stat.sqrt().sum(dim=0)


def finish_norm(total: Tensor, samples: int | Tensor, accumulate: str = "wanda") -> Tensor:
    """The input norm from a running total of :func:`accumulation_term` over ``samples`` samples.

    Example:
        >>> finish_norm(torch.tensor([10.0, 8.0]), 2).tolist()
        [2.2360680103302, 2.0]
    """
    check_accumulation(accumulate)
    if accumulate == "wanda":
        count = torch.as_tensor(samples, dtype=torch.float32, device=total.device).clamp(min=1)
        return (total / count).sqrt()
    return total


def _check_weight(weight: Tensor) -> None:
    check_matrix(weight, "weight")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}.")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf; the layer is already broken, prune a clean checkpoint.")


def _check_statistic(stat: Tensor, name: str) -> None:
    if not isinstance(stat, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(stat).__name__}.")
    if not stat.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {stat.dtype}.")
    if not torch.isfinite(stat).all():
        raise ValueError(
            f"{name} contains NaN or Inf; recollect the calibration statistics accumulating in "
            "float32 (fp16 sums of squares overflow)."
        )
    if (stat < 0).any():
        raise ValueError(f"{name} has negative entries; it must be a norm or a sum of squares (>= 0).")


def magnitude_scores(weight: Tensor) -> Tensor:
    """Magnitude-pruning scores ``|W|`` in float32.

    Args:
        weight: ``(out_features, in_features)`` weight.

    Returns:
        float32 tensor shaped like ``weight``.

    Raises:
        ValueError: If ``weight`` is not a finite 2-D floating-point tensor.

    Example:
        >>> magnitude_scores(torch.tensor([[-2.0, 1.0]]))
        tensor([[2., 1.]])
    """
    _check_weight(weight)
    return weight.detach().to(torch.float32).abs()


def wanda_scores(weight: Tensor, act_norm: Tensor) -> Tensor:
    """Wanda scores ``S_ij = |W_ij| * act_norm_j`` in float32.

    Args:
        weight: ``(out_features, in_features)`` weight, any floating dtype.
        act_norm: ``(in_features,)`` per-input-column activation norm, e.g.
            ``wanda_scaler_to_norm(scaler)`` or the reference sum of per-sample L2 norms.

    Returns:
        float32 ``(out_features, in_features)`` scores.

    Raises:
        ValueError: If shapes disagree (naming both sizes), or either input holds NaN/Inf, or
            ``act_norm`` is negative.

    Example:
        >>> w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> wanda_scores(w, torch.tensor([100.0, 10.0, 1.0, 0.1]))
        tensor([[100.0000,  20.0000,   3.0000,   0.4000]])
    """
    _check_weight(weight)
    _check_statistic(act_norm, "act_norm")
    if act_norm.ndim != 1 or act_norm.shape[0] != weight.shape[1]:
        raise ValueError(
            f"act_norm has shape {tuple(act_norm.shape)} but the weight has in_features="
            f"{weight.shape[1]} (weight shape {tuple(weight.shape)}); pass one norm per input column "
            "(statistics of the layer's input, not its output)."
        )
    norm = act_norm.detach().to(device=weight.device, dtype=torch.float32)
    return weight.detach().to(torch.float32).abs() * norm.unsqueeze(0)


def wanda_scaler_to_norm(scaler: Tensor) -> Tensor:
    """Column norm ``sqrt(scaler)`` from Wanda's scaler (mean over sequences of ``sum_t x_tj**2``).

    Args:
        scaler: ``(in_features,)`` non-negative scaler.

    Returns:
        float32 ``(in_features,)`` norm.

    Raises:
        ValueError: If ``scaler`` holds NaN/Inf or negative values.

    Example:
        >>> wanda_scaler_to_norm(torch.tensor([4.0, 9.0]))
        tensor([2., 3.])
    """
    _check_statistic(scaler, "scaler")
    return scaler.detach().to(torch.float32).sqrt()


def act_norm_from_sumsq(sumsq: Tensor, *, accumulate: str = "wanda") -> Tensor:
    """Per-column activation norm from per-sample sums of squares.

    ``sumsq[s, j] = sum_t x_tj**2`` over the tokens of sample ``s`` (optionally sink-weighted).

    - ``"wanda"``: ``sqrt(mean_s sumsq[s, j])``, Wanda's published statistic.
    - ``"reference"``: ``sum_s sqrt(sumsq[s, j])``, what the Sink-Aware Pruning reference code
      accumulates (a sum of L2 norms, not squared, not averaged).

    Args:
        sumsq: ``(samples, in_features)`` non-negative per-sample sums of squares.
        accumulate: one of :data:`ACCUMULATIONS`.

    Returns:
        float32 ``(in_features,)`` norm.

    Raises:
        ValueError: On a bad shape, NaN/Inf or negative entries, or an unknown ``accumulate``.

    Example:
        >>> s = torch.tensor([[1.0, 4.0], [9.0, 4.0]])
        >>> act_norm_from_sumsq(s, accumulate="reference")
        tensor([4., 4.])
    """
    _check_statistic(sumsq, "sumsq")
    if sumsq.ndim != 2 or sumsq.shape[0] == 0:
        raise ValueError(
            f"sumsq must be (samples, in_features) with at least one sample, got shape "
            f"{tuple(sumsq.shape)}; unsqueeze(0) a single sample."
        )
    check_accumulation(accumulate)
    return finish_norm(accumulation_term(sumsq, accumulate), sumsq.shape[0], accumulate)
