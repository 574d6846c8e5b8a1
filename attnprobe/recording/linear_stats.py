"""Reduce one step's linear-layer inputs into the statistics Wanda and SparseGPT need.

Pure tensor functions. The recorder buffers each input group's activations for a step (or replays
the step in two-pass mode), learns that step's sink weights ``w = 1 - s`` from the attention mass,
and then calls :func:`reduce_inputs` once per input group.

Statistics, over valid (non-padding) tokens t of each sample b, in float32:

- ``sumsq[b, j]  = Σ_t x[b,t,j]²``                 plain Wanda scaler before averaging
- ``wsumsq[b, j] = Σ_t w[b,t]² · x[b,t,j]²``       the same on sink-down-weighted rows (w·x)²
- ``sum[b, j]    = Σ_t x[b,t,j]``, ``wsum[b, j] = Σ_t w[b,t] · x[b,t,j]``: the means beside the squares,
                                                     for FLAP's fluctuation and bias compensation
- ``cand_rows``  = x[b,t,:]² for candidate tokens   lets ``prune`` redo the weighting for other sink
                                                     parameters without running the model again
- ``plain = Σ x xᵀ`` and ``weighted = Σ (w x)(w x)ᵀ``, summed over samples (only with Hessians)
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnprobe.recording.row_stats import row_statistics


def reduce_inputs(
    x: Tensor,
    valid: Tensor,
    weights: Tensor,
    candidates: Tensor,
    *,
    hessians: bool = False,
) -> dict[str, Tensor]:
    """Per-sample statistics of one linear input group for one forward.

    Args:
        x: the linear input, (batch, tokens, in_features), any float dtype.
        valid: bool (batch, tokens), False on padding.
        weights: float32 (batch, tokens), the sink down-weighting ``w = 1 - s``.
        candidates: int64 (n, 2) rows (sample, token) whose squared inputs are kept; an index rather than
            a bool mask, so that selecting them needs no host sync inside a hook.
        hessians: also return ``plain`` and ``weighted`` (in, in) Gram matrices.

    Returns:
        ``sumsq``, ``wsumsq``, ``sum`` and ``wsum`` (batch, in), ``cand_rows`` (n, in) in the order of
        ``candidates``, and with ``hessians`` also ``plain`` and ``weighted`` (in, in); all float32 on
        x's device.

    Example:
        >>> x = torch.ones(1, 3, 2)
        >>> out = reduce_inputs(x, torch.ones(1, 3, dtype=torch.bool), torch.full((1, 3), 0.5),
        ...                     torch.zeros(0, 2, dtype=torch.long))
        >>> out["sumsq"].tolist(), out["wsumsq"].tolist()
        ([[3.0, 3.0]], [[0.75, 0.75]])
    """
    batch, tokens, width = x.shape
    # valid, weights and candidates come from the step (the input ids' device, or the device where the
    # layers' masses were summed); x from this layer, which for a dispatched model may be elsewhere.
    valid, candidates = valid.to(x.device), candidates.to(x.device)
    out = weighted_statistics(
        x.reshape(-1, width),
        None,  # whole samples in order
        batch,
        valid.reshape(-1),
        weights.reshape(-1),
        hessians=hessians,
        means=True,
    )
    out["cand_rows"] = x[candidates[:, 0], candidates[:, 1]].to(torch.float32).square()
    return out


def weighted_statistics(
    rows: Tensor,
    sample: Tensor | None,
    batch: int,
    keep: Tensor,
    weights: Tensor,
    *,
    hessians: bool,
    means: bool,
) -> dict[str, Tensor]:
    """The statistics above over input rows (n, in) of ``batch`` samples, through the one reduction
    (:func:`attnprobe.recording.row_stats.row_statistics`): row r belongs to sample ``sample[r]``,
    counts where ``keep[r]`` (not padding) and carries the sink weight ``weights[r]``. Used for a block
    linear's whole input and for the rows routed to one expert."""
    keep = keep.to(device=rows.device, dtype=torch.float32)
    w = weights.to(device=rows.device, dtype=torch.float32) * keep
    squares = {"sumsq": keep, "wsumsq": w.square()}
    sums = {"sum": keep, "wsum": w} if means else None
    grams = {"plain": keep, "weighted": w} if hessians else None
    return row_statistics(rows, sample, batch, squares=squares, sums=sums, grams=grams)
