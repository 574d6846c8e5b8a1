"""Declarative architecture adapters for structured pruning: which linears form a head group or an MLP.

A family of modules is one :class:`Adapter` entry in :data:`ADAPTERS`: the class names it matches,
the child linear names (q, k, v, o for attention; gate, up, down for a gated MLP), how to read the
head layout, which attributes the module's forward reads (and so must follow a change of width), and
which config fields hold the widths for ``save_pretrained``. Nothing here slices a weight; that is
:func:`prune.methods.structured.apply_plan`.

Supported classes (:data:`SUPPORTED_CLASSES`): transformers ``LlamaAttention``/``LlamaMLP`` and the
Qwen2, Mistral and Qwen3 equivalents (their forward reads ``self.head_dim`` and
``self.num_key_value_groups``, both set per module), and LLaDA's ``LLaDALlamaBlock`` (its
``attention()`` reads ``self.config.n_heads``/``effective_n_kv_heads``; each pruned block gets its own
config copy). Anything else (GPT-2's fused ``c_attn``; remote-code models such as Dream's, whose
attention classes are not listed) makes :func:`find_structures` raise ``ValueError``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from attnprobe import discover, discover_experts

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTERS",
    "SUPPORTED_CLASSES",
    "Adapter",
    "AttentionSpec",
    "MlpSpec",
    "find_structures",
    "spec_widths",
    "write_config_widths",
]


# ------------------------------------------------------------------------------------------------
# Adapters: which children form a head group / an MLP, and which attributes the forward reads.
# ------------------------------------------------------------------------------------------------


def _hf_heads(module: nn.Module) -> tuple[int, int]:
    return module.q_proj.out_features // module.head_dim, module.head_dim


def _hf_write_heads(module: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    # transformers 5.x attention reads only self.head_dim and self.num_key_value_groups;
    # older-style modules also keep num_heads / num_key_value_heads.
    module.num_key_value_groups = num_heads // num_kv_heads
    for attr, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


def _hf_write_width(module: nn.Module, width: int) -> None:
    module.intermediate_size = width


def _llada_heads(module: nn.Module) -> tuple[int, int]:
    return module.config.n_heads, module.q_proj.out_features // module.config.n_heads


def _llada_write_heads(module: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    # LLaDA's block.attention() reads self.config.n_heads / effective_n_kv_heads, and the config is
    # shared by all blocks (and the rotary embedding), so each pruned block gets its own copy.
    config = copy.copy(module.config)
    config.n_heads, config.n_kv_heads = num_heads, num_kv_heads
    module.config = config


def _llada_write_width(module: nn.Module, width: int) -> None:
    if isinstance(getattr(module, "hidden_size", None), int):
        module.hidden_size = width


def _llada_unsupported(module: nn.Module) -> str | None:
    if getattr(module, "q_norm", None) is not None or getattr(module, "k_norm", None) is not None:
        return "its q_norm/k_norm normalise the full projection width (attention_layer_norm=True)"
    return None


@dataclass(frozen=True)
class Adapter:
    """How one family of modules is pruned: child names, head-count reader and attribute writers."""

    classes: tuple[str, ...]
    attention: tuple[str, str, str, str] | None = None  # q, k, v, o child names
    mlp: tuple[str, str, str] | None = None  # gate, up, down child names
    read_heads: Callable[[nn.Module], tuple[int, int]] | None = None  # -> (num_heads, head_dim)
    write_heads: Callable[[nn.Module, int, int], None] | None = None
    write_width: Callable[[nn.Module, int], None] | None = None
    head_config: tuple[str, str, str] | None = None  # config fields: heads, kv heads, head_dim
    width_config: str | None = None
    unsupported: Callable[[nn.Module], str | None] = lambda module: None


ADAPTERS: dict[str, Adapter] = {
    "hf-attention": Adapter(
        classes=("LlamaAttention", "Qwen2Attention", "MistralAttention", "Qwen3Attention"),
        attention=("q_proj", "k_proj", "v_proj", "o_proj"),
        read_heads=_hf_heads,
        write_heads=_hf_write_heads,
        head_config=("num_attention_heads", "num_key_value_heads", "head_dim"),
    ),
    "hf-mlp": Adapter(
        classes=("LlamaMLP", "Qwen2MLP", "MistralMLP", "Qwen3MLP"),
        mlp=("gate_proj", "up_proj", "down_proj"),
        write_width=_hf_write_width,
        width_config="intermediate_size",
    ),
    "llada-block": Adapter(
        classes=("LLaDALlamaBlock",),
        attention=("q_proj", "k_proj", "v_proj", "attn_out"),
        mlp=("ff_proj", "up_proj", "ff_out"),
        read_heads=_llada_heads,
        write_heads=_llada_write_heads,
        write_width=_llada_write_width,
        unsupported=_llada_unsupported,
    ),
}
SUPPORTED_CLASSES = tuple(cls for adapter in ADAPTERS.values() for cls in adapter.classes)


# ------------------------------------------------------------------------------------------------
# Specs: one attention module or MLP of a concrete model.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSpec:
    """One attention module's prunable linears and head layout (names are full module names)."""

    name: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    adapter: str

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class MlpSpec:
    """One gated MLP's prunable linears (``down`` is the one whose input channels are removed)."""

    name: str
    gate: str
    up: str
    down: str
    width: int
    adapter: str


