"""Per-expert statistics of one forward of one MoE layer: each expert's two input groups (gate/up, down)
reduced over exactly the rows routed to it, each row with its own token's sink weight and padding flag
(:func:`attnprobe.recording.linear_stats.weighted_statistics`), plus the routed-token count, the
candidate rows routed to it and REAP's saliency sums (:mod:`attnprobe.recording.expert_saliency`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnprobe.layout.experts import ExpertSet, expert_activation, routed_rows
from attnprobe.recording.expert_saliency import routed_slots, router_weights, saliency_sums
from attnprobe.recording.linear_stats import weighted_statistics


def _reduce_rows(
    x: Tensor,
    rows: Tensor,
    tokens: int,
    batch: int,
    valid: Tensor,
    weights: Tensor,
    cand_flat: Tensor,
    hessians: bool,
) -> dict[str, Tensor]:
    """One expert input group: statistics over its routed ``rows`` (indices into batch · tokens)."""
    sample = rows // tokens
    keep = valid[rows].to(torch.float32)
    out = weighted_statistics(x, sample, batch, keep, weights[rows], hessians=hessians, means=False)
    out["tokens"] = x.new_zeros((batch,), dtype=torch.float32).index_add_(0, sample, keep)
    # Candidate tokens routed here: their squared rows, and where they sit in the step's candidates.
    where = torch.full((batch * tokens,), -1, dtype=torch.long, device=x.device)
    where[rows] = torch.arange(rows.numel(), device=x.device)
    at = where[cand_flat]
    sel = (at >= 0).nonzero().squeeze(1)
    out["cand_rows"] = x[at[sel]].to(torch.float32).square()
    out["cand_sel"] = sel
    return out


def reduce_experts(
    model_modules: dict[str, nn.Module],
    es: ExpertSet,
    hidden: Tensor,
    index: Tensor,
    valid: Tensor,
    weights: Tensor,
    candidates: Tensor,
    *,
    hessians: bool = False,
) -> dict[str, dict[str, Tensor]]:
    """Per-expert statistics of one forward of one MoE layer (module docstring).

    Args:
        model_modules: ``dict(model.named_modules())``.
        es: the layer's :class:`ExpertSet`.
        hidden: (batch · tokens, H) captured hidden states; index: (batch · tokens, k) routing.
        valid: bool (batch, tokens); weights: float (batch, tokens) sink weights ``w = 1 − s``.
        candidates: int64 (n, 2) rows (sample, token) of the step's candidate tokens.
        hessians: also the per-expert Gram matrices.

    Returns:
        ``{group name: statistics}`` for the two input groups of every expert.
    """
    batch, tokens = valid.shape
    if hidden.shape[0] != batch * tokens:
        raise ValueError(
            f"{es.name}: {hidden.shape[0]} routed rows, expected batch · tokens = {batch * tokens}"
        )
    flat_valid = valid.reshape(-1).to(hidden.device)
    flat_w = weights.reshape(-1).to(hidden.device)
    cand = candidates.to(hidden.device)
    cand_flat = cand[:, 0] * tokens + cand[:, 1]
    out = {}
    index = index.to(hidden.device)
    gates = router_weights(model_modules, es, hidden, index)  # REAP's g (attnprobe.recording.expert_saliency)
    slots = routed_slots(index, es.num_experts)
    for expert, rows in enumerate(routed_rows(index, es.num_experts)):
        x = hidden[rows]
        (first, _), (down, _) = es.groups(expert).items()
        args = (rows, tokens, batch, flat_valid, flat_w, cand_flat, hessians)
        out[first] = _reduce_rows(x, *args)
        with torch.no_grad():
            h = expert_activation(model_modules, es, expert, x)
        out[down] = _reduce_rows(h, *args)
        reap = (expert, h, rows, slots[expert], gates, batch, tokens, flat_valid, flat_w)
        out[down].update(saliency_sums(model_modules, es, *reap))
    return out
