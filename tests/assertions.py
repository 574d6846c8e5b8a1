"""Assertions for comparing two floating-point computations of the same mask or pruned weight.

Two computations that sum in different orders (float32 vs float64 statistics, an all-reduce of
per-rank sums, another CPU's kernels) agree to rounding, and a mask selected from nearly tied scores
may flip a few entries. What holds on every CPU is then: the masks agree on all entries but near-ties
(a high fraction), and the pruned layer's error ``tr(ΔW H ΔWᵀ)`` is within a tight ratio of the
reference's. Keep ``torch.equal`` where the arithmetic is really the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Near-ties: at most one entry in a thousand may fall the other way.
MASK_AGREEMENT = 0.999


def mask_agreement(got: Tensor, expected: Tensor) -> float:
    """Fraction of entries on which two keep-masks agree."""
    assert got.shape == expected.shape, (tuple(got.shape), tuple(expected.shape))
    return float((got == expected).float().mean())


def assert_masks_agree(got: Tensor, expected: Tensor, name: str = "", *, at_least: float = MASK_AGREEMENT):
    """The masks agree on every entry but near-ties (at least ``at_least`` of the entries)."""
    agree = mask_agreement(got, expected)
    assert agree >= at_least, f"{name}: masks agree on {agree:.5f} of the entries (< {at_least})"


def layer_error(dense: Tensor, pruned: Tensor, hessian: Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` in float64: the pruned layer's output error over the rows of ``H``."""
    delta = dense.detach().double() - pruned.detach().double()
    return float(torch.einsum("oi,ij,oj->", delta, hessian.double(), delta))


def assert_layer_error_close(
    dense: Tensor, got: Tensor, expected: Tensor, hessian: Tensor, name: str = "", *, ratio: float = 1.01
):
    """The layer error of ``got`` is within ``ratio`` of the reference ``expected``'s (both ways)."""
    mine, theirs = layer_error(dense, got, hessian), layer_error(dense, expected, hessian)
    assert mine <= ratio * theirs + 1e-9 and theirs <= ratio * mine + 1e-9, (
        f"{name}: layer error {mine:.6g} vs the reference's {theirs:.6g} (ratio bound {ratio})"
    )


def assert_pruned_like(
    dense: dict[str, Tensor],
    got: tuple[dict[str, Tensor], dict[str, Tensor]],
    expected: tuple[dict[str, Tensor], dict[str, Tensor]],
    hessians: dict[str, Tensor],
    *,
    at_least: float = MASK_AGREEMENT,
    ratio: float = 1.01,
):
    """Two prunings of the same layers agree but for near-ties.

    Args:
        dense: ``{name: dense weight}``.
        got, expected: ``({name: keep-mask}, {name: pruned weight})`` of the code under test and of
            the reference.
        hessians: ``{name: Σ x xᵀ}`` of each layer's input (any positive scale).
        at_least: the fraction of all mask entries, over every layer, that must agree.
        ratio: the bound on each layer's error ratio (both ways).
    """
    (got_masks, got_weights), (ref_masks, ref_weights) = got, expected
    assert got_masks.keys() == ref_masks.keys()
    agree = sum(int((got_masks[n] == ref_masks[n]).sum()) for n in ref_masks)
    total = sum(m.numel() for m in ref_masks.values())
    assert agree / total >= at_least, f"masks agree on {agree}/{total} entries (< {at_least})"
    for name in ref_masks:
        assert_layer_error_close(
            dense[name], got_weights[name], ref_weights[name], hessians[name], name, ratio=ratio
        )
