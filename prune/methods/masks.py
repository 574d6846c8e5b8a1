"""Mask selection from pruning scores: per-row unstructured and N:M semi-structured.

Every function here is pure: it takes a score (or mask) tensor and returns a new tensor. Masks are
boolean with ``True`` = weight kept, shaped like the weight, ``(out_features, in_features)``.

Conventions follow Wanda (arXiv 2306.11695): the comparison group of unstructured selection is an
output row, and ``"N:M"`` prunes the ``N`` lowest-scored weights of every ``M`` consecutive input
columns (``"2:4"`` prunes 2 of every 4, so its sparsity is 0.5). Ties are broken by a stable sort:
among equal scores the lower input index is pruned first, so masks are reproducible across runs
and devices.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

UNSTRUCTURED = "unstructured"
N_M = "n:m"

_N_M_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_VALID_FORMS = f'"{UNSTRUCTURED}" or "N:M" with integers 0 < N < M (e.g. "2:4", "4:8")'
# Sparsity given next to an N:M pattern must equal N/M up to this absolute tolerance.
_N_M_TOLERANCE = 1e-6


def check_sparsity(sparsity: float) -> float:
    """Validate an unstructured sparsity (fraction of weights pruned).

    Args:
        sparsity: Fraction in ``[0, 1]``.

    Returns:
        The sparsity as a Python float.

    Raises:
        ValueError: If it is not a finite number in ``[0, 1]``.

    Example:
        >>> check_sparsity(0.5)
        0.5
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}; pass e.g. 0.5.")
    value = float(sparsity)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"sparsity must be a fraction in [0, 1] (0.5 prunes half the weights), got {sparsity!r}."
        )
    return value


def check_n_m(n: int, m: int, sparsity: float | None = None) -> None:
    """Validate an N:M pattern and, if given, that ``sparsity == n / m``.

    Args:
        n: Weights pruned in every group.
        m: Group size (consecutive input columns).
        sparsity: Optional sparsity passed alongside the pattern.

    Raises:
        ValueError: If ``not 0 < n < m`` or ``sparsity`` differs from ``n / m``.

    Example:
        >>> check_n_m(2, 4, 0.5)
    """
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"N:M needs integers N and M, got n={n!r}, m={m!r}.")
    if not 0 < n < m:
        raise ValueError(
            f"N:M pattern {n}:{m} is invalid: it prunes N of every M weights, so it needs 0 < N < M "
            '(e.g. "2:4").'
        )
    if sparsity is not None:
        value = check_sparsity(sparsity)
        if abs(value - n / m) > _N_M_TOLERANCE:
            raise ValueError(
                f"sparsity {sparsity!r} does not match pattern {n}:{m}, which prunes {n} of every {m} "
                f"weights (sparsity {n / m:.6g}); pass sparsity={n / m:.6g} or change the pattern."
            )


def parse_pattern(pattern: str, sparsity: float) -> tuple[str, int | None, int | None]:
    """Parse and validate a sparsity pattern together with its sparsity.

    Args:
        pattern: ``"unstructured"`` or ``"N:M"`` (prune ``N`` of every ``M`` consecutive input
            weights; ``"2:4"`` prunes 2 of 4).
        sparsity: Fraction of weights to prune. For ``"N:M"`` it must equal ``N / M``.

    Returns:
        ``("unstructured", None, None)`` or ``("n:m", N, M)``.

    Raises:
        ValueError: On an unknown pattern (the message lists the valid forms), a sparsity outside
            ``[0, 1]``, or a sparsity that differs from ``N / M``.

    Example:
        >>> parse_pattern("2:4", 0.5)
        ('n:m', 2, 4)
        >>> parse_pattern("unstructured", 0.3)
        ('unstructured', None, None)
    """
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string, {_VALID_FORMS}; got {pattern!r}.")
    if pattern.strip().lower() == UNSTRUCTURED:
        check_sparsity(sparsity)
        return UNSTRUCTURED, None, None
    match = _N_M_PATTERN.match(pattern)
    if match is None:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; valid forms: {_VALID_FORMS}.")
    n, m = int(match.group(1)), int(match.group(2))
    check_n_m(n, m, sparsity)
    return N_M, n, m


