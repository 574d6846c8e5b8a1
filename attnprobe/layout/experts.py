"""Mixture-of-experts layers: find the experts, capture their routing, reduce per-expert statistics.

An expert sees only the tokens routed to it, as a (routed rows, features) input, so the per-linear
hooks of the recorder cannot tell which (sample, position) a row came from, and fused experts have
no ``nn.Linear`` at all. Instead, for each MoE layer one hook captures the layer's hidden states
(N = batch · tokens rows) and its routing index (N, top-k):

- fused experts (one module holding 3-D parameters): a forward pre-hook on that module reads its
  arguments, ``experts(hidden_states, top_k_index, top_k_weights)`` in transformers 5 or
  ``experts(hidden_states, routing_weights, selected_experts)`` in fused LLaDA2 ports (the index is
  the integer tensor, whatever its position);
- experts as an ``nn.ModuleList`` (OLMoE, LLaDA-MoE, LLaDA2's official file): a forward hook on the
  sibling router reads its input and output: the integer top-k index it returns (LLaDA2's gate), or
  the top-k of the logits it returns (OLMoE's ``gate`` linear; softmax keeps the order).

Row n of the hidden states is token ``(n // tokens, n % tokens)``, so each routed row gets that
token's own sink weight and padding flag. The input of an expert's ``down_proj`` is recomputed from
the captured rows and that expert's own weights (``act(gate(x)) * up(x)``, in the weights' dtype),
so the order in which a model dispatches rows to its experts never matters.

Statistics of one expert's input group, over its routed rows (cf. :func:`attnprobe.reduce_inputs`):
``sumsq``/``wsumsq`` (batch, in), ``tokens`` (batch,) routed valid tokens, ``cand_rows`` the squared
rows of the candidate tokens routed to it and ``cand_sel`` their positions in the step's candidate
index, and with Hessians ``plain``/``weighted`` (in, in).

Names: a slice of a fused parameter is ``<experts>.<param>.<e>`` (e.g.
``model.layers.0.mlp.experts.gate_up_proj.3``, an (out, in) matrix); a ``ModuleList`` expert keeps its
linears' names (``model.layers.0.mlp.experts.3.gate_proj``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_ROUTER_NAMES = ("gate", "router")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "num_experts_per_token")


@dataclass(frozen=True)
class ExpertAdapter:
    """Names of an expert's gated MLP: ``gate`` holds gate and up stacked when ``up`` is None."""

    gate: str
    up: str | None
    down: str
    fused: bool  # 3-D parameters of one module (True) or nn.Linear children of each list entry


ADAPTERS: dict[str, ExpertAdapter] = {
    "fused-gate-up": ExpertAdapter("gate_up_proj", None, "down_proj", fused=True),  # transformers 5
    "fused-gate-up-down": ExpertAdapter("gate_proj", "up_proj", "down_proj", fused=True),  # LLaDA2 ports
    "list": ExpertAdapter("gate_proj", "up_proj", "down_proj", fused=False),  # OLMoE, LLaDA-MoE, LLaDA2
    "list-w": ExpertAdapter("w1", "w3", "w2", fused=False),  # Mixtral-style
}


@dataclass(frozen=True)
class ExpertSet:
    """The routed experts of one MoE layer.

    Attributes:
        name: the experts module (fused) or ``nn.ModuleList`` name.
        adapter: key into :data:`ADAPTERS`.
        num_experts, hidden: E and the input width H.
        router: the router module's name (its weights are not expert weights), or None.
        capture: the module hooked to read hidden states and routing.
        top_k: experts per token when the router returns only logits, else None.
    """

    name: str
    adapter: str
    num_experts: int
    hidden: int
    router: str | None
    capture: str
    top_k: int | None

    @property
    def spec(self) -> ExpertAdapter:
        return ADAPTERS[self.adapter]

    def slice_name(self, projection: str, expert: int) -> str:
        """Name of one expert's weight of ``projection`` (an adapter field value, e.g. "down_proj")."""
        if self.spec.fused:
            return f"{self.name}.{projection}.{expert}"
        return f"{self.name}.{expert}.{projection}"

    def groups(self, expert: int) -> dict[str, list[str]]:
        """Input groups of one expert: {group: member weights}; the first group feeds gate (and up)."""
        spec = self.spec
        first = [self.slice_name(spec.gate, expert)]
        if spec.up is not None:
            first.append(self.slice_name(spec.up, expert))
        return {first[0]: first, self.slice_name(spec.down, expert): [self.slice_name(spec.down, expert)]}

    def weight_names(self) -> list[str]:
        return [n for e in range(self.num_experts) for members in self.groups(e).values() for n in members]


