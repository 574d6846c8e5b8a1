"""Running statistics of one block's linear inputs, accumulated in place in float32 on their device.

The block-wise engine (:mod:`prune.engine.blockwise`) runs one block over every calibration step. Pre-hooks
on the block's linears hand each input to :class:`BlockStatistics`, which keeps, per *input group*
(linears fed the very same tensor, e.g. q/k/v or gate/up, are reduced once), one running sum:

- ``"sumsq"``   (in,)      ``Σ_sequences Σ_t (w x)²``          Wanda's scaler before the mean;
- ``"norms"``   (in,)      ``Σ_sequences ||(w x)_:j||₂``       the public Sink-Aware code's sum of norms;
- ``"hessian"`` (in, in)   ``Σ (w x)(w x)ᵀ``                  SparseGPT, before the ``2/N`` factor;

and ``nsamples``, the number of calibration sequences (sample, step) seen. ``w`` is the step's sink
weight (1 without sink awareness) times the padding mask. Nothing per step is kept: never a list of
Gram matrices. Every accumulator is a plain sum, so adding them across processes (an all-reduce) gives
the statistics of all their data: :meth:`BlockStatistics.tensors` lists them for that.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from attnprobe import row_statistics
from prune.methods.wanda import accumulation_term, finish_norm

KINDS = ("sumsq", "norms", "hessian")
# the input-norm kinds, as prune.methods.wanda names them
_ACCUMULATE = {"sumsq": "wanda", "norms": "reference"}


class InputStatistics:
    """One input group's running sum (``kind``) and sequence count, on the input's device.

    Args:
        members: names of the linears that read this input.
        kind: one of :data:`KINDS`.
    """

    def __init__(self, members: list[str], kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown statistic {kind!r}; choose one of {KINDS}")
        self.members = members
        self.kind = kind
        self.total: Tensor | None = None
        self.nsamples: Tensor | None = None  # a tensor, so that it can be all-reduced with the sums
        self._scaled = False

    @torch.no_grad()
    def add(self, x: Tensor, weights: Tensor) -> None:
        """Add one forward's input ``x`` (batch, tokens, in) with row weights ``weights`` (batch, tokens).

        ``weights`` already holds the padding mask (0 on padding); both are moved to ``x``'s device.
        """
        batch, tokens, width = x.shape
        self.add_rows(x.reshape(-1, width), weights.reshape(-1), None, batch)  # whole samples in order

    @torch.no_grad()
    def add_rows(self, rows: Tensor, weights: Tensor, sample: Tensor | None, batch: int) -> None:
        """Add input rows (n, in) of ``batch`` sequences: row r belongs to sequence ``sample[r]`` (None:
        the sequences one after another, n // batch rows each) and counts with weight ``weights[r]``
        (sink weight times padding mask; an expert's routed rows).

        One reduction (:func:`attnprobe.row_statistics`) and one accumulation (Wanda's
        :func:`prune.methods.wanda.accumulation_term`) for dense linears and experts alike.
        """
        width, device = rows.shape[-1], rows.device
        weights = weights.to(device=device, dtype=torch.float32)
        if self.total is None:
            shape = (width, width) if self.kind == "hessian" else (width,)
            self.total = torch.zeros(shape, dtype=torch.float32, device=device)
            self.nsamples = torch.zeros((), dtype=torch.float32, device=device)
        if self.kind == "hessian":  # Σ (w x)(w x)ᵀ, summed in place where the accumulator lives
            into = {"gram": self.total} if self.total.device == device else None
            gram = row_statistics(rows, sample, batch, grams={"gram": weights}, into=into)["gram"]
            if into is None:
                self.total.add_(gram.to(self.total.device))
        else:  # Σ_t (w x)² per sequence, then Wanda's accumulation over sequences
            per_seq = row_statistics(rows, sample, batch, squares={"sumsq": weights.square()})["sumsq"]
            self.total.add_(accumulation_term(per_seq, _ACCUMULATE[self.kind]).to(self.total.device))
        self.nsamples.add_(batch)

    def norm(self) -> Tensor:
        """Wanda's input norm: ``sqrt(mean sumsq)`` or the sum of norms; (in,) float32."""
        if self.kind not in _ACCUMULATE:
            raise RuntimeError("a Hessian accumulator has no input norm")
        return finish_norm(self.total, self.nsamples, _ACCUMULATE[self.kind])

    def hessian(self) -> Tensor:
        """SparseGPT's ``H = 2/N · Σ x̃ x̃ᵀ`` (in, in) float32, scaled in place once (no copy)."""
        if self.kind != "hessian":
            raise RuntimeError(f"a {self.kind!r} accumulator has no Hessian")
        if not self._scaled:  # the members of a group (q, k, v) share one Hessian
            self.total.mul_(2.0 / float(self.nsamples.clamp(min=1)))
            self._scaled = True
        return self.total


class BlockStatistics:
    """The input statistics of one block's linears, gathered while the block runs over the steps.

    Args:
        linears: ``{name: module}`` of the block's linears to measure.
        kind: the statistic every group accumulates (:data:`KINDS`).

    Example:
        >>> q, k = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        >>> stats = BlockStatistics({"q": q, "k": k}, "sumsq")
        >>> x = torch.ones(2, 3, 4)  # (batch, tokens, in): one step's input of both linears
        >>> with stats.hooks():
        ...     stats.begin_step(torch.ones(2, 3)); _ = q(x), k(x)
        >>> # one group (q and k read one tensor); norm = sqrt(mean over sequences of Σ_t x²)
        >>> stats.of("k") is stats.of("q"), stats.of("k").norm().tolist()
        (True, [1.7320507764816284, 1.7320507764816284, 1.7320507764816284, 1.7320507764816284])
    """

    def __init__(self, linears: dict[str, nn.Module], kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown statistic {kind!r}; choose one of {KINDS}")
        self.linears = linears
        self.kind = kind
        self.groups: dict[str, InputStatistics] = {}  # first member's name -> its group
        self._group_of: dict[str, str] = {}
        self._weights: Tensor | None = None
        self._seen: dict[int, tuple[str, weakref.ref]] = {}

    last = True  # one pass measures everything (prune.engine.block_experts splits experts into several)

    def passes(self) -> Iterator[BlockStatistics]:
        """The passes the block runs over the steps for these statistics: one, measuring every linear."""
        yield self

    def measures(self, name: str) -> bool:
        """Whether the current pass measures ``name``."""
        return name in self.linears

    def begin_step(self, weights: Tensor) -> None:
        """Row weights (batch, tokens) of the next forward: sink weight times padding mask."""
        self._weights = weights
        self._seen = {}

    def _on_input(self, name: str, args: tuple) -> None:
        if not args or not isinstance(args[0], Tensor) or self._weights is None:
            return
        x = args[0]
        # Linears fed the very same tensor form one group, reduced once. The weak reference guards
        # against a freed tensor's id being reused by a later input.
        hit = self._seen.get(id(x))
        if hit is not None and hit[1]() is x:
            group = hit[0]
            if name not in self._group_of:
                self._group_of[name] = group
                self.groups[group].members.append(name)
            return
        self._seen[id(x)] = (name, weakref.ref(x))
        group = self._group_of.setdefault(name, name)
        if group not in self.groups:
            self.groups[group] = InputStatistics([name], self.kind)
        if x.dim() != 3 or tuple(x.shape[:2]) != tuple(self._weights.shape):
            raise RuntimeError(
                f"{name} got input of shape {tuple(x.shape)}, not (batch, tokens, features) with (batch, "
                f"tokens) = {tuple(self._weights.shape)}; block-wise statistics need token-aligned inputs"
            )
        self.groups[group].add(x.detach(), self._weights)

    @contextmanager
    def hooks(self) -> Iterator[BlockStatistics]:
        """Attach pre-hooks on the linears for the duration of the block; removed whatever happens."""
        handles = [
            module.register_forward_pre_hook(lambda m, a, n=name: self._on_input(n, a))
            for name, module in self.linears.items()
        ]
        try:
            yield self
        finally:
            while handles:
                handles.pop().remove()

    def of(self, name: str) -> InputStatistics | None:
        """The statistics that ``name`` reads, or None if it never ran."""
        group = self._group_of.get(name)
        return self.groups.get(group) if group is not None else None

    def tensors(self) -> list[Tensor]:
        """Every accumulator, in a fixed order (group insertion order): sums an all-reduce may add."""
        out = []
        for group in self.groups.values():
            out += [group.total, group.nsamples]
        return out