def check_matrix(tensor: Tensor, name: str) -> None:
    """Raise unless ``tensor`` is a 2-D (out_features, in_features) tensor, naming it in the error."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (out_features, in_features), got shape {tuple(tensor.shape)}; "
            "flatten convolution kernels to (out, in) first."
        )


def _check_scores(scores: Tensor, name: str = "scores") -> None:
    check_matrix(scores, name)
    if scores.is_floating_point() and not torch.isfinite(scores).all():
        raise ValueError(
            f"{name} contain NaN or Inf; check the calibration statistics (e.g. fp16 overflow: "
            "accumulate activations in float32)."
        )


def _stable_smallest(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` smallest entries along the last dim; ties pruned lower index first."""
    # Sorting compares only, so the input dtype is kept: casting could merge distinct values.
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def select_unstructured(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask pruning the ``int(in_features * sparsity)`` lowest scores of every output row.

    The count uses ``int()`` truncation, as Wanda's public code does. Ties are broken stably: among
    equal scores the lower column index is pruned first.

    Args:
        scores: ``(out_features, in_features)`` importance scores (higher = more important).
        sparsity: Fraction of each row to prune, in ``[0, 1]``.

    Returns:
        Bool tensor shaped like ``scores``; ``True`` = kept.

    Raises:
        ValueError: If ``scores`` is not 2-D or holds NaN/Inf, or ``sparsity`` is not in ``[0, 1]``.

    Example:
        >>> select_unstructured(torch.tensor([[100.0, 20.0, 3.0, 0.4]]), 0.5)
        tensor([[ True,  True, False, False]])
    """
    _check_scores(scores)
    value = check_sparsity(sparsity)
    k = int(scores.shape[1] * value)
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        keep.scatter_(1, _stable_smallest(scores, k), False)
    return keep


def select_n_m(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask pruning the ``n`` lowest scores in every group of ``m`` consecutive input columns.

    Groups are ``[0, m), [m, 2m), ...`` along the input dimension of each row. Ties are broken
    stably (lower column index pruned first).

    Args:
        scores: ``(out_features, in_features)`` importance scores; ``in_features % m == 0``.
        n: Weights pruned per group.
        m: Group size.

    Returns:
        Bool tensor shaped like ``scores``; ``True`` = kept. Every group has exactly ``m - n`` kept.

    Raises:
        ValueError: If the pattern is invalid, ``in_features`` is not divisible by ``m``, or
            ``scores`` is not 2-D or holds NaN/Inf.

    Example:
        >>> select_n_m(torch.arange(1.0, 9.0)[None], 2, 4).int()
        tensor([[0, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.int32)
    """
    _check_scores(scores)
    check_n_m(n, m)
    rows, cols = scores.shape
    if cols % m != 0:
        raise ValueError(
            f"in_features={cols} is not divisible by M={m}, so {n}:{m} groups do not tile the row; "
            "use unstructured sparsity for this layer or exclude it."
        )
    groups = scores.reshape(rows, cols // m, m)  # (out, groups, m)
    keep = torch.ones(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(2, _stable_smallest(groups, n), False)
    return keep.reshape(rows, cols)


def select_mask(scores: Tensor, pattern: str, sparsity: float) -> Tensor:
    """Keep-mask for ``pattern`` (``"unstructured"`` or ``"N:M"``) at ``sparsity``.

    Args:
        scores: ``(out_features, in_features)`` importance scores.
        pattern: See :func:`parse_pattern`.
        sparsity: Fraction pruned; must equal ``N / M`` for N:M.

    Returns:
        Bool keep-mask shaped like ``scores``.

    Raises:
        ValueError: As :func:`parse_pattern`, :func:`select_unstructured` and :func:`select_n_m`.

    Example:
        >>> select_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), "2:4", 0.5)
        tensor([[ True,  True, False, False]])
    """
    _, n, m = parse_pattern(pattern, sparsity)
    if n is None or m is None:
        return select_unstructured(scores, sparsity)
    return select_n_m(scores, n, m)


def achieved_sparsity(mask: Tensor) -> float:
    """Fraction of weights pruned (``False``) in a keep-mask.

    Args:
        mask: Bool keep-mask of any shape.

    Returns:
        ``pruned / numel`` as a float (0.0 for an empty mask).

    Raises:
        ValueError: If ``mask`` is not a bool tensor.

    Example:
        >>> achieved_sparsity(torch.tensor([[True, False, False, True]]))
        0.5
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True = kept), got {got}; use `mask.bool()`.")
    if mask.numel() == 0:
        return 0.0
    return 1.0 - mask.sum().item() / mask.numel()


def check_mask(mask: Tensor, pattern: str, sparsity: float, *, per_row: bool = True) -> None:
    """Raise unless ``mask`` satisfies ``pattern`` at ``sparsity``.

    N:M: every group of ``M`` consecutive input columns prunes exactly ``N``. Unstructured with
    ``per_row=True``: every row prunes exactly ``int(in_features * sparsity)`` (what
    :func:`select_unstructured` produces). With ``per_row=False`` only the overall pruned fraction is
    checked, to within one weight per row (SparseGPT selects over whole column blocks, so its rows
    differ).

    Args:
        mask: ``(out_features, in_features)`` bool keep-mask.
        pattern: ``"unstructured"`` or ``"N:M"``.
        sparsity: Target fraction pruned.
        per_row: Unstructured only: require the exact count in every row.

    Raises:
        ValueError: Naming the first offending row/group and the counts found.

    Example:
        >>> check_mask(torch.tensor([[False, True, True, False]]), "2:4", 0.5)
    """
    _, n, m = parse_pattern(pattern, sparsity)
    achieved_sparsity(mask)  # validates the dtype
    _check_scores(mask, "mask")
    rows, cols = mask.shape
    if n is not None and m is not None:
        if cols % m != 0:
            raise ValueError(f"mask has in_features={cols}, not divisible by M={m} of pattern {pattern!r}.")
        pruned = (~mask).reshape(rows, cols // m, m).sum(dim=2)  # (out, groups)
        bad = (pruned != n).nonzero()
        if bad.numel():
            r, g = bad[0].tolist()
            raise ValueError(
                f"mask violates {n}:{m} in {bad.shape[0]} group(s); first: row {r}, columns "
                f"{g * m}..{g * m + m - 1} prune {pruned[r, g].item()} instead of {n}."
            )
        return
    k = int(cols * sparsity)
    if per_row:
        pruned_rows = (~mask).sum(dim=1)
        bad_rows = (pruned_rows != k).nonzero().flatten()
        if bad_rows.numel():
            r = bad_rows[0].item()
            raise ValueError(
                f"mask prunes {pruned_rows[r].item()} weights in row {r} instead of {k} "
                f"(= int({cols} * {sparsity})); {bad_rows.numel()} row(s) differ. Pass per_row=False "
                "for masks chosen over whole blocks (SparseGPT)."
            )
        return
    got = achieved_sparsity(mask)
    if cols and abs(got - sparsity) > 1.0 / cols:
        raise ValueError(
            f"mask sparsity {got:.6g} differs from target {sparsity} by more than one weight per row "
            f"(1/{cols})."
        )
