"""SparseGPT: prune one linear layer and reconstruct it from a Hessian (arXiv 2301.00774).

Pure math: :func:`sparsegpt_prune` takes a weight ``W`` (out, in) and the layer-input Hessian
``H = (2/N) sum X^T X`` (in, in) and returns the pruned, OBS-updated weight and its keep-mask.

The algorithm, as published:

1. Dead input columns (``H_jj == 0``, never activated) get ``H_jj = 1`` and ``W[:, j] = 0``.
2. Damping ``lambda = percdamp * mean(diag H)`` is added to the diagonal.
3. ``Hinv = U``, the upper Cholesky factor of ``H^-1`` (itself computed from a Cholesky). Row ``j`` of
   ``U`` is, up to the factor ``U_jj``, row ``j`` of the inverse Hessian of the columns ``j..in-1``
   still to be processed, which is what the Optimal Brain Surgeon update needs.
4. Columns are processed left to right in blocks of ``blocksize``. Unstructured: at the start of
   each block the mask is chosen over the whole ``(rows, block)`` slab from ``w**2 / U_jj**2``.
   N:M: the mask of every ``M`` columns is chosen from the same score when the first of them is
   reached. Each column ``j`` is quantised to ``q = w * keep``, and its error
   ``(w - q) / U_jj`` is propagated to the later columns of the block along ``U[j, j:]``; the errors
   of a whole block are propagated to the columns after it in one matmul ("lazy batch" update).

Differences from the published code, all deliberate:

- Unstructured selection prunes exactly ``int(numel * sparsity)`` weights per block by a stable
  sort. The published ``scores <= sorted[int(numel * sparsity)]`` prunes one more (and all ties),
  so ``sparsity=0`` pruned one weight per block there and ``sparsity=1`` indexed out of range.
- N:M ties are broken by a stable sort (lower index pruned first) instead of ``topk``.
- A failed Cholesky is retried with 10x more damping, with a warning, instead of crashing.

The result does not depend on the scale of ``H`` (the damping is relative), so ``2/N`` vs ``1/N``
normalisation, or a sum instead of a mean, give the same weights up to rounding.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from prune.methods.masks import check_n_m, check_sparsity

# Failed Cholesky factorisations are retried this many times, each with 10x the damping.
_DAMP_RETRIES = 3
# Damping fraction used on retry when the caller asked for none.
_DAMP_FLOOR = 0.01


def hessian_from_inputs(x: Tensor, row_weights: Tensor | None = None) -> Tensor:
    """Layer-input Hessian ``(2/N) * sum_t x_t x_t^T`` in float32, N = number of sequences.

    Matches the published running mean (``H *= n/(n+b); H += 2/(n+b) * X X^T`` per batch of ``b``
    sequences) once all batches are seen. ``row_weights`` scales every token row first, giving the
    sink-aware Hessian ``X~^T X~`` with ``X~ = diag(w) X``.

    Args:
        x: ``(batch, seq, in_features)`` or ``(seq, in_features)`` (one sequence) layer inputs.
        row_weights: Optional ``(batch, seq)`` or ``(seq,)`` per-token weights, e.g. ``1 - sink``.

    Returns:
        float32 ``(in_features, in_features)`` Hessian.

    Raises:
        ValueError: On bad shapes or NaN/Inf inputs.

    Example:
        >>> hessian_from_inputs(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        tensor([[4., 4.],
                [4., 8.]])
    """
    if not isinstance(x, Tensor) or x.ndim not in (2, 3) or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"x must be a float tensor (batch, seq, in) or (seq, in), got {shape}; "
            "pass the linear layer's input."
        )
    x3 = x.detach().to(torch.float32)
    if x3.ndim == 2:
        x3 = x3.unsqueeze(0)
    if not torch.isfinite(x3).all():
        raise ValueError("x contains NaN or Inf; run the calibration forward in float32 or bfloat16.")
    if row_weights is not None:
        w = row_weights.detach().to(device=x3.device, dtype=torch.float32)
        if w.shape != x3.shape[:2] and not (x.ndim == 2 and w.shape == x.shape[:1]):
            raise ValueError(
                f"row_weights has shape {tuple(row_weights.shape)} but x has {tuple(x.shape)}; pass one "
                "weight per token, shaped like x without its last dimension."
            )
        x3 = x3 * w.reshape(x3.shape[:2]).unsqueeze(-1)
    flat = x3.reshape(-1, x3.shape[-1])  # (tokens, in)
    return (2.0 / x3.shape[0]) * (flat.T @ flat)


def _upper_inverse_cholesky(hessian: Tensor, percdamp: float) -> tuple[Tensor | None, Tensor]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, or ``None`` if ``H + damp I`` is not PD."""
    # Each (in, in) intermediate is released as soon as the next exists: at in = 12288 (an 8B model's
    # down projection) each is 0.56 GiB, and the block-wise engine's device peak is set here.
    damped = hessian.clone()
    damp = percdamp * torch.mean(torch.diagonal(damped))
    damped.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(damped)
    del damped
    if info.item() != 0:
        return None, damp
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if info.item() != 0 or not torch.isfinite(upper).all():
        return None, damp
    return upper, damp


def _validate(weight: Tensor, hessian: Tensor, blocksize: int, percdamp: float, mask: Tensor | None) -> None:
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"weight must be a 2-D float tensor (out_features, in_features), got {shape}; "
            "flatten convolution kernels and transpose Conv1D weights first."
        )
    cols = weight.shape[1]
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (cols, cols):
        shape = tuple(hessian.shape) if isinstance(hessian, Tensor) else type(hessian).__name__
        raise ValueError(
            f"hessian has shape {shape} but the weight {tuple(weight.shape)} needs ({cols}, {cols}); "
            "pass the Hessian of this layer's input (in_features x in_features)."
        )
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf; the layer is already broken, prune a clean checkpoint.")
    if not torch.isfinite(hessian).all():
        raise ValueError(
            "hessian contains NaN or Inf; accumulate X^T X in float32 and check the calibration inputs."
        )
    if (torch.diagonal(hessian) < 0).any():
        raise ValueError(
            "hessian has negative diagonal entries; it must be positive semi-definite, "
            "e.g. (2/N) * X^T X of the layer inputs."
        )
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer (published default 128), got {blocksize!r}.")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < math.inf:
        raise ValueError(f"percdamp must be a finite number >= 0 (published default 0.01), got {percdamp!r}.")
    if mask is not None and (
        not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape
    ):
        got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"mask must be a bool keep-mask shaped like the weight {tuple(weight.shape)}, got {got}."
        )


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    prune_n: int | None = 0,
    prune_m: int | None = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Prune a linear weight with SparseGPT and return the reconstructed weight and its keep-mask.

    All math runs in float32 on the weight's device; neither input is modified.

    Args:
        weight: ``(out_features, in_features)`` weight, any floating dtype.
        hessian: ``(in_features, in_features)`` Hessian of the layer input, ``(2/N) X^T X``
            (any positive scale gives the same result).
        sparsity: Fraction pruned in ``[0, 1]``. With N:M it must equal ``prune_n / prune_m``.
        prune_n: N of an N:M pattern; 0 or None = unstructured (as :func:`prune.methods.masks.parse_pattern`
            returns).
        prune_m: M of an N:M pattern; ``in_features`` and ``blocksize`` must be multiples of it.
        blocksize: Columns per lazy-update block (published default 128).
        percdamp: Damping as a fraction of ``mean(diag H)`` (published default 0.01).
        mask: Optional fixed bool keep-mask (True = kept). When given, no selection happens and
            only the OBS reconstruction runs (``sparsity`` and N:M are then only validated).

    Returns:
        ``(new_weight, keep_mask)``: the weight in the input dtype with pruned entries exactly zero,
        and a bool mask shaped like it (True = kept). Dead input columns are zero in ``new_weight``
        whatever the mask says (their input is always zero).

    Raises:
        ValueError: On shape mismatches (naming both shapes), NaN/Inf, a negative Hessian
            diagonal, or invalid sparsity/N:M/blocksize/percdamp/mask.
        RuntimeError: If ``H`` stays non-positive-definite after the damping retries.

    Warns:
        UserWarning: For every Cholesky failure that is retried with 10x the damping.

    Example:
        >>> x = torch.randn(256, 8)
        >>> w_new, keep = sparsegpt_prune(torch.randn(4, 8), 2 / 256 * x.T @ x, 0.5, blocksize=4)
        >>> int((~keep).sum()), bool((w_new[~keep] == 0).all())
        (16, True)
    """
    _validate(weight, hessian, blocksize, percdamp, mask)
    rows, cols = weight.shape
    prune_n, prune_m = prune_n or 0, prune_m or 0
    if prune_n or prune_m:
        check_n_m(prune_n, prune_m, sparsity)
        if cols % prune_m != 0:
            raise ValueError(
                f"in_features={cols} is not divisible by M={prune_m}, so {prune_n}:{prune_m} groups do "
                "not tile the row; use unstructured sparsity for this layer or exclude it."
            )
        if blocksize % prune_m != 0:
            raise ValueError(
                f"blocksize={blocksize} is not a multiple of M={prune_m}; N:M groups would straddle "
                f"blocks. Use e.g. blocksize={max(prune_m, blocksize // prune_m * prune_m)}."
            )
    check_sparsity(sparsity)
    n_m = prune_n > 0

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    damp_frac = float(percdamp)
    hinv, damp = _upper_inverse_cholesky(h, damp_frac)
    for _ in range(_DAMP_RETRIES):
        if hinv is not None:
            break
        new_frac = damp_frac * 10 if damp_frac > 0 else _DAMP_FLOOR
        warnings.warn(
            f"SparseGPT: Cholesky of the {cols}x{cols} Hessian failed with percdamp={damp_frac:g} "
            f"(damping {damp.item():.3g}); retrying with percdamp={new_frac:g}. The Hessian is "
            "ill-conditioned: more calibration tokens would help.",
            stacklevel=2,
        )
        damp_frac = new_frac
        hinv, damp = _upper_inverse_cholesky(h, damp_frac)
    if hinv is None:
        raise RuntimeError(
            f"SparseGPT: the {cols}x{cols} Hessian of this ({rows}x{cols}) layer is not positive "
            f"definite even with percdamp={damp_frac:g}; use more calibration data (tokens >> {cols}), "
            "accumulate it in float32, or raise percdamp."
        )
    del h  # only its inverse factor is needed from here on

    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()  # (rows, block), already updated by earlier blocks
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(hinv1)  # (block,)

        if mask is not None:
            prune1 = ~mask[:, i1:i2].to(w.device)
        elif n_m:
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            # OBS saliency w^2 / [H_F^-1]_jj over the whole slab; stable so ties prune lower index.
            score = (w1**2 / d1.unsqueeze(0) ** 2).flatten()
            k = int(score.numel() * sparsity)
            prune1 = torch.zeros(score.numel(), dtype=torch.bool, device=w.device)
            prune1[torch.sort(score, stable=True).indices[:k]] = True
            prune1 = prune1.reshape(rows, count)

        for i in range(count):
            if n_m and mask is None and i % prune_m == 0:
                score = w1[:, i : i + prune_m] ** 2 / d1[i : i + prune_m].unsqueeze(0) ** 2
                smallest = torch.sort(score, dim=1, stable=True).indices[:, :prune_n]
                prune1[:, i : i + prune_m].scatter_(1, smallest, True)
            col = w1[:, i]
            q = col.masked_fill(prune1[:, i], 0.0)
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            # OBS update of the remaining columns of the block (column i itself becomes q).
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err

        w[:, i1:i2] = q1
        keep[:, i1:i2] = ~prune1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    return w.to(weight.dtype), keep
