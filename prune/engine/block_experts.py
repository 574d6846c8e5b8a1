"""Per-expert statistics inside the block-wise engine: one block's routed experts, accumulated in place.

:class:`ExpertBlockStatistics` is a :class:`prune.block_stats.BlockStatistics` that also measures
the block's routed experts (:mod:`attnprobe.experts`): while the block runs over the cached inputs of
every step, one hook per MoE layer captures its hidden states and routing, and each expert's input
groups (gate/up input, down input) accumulate the same running sums as a linear's (``sumsq``,
``norms`` or ``hessian``, rows weighted by the step's sink weight times padding), over exactly the
tokens routed to that expert. Every expert group exists from the start, with zero sums, so that all
processes of a data-parallel run hold the same accumulators (an all-reduce adds them); an expert no
row with a non-zero weight reached is :meth:`~ExpertBlockStatistics.starved` (pruned by magnitude).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from attnprobe import discover_experts, expert_weight
from attnprobe.layout import experts as moe
from prune.engine.block_stats import BlockStatistics, InputStatistics


class ExpertBlockStatistics(BlockStatistics):
    """The statistics of one block's selected linears and routed experts.

    Args:
        block: a :class:`prune.blockwise.Block` (its ``linears`` may name fused expert slices).
        kind: ``"sumsq"``, ``"norms"`` or ``"hessian"``.
    """

    def __init__(self, block, kind: str) -> None:
        self._prefix = f"{block.name}." if block.name else ""
        self._block = block.module
        self._modules = dict(block.module.named_modules())
        selected = set(block.linears)
        self._sets = [
            es for es in discover_experts(block.module)
            if any(self._prefix + n in selected for n in es.weight_names())
        ]
        experts = {self._prefix + n for es in self._sets for n in es.weight_names()}
        super().__init__({n: m for n, m in block.linears.items() if n not in experts}, kind)
        self._routed: dict[str, Tensor] = {}  # expert group -> tokens with a non-zero row weight
        for es in self._sets:
            for expert in range(es.num_experts):
                for group, members in es.groups(expert).items():
                    self._add_group(group, members)

    def _add_group(self, group: str, members: list[str]) -> None:
        weight = expert_weight(self._block, members[0], self._modules)  # (out, in)
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
        if weights is None:
            return
        if hidden.shape[0] != weights.numel():
            raise RuntimeError(
                f"{self._prefix}{es.name} got {hidden.shape[0]} rows, not batch · tokens = "
                f"{tuple(weights.shape)}; block-wise expert statistics need token-aligned hidden states"
            )
        weights = weights.to(hidden.device, torch.float32)
        valid = torch.ones(weights.shape, dtype=torch.bool, device=hidden.device)  # padding: weight 0
        nothing = torch.zeros((0, 2), dtype=torch.long, device=hidden.device)
        out = moe.reduce_experts(
            self._modules, es, hidden, index, valid, weights, nothing, hessians=self.kind == "hessian"
        )
        # Tokens per expert among the rows that count (non-zero weight); top-k experts are distinct.
        chosen = index.reshape(weights.numel(), -1)[weights.reshape(-1) > 0].reshape(-1)
        chosen = chosen[(chosen >= 0) & (chosen < es.num_experts)]
        counts = torch.bincount(chosen, minlength=es.num_experts).to(torch.float32)
        for group, stats in out.items():
            target = self.groups[self._prefix + group]
            if self.kind == "hessian":
                target.total.add_(stats["weighted"])
            elif self.kind == "sumsq":
                target.total.add_(stats["wsumsq"].sum(0))
            else:
                target.total.add_(stats["wsumsq"].sqrt().sum(0))
            target.nsamples.add_(weights.shape[0])
        for expert in range(es.num_experts):
            for group in es.groups(expert):
                routed = self._routed[self._prefix + group]
                routed.add_(counts[expert].to(routed.device))

    def _unread(self, es) -> None:
        raise RuntimeError(
            f"could not read the hidden states and routing of {self._prefix}{es.name} while its block ran"
        )

    @contextmanager
    def hooks(self) -> Iterator[ExpertBlockStatistics]:
        """The linears' pre-hooks and one routing hook per MoE layer; removed whatever happens."""
        with super().hooks():
            handles = moe.attach(self._block, self._sets, self._on_routing, self._unread)
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