def _linear(modules: dict[str, nn.Module], owner: str, child: str) -> tuple[str, nn.Linear]:
    name = f"{owner}.{child}" if owner else child
    module = modules.get(name)
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"{owner!r} ({type(modules[owner]).__name__}) should have an nn.Linear child {child!r} but has "
            f"{type(module).__name__}; widths cannot be changed here. Supported classes: "
            f"{', '.join(SUPPORTED_CLASSES)}."
        )
    return name, module


def find_structures(model: nn.Module) -> list[AttentionSpec | MlpSpec]:
    """Find the attention head groups and MLPs whose widths can be changed, in ``named_modules`` order.

    Args:
        model: a transformers Llama / Qwen2 / Mistral / Qwen3 model, or a LLaDA-style model with
            ``LLaDALlamaBlock`` blocks.

    Returns:
        :class:`AttentionSpec` and :class:`MlpSpec` entries (a LLaDA block yields one of each).

    Raises:
        ValueError: if an attention module of the model has no adapter (e.g. GPT-2's fused ``c_attn``
            Conv1D) or an adapter's requirements fail; the message lists the supported classes.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        >>> [(type(s).__name__, s.name) for s in find_structures(model)][:2]
        [('AttentionSpec', 'model.layers.0.self_attn'), ('MlpSpec', 'model.layers.0.mlp')]
    """
    modules = dict(model.named_modules())
    specs: list[AttentionSpec | MlpSpec] = []
    for owner, module in modules.items():
        key = next((k for k, a in ADAPTERS.items() if type(module).__name__ in a.classes), None)
        if key is None:
            continue
        adapter = ADAPTERS[key]
        reason = adapter.unsupported(module)
        if reason is not None:
            raise ValueError(
                f"widths of {owner!r} ({type(module).__name__}) cannot be changed: {reason}. "
                "Structured pruning is only available without it."
            )
        if adapter.attention is not None:
            (q, q_mod), (k, k_mod), (v, _), (o, _) = (_linear(modules, owner, c) for c in adapter.attention)
            num_heads, head_dim = adapter.read_heads(module)
            num_kv = k_mod.out_features // head_dim
            if num_heads * head_dim != q_mod.out_features or num_kv < 1 or num_heads % num_kv:
                raise ValueError(
                    f"{owner!r}: q_proj has {q_mod.out_features} outputs, k_proj {k_mod.out_features}, "
                    f"but the module says {num_heads} heads of size {head_dim}; its attributes and weights "
                    "disagree (was it pruned by another tool?). Load the dense checkpoint."
                )
            specs.append(AttentionSpec(owner, q, k, v, o, num_heads, num_kv, head_dim, key))
        if adapter.mlp is not None:
            (g, g_mod), (u, _), (d, _) = (_linear(modules, owner, c) for c in adapter.mlp)
            specs.append(MlpSpec(owner, g, u, d, g_mod.out_features, key))
    covered = {s.name for s in specs if isinstance(s, AttentionSpec)}
    try:
        attention = discover(model).attention
    except ValueError:
        attention = ()
    missing = [name for name in attention if name not in covered]
    _refuse_fused_and_moe(model, modules, missing)
    if missing or not specs:
        where = f"{missing[0]!r} ({type(modules[missing[0]]).__name__})" if missing else type(model).__name__
        raise ValueError(
            f"Structured pruning cannot change the widths of {where}: no adapter knows which linears form "
            f"its heads (e.g. fused qkv projections). Supported classes: {', '.join(SUPPORTED_CLASSES)}. "
            "Use unstructured or N:M pruning for this model."
        )
    return specs


