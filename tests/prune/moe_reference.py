"""Independent per-expert statistics for the MoE tests: route explicitly, then sum over routed tokens.

Nothing here uses attnprobe's capture: the routing is recomputed from each router's published
formula (softmax top-k; LLaDA2's sigmoid + expert_bias with group-limited top-k), the experts'
inputs are the MoE block's input rows, and each routed row is weighted by the sink weight of its own
(sample, position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sink_weights(store, sink_std: float = 2.0, sink_alpha: float = 5.0) -> dict[int, Tensor]:
    """The sink weights w = 1 - s of every step, written out from docs/DESIGN.md "The sink rule".

    Per sample: m[k] = attention mass on key k summed over every layer (whose keys are the step's tokens)
    and head; thr = mean + sink_std · population std of m over valid keys; s = sigmoid(alpha (m - thr)),
    0 on padding. Independent of prune's step_weights (plain loops over samples, float64).
    """
    weights = {}
    for step in range(store.num_steps):
        valid = store.valid(step)
        tokens = valid.shape[1]
        m = torch.zeros(valid.shape, dtype=torch.float64)
        for layer in range(len(store.layers)):
            try:
                mass = store.layer_mass(step, layer)  # (batch, heads, keys)
            except KeyError:
                continue
            if mass.shape[-1] == tokens:
                m += mass.double().sum(dim=1)
        w = torch.ones_like(m)
        for b in range(m.shape[0]):
            keys = m[b][valid[b]]
            thr = keys.mean() + sink_std * keys.std(unbiased=False)
            s = torch.sigmoid(sink_alpha * (m[b] - thr)) * valid[b]
            w[b] = 1 - s
        weights[step] = w.float()
    return weights


def route(mlp: nn.Module, x: Tensor) -> Tensor:
    """(N, k) experts chosen for each row of x (N, H)."""
    gate = mlp.gate
    if isinstance(gate, nn.Linear):  # OLMoE: softmax top-k of a linear's logits
        return F.softmax(gate(x), dim=-1).topk(mlp.top_k, dim=-1).indices
    if hasattr(gate, "expert_bias"):  # LLaDA2: sigmoid scores + bias, best groups first
        c = gate.config
        scores = torch.sigmoid(x @ gate.weight.T) + gate.expert_bias
        per_group = c.num_experts // c.n_group
        group_score = scores.view(-1, c.n_group, per_group).topk(2, dim=-1).values.sum(-1)
        best = group_score.topk(c.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, best, True)
        allowed = allowed.repeat_interleave(per_group, dim=1)
        return scores.masked_fill(~allowed, float("-inf")).topk(c.num_experts_per_tok, dim=-1).indices
    return F.softmax(x @ gate.weight.T, dim=-1).topk(gate.top_k, dim=-1).indices  # transformers Qwen3-MoE


def expert_names(prefix: str, experts: nn.Module, e: int) -> tuple[list[str], str]:
    """Names of expert e's gate/up weights (same input) and of its down weight."""
    if isinstance(experts, nn.ModuleList):
        return [f"{prefix}.{e}.gate_proj", f"{prefix}.{e}.up_proj"], f"{prefix}.{e}.down_proj"
    if hasattr(experts, "gate_up_proj"):
        return [f"{prefix}.gate_up_proj.{e}"], f"{prefix}.down_proj.{e}"
    return [f"{prefix}.gate_proj.{e}", f"{prefix}.up_proj.{e}"], f"{prefix}.down_proj.{e}"


def expert_matrices(experts: nn.Module, e: int) -> tuple[Tensor, Tensor, Tensor]:
    """Expert e's gate, up and down weights as (out, in) matrices."""
    if isinstance(experts, nn.ModuleList):
        mlp = experts[e]
        return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    if hasattr(experts, "gate_up_proj"):
        gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
        return gate, up, experts.down_proj[e]
    return experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e]


@torch.no_grad()
def expert_statistics(
    model: nn.Module, store, weights: dict[int, Tensor] | None = None, *, hessian: bool = False
) -> dict[str, Tensor]:
    """Per expert weight name: Σ over routed valid tokens of (w·x)² (in,), or of (w·x)(w·x)ᵀ.

    Args:
        model: the (dense) model the store was recorded from.
        store: its calibration store: each step's input_ids are run again.
        weights: per step, (batch, tokens) sink weights; None for plain statistics.
        hessian: Gram matrices instead of sums of squares.
    """
    layers = model.model.layers
    totals: dict[str, Tensor] = {}
    for step in range(store.num_steps):
        ids, valid = store.input_ids(step), store.valid(step)
        w = weights[step] if weights is not None else torch.ones(valid.shape)
        seen: dict[int, Tensor] = {}
        hooks = [
            layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().double()))
            for i, layer in enumerate(layers)
        ]
        try:
            model(input_ids=ids, attention_mask=None if bool(valid.all()) else valid.long())
        finally:
            for h in hooks:
                h.remove()
        for i, layer in enumerate(layers):
            flat = seen[i].reshape(-1, seen[i].shape[-1])  # row = sample · tokens + position
            chosen = route(layer.mlp, flat.to(layer.mlp.gate.weight.dtype))
            prefix = f"model.layers.{i}.mlp.experts"
            for e in range(chosen.max().item() + 1 if chosen.numel() else 0):
                rows = ((chosen == e).any(-1) & valid.reshape(-1)).nonzero().flatten()
                x = flat[rows]
                row_w = w.reshape(-1)[rows].double()[:, None]
                gate, up, _ = (m.double() for m in expert_matrices(layer.mlp.experts, e))
                h = F.silu(x @ gate.T) * (x @ up.T)
                firsts, down = expert_names(prefix, layer.mlp.experts, e)
                for names, value in ((firsts, x * row_w), ([down], h * row_w)):
                    term = value.T @ value if hessian else value.square().sum(0)
                    for name in names:
                        totals[name] = totals[name] + term if name in totals else term
    return totals
