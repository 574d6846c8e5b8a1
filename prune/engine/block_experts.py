"""Per-expert statistics inside the block-wise engine: one block's routed experts, a bounded group at a time.

:class:`ExpertBlockStatistics` is a :class:`prune.engine.block_stats.BlockStatistics` that also measures
the block's routed experts (:mod:`attnprobe.layout.experts`): while the block runs over the cached inputs of
every step, one hook per MoE layer captures its hidden states and routing, and each expert's input
groups (gate/up input, down input) accumulate the same running sums as a linear's (``sumsq``,
``norms`` or ``hessian``, rows weighted by the step's sink weight times padding), over exactly the
tokens routed to that expert. Each expert's rows are reduced straight into its accumulator, one expert
after another: no per-step statistics of all experts at once, and no unweighted Gram matrix.

**Passes.** An expert's Hessians are (H² + I²) float32 (17 MiB at hidden 2048, expert width 512): all
256 experts of one LLaDA2.0-mini block would hold 4.3 GiB. The experts are therefore split into passes
whose accumulators fit :data:`EXPERT_PASS_BYTES`; :meth:`~ExpertBlockStatistics.passes` yields the
statistics once per pass, the engine runs the block over every step in each, and the caller plans the
linears that pass measured (:meth:`~ExpertBlockStatistics.measures`) and frees the pass's sums before
the next. The first pass also measures the block's ordinary linears (attention, shared experts). No
weight of the block changes until its last pass (:attr:`~ExpertBlockStatistics.last`), so every pass
sees the dense block, as one pass would. The input-norm kinds (``sumsq``, ``norms``) are vectors: one
pass holds every expert.

Within a pass every expert group exists from the start, with zero sums, so that all processes of a
data-parallel run hold the same accumulators (an all-reduce adds them); an expert no row with a
non-zero weight reached is :meth:`~ExpertBlockStatistics.starved` (pruned by magnitude).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from attnprobe import attach_expert_hooks, discover_experts, expert_activation, expert_weight, routed_rows
from prune.engine.block_stats import BlockStatistics, InputStatistics

# The float32 expert accumulators one pass may hold, on the block's device.
EXPERT_PASS_BYTES = 2 * 2**30


def expert_passes(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of experts whose accumulator ``sizes`` (bytes) fit ``budget``; ≥ 1 expert each.

    Example:
        >>> expert_passes([3, 3, 3, 3, 3], 7)
        [[0, 1], [2, 3], [4]]
    """
    passes: list[list[int]] = []
    used = budget + 1
    for index, size in enumerate(sizes):
        if used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(index)
        used += size
    return passes


