"""Expert removal: ``prune.apply(model, store, ratio, pattern="experts")`` drops routed experts.

Every MoE layer loses ``round(ratio · E)`` (half up) of its ``E`` routed experts, those with the lowest
score over the calibration store (sums recorded by :mod:`attnprobe.recording.expert_saliency`, over every step
and valid routed token; sink-aware: each token weighted by its sink weight ``w``):

- ``"reap"`` (default; REAP, in llm-compressor 0.13): ``Σ g·‖y‖ / Σ 1`` over the tokens routed to the
  expert, ``g`` its router weight and ``y`` its output (sink-aware: ``Σ w·g·‖y‖ / Σ w``);
- ``"frequency"``: how many tokens were routed to it (``Σ 1``, sink-aware ``Σ w``);
- ``"norm"``: the mean output norm ``Σ ‖y‖ / Σ 1`` (sink-aware ``Σ w·‖y‖ / Σ w``).

An expert no calibration token reached scores 0 and goes first. Ties go towards the lower index.

What changes, in place, once every layer is planned (a refusal leaves the model untouched): fused
experts (3-D parameters, transformers 5) keep the rows ``[kept]`` of every parameter whose first axis
is the expert axis; a ``ModuleList`` keeps its kept entries. The router loses the rows of the removed
experts (every parameter or buffer with the expert axis first: weight, bias, ``expert_bias``), and the
``num_experts``-like attributes of the experts, router, MoE block and config follow, so
``prune.save_pretrained`` writes a checkpoint that ``from_pretrained`` builds with fewer experts. Top-k
must stay valid: a ratio that leaves fewer experts than a token routes to is refused. Group-limited
routers (``n_group > 1``: LLaDA2, DeepSeek) are refused too: they need the same number of experts
removed from every group, which this selection does not plan.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnprobe import discover_experts

logger = logging.getLogger(__name__)

SCORES = ("reap", "frequency", "norm")
_COUNT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts", "out_features")
_CONFIG_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")


@dataclass
class ExpertPlan:
    """Kept experts per MoE layer (old indices, sorted) and every expert's score."""

    keep: dict[str, list[int]]
    scores: dict[str, list[float]]
    score: str


def expert_scores(store, sets, score: str, sink_aware: bool) -> dict[str, Tensor]:
    """``{experts name: (E,) float64}`` scores from the store's per-expert sums (module docstring)."""
    if score not in SCORES:
        raise ValueError(f"unknown expert score {score!r}; choose one of {SCORES}")
    prefix = "w" if sink_aware else ""
    numer = {"reap": f"{prefix}gate_norm", "norm": f"{prefix}out_norm", "frequency": None}[score]
    count = "wtokens" if sink_aware else "tokens"
    sums = {es.name: torch.zeros(es.num_experts, dtype=torch.float64) for es in sets}
    counts = {es.name: torch.zeros(es.num_experts, dtype=torch.float64) for es in sets}
    for step in range(store.num_steps):
        stats = store.linear_stats(step)
        for es in sets:
            for e in range(es.num_experts):
                group = stats.get(es.slice_name(es.spec.down, e))
                if group is None:
                    continue
                if "wtokens" not in group:
                    raise ValueError(
                        f"the store at {store.path} has no routed-expert saliency sums for {es.name}: it was "
                        "recorded before attnprobe kept them. Record the calibration again for "
                        "pattern='experts'."
                    )
                counts[es.name][e] += group[count].double().sum()
                if numer is not None:
                    sums[es.name][e] += group[numer].double().sum()
    if score == "frequency":
        return counts
    return {name: sums[name] / counts[name].clamp(min=1e-12) for name in sums}


