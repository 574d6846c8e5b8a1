"""Per-layer reconstruction error of a pruned linear, from the Gram matrix of its inputs.

For a linear with weight ``W`` (out, in), pruned weight ``Ŵ`` and calibration inputs ``X`` (rows, in),
the relative error of its outputs is

    ‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖²  =  tr(D G Dᵀ) / tr(W G Wᵀ),   D = W − Ŵ,  G = XᵀX,

so it needs only ``G`` (in, in), never the inputs themselves. ``G`` is the sink-weighted ``X̃ᵀX̃``
(``X̃ = diag(w) X``) when pruning is sink-aware: the error is then measured on the rows the method was
told to care about. Any positive scale of ``G`` cancels, so SparseGPT's ``H = 2/N · XᵀX`` serves as is.

Where ``G`` comes from (what it costs):

- one-shot: the store's Hessians (``attnprobe.record(..., hessians=True)``): ``in²`` float32 per input
  group on disk, which SparseGPT needs anyway; Wanda and magnitude one-shot read them only for this
  error, for refinement (:mod:`prune.methods.refine`) and for ``allocation="sensitivity"``;
- block-wise: the Hessian the engine accumulates for SparseGPT; for Wanda and magnitude the engine
  accumulates the Hessian instead of the per-column sums of squares when the error, refinement or
  sensitivity is asked for (one ``in × in`` matrix per input group of the current block, on its
  device, and ``rows · in²`` flops per step instead of ``rows · in``); Wanda's norm is its diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Output rows processed at once: bounds the (rows, in) float32 temporaries of a large layer.
_ROWS_PER_CHUNK = 1024


def _check(weight: Tensor, pruned: Tensor, gram: Tensor) -> None:
    if weight.ndim != 2 or pruned.shape != weight.shape:
        raise ValueError(
            f"weight {tuple(weight.shape)} and pruned weight {tuple(pruned.shape)} must be the same 2-D "
            "(out_features, in_features) shape"
        )
    cols = weight.shape[1]
    if gram.shape != (cols, cols):
        raise ValueError(
            f"gram has shape {tuple(gram.shape)} but the weight {tuple(weight.shape)} needs ({cols}, "
            f"{cols}): pass XᵀX of this layer's input"
        )


@torch.no_grad()
def quadratic_form(rows: Tensor, gram: Tensor) -> Tensor:
    """``Σ_i r_i G r_iᵀ`` over the rows of ``rows`` (out, in), float32, in chunks of rows.

    Example:
        >>> float(quadratic_form(torch.tensor([[1.0, 2.0]]), torch.eye(2)))
        5.0
    """
    g = gram.to(device=rows.device, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        r = rows[start : start + _ROWS_PER_CHUNK].to(torch.float32)
        total += ((r @ g) * r).sum()
    return total


@torch.no_grad()
def relative_error(weight: Tensor, pruned: Tensor, gram: Tensor) -> float:
    """``tr(D G Dᵀ) / tr(W G Wᵀ)`` with ``D = W − Ŵ``: the pruned layer's relative output error.

    Args:
        weight: the dense weight ``W`` (out, in), any floating dtype.
        pruned: the pruned weight ``Ŵ`` (zeros where pruned; SparseGPT's updated values where kept).
        gram: ``XᵀX`` (in, in) of the layer's calibration inputs, any positive scale (sink-weighted
            for sink-aware pruning).

    Returns:
        The relative error, a float ≥ 0 (0 for an unpruned layer; NaN if ``W X`` is zero).

    Example:
        >>> w = torch.tensor([[1.0, 2.0]])
        >>> round(relative_error(w, torch.tensor([[0.0, 2.0]]), torch.eye(2)), 6)
        0.2
    """
    _check(weight, pruned, gram)
    diff = weight.to(torch.float32) - pruned.to(device=weight.device, dtype=torch.float32)
    dense = quadratic_form(weight, gram)
    if float(dense) <= 0:
        return float("nan")
    return float(quadratic_form(diff, gram) / dense)


def masked(weight: Tensor, mask: Tensor, new_weight: Tensor | None = None) -> Tensor:
    """The weight a plan writes: ``new_weight`` (SparseGPT) or ``weight``, times the keep-mask; float32."""
    source = weight if new_weight is None else new_weight
    return source.to(torch.float32) * mask.to(device=source.device, dtype=torch.float32)


def norm_from_gram(gram: Tensor) -> Tensor:
    """Wanda's norm ``sqrt(mean Σ_t x²)`` from SparseGPT's ``H = 2/N · Σ x xᵀ``: ``sqrt(diag(H) / 2)``."""
    return (torch.diagonal(gram).clamp(min=0) / 2).sqrt()
