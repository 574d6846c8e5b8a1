"""Training-free mask refinement by 1-swaps under the Gram matrix (SparseSwaps, arXiv 2512.10922).

After magnitude, Wanda or SparseGPT chose a mask, each output row ``i`` has residual
``r = w − ŵ`` (``w`` dense, ``ŵ`` pruned) and reconstruction error ``e = r G rᵀ`` with ``G = XᵀX``
(sink-weighted when sink-aware). Rows are independent under per-row sparsity, so every row is refined
on its own, all rows at once in torch. A *1-swap* restores a pruned weight ``p`` (``ŵ_p ← w_p``, its
residual ``r_p → 0``) and prunes a kept weight ``q`` (``ŵ_q → 0``, residual ``r_q → r_q + ŵ_q``). With
``g = G rᵀ`` its exact change of the row's error is

    Δ(p, q) = a_p + b_q − 2 r_p ŵ_q G_pq,   a_p = r_p² G_pp − 2 r_p g_p,   b_q = ŵ_q² G_qq + 2 ŵ_q g_q,

and ``g`` is updated in O(in) per accepted swap. Each iteration applies, in every row still improving,
the swap with the most negative ``Δ`` among the ``candidates`` best ``p`` (smallest ``a_p``) times the
``candidates`` best ``q`` (smallest ``b_q``); this is SparseSwaps' exact 1-swap criterion with its
pair search restricted to those ``candidates²`` pairs (all pairs when ``candidates`` covers the row),
which makes an iteration ``O(rows · in)`` instead of ``O(rows · in²)``. A row stops when its best
swap no longer lowers its error; the pass stops after ``iterations`` iterations or ``seconds``.

Per-row counts never change (a swap restores one weight and prunes one). For ``N:M`` the swap stays
inside one group of ``M`` consecutive inputs (every pair of the group is searched exactly), so the
pattern is kept. For SparseGPT, whose kept weights were updated, the mask is refined the same way on
its weights, then the kept weights are solved again for the new mask (SparseGPT's reconstruction with
a fixed mask); a layer keeps whichever of the two results has the lower error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RefineSettings:
    """How :func:`refine_mask` searches.

    Attributes:
        iterations: at most this many swaps per row.
        candidates: pruned and kept candidates per side searched per iteration (unstructured).
        seconds: stop a layer's refinement after this wall time (None: no limit).
    """

    iterations: int = 30
    candidates: int = 16
    seconds: float | None = None

    def check(self) -> RefineSettings:
        """Validate; returns self."""
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(
                f"refine_iterations must be an integer >= 0 (swaps per row), got {self.iterations!r}"
            )
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"refine_candidates must be an integer >= 1, got {self.candidates!r}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"refine_seconds must be > 0 or None, got {self.seconds!r}")
        return self


# A swap must lower the row's error by more than this fraction of it: float noise is no improvement.
_RELATIVE_TOLERANCE = 1e-6


def _gains(c: Tensor, mask: Tensor, g: Tensor, diag: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` (restore p) on pruned entries and ``b`` (prune q) on kept ones, +inf elsewhere.

    Both are ``c² G_jj + 2 c g_j`` with ``c = −r`` on pruned entries and ``c = ŵ`` on kept ones.
    """
    a = c * diag  # in place from here: these (rows, in) temporaries are an iteration's cost
    a.add_(g, alpha=2).mul_(c)
    b = a.masked_fill(~mask, float("inf"))
    return a.masked_fill_(mask, float("inf")), b