_FUSED_QKV = ("query_key_value", "qkv_proj", "Wqkv", "wqkv", "c_attn", "att_proj")


def _refuse_fused_and_moe(model: nn.Module, modules: dict[str, nn.Module], missing: list[str]) -> None:
    """Name the two layouts structured pruning cannot change: fused q/k/v projections and routed experts."""
    for name in missing:
        fused = next((c for c in _FUSED_QKV if isinstance(getattr(modules[name], c, None), nn.Module)), None)
        if fused is not None:
            raise ValueError(
                f"Structured pruning cannot remove heads of {name!r} ({type(modules[name]).__name__}): its "
                f"queries, keys and values come from one fused projection {fused!r} (LLaDA2.0's "
                "query_key_value has (heads + 2·kv_heads)·head_dim outputs), which no adapter slices. "
                "Prune this model unstructured or N:M: the fused projection is an ordinary linear there. "
                f"Supported classes: {', '.join(SUPPORTED_CLASSES)}."
            )
    experts = discover_experts(model)
    if experts:
        raise ValueError(
            f"Structured pruning does not change expert widths of mixture-of-experts layers "
            f"({experts[0].name}, {len(experts)} layers). Prune this model unstructured or N:M, which "
            "prunes every expert slice (docs/PRUNING.md, 'Mixture-of-experts models')."
        )


# ------------------------------------------------------------------------------------------------
# Configs: widths that save_pretrained + from_pretrained must see.
# ------------------------------------------------------------------------------------------------


def spec_widths(spec: AttentionSpec | MlpSpec) -> tuple[int, ...]:
    """``(num_heads, num_kv_heads, head_dim)`` of an attention spec, ``(width,)`` of an MLP spec."""
    if isinstance(spec, AttentionSpec):
        return (spec.num_heads, spec.num_kv_heads, spec.head_dim)
    return (spec.width,)


def write_config_widths(model: nn.Module, specs: list[AttentionSpec | MlpSpec]) -> None:
    """Write the widths of ``specs`` into the modules' configs, in place, where one value fits all layers.

    When every attention spec has the same ``(heads, kv heads, head_dim)`` and the adapter names config
    fields for them (likewise for MLP widths), those fields are set on every config the modules hold,
    so ``save_pretrained`` + ``from_pretrained`` rebuilds the pruned shapes. Otherwise a warning says
    to save the plan instead; nothing is written for that kind.

    Args:
        model: the (pruned) model.
        specs: its current specs, e.g. :func:`find_structures` after slicing.
    """
    modules = dict(model.named_modules())
    unexpressed = []
    for cls in (AttentionSpec, MlpSpec):
        group = [s for s in specs if isinstance(s, cls)]
        adapters = {ADAPTERS[s.adapter] for s in group}
        keys = {a.head_config if cls is AttentionSpec else (a.width_config,) for a in adapters}
        widths = {spec_widths(s) for s in group}
        if not group:
            continue
        if len(widths) != 1 or len(keys) != 1 or None in keys or (None,) in keys:
            unexpressed.append(f"{'heads' if cls is AttentionSpec else 'MLP widths'} {sorted(widths)[:4]}")
            continue
        (names,), (values,) = keys, widths
        found = (getattr(modules[s.name], "config", None) for s in group)
        configs = {id(c): c for c in found if c is not None}
        for config in configs.values():
            for attr, value in zip(names, values):
                setattr(config, attr, value)
    if unexpressed:
        logger.warning(
            "the model config cannot express the pruned %s (per-layer widths differ, or the architecture "
            "derives them from its config); save_pretrained will not reload it. Save the plan "
            "(prune.methods.structured.save_plan) and re-apply it to the dense checkpoint.",
            " and ".join(unexpressed),
        )
