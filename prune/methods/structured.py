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
which attributes follow a change of width, is declared per family in :mod:`prune.structured_adapters`
(a new family is one ``Adapter`` entry); anything else (GPT-2's fused ``c_attn``, remote-code Dream)
raises ``ValueError``. The spec classes and :func:`find_structures` live there and are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prune.methods.structured_adapters import (
    ADAPTERS,
    SUPPORTED_CLASSES,
    AttentionSpec,
    MlpSpec,
    find_structures,
    write_config_widths,
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

MODES = ("uniform", "global")
PLAN_FORMAT = "attnprobe-structured-plan"
PLAN_VERSION = 1


# ------------------------------------------------------------------------------------------------
# Plan: pure scoring and selection.
# ------------------------------------------------------------------------------------------------


@dataclass
class StructuredPlan:
    """What to keep, per module, and how it was chosen. JSON-able through :meth:`to_dict`.

    Attributes:
        keep_heads: attention module name -> kept query-head indices (sorted; whole KV groups).
        keep_channels: MLP (or block) name -> kept intermediate channel indices (sorted).
        ratio: requested fraction removed.
        mode: ``"uniform"`` or ``"global"``.
        num_heads: attention name -> ``[num_heads, num_kv_heads, head_dim]`` of the dense model.
        widths: MLP name -> dense intermediate size.
        head_scores: attention name -> score of every dense query head (metadata).
        bias_shift: linear name -> vector added to its bias (bias compensation; empty without it).
    """

    keep_heads: dict[str, list[int]]
    keep_channels: dict[str, list[int]]
    ratio: float
    mode: str
    num_heads: dict[str, list[int]] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    head_scores: dict[str, list[float]] = field(default_factory=dict)
    bias_shift: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (floats round-trip exactly through ``json``)."""
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredPlan:
        """Inverse of :meth:`to_dict`; raises ValueError on another format or a newer version."""
        if data.get("format") != PLAN_FORMAT or int(data.get("version", 0)) > PLAN_VERSION:
            raise ValueError(
                f"not a structured plan of version <= {PLAN_VERSION} (format={data.get('format')!r}, "
                f"version={data.get('version')!r}); write it with prune.structured.save_plan."
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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
        how = "prune.statistics.activation_norms(store, ...)" if what == "act_norms" else "the mean inputs"
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
            of Wanda-sp's (e.g. FLAP's fluctuation, :mod:`prune.flap`); ``act_norms`` is then unused.

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
    pairs = [(s.o, _expand(plan.keep_heads[s.name], s.head_dim), s.num_heads * s.head_dim) for s in attn]
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


def _expand(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def _slice_linear(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    """Keep ``rows`` (outputs) and/or ``cols`` (inputs) of ``linear``, in place."""
    weight = linear.weight
    new = weight.detach()
    if rows is not None:
        new = new.index_select(0, rows.to(new.device))
        if linear.bias is not None:
            bias = linear.bias.detach().index_select(0, rows.to(new.device)).clone()
            linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    if cols is not None:
        new = new.index_select(1, cols.to(new.device))
    linear.weight = nn.Parameter(new.clone(), requires_grad=weight.requires_grad)
    linear.out_features, linear.in_features = new.shape


def _check_keep(name: str, keep: list[int], total: int, what: str) -> Tensor:
    index = torch.as_tensor(keep, dtype=torch.long)
    distinct = index.unique().numel() == index.numel()
    if index.numel() == 0 or not distinct or index.min() < 0 or index.max() >= total:
        raise ValueError(
            f"plan for {name!r} keeps {keep[:8]}...: {what} indices must be distinct, in [0, {total}) and "
            "at least one; make plans with plan_structured."
        )
    return index.sort().values


def _check_dense(name: str, planned: Any, current: Any) -> None:
    if planned is not None and planned != current:
        raise ValueError(
            f"plan was made for {name!r} with {planned} but the module has {current}; apply a plan to "
            "the dense checkpoint it was made from (load it again)."
        )


def _lookup(specs: dict[str, Any], name: str, kind: str) -> Any:
    if name not in specs:
        have = ", ".join(list(specs)[:4])
        raise ValueError(f"plan names {name!r}, which is no {kind} of this model (it has {have}, ...).")
    return specs[name]


def _validate(plan: StructuredPlan, specs: list[AttentionSpec | MlpSpec]) -> list[tuple]:
    """Check the plan against the model; return the work list ``(spec, kept, kept_kv)`` unchanged."""
    attn = {s.name: s for s in specs if isinstance(s, AttentionSpec)}
    mlps = {s.name: s for s in specs if isinstance(s, MlpSpec)}
    work: list[tuple] = []
    for name, keep in plan.keep_heads.items():
        spec = _lookup(attn, name, "attention module")
        planned = plan.num_heads.get(name)
        _check_dense(
            name,
            None if planned is None else list(planned),
            [spec.num_heads, spec.num_kv_heads, spec.head_dim],
        )
        heads = _check_keep(name, keep, spec.num_heads, "head")
        kv = heads.div(spec.group_size, rounding_mode="floor").unique()
        if heads.numel() != kv.numel() * spec.group_size:
            raise ValueError(
                f"plan for {name!r} keeps heads {keep[:8]}..., which are not whole KV groups of "
                f"{spec.group_size}; keep every query head of a kept key/value head."
            )
        if heads.numel() < spec.num_heads:
            work.append((spec, heads, kv))
    for name, keep in plan.keep_channels.items():
        spec = _lookup(mlps, name, "MLP")
        _check_dense(name, plan.widths.get(name), spec.width)
        chans = _check_keep(name, keep, spec.width, "channel")
        if chans.numel() < spec.width:
            work.append((spec, chans, None))
    return work


def _shrink(
    modules: dict[str, nn.Module], spec: AttentionSpec | MlpSpec, keep: Tensor, kv: Tensor | None
) -> AttentionSpec | MlpSpec:
    """Slice one attention module or MLP in place; return its new spec."""
    adapter = ADAPTERS[spec.adapter]
    if isinstance(spec, MlpSpec):
        _slice_linear(modules[spec.gate], rows=keep)
        _slice_linear(modules[spec.up], rows=keep)
        _slice_linear(modules[spec.down], cols=keep)
        adapter.write_width(modules[spec.name], keep.numel())
        return MlpSpec(**{**asdict(spec), "width": keep.numel()})
    rows = torch.as_tensor(_expand(keep.tolist(), spec.head_dim))
    _slice_linear(modules[spec.q], rows=rows)
    if kv.numel() < spec.num_kv_heads:
        kv_rows = torch.as_tensor(_expand(kv.tolist(), spec.head_dim))
        _slice_linear(modules[spec.k], rows=kv_rows)
        _slice_linear(modules[spec.v], rows=kv_rows)
    _slice_linear(modules[spec.o], cols=rows)
    adapter.write_heads(modules[spec.name], keep.numel(), kv.numel())
    return AttentionSpec(**{**asdict(spec), "num_heads": keep.numel(), "num_kv_heads": kv.numel()})


def _add_bias(linear: nn.Linear, name: str, shift: list[float]) -> None:
    delta = torch.tensor(shift, dtype=torch.float32, device=linear.weight.device)
    if linear.bias is None:
        linear.bias = nn.Parameter(delta.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
        logger.warning("created a bias for %s (bias compensation); a config without biases drops it", name)
    else:
        linear.bias.copy_((linear.bias.float() + delta).to(linear.bias.dtype))


@torch.no_grad()
def apply_plan(model: nn.Module, plan: StructuredPlan) -> None:
    """Remove the planned heads and channels from ``model`` in place (``nn.Linear`` modules shrink).

    Heads: rows of ``q_proj`` (and of ``k_proj``/``v_proj`` for removed KV groups) and the matching
    input columns of ``o_proj``; the module attributes the forward reads (``num_key_value_groups``
    for transformers, a per-block config copy with ``n_heads``/``n_kv_heads`` for LLaDA) follow.
    MLP: rows of gate/up and input columns of down. Biases of row-sliced linears are sliced;
    ``plan.bias_shift`` is added to output biases (creating them where missing). Where all layers end
    equal, transformers configs get the new widths. Modules with nothing to remove are not touched,
    so a ratio-0 plan leaves the model bit-identical. Everything is validated before any change.

    Args:
        model: the dense model the plan was made for (or a fresh load of the same checkpoint).
        plan: from :func:`plan_structured` or :func:`load_plan`.

    Raises:
        ValueError: if the plan names unknown modules, was made for other widths (e.g. the model is
            already pruned), or keeps invalid indices.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        >>> linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        >>> norms = {n: torch.ones(m.in_features) for n, m in linears}
        >>> apply_plan(model, plan_structured(model, norms, 0.5))
        >>> model.model.layers[0].self_attn.q_proj.weight.shape, model.config.num_key_value_heads
        (torch.Size([16, 32]), 1)

        Re-applying a saved plan to the dense checkpoint (e.g. after ``mode="global"``)::

            model = AutoModelForCausalLM.from_pretrained(dense_path)
            apply_plan(model, load_plan("plan.json"))
    """
    specs = find_structures(model)
    work = _validate(plan, specs)
    modules = dict(model.named_modules())
    for name, shift in plan.bias_shift.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear) or len(shift) != linear.out_features:
            raise ValueError(
                f"plan.bias_shift[{name!r}] matches no linear of this model with {len(shift)} outputs; "
                "apply the plan to the model it was made for."
            )
    if not work and not plan.bias_shift:
        return
    new = {(type(s), s.name): s for s in specs}
    for spec, keep, kv in work:
        new[(type(spec), spec.name)] = _shrink(modules, spec, keep, kv)
    for name, shift in plan.bias_shift.items():
        _add_bias(modules[name], name, shift)
    write_config_widths(model, list(new.values()))


def save_plan(plan: StructuredPlan, path: str | Path) -> None:
    """Write ``plan`` as JSON.

    Example:
        >>> save_plan(plan, "plan.json")                                     # doctest: +SKIP
        >>> apply_plan(dense_model, load_plan("plan.json"))                  # doctest: +SKIP
    """
    Path(path).write_text(json.dumps(plan.to_dict(), indent=1))


def load_plan(path: str | Path) -> StructuredPlan:
    """Read a plan written by :func:`save_plan`.

    Example:
        >>> plan = load_plan("plan.json")                                    # doctest: +SKIP
    """
    return StructuredPlan.from_dict(json.loads(Path(path).read_text()))