def _best_unstructured(c, mask, g, gram, diag, candidates):
    """Per row: (Δ, p, q) of the best swap among the top candidates of each side."""
    a, b = _gains(c, mask, g, diag)
    # Rows may prune different counts (SparseGPT chooses per block of columns): a row with fewer
    # candidates than k gets +inf entries, whose swaps are never taken.
    pruned = (~mask).sum(dim=1)
    k_p = min(candidates, int(pruned.max()))
    k_q = min(candidates, int((mask.shape[1] - pruned).max()))
    a_top, p_idx = torch.topk(a, k_p, dim=1, largest=False)  # (rows, k_p)
    b_top, q_idx = torch.topk(b, k_q, dim=1, largest=False)  # (rows, k_q)
    pair = gram[p_idx.unsqueeze(2), q_idx.unsqueeze(1)]  # (rows, k_p, k_q)
    c_p = c.gather(1, p_idx).unsqueeze(2)
    c_q = c.gather(1, q_idx).unsqueeze(1)
    delta = a_top.unsqueeze(2) + b_top.unsqueeze(1) + 2 * c_p * c_q * pair
    best, flat = delta.flatten(1).min(dim=1)
    p = p_idx.gather(1, (flat // k_q).unsqueeze(1)).squeeze(1)
    q = q_idx.gather(1, (flat % k_q).unsqueeze(1)).squeeze(1)
    return best, p, q


def _best_n_m(c, mask, g, gram, diag, m):
    """Per row: (Δ, p, q) of the best swap inside one group of ``m`` consecutive inputs."""
    rows, cols = c.shape
    a, b = _gains(c, mask, g, diag)
    groups = cols // m
    base = torch.arange(groups, device=c.device).mul_(m).view(1, groups, 1)
    # Within a group, the stable sort puts its pruned entries first (False < True).
    order = torch.sort(mask.view(rows, groups, m).to(torch.int8), dim=2, stable=True).indices + base
    n = int((~mask[0, :m]).sum())
    p_idx, q_idx = order[..., :n], order[..., n:]  # (rows, groups, n), (rows, groups, m − n)
    flat_p, flat_q = p_idx.reshape(rows, -1), q_idx.reshape(rows, -1)
    a_p = a.gather(1, flat_p).view(rows, groups, n, 1)
    b_q = b.gather(1, flat_q).view(rows, groups, 1, m - n)
    c_p = c.gather(1, flat_p).view(rows, groups, n, 1)
    c_q = c.gather(1, flat_q).view(rows, groups, 1, m - n)
    pair = gram[p_idx.unsqueeze(3), q_idx.unsqueeze(2)]  # (rows, groups, n, m − n)
    delta = (a_p + b_q + 2 * c_p * c_q * pair).flatten(1)
    best, flat = delta.min(dim=1)
    group, rest = flat // (n * (m - n)), flat % (n * (m - n))
    p = p_idx.reshape(rows, -1).gather(1, (group * n + rest // (m - n)).unsqueeze(1)).squeeze(1)
    q = q_idx.reshape(rows, -1).gather(1, (group * (m - n) + rest % (m - n)).unsqueeze(1)).squeeze(1)
    return best, p, q


@torch.no_grad()
def refine_mask(
    weight: Tensor,
    pruned: Tensor,
    mask: Tensor,
    gram: Tensor,
    *,
    n_m: tuple[int, int] | None = None,
    settings: RefineSettings = RefineSettings(),
) -> tuple[Tensor, Tensor, int]:
    """Refine ``mask`` by error-lowering 1-swaps within rows; returns (new mask, new pruned weight, swaps).

    Args:
        weight: dense weight ``w`` (out, in), any floating dtype.
        pruned: the pruned weight ``ŵ`` (zero where pruned; SparseGPT's updated values where kept).
        mask: bool keep-mask (out, in), True = kept; every row prunes the same count (and, with
            ``n_m``, ``N`` of every group of ``M``).
        gram: ``XᵀX`` (in, in) of the layer's inputs (sink-weighted for sink-aware pruning).
        n_m: ``(N, M)`` to keep swaps inside groups of ``M`` consecutive inputs.
        settings: iteration, candidate and time bounds.

    Returns:
        The refined keep-mask (bool), the pruned weight it implies (float32: restored entries take
        their dense value, newly pruned ones are zero, others unchanged) and the number of swaps made.

    Example:
        >>> w = torch.tensor([[1.0, 1.0]]); g = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> keep, new_w, swaps = refine_mask(w, torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]), g)
        >>> keep.tolist(), swaps
        ([[False, True]], 1)
    """
    settings.check()
    device = weight.device
    gram = gram.to(device=device, dtype=torch.float32)
    dense = weight.to(torch.float32)
    mask = mask.to(device).clone()
    kept = pruned.to(device=device, dtype=torch.float32) * mask
    g = (dense - kept) @ gram  # (rows, in): G r for every row; G is symmetric
    error = ((dense - kept) * g).sum(dim=1)
    c = torch.where(mask, kept, kept - dense)  # −r on pruned entries, ŵ on kept ones
    del kept
    diag = torch.diagonal(gram)
    pruned_per_row = (~mask).sum(dim=1)
    if not bool(((pruned_per_row > 0) & (pruned_per_row < mask.shape[1])).any()):
        return mask, c * mask, 0  # no row has both a pruned and a kept weight: nothing to swap
    rows_all = torch.arange(c.shape[0], device=device)
    start, swaps = time.perf_counter(), 0
    for _ in range(settings.iterations):
        if settings.seconds is not None and time.perf_counter() - start > settings.seconds:
            break
        best, p, q = (
            _best_n_m(c, mask, g, gram, diag, n_m[1])
            if n_m
            else _best_unstructured(c, mask, g, gram, diag, settings.candidates)
        )
        better = best < -_RELATIVE_TOLERANCE * error.clamp(min=0)
        if not bool(better.any()):
            break
        # Rows without an improving swap add nothing: their coefficients are zeroed, no copies.
        c_p = torch.where(better, c[rows_all, p], 0.0)  # residual change at p (−r_p → 0)
        c_q = torch.where(better, c[rows_all, q], 0.0)  # residual change at q (+ŵ_q)
        g.addcmul_(c_p.unsqueeze(1), gram[p]).addcmul_(c_q.unsqueeze(1), gram[q])
        error += torch.where(better, best, 0.0)
        rows, p, q = rows_all[better], p[better], q[better]
        c[rows, p] = dense[rows, p]
        c[rows, q] = -dense[rows, q]
        mask[rows, p] = True
        mask[rows, q] = False
        swaps += int(rows.numel())
    return mask, c * mask, swaps


def finish_plan(
    weight: Tensor,
    mask: Tensor,
    new_weight: Tensor | None,
    gram: Tensor,
    *,
    n_m: tuple[int, int] | None,
    settings: RefineSettings | None,
    resolve=None,
) -> tuple[Tensor, Tensor | None, dict[str, float]]:
    """Refine a planned mask (when ``settings`` is given) and measure the layer's relative error.

    Args:
        weight: the dense weight.
        mask, new_weight: the method's plan (``new_weight`` is SparseGPT's, else None).
        gram: ``XᵀX`` of the layer's inputs.
        n_m: ``(N, M)`` for N:M masks.
        settings: refinement bounds, or None to only measure.
        resolve: for SparseGPT, ``mask -> weight`` re-solving the kept weights for a fixed mask.

    Returns:
        ``(mask, new_weight, report columns)``: ``error`` and, when refining, ``error_before`` and
        ``swaps``. A refined plan is kept only if its error is lower (SparseGPT's re-solve may not be).
    """
    from prune.methods.layer_error import masked, relative_error

    pruned = masked(weight, mask, new_weight)
    before = relative_error(weight, pruned, gram)
    if settings is None:
        return mask, new_weight, {"error": before}
    new_mask, refined, swaps = refine_mask(weight, pruned, mask, gram, n_m=n_m, settings=settings)
    options = [(before, mask, new_weight)]
    if swaps:
        values = refined if new_weight is not None else None  # Wanda/magnitude: the mask says it all
        options.append((relative_error(weight, refined, gram), new_mask, values))
        if resolve is not None:
            solved = resolve(new_mask)
            options.append((relative_error(weight, masked(solved, new_mask), gram), new_mask, solved))
    error, mask, new_weight = min(options, key=lambda option: option[0])
    if new_weight is not None:
        new_weight = new_weight.to(weight.dtype)
    return mask, new_weight, {"error_before": before, "error": error, "swaps": swaps}
