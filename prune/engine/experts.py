"""Pruning routed experts: every expert's weights are pruned like a linear, from its own statistics.

Each expert weight is one (out, in) matrix: a ``ModuleList`` expert's ``nn.Linear``, or one slice
``W[e]`` of a fused 3-D parameter (transformers 5 ``gate_up_proj`` (E, 2I, H) / ``down_proj``
(E, H, I); fused LLaDA2 ports ``gate_proj`` / ``up_proj`` / ``down_proj``). A slice is handed to the
same planning code as a linear through :class:`SliceView`, so magnitude, Wanda and SparseGPT,
unstructured and N:M, baseline and sink-aware, all apply per expert, with that expert's statistics
(over exactly the tokens routed to it; :mod:`attnprobe.layout.experts`).

- An expert that received no calibration token has no statistics to score with: it falls back to
  magnitude, and its report row says so.
- Routers (``gate``/``router`` weights) are not pruned unless ``targets=`` names them.
- Masks are saved one key per expert slice, ``mask/<experts>.<param>.<e>`` of shape (out, in), like
  a linear's; :func:`prune.load_masks` resolves the name to that slice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor, nn

from attnprobe import ExpertSet, discover, discover_experts

FALLBACK_NOTE = "magnitude: no calibration token was routed to this expert"


@dataclass
class SliceView:
    """One expert's (out, in) weight inside its 3-D parameter, shaped like an ``nn.Linear``.

    ``weight`` is a fresh view ``getattr(owner, param)[expert]`` at every access, never one kept
    from earlier: onloading swaps the parameter's storage (host → device → host), and a view taken
    before the block was onloaded would read and write the stale host copy.
    """

    name: str
    owner: nn.Module
    param: str
    expert: int

    @property
    def weight(self) -> Tensor:
        return getattr(self.owner, self.param)[self.expert]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def model_experts(model: nn.Module) -> list[ExpertSet]:
    """The routed experts inside the model's attention blocks."""
    try:
        blocks = sorted(set(discover(model).blocks.values()))
    except ValueError:
        return []
    return discover_experts(model, blocks)


def fused_slices(model: nn.Module, sets: list[ExpertSet]) -> dict[str, SliceView]:
    """``{slice name: SliceView}`` of every fused expert parameter."""
    modules = dict(model.named_modules())
    out = {}
    for es in sets:
        if not es.spec.fused:
            continue
        owner = modules[es.name]
        for name in es.weight_names():
            param, expert = name[len(es.name) + 1 :].rsplit(".", 1)
            out[name] = SliceView(name, owner, param, int(expert))
    return out


def fused_selected(model: nn.Module, targets: str | None, ignore: str | None) -> bool:
    """Whether ``targets``/``ignore`` select any fused expert slice."""
    slices = fused_slices(model, model_experts(model))
    return any(_matches(name, targets, ignore) for name in slices)


def router_names(sets: list[ExpertSet]) -> set[str]:
    return {es.router for es in sets if es.router}


def _under(name: str, owners: set[str]) -> bool:
    return any(name == o or name.startswith(o + ".") for o in owners)


def _matches(name: str, targets: str | None, ignore: str | None) -> bool:
    if targets is not None and not re.fullmatch(targets, name):
        return False
    return ignore is None or not re.fullmatch(ignore, name)


def check_store(model: nn.Module, store, sets: list[ExpertSet]) -> None:
    """Refuse a store whose experts differ from the model's, or that predates per-expert statistics."""
    recorded = store.fingerprint.get("experts")
    mine = {es.name: (es.adapter, es.num_experts) for es in sets}
    if recorded is None:
        if sets:
            raise ValueError(
                f"the store at {store.path} has no per-expert statistics, but {type(model).__name__} has "
                f"routed experts ({', '.join(list(mine)[:3])}): it was recorded before attnprobe knew them. "
                "Record the calibration again, or exclude the experts with ignore=r'.*experts.*'."
            )
        return
    theirs = {name: (v.get("adapter"), v.get("num_experts")) for name, v in recorded.items()}
    if theirs != mine:
        raise ValueError(
            f"the store at {store.path} was recorded with experts {theirs}, the model has {mine}; record "
            "the calibration from this model."
        )


def select(
    model: nn.Module,
    linears: dict[str, nn.Module],
    store,
    method: str,
    targets: str | None,
    ignore: str | None,
) -> tuple[dict[str, nn.Module | SliceView], dict[str, str]]:
    """Add the fused expert slices to the selected linears, drop routers not targeted explicitly.

    Args:
        model: the model being pruned.
        linears: the selected ``{name: nn.Linear}`` (``ModuleList`` experts are among them).
        store: the calibration store (None for magnitude without one).
        method: the pruning method (a fallback only matters for methods with statistics).
        targets, ignore: the user's regexes.

    Returns:
        ``(selection, notes)``: the weights to prune and ``{name: note}`` for experts that fall back
        to magnitude.
    """
    sets = model_experts(model)
    if not sets:
        return linears, {}
    routers = router_names(sets)
    chosen: dict[str, nn.Module | SliceView] = {
        n: m for n, m in linears.items() if targets is not None or not _under(n, routers)
    }
    chosen.update({n: v for n, v in fused_slices(model, sets).items() if _matches(n, targets, ignore)})
    notes = {}
    expert_weights = {n for es in sets for n in es.weight_names()}
    if store is not None and method != "magnitude" and expert_weights & set(chosen):
        check_store(model, store, sets)  # only when experts are to be scored from it
        tokens = routed_tokens(store)
        for name in chosen:
            # Absent from the store altogether (never recorded) is an error later, not a fallback.
            if name in expert_weights and tokens.get(name) == 0:
                notes[name] = FALLBACK_NOTE
    return chosen, notes


def routed_tokens(store) -> dict[str, float]:
    """``{expert weight name: calibration tokens routed to it}``, summed over the store's steps."""
    counts: dict[str, float] = {}
    for step in range(store.num_steps):
        groups = store.linear_groups(step)
        for group, stats in store.linear_stats(step).items():
            if "tokens" in stats:
                for name in groups.get(group, [group]):
                    counts[name] = counts.get(name, 0.0) + float(stats["tokens"].sum())
    return counts


def annotate(report, notes: dict[str, str]) -> None:
    """Add the ``note`` column to a report: why a row was not pruned as asked (magnitude fallback)."""
    if report is not None and "layer" in getattr(report, "columns", ()):
        report["note"] = [notes.get(name, "") for name in report["layer"]]
