"""The one reduction of linear-input rows: per-sample weighted sums of squares (and plain sums) and
weighted Gram matrices, in float32, chunked so that a bf16 activation's float32 temporaries stay bounded.

Every statistic Wanda and SparseGPT read is one of these two shapes, whoever computes it: the
recorder for a block linear's input (:func:`attnprobe.reduce_inputs`), the recorder and the block-wise
engine for the rows routed to one expert, and the block-wise engine's running sums. Which rows count
and how much is said by per-row weights, so padding, sink weights and routing are the caller's
choice and the arithmetic is written once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

# Rows reduced at once: bounds the float32 temporaries (rows x features) of a bf16 activation.
ROWS_PER_CHUNK = 4096

__all__ = ["ROWS_PER_CHUNK", "row_statistics"]


def row_statistics(
    rows: Tensor,
    sample: Tensor | None,
    batch: int,
    *,
    squares: Mapping[str, Tensor] | None = None,
    sums: Mapping[str, Tensor] | None = None,
    grams: Mapping[str, Tensor] | None = None,
    into: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Weighted per-sample sums of squares, weighted per-sample sums and weighted Gram matrices of ``rows``.

    Args:
        rows: (n, in) input rows, any float dtype.
        sample: (n,) int64, the sample (0 .. batch - 1) each row belongs to; None when the rows are the
            samples one after another, ``n // batch`` rows each (a dense input): per-sample sums are then
            batched matvecs over whole samples, with no selector to build.
        batch: the number of samples.
        squares: ``{name: c}`` with ``c`` (n,) row weights: ``out[name][b, j] = Σ_{r in b} c_r · x_rj²``,
            shape (batch, in).
        sums: ``{name: c}`` likewise without the square: ``out[name][b, j] = Σ_{r in b} c_r · x_rj``.
        grams: ``{name: g}`` with ``g`` (n,) row weights: ``out[name] = Σ_r (g_r x_r)(g_r x_r)ᵀ``,
            shape (in, in).
        into: existing float32 accumulators on ``rows``' device to add to, by name, instead of new
            zeros (a running Gram matrix is summed in place: no second (in, in) buffer).

    Returns:
        The requested statistics, float32 on ``rows``' device.

    Example:
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
        >>> c = torch.tensor([1.0, 0.5, 2.0])
        >>> out = row_statistics(x, torch.tensor([0, 0, 1]), 2, squares={"q": c}, sums={"s": c},
        ...                      grams={"g": torch.ones(3)})
        >>> out["q"].tolist(), out["s"].tolist(), out["g"].tolist()
        ([[5.5, 4.0], [0.0, 2.0]], [[2.5, 2.0], [0.0, 2.0]], [[10.0, 2.0], [2.0, 5.0]])
        >>> running = torch.eye(2)  # summed into in place
        >>> sample = torch.tensor([0, 0, 1])
        >>> out = row_statistics(x, sample, 2, grams={"g": torch.ones(3)}, into={"g": running})
        >>> out["g"] is running
        True
        >>> running.tolist()
        [[11.0, 2.0], [2.0, 6.0]]
    """
    width, device = rows.shape[-1], rows.device

    def as_f32(weights: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        return {name: c.to(device=device, dtype=torch.float32) for name, c in (weights or {}).items()}

    squares, sums, grams = as_f32(squares), as_f32(sums), as_f32(grams)
    out = {
        name: torch.zeros((batch, width), dtype=torch.float32, device=device) for name in [*squares, *sums]
    }
    out.update({name: torch.zeros((width, width), dtype=torch.float32, device=device) for name in grams})
    out.update(into or {})
    tokens = rows.shape[0] // max(batch, 1) if sample is None else None
    chunk = max(1, ROWS_PER_CHUNK // max(tokens, 1)) * tokens if tokens else ROWS_PER_CHUNK
    sample = None if sample is None else sample.to(device)
    for r0 in range(0, rows.shape[0], chunk):
        part = slice(r0, r0 + chunk)
        xs = rows[part].to(torch.float32)
        for values, weights in ((xs.square(), squares), (xs, sums)):
            chosen = {n: c[part] for n, c in weights.items()}
            if not chosen:
                continue
            if tokens:
                _add_whole_samples(out, values, r0 // tokens, tokens, chosen)
            else:
                _add_sample_sums(out, values, sample[part], batch, chosen)
        for name, g in grams.items():
            gx = xs * g[part, None]
            out[name].addmm_(gx.T, gx)
    return out


def _add_whole_samples(out: dict[str, Tensor], values: Tensor, first: int, tokens: int, weights) -> None:
    """Add ``Σ_t c[b, t] · values[b, t]`` for the whole samples ``first ..`` that ``values`` holds, as a
    batched matvec (batch, 1, tokens) x (batch, tokens, in): no (rows, in) temporary."""
    count = values.shape[0] // tokens
    grid = values.view(count, tokens, -1)
    for name, c in weights.items():
        out[name][first : first + count] += torch.bmm(c.view(count, 1, tokens), grid).squeeze(1)


def _add_sample_sums(out: dict[str, Tensor], values: Tensor, sample: Tensor, batch: int, weights) -> None:
    """Add ``Σ_{r in b} c_r · values_r`` for every weight vector as one small matmul (deterministic on every
    device, unlike an ``index_add_``): row ``k · batch + b`` of the selector carries the k-th weight
    of the rows of sample b."""
    names = list(weights)
    selector = values.new_zeros((len(names) * batch, values.shape[0]))
    column = torch.arange(values.shape[0], device=values.device)
    for k, name in enumerate(names):
        selector[k * batch + sample, column] = weights[name]
    totals = selector @ values
    for k, name in enumerate(names):
        out[name] += totals[k * batch : (k + 1) * batch]
