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

# Rows of (batch · tokens) reduced at once: bounds the float32 temporaries of a bf16 activation.
_ROWS_PER_CHUNK = 4096


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
    weights = weights.to(device=x.device, dtype=torch.float32)
    keep = valid.to(torch.float32)  # (batch, tokens)
    w2 = weights.square() * keep
    sumsq = x.new_zeros((batch, width), dtype=torch.float32)
    wsumsq, total, wtotal = torch.zeros_like(sumsq), torch.zeros_like(sumsq), torch.zeros_like(sumsq)
    w1 = weights * keep
    out: dict[str, Tensor] = {}
    if hessians:
        out["plain"] = x.new_zeros((width, width), dtype=torch.float32)
        out["weighted"] = x.new_zeros((width, width), dtype=torch.float32)
    step = max(1, _ROWS_PER_CHUNK // max(tokens, 1))
    for b0 in range(0, batch, step):
        xb = x[b0 : b0 + step].to(torch.float32)  # (chunk, tokens, in)
        sq = xb.square()
        # (chunk, tokens) x (chunk, tokens, in) -> (chunk, in): a batched matvec, no (t, in) temporary.
        sumsq[b0 : b0 + step] = torch.bmm(keep[b0 : b0 + step, None, :], sq).squeeze(1)
        wsumsq[b0 : b0 + step] = torch.bmm(w2[b0 : b0 + step, None, :], sq).squeeze(1)
        total[b0 : b0 + step] = torch.bmm(keep[b0 : b0 + step, None, :], xb).squeeze(1)
        wtotal[b0 : b0 + step] = torch.bmm(w1[b0 : b0 + step, None, :], xb).squeeze(1)
        if hessians:
            rows = (xb * keep[b0 : b0 + step, :, None]).reshape(-1, width)
            out["plain"].addmm_(rows.T, rows)
            wrows = xb * (weights[b0 : b0 + step] * keep[b0 : b0 + step])[..., None]
            wrows = wrows.reshape(-1, width)
            out["weighted"].addmm_(wrows.T, wrows)
    out["sumsq"] = sumsq
    out["wsumsq"] = wsumsq
    out["sum"], out["wsum"] = total, wtotal
    out["cand_rows"] = x[candidates[:, 0], candidates[:, 1]].to(torch.float32).square()
    return out