def _router_of(parent: nn.Module, parent_name: str, num_experts: int, hidden: int) -> str | None:
    """The sibling ``gate``/``router`` with an (E, H) weight, its own or a child's (``router.proj``)."""
    for child in _ROUTER_NAMES:
        module = getattr(parent, child, None)
        if not isinstance(module, nn.Module):
            continue
        weights = [p for _, p in module.named_parameters() if p.dim() == 2]
        if any(tuple(w.shape) == (num_experts, hidden) for w in weights):
            return f"{parent_name}.{child}" if parent_name else child
    return None


def _top_k_of(parent: nn.Module) -> int | None:
    for owner in (parent, getattr(parent, "config", None)):
        for attr in _TOP_K_ATTRS:
            value = getattr(owner, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _fused_set(name: str, module: nn.Module) -> tuple[str, int, int] | None:
    params = dict(module.named_parameters(recurse=False))
    for key, spec in ADAPTERS.items():
        if not spec.fused:
            continue
        names = [spec.gate, spec.down] + ([spec.up] if spec.up else [])
        found = [params.get(n) for n in names]
        if any(p is None or p.dim() != 3 for p in found):
            continue
        gate, down = found[0], found[1]
        experts, hidden = gate.shape[0], gate.shape[2]
        # (E, out, in) orientation: down maps the expert width back to the hidden width.
        if all(p.shape[0] == experts for p in found) and down.shape[1] == hidden:
            return key, experts, hidden
    return None


def _list_set(module: nn.Module) -> tuple[str, int, int] | None:
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return None
    for key, spec in ADAPTERS.items():
        if spec.fused:
            continue
        names = [spec.gate, spec.up, spec.down]
        if all(all(isinstance(getattr(e, n, None), nn.Linear) for n in names) for e in module):
            return key, len(module), getattr(module[0], spec.gate).in_features
    return None


def discover_experts(model: nn.Module, blocks: list[str] | tuple[str, ...] | None = None) -> list[ExpertSet]:
    """Find the routed experts of every MoE layer inside ``blocks`` (default: all of ``model``).

    A layer is found when its experts match an adapter of :data:`ADAPTERS` and a sibling router
    (``gate`` or ``router`` with an (E, H) weight) exists: a ``ModuleList`` without a router is not
    treated as experts.

    Example:
        >>> sets = discover_experts(moe_model)
        >>> sets[0].name, sets[0].num_experts
        ('model.layers.0.mlp.experts', 4)
    """
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        if not name or blocks is not None and not any(b == "" or name.startswith(b + ".") for b in blocks):
            continue
        fused = _fused_set(name, module)
        match = fused or _list_set(module)
        if match is None:
            continue
        key, experts, hidden = match
        parent_name = name.rpartition(".")[0]
        parent = modules[parent_name]
        router = _router_of(parent, parent_name, experts, hidden)
        if router is None:
            continue
        capture = name if fused else router
        act_owner = module if fused else module[0]
        if getattr(act_owner, "act_fn", getattr(act_owner, "act", None)) is None:
            logger.warning("attnprobe: %s has no act_fn; its down_proj inputs are computed with SiLU", name)
        found.append(ExpertSet(name, key, experts, hidden, router, capture, _top_k_of(parent)))
    return found


def expert_weight(model: nn.Module, name: str, modules: dict[str, nn.Module] | None = None) -> Tensor | None:
    """The (out, in) weight called ``name``: an ``nn.Linear``'s, or a view of one fused expert slice.

    Args:
        model: the model.
        name: a linear's name or ``<experts>.<param>.<e>``.
        modules: ``dict(model.named_modules())`` when resolving many names.

    Example:
        >>> expert_weight(moe_model, "model.layers.0.mlp.experts.down_proj.3").shape
        torch.Size([32, 32])
    """
    modules = modules if modules is not None else dict(model.named_modules())
    owner, _, last = name.rpartition(".")
    if last.isdigit():
        module_name, _, param = owner.rpartition(".")
        module = modules.get(module_name)
        tensor = getattr(module, param, None) if module is not None else None
        if isinstance(tensor, nn.Parameter) and tensor.dim() == 3 and int(last) < tensor.shape[0]:
            return tensor[int(last)]
    module = modules.get(name)
    return module.weight if isinstance(module, nn.Linear) else None


# -- capture ---------------------------------------------------------------------------------------


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return [t for t in (getattr(value, k, None) for k in ("top_k_index", "indices")) if isinstance(t, Tensor)]


def _index_in(tensors: list[Tensor], rows: int) -> Tensor | None:
    """The first integer tensor with k ≥ 1 entries per row: the routing index ((N, k), or (N,) for top-1)."""
    for t in tensors:
        integer = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
        if integer and t.numel() >= rows and t.numel() % rows == 0:
            return t.reshape(rows, -1)
    return None


def routing_from_call(es: ExpertSet, args: tuple, kwargs: dict, output=None) -> tuple[Tensor, Tensor] | None:
    """``(hidden (N, H), index (N, k))`` from a hooked call: the experts' arguments, or the router's
    input and output. None when they cannot be read (the caller warns)."""
    inputs = _tensors(args) + _tensors(kwargs)
    hidden = next((t for t in inputs if t.is_floating_point() and t.shape[-1] == es.hidden), None)
    if hidden is None:
        return None
    hidden = hidden.detach().reshape(-1, es.hidden)
    rows = hidden.shape[0]
    index = _index_in(inputs if output is None else _tensors(output), rows)
    if index is None and output is not None and es.top_k is not None:
        logits = next(
            (t for t in _tensors(output) if t.is_floating_point() and t.shape[-1] == es.num_experts), None
        )
        if logits is not None:
            index = logits.detach().reshape(rows, -1).topk(es.top_k, dim=-1).indices
    return (hidden, index.detach()) if index is not None else None


def attach(
    model: nn.Module,
    sets: list[ExpertSet],
    on_routing: Callable[[ExpertSet, Tensor, Tensor], None],
    on_fail: Callable[[ExpertSet], None],
) -> list:
    """Register one capture hook per expert set; returns the handles (the caller removes them)."""
    modules = dict(model.named_modules())
    handles = []
    for es in sets:

        def fire(result, es=es):
            if result is None:
                on_fail(es)
            else:
                on_routing(es, *result)

        if es.spec.fused:
            hook = modules[es.capture].register_forward_pre_hook(
                lambda m, a, k, es=es, fire=fire: fire(routing_from_call(es, a, k)), with_kwargs=True
            )
        else:
            hook = modules[es.capture].register_forward_hook(
                lambda m, a, k, o, es=es, fire=fire: fire(routing_from_call(es, a, k, o)), with_kwargs=True
            )
        handles.append(hook)
    return handles


# -- reduction -------------------------------------------------------------------------------------


def _weights_of(model_modules: dict[str, nn.Module], es: ExpertSet, expert: int) -> tuple:
    """((gate weight, bias), (up weight, bias) or None when stacked with gate, activation)."""
    spec = es.spec
    if spec.fused:
        owner = model_modules[es.name]
        up = (getattr(owner, spec.up)[expert], None) if spec.up else None
        return (getattr(owner, spec.gate)[expert], None), up, getattr(owner, "act_fn", None)
    mlp = model_modules[es.name][expert]
    gate, up = getattr(mlp, spec.gate), getattr(mlp, spec.up)
    return (gate.weight, gate.bias), (up.weight, up.bias), getattr(mlp, "act_fn", getattr(mlp, "act", None))


def expert_activation(model_modules: dict[str, nn.Module], es: ExpertSet, expert: int, x: Tensor) -> Tensor:
    """The input of expert ``expert``'s down projection for its routed rows ``x`` (n, H)."""
    (gw, gb), up, act = _weights_of(model_modules, es, expert)
    act = act if act is not None else F.silu
    x = x.to(gw.dtype)
    gate = F.linear(x, gw, gb)
    if up is None:  # stacked gate and up
        gate, upv = gate.chunk(2, dim=-1)
    else:
        upv = F.linear(x, up[0], up[1])
    return act(gate) * upv


def routed_rows(index: Tensor, num_experts: int) -> list[Tensor]:
    """For each expert, the rows routed to it in ascending order, from one stable sort of the index.

    Entries outside ``[0, num_experts)`` (dropped tokens, e.g. transformers' ``num_experts`` sentinel)
    route nowhere. One host sync for the counts, instead of one scan of the index per expert.
    """
    rows, k = index.shape
    flat = index.reshape(-1)
    token = torch.arange(rows, device=index.device).repeat_interleave(k)
    kept = (flat >= 0) & (flat < num_experts)
    flat, token = flat[kept], token[kept]
    order = torch.sort(flat, stable=True).indices  # index is token-major: each expert's rows stay sorted
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return list(torch.split(token[order], counts))


def fingerprint(sets: list[ExpertSet]) -> dict[str, dict]:
    """What a store records about the experts: ``{experts name: {adapter, num_experts, hidden}}``."""
    return {
        es.name: {"adapter": es.adapter, "num_experts": es.num_experts, "hidden": es.hidden} for es in sets
    }