class ExpertBlockStatistics(BlockStatistics):
    """The statistics of one block's selected linears and routed experts, in bounded passes.

    Args:
        block: a :class:`prune.engine.blockwise.Block` (its ``linears`` may name fused expert slices).
        kind: ``"sumsq"``, ``"norms"`` or ``"hessian"``.
        pass_bytes: the float32 expert accumulators one pass may hold (default
            :data:`EXPERT_PASS_BYTES`).
    """

    def __init__(self, block, kind: str, pass_bytes: int | None = None) -> None:
        self._prefix = f"{block.name}." if block.name else ""
        self._block = block.module
        self._modules = dict(block.module.named_modules())
        selected = set(block.linears)
        self._sets = [
            es
            for es in discover_experts(block.module)
            if any(self._prefix + n in selected for n in es.weight_names())
        ]
        experts = {self._prefix + n for es in self._sets for n in es.weight_names()}
        super().__init__({n: m for n, m in block.linears.items() if n not in experts}, kind)
        self._routed: dict[str, Tensor] = {}  # expert group -> tokens with a non-zero row weight
        self._members: dict[str, list[str]] = {}  # expert group -> its weight names
        self._current: dict[str, list[int]] = {}  # expert set name -> its experts in this pass
        every = [(es, expert) for es in self._sets for expert in range(es.num_experts)]
        sizes = [self._expert_bytes(es, expert) for es, expert in every]
        budget = EXPERT_PASS_BYTES if pass_bytes is None else pass_bytes
        if kind != "hessian":
            budget = max(sum(sizes), 1)  # vectors: one pass
        self._plan = [[every[i] for i in run] for run in expert_passes(sizes, budget)] or [[]]
        self.last = len(self._plan) == 1

    def _expert_bytes(self, es, expert: int) -> int:
        total = 0
        for members in es.groups(expert).values():
            width = expert_weight(self._block, members[0], self._modules).shape[1]
            total += 4 * (width * width if self.kind == "hessian" else width)
        return total

    def passes(self) -> Iterator[ExpertBlockStatistics]:
        """Yield these statistics once per pass, each time holding that pass's expert groups only."""
        for number, members in enumerate(self._plan):
            if number:  # the ordinary linears were measured in the first pass
                self.linears = {}
            self.groups, self._group_of, self._routed, self._current = {}, {}, {}, {}
            for es, expert in members:
                self._current.setdefault(es.name, []).append(expert)
                for group, names in es.groups(expert).items():
                    self._add_group(group, names)
            self.last = number == len(self._plan) - 1
            yield self
        self.groups, self._group_of, self._routed = {}, {}, {}

    def measures(self, name: str) -> bool:
        """Whether the current pass measures ``name`` (an ordinary linear in the first pass, or an expert)."""
        return name in self._group_of or name in self.linears

    def _add_group(self, group: str, members: list[str]) -> None:
        weight = expert_weight(self._block, members[0], self._modules)  # (out, in), once onloaded
        stats = InputStatistics([self._prefix + m for m in members], self.kind)
        width = weight.shape[1]
        shape = (width, width) if self.kind == "hessian" else (width,)
        stats.total = torch.zeros(shape, dtype=torch.float32, device=weight.device)
        stats.nsamples = torch.zeros((), dtype=torch.float32, device=weight.device)
        name = self._prefix + group
        self.groups[name] = stats
        for member in members:
            self._group_of[self._prefix + member] = name
        self._routed[name] = torch.zeros((), dtype=torch.float32, device=weight.device)

    def _on_routing(self, es, hidden: Tensor, index: Tensor) -> None:
        weights = self._weights
        if weights is None or es.name not in self._current:
            return
        if hidden.shape[0] != weights.numel():
            raise RuntimeError(
                f"{self._prefix}{es.name} got {hidden.shape[0]} rows, not batch · tokens = "
                f"{tuple(weights.shape)}; block-wise expert statistics need token-aligned hidden states"
            )
        batch, tokens = weights.shape
        flat_w = weights.reshape(-1).to(hidden.device, torch.float32)
        routed = routed_rows(index.to(hidden.device), es.num_experts)
        for expert in self._current[es.name]:
            rows = routed[expert]
            w, sample = flat_w[rows], rows // tokens
            (first, _), (down, _) = es.groups(expert).items()
            x = hidden[rows]  # (routed rows, H)
            self._reduce(first, x, w, sample, batch)
            with torch.no_grad():
                h = expert_activation(self._modules, es, expert, x)  # (routed rows, I)
            self._reduce(down, h, w, sample, batch)
            count = (w > 0).sum().to(torch.float32)
            for group in (first, down):
                self._routed[self._prefix + group].add_(count.to(self._routed[self._prefix + group].device))

    def _reduce(self, group: str, x: Tensor, w: Tensor, sample: Tensor, batch: int) -> None:
        """Add one expert's routed rows ``x`` (n, in) with row weights ``w`` (n,) to its group's sums."""
        self.groups[self._prefix + group].add_rows(x, w, sample, batch)

    def _unread(self, es) -> None:
        raise RuntimeError(
            f"could not read the hidden states and routing of {self._prefix}{es.name} while its block ran"
        )

    @contextmanager
    def hooks(self) -> Iterator[ExpertBlockStatistics]:
        """The linears' pre-hooks and one routing hook per MoE layer; removed whatever happens."""
        with super().hooks():
            handles = attach_expert_hooks(self._block, self._sets, self._on_routing, self._unread)
            try:
                yield self
            finally:
                while handles:
                    handles.pop().remove()

    def starved(self, name: str) -> bool:
        """Whether ``name`` is an expert weight that no weighted calibration row reached."""
        group = self._group_of.get(name)
        return group in self._routed and float(self._routed[group]) == 0

    def tensors(self) -> list[Tensor]:
        """The sums of :class:`BlockStatistics` and the per-expert token counts."""
        return super().tensors() + list(self._routed.values())