def _top_k(modules: dict[str, nn.Module], es, config: Any) -> int | None:
    owners = (modules.get(es.router), modules.get(es.name.rpartition(".")[0]), config)
    for owner in owners:
        for attr in ("top_k", "num_experts_per_tok", "num_experts_per_token"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return es.top_k


def _check(modules, es, kept: int, config: Any) -> None:
    top_k = _top_k(modules, es, config)
    if top_k is not None and kept < top_k:
        raise ValueError(
            f"{es.name} would keep {kept} of {es.num_experts} experts, fewer than the {top_k} every token is "
            "routed to (top-k); use a smaller ratio."
        )
    router = modules.get(es.router)
    for owner in (router, getattr(router, "config", None)):  # a group-limited router reads n_group
        groups = getattr(owner, "n_group", None)
        if isinstance(groups, int) and groups > 1:
            raise ValueError(
                f"{es.name}'s router picks experts group by group (n_group={groups}, LLaDA2/DeepSeek style), "
                "which needs the same experts removed from every group; pattern='experts' does not plan that "
                "yet. Prune these experts' weights instead (pattern='unstructured')."
            )


def plan_experts(model: nn.Module, store, ratio: float, *, score: str = "reap", sink_aware: bool = False):
    """Choose the experts to keep in every MoE layer; the model is not changed."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1) (0.5 removes half of each layer's experts), got {ratio!r}")
    sets = discover_experts(model)
    if not sets:
        raise ValueError(
            f"pattern='experts' removes routed experts, and {type(model).__name__} has no MoE layer "
            "attnprobe recognises (fused 3-D experts or a ModuleList of experts beside a router)."
        )
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    scores = expert_scores(store, sets, score, sink_aware)
    keep = {}
    for es in sets:
        removed = int(math.floor(ratio * es.num_experts + 0.5 + 1e-9))
        _check(modules, es, es.num_experts - removed, config)
        order = sorted(range(es.num_experts), key=lambda e: (float(scores[es.name][e]), e))
        keep[es.name] = sorted(order[removed:])
    kept_counts = {len(k) for k in keep.values()}
    if config is not None and len(kept_counts) > 1:
        raise ValueError(
            f"the MoE layers would keep different expert counts {sorted(kept_counts)}; the config holds one "
            "count for every layer. Use a ratio that leaves every layer the same number."
        )
    return ExpertPlan(keep, {n: s.tolist() for n, s in scores.items()}, score), sets


def _slice_first_axis(module: nn.Module, total: int, index: Tensor) -> None:
    """Keep ``index`` along axis 0 of every direct parameter and buffer of ``module`` with ``total`` rows."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.dim() >= 1 and param.shape[0] == total:
            new = param.detach().index_select(0, index.to(param.device)).clone()
            setattr(module, name, nn.Parameter(new, requires_grad=param.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer is not None and buffer.dim() >= 1 and buffer.shape[0] == total:
            module._buffers[name] = buffer.index_select(0, index.to(buffer.device)).clone()


def _set_counts(module: nn.Module | None, total: int, kept: int) -> None:
    for attr in _COUNT_ATTRS:
        if module is not None and getattr(module, attr, None) == total:
            setattr(module, attr, kept)


def _remove(model: nn.Module, modules: dict[str, nn.Module], es, keep: list[int]) -> None:
    index = torch.as_tensor(keep, dtype=torch.long)
    total = es.num_experts
    experts = modules[es.name]
    if es.spec.fused:
        _slice_first_axis(experts, total, index)
        _set_counts(experts, total, len(keep))
    else:
        parent_name, _, attr = es.name.rpartition(".")
        setattr(modules[parent_name], attr, nn.ModuleList([experts[i] for i in keep]))
    router = modules[es.router]
    for sub in router.modules():  # the router itself or its projection child (router.proj)
        _slice_first_axis(sub, total, index)
        _set_counts(sub, total, len(keep))
    _set_counts(modules.get(es.name.rpartition(".")[0]), total, len(keep))


def apply_experts(model: nn.Module, store, ratio: float, *, score: str, sink_aware: bool, settings, meta):
    """``prune.apply(..., pattern="experts")`` (see the module docstring)."""
    import pandas as pd

    from prune.engine.planning import PruneResult

    if store is None:
        raise ValueError("pattern='experts' scores experts from a calibration store; pass one.")
    start = time.perf_counter()
    plan, sets = plan_experts(model, store, ratio, score=score, sink_aware=sink_aware)
    modules = dict(model.named_modules())
    for es in sets:  # every layer planned and checked: only now change the model
        _remove(model, modules, es, plan.keep[es.name])
    config = getattr(model, "config", None)
    if config is not None and sets:
        for attr in _CONFIG_ATTRS:
            if getattr(config, attr, None) == sets[0].num_experts:
                setattr(config, attr, len(plan.keep[sets[0].name]))
    rows = [
        {
            "layer": es.name,
            "expert": e,
            "score": plan.scores[es.name][e],
            "removed": e not in plan.keep[es.name],
        }
        for es in sets
        for e in range(es.num_experts)
    ]
    report = pd.DataFrame(rows, columns=["layer", "expert", "score", "removed"])
    removed = sum(es.num_experts - len(plan.keep[es.name]) for es in sets)
    logger.info("removed %d of %d routed experts (%s)", removed, sum(es.num_experts for es in sets), score)
    out = {**meta, "score": score, "seconds": time.perf_counter() - start}
    return PruneResult(masks={}, report=report, settings=out, plan=plan)
