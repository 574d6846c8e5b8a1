"""Structured pruning: remove whole attention heads and MLP channels physically (FLAP's ``wanda_sp``).

Phases: :func:`find_structures` (which linears form a head group or an MLP, via small declarative
adapters) → :func:`plan_structured` (pure scoring and selection, nothing changes) → :func:`apply_plan`
(in place: ``nn.Linear`` modules shrink and the attention code's head counts follow).

Score (the ``wanda_sp`` baseline of FLAP, arXiv 2312.11983). For the attention output projection
(``o_proj`` / ``attn_out``) and the MLP down projection (``down_proj`` / ``ff_out``), with ``W`` its
``(out, in)`` weight and ``a`` its per-input-column activation norm (``act_norms[name]``)::

    score[c] = mean_over_rows(|W[:, c]|) * a[c]                 # float32, one per input channel
    head h   = sum(score[h*head_dim : (h+1)*head_dim])
    KV group = sum of the scores of the query heads that share one key/value head
    channel  = score[c] of the down projection

Units. Attention is pruned in whole *KV groups*: one key/value head together with all the query heads
that read it (``num_heads // num_kv_heads`` of them). With multi-head attention a group is a single
head; with grouped-query attention (Qwen2, Dream) removing whole groups keeps ``num_key_value_groups``
unchanged and integral and shrinks ``k_proj``/``v_proj`` too. ``ratio`` is therefore the fraction of
KV groups removed; on GQA models it moves in steps of ``1 / num_kv_heads`` per layer. MLP units are
single intermediate channels (rows of gate/up, columns of down).

Selection, ``mode="uniform"``: in every layer remove ``r = floor(n * ratio + 0.5)`` units (round half
up), at most ``n - 1``; the ``r`` lowest scores go, ties broken towards the lower index (stable sort).
``mode="global"``: scores are standardised per layer, ``z = (s - mean) / std`` (population std; a
layer whose scores are all equal gets ``z = 0``), then ranked across all layers, attention units and
MLP channels separately; the lowest ``floor(N * ratio + 0.5)`` of the ``N`` units in the model are
removed, skipping any unit whose removal would leave its layer empty, so each layer keeps at least one
KV group and one channel. The overall removed fraction equals ``ratio`` up to rounding (and the
one-per-layer floor).

Bias compensation (optional, FLAP): given ``act_means[name]`` (mean input of ``o_proj``/``down``), the
removed columns' mean contribution ``W[:, removed] @ mean[removed]`` is added to that linear's bias;
a linear without bias gets one only with ``create_bias=True``. The shift is computed from the dense
weights at plan time and stored in the plan, so a saved plan reproduces the pruned model exactly.

Saving. When every layer ends with the same widths (always so with ``mode="uniform"`` on a model with
equal layers), transformers configs are updated (``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``, and ``head_dim`` made explicit), so ``save_pretrained`` + ``from_pretrained``
reloads the pruned model. Otherwise (``mode="global"``, or LLaDA-style models whose head size is
derived from ``d_model // n_heads``) save the plan with :func:`save_plan` and re-apply it to the dense
checkpoint: ``apply_plan(dense_model, load_plan(path))``.

Supported architectures: :data:`SUPPORTED_CLASSES` (transformers Llama, Qwen2, Mistral and Qwen3
attention/MLP classes, LLaDA's ``LLaDALlamaBlock``). Which linears form a head group or an MLP, and
which attributes follow a change of width, is declared per family in :mod:`prune.methods.structured_adapters`
(a new family is one ``Adapter`` entry); anything else (GPT-2's fused ``c_attn``, remote-code Dream)
raises ``ValueError``. The spec classes and :func:`find_structures` live there and are re-exported here.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import Tensor, nn

from prune.methods.shrink import apply_plan, expand_heads
from prune.methods.structured_adapters import (
    SUPPORTED_CLASSES,
    AttentionSpec,
    MlpSpec,
    find_structures,
)
from prune.methods.structured_plan import (
    MODES,
    StructuredPlan,
    load_plan,
    save_plan,
)
from prune.methods.wanda import wanda_scores

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "SUPPORTED_CLASSES",
    "AttentionSpec",
    "MlpSpec",
    "StructuredPlan",
    "apply_plan",
    "channel_scores",
    "find_structures",
    "load_plan",
    "plan_structured",
    "save_plan",
    "select_global",
    "select_uniform",
]


def channel_scores(weight: Tensor, act_norm: Tensor) -> Tensor:
    """FLAP ``wanda_sp`` score of every input channel: ``mean_rows |W[:, c]| * act_norm[c]``.

    Args:
        weight: ``(out_features, in_features)`` weight of ``o_proj`` / ``down_proj``.
        act_norm: ``(in_features,)`` input activation norm.

    Returns:
        float32 ``(in_features,)`` scores.

    Example:
        >>> channel_scores(torch.tensor([[1.0, -2.0], [3.0, 0.0]]), torch.tensor([1.0, 10.0]))
        tensor([ 2., 10.])
    """
    return wanda_scores(weight, act_norm).mean(dim=0)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def select_uniform(scores: Tensor, ratio: float) -> list[int]:
    """Kept indices after removing ``min(floor(n * ratio + 0.5), n - 1)`` lowest scores (stable).

    Example:
        >>> select_uniform(torch.tensor([3.0, 1.0, 2.0, 1.0]), 0.5)
        [0, 2]
    """
    n = scores.numel()
    removed = min(_round_half_up(n * ratio), n - 1)
    order = torch.sort(scores.float(), stable=True).indices
    return sorted(order[removed:].tolist())


def select_global(scores: list[Tensor], ratio: float) -> list[list[int]]:
    """Kept indices per layer after removing the globally lowest per-layer standardised scores.

    ``z = (s - mean) / std`` per layer (population std, ``z = 0`` where ``std = 0``); the lowest
    ``floor(N * ratio + 0.5)`` of all ``N`` units go, skipping any that would empty its layer.

    Example:
        >>> select_global([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 10.0])], 0.4)
        [[1, 2], [1]]
    """
    zs = []
    for s in scores:
        s = s.double()
        std = s.std(unbiased=False) if s.numel() > 1 else s.new_zeros(())
        zs.append((s - s.mean()) / std if std > 0 else torch.zeros_like(s))
    units = [(i, j) for i, s in enumerate(scores) for j in range(s.numel())]  # concat order of zs
    target = _round_half_up(len(units) * ratio)
    left = [s.numel() for s in scores]
    removed: set[tuple[int, int]] = set()
    for unit in torch.sort(torch.cat(zs), stable=True).indices.tolist():
        if len(removed) == target:
            break
        i, j = units[unit]
        if left[i] > 1:  # every layer keeps at least one unit
            left[i] -= 1
            removed.add((i, j))
    return [[j for j in range(s.numel()) if (i, j) not in removed] for i, s in enumerate(scores)]


def _check_ratio(ratio: float, mode: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"ratio={ratio!r} must be a number in [0, 1): the fraction of KV groups and MLP channels removed."
        )
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}.")


def _stat(stats: dict[str, Tensor], name: str, needed: list[str], what: str = "act_norms") -> Tensor:
    if name not in stats:
        listed = ", ".join(needed[:4]) + (", ..." if len(needed) > 4 else "")
        norms = "prune.engine.statistics.activation_norms(store, ...)"
        how = norms if what == "act_norms" else "the mean inputs"
        raise ValueError(
            f"{what} has no entry for {name!r}; structured pruning needs it for every attention output "
            f"and MLP down projection ({listed}). Compute them with {how}."
        )
    return stats[name]


def _select(scores: list[Tensor], ratio: float, mode: str) -> list[list[int]]:
    if mode == "uniform":
        return [select_uniform(s, ratio) for s in scores]
    return select_global(scores, ratio) if scores else []


@torch.no_grad()
def plan_structured(
    model: nn.Module,
    act_norms: dict[str, Tensor],
    ratio: float,
    *,
    mode: str = "uniform",
    act_means: dict[str, Tensor] | None = None,
    create_bias: bool = False,
    scores: dict[str, Tensor] | None = None,
) -> StructuredPlan:
    """Choose the KV groups and MLP channels to remove; the model is not changed.

    See the module docstring for the score, the units and both selection modes.

    Args:
        model: a model :func:`find_structures` supports, dense.
        act_norms: linear name -> ``(in_features,)`` input activation norm (sqrt of the, optionally
            sink-down-weighted, Wanda scaler); needed for every ``o_proj``/``attn_out`` and
            ``down_proj``/``ff_out``.
        ratio: fraction of KV groups and of MLP channels removed, in ``[0, 1)``.
        mode: ``"uniform"`` (the same count in every layer) or ``"global"`` (standardised scores
            ranked across layers).
        act_means: optional linear name -> ``(in_features,)`` mean input, for FLAP's bias compensation
            of ``o_proj``/``down_proj``.
        create_bias: with ``act_means``, give a bias to output linears that have none.
        scores: optional output-linear name -> ``(in_features,)`` per-input-channel scores used instead
            of Wanda-sp's (e.g. FLAP's fluctuation, :mod:`prune.engine.flap`); ``act_norms`` is then unused.

    Returns:
        The :class:`StructuredPlan`.

    Raises:
        ValueError: bad ``ratio``/``mode``, a missing or misshapen norm, an unsupported architecture.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        >>> linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        >>> norms = {n: torch.ones(m.in_features) for n, m in linears}
        >>> plan = plan_structured(model, norms, 0.5)  # 1 of 2 KV groups, 32 of 64 channels per layer
        >>> len(plan.keep_heads["model.layers.0.self_attn"]), len(plan.keep_channels["model.layers.0.mlp"])
        (2, 32)
    """
    _check_ratio(ratio, mode)
    specs = find_structures(model)
    modules = dict(model.named_modules())
    attn = [s for s in specs if isinstance(s, AttentionSpec)]
    mlps = [s for s in specs if isinstance(s, MlpSpec)]
    outputs = [s.o for s in attn] + [s.down for s in mlps]
    heads, groups, chans = {}, [], []

    def score_of(name: str) -> Tensor:
        if scores is not None:
            return _stat(scores, name, outputs, "scores").float().cpu()
        return channel_scores(modules[name].weight, _stat(act_norms, name, outputs)).cpu()

    for s in attn:
        ch = score_of(s.o)
        heads[s.name] = ch.view(s.num_heads, s.head_dim).sum(dim=1)
        groups.append(heads[s.name].view(s.num_kv_heads, s.group_size).sum(dim=1))
    for s in mlps:
        chans.append(score_of(s.down))
    keep_groups, keep_chans = _select(groups, ratio, mode), _select(chans, ratio, mode)
    plan = StructuredPlan(
        keep_heads={
            s.name: [g * s.group_size + j for g in kg for j in range(s.group_size)]
            for s, kg in zip(attn, keep_groups)
        },
        keep_channels={s.name: kc for s, kc in zip(mlps, keep_chans)},
        ratio=float(ratio),
        mode=mode,
        num_heads={s.name: [s.num_heads, s.num_kv_heads, s.head_dim] for s in attn},
        widths={s.name: s.width for s in mlps},
        head_scores={name: h.tolist() for name, h in heads.items()},
    )
    if act_means is not None:
        plan.bias_shift = _bias_shifts(modules, attn, mlps, plan, act_means, create_bias)
    removed_h = sum(s.num_heads - len(plan.keep_heads[s.name]) for s in attn)
    removed_c = sum(s.width - len(plan.keep_channels[s.name]) for s in mlps)
    logger.info(
        "structured plan (%s, ratio %.3f): remove %d of %d heads, %d of %d MLP channels",
        mode,
        ratio,
        removed_h,
        sum(s.num_heads for s in attn),
        removed_c,
        sum(s.width for s in mlps),
    )
    return plan


def _bias_shifts(
    modules: dict[str, nn.Module],
    attn: list[AttentionSpec],
    mlps: list[MlpSpec],
    plan: StructuredPlan,
    act_means: dict[str, Tensor],
    create_bias: bool,
) -> dict[str, list[float]]:
    """FLAP bias compensation: ``W[:, removed] @ mean[removed]`` per output linear (float32)."""
    shifts, skipped = {}, []
    pairs = [(s.o, expand_heads(plan.keep_heads[s.name], s.head_dim), s.num_heads * s.head_dim) for s in attn]
    pairs += [(s.down, plan.keep_channels[s.name], s.width) for s in mlps]
    for name, keep, width in pairs:
        if len(keep) == width:
            continue
        linear = modules[name]
        if linear.bias is None and not create_bias:
            skipped.append(name)
            continue
        mean = _stat(act_means, name, [p[0] for p in pairs], "act_means").detach().float().flatten()
        if mean.numel() != width or not torch.isfinite(mean).all():
            raise ValueError(f"act_means[{name!r}] must hold {width} finite values (one per input column).")
        w = linear.weight.detach().float()
        removed = torch.ones(width, dtype=torch.bool, device=w.device)
        removed[keep] = False
        shifts[name] = (w[:, removed] @ mean.to(w.device)[removed]).cpu().tolist()  # (out,)
    if skipped:
        warnings.warn(
            f"bias compensation skipped for {len(skipped)} linears without a bias (e.g. {skipped[0]!r}); "
            "pass create_bias=True to add one.",
            stacklevel=3,
        )
    return shifts


# ------------------------------------------------------------------------------------------------
# Apply: shrink linears in place.
# ------------------------------------------------------------------------------------------------
