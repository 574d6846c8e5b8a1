"""Apply a structured plan in place: ``nn.Linear`` modules shrink to the kept heads and channels, the
attention code's head counts and the config's widths follow, and compensated biases are added.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from prune.methods.structured_adapters import (
    ADAPTERS,
    AttentionSpec,
    MlpSpec,
    find_structures,
    write_config_widths,
)
from prune.methods.structured_plan import StructuredPlan

logger = logging.getLogger(__name__)


def expand_heads(heads: list[int], head_dim: int) -> list[int]:
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
    rows = torch.as_tensor(expand_heads(keep.tolist(), spec.head_dim))
    _slice_linear(modules[spec.q], rows=rows)
    if kv.numel() < spec.num_kv_heads:
        kv_rows = torch.as_tensor(expand_heads(kv.tolist(), spec.head_dim))
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
        >>> from prune.methods.structured import plan_structured
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
