"""Per-expert saliency sums of one MoE layer's forward: router weight × expert output norm (REAP).

REAP (Lasby et al., in llm-compressor 0.13) scores a routed expert ``j`` by the mean, over the tokens
routed to it, of ``g_j(x) · ‖f_j(x)‖₂``: its router (gate) weight times the norm of its output. The
recorder captures each MoE layer's hidden states and routing index (:mod:`attnprobe.layout.experts`); here the
expert's output is recomputed from its own weights for its routed rows, and the router weights by
calling the router on the same hidden states:

- a router that returns the top-k weights beside the index (transformers 5's ``Qwen3MoeTopKRouter``,
  LLaDA2's gate): those weights, exactly what the layer used;
- a router that returns logits only (OLMoE's ``gate`` linear): ``softmax(logits)`` at the routed
  experts, renormalised over the top-k when the MoE block has ``norm_topk_prob`` set.

Sums per sample over valid routed tokens, float32, next to the expert's ``tokens`` count, so that any
mean over steps is exact: ``gate_norm = Σ g·‖y‖``, ``out_norm = Σ ‖y‖``, and the sink-weighted
``wgate_norm = Σ w·g·‖y‖``, ``wout_norm = Σ w·‖y‖``, ``wtokens = Σ w``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SALIENCY_FIELDS = ("gate_norm", "out_norm", "wgate_norm", "wout_norm", "wtokens")


def _outputs(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    return []


@torch.no_grad()
def router_weights(modules: dict[str, nn.Module], es, hidden: Tensor, index: Tensor) -> Tensor | None:
    """The router weight of each (row, top-k slot) of ``index``, float32 (N, k); None if unreadable."""
    router = modules.get(es.router) if es.router else None
    if router is None:
        return None
    try:  # .forward: no hooks (the recorder's capture hook sits on list-style routers)
        out = _outputs(router.forward(hidden))
    except (TypeError, ValueError, RuntimeError):  # a router not callable on the hidden states alone
        return None
    floats = [t for t in out if t.is_floating_point()]
    same = next((t for t in floats if tuple(t.reshape(index.shape[0], -1).shape) == tuple(index.shape)), None)
    if same is not None and index.shape[1] != es.num_experts:
        return same.reshape(index.shape).float()
    logits = next((t for t in floats if t.shape[-1] == es.num_experts), None)
    if logits is None:
        return None
    probs = F.softmax(logits.reshape(-1, es.num_experts).float(), dim=-1)
    picked = probs.gather(1, index.clamp(0, es.num_experts - 1))
    parent = modules.get(es.name.rpartition(".")[0])
    if getattr(parent, "norm_topk_prob", False):
        picked = picked / picked.sum(-1, keepdim=True).clamp(min=1e-12)
    return picked


def _down(modules: dict[str, nn.Module], es, expert: int) -> tuple[Tensor, Tensor | None]:
    spec = es.spec
    if spec.fused:
        return getattr(modules[es.name], spec.down)[expert], None
    linear = getattr(modules[es.name][expert], spec.down)
    return linear.weight, linear.bias


def saliency_sums(
    modules: dict[str, nn.Module],
    es,
    expert: int,
    activation: Tensor,
    rows: Tensor,
    slots: Tensor | None,
    gates: Tensor | None,
    batch: int,
    tokens: int,
    valid: Tensor,
    weights: Tensor,
) -> dict[str, Tensor]:
    """Per-sample REAP sums of one expert (module docstring).

    Args:
        activation: (n, I) the input of the expert's down projection for its routed rows.
        rows: (n,) flat token index (``sample · tokens + position``) of each routed row.
        slots: (n,) the top-k slot each row was routed through, or None; gates: (N, k) or None.
        valid, weights: flat (batch · tokens,) padding flags and sink weights.
    """
    weight, bias = _down(modules, es, expert)
    with torch.no_grad():
        y = F.linear(activation.to(weight.dtype), weight, bias)
    norm = y.float().norm(dim=-1)
    keep = valid[rows].float()
    w = weights[rows].float() * keep
    g = gates[rows, slots].float() if gates is not None and slots is not None else torch.ones_like(norm)
    sample = rows // tokens
    out = {}
    for key, values in (
        ("gate_norm", keep * g * norm),
        ("out_norm", keep * norm),
        ("wgate_norm", w * g * norm),
        ("wout_norm", w * norm),
        ("wtokens", w),
    ):
        out[key] = norm.new_zeros(batch).index_add_(0, sample, values)
    return out


def routed_slots(index: Tensor, num_experts: int) -> list[Tensor]:
    """For each expert, the top-k slot of each of its routed rows, in :func:`routed_rows` order."""
    rows, k = index.shape
    flat = index.reshape(-1)
    slot = torch.arange(k, device=index.device).repeat(rows)
    kept = (flat >= 0) & (flat < num_experts)
    flat, slot = flat[kept], slot[kept]
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return list(torch.split(slot[order], counts))
