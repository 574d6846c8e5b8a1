"""How attention sinks move along a denoising trajectory: the metrics of the paper's claim.

Sinks of diffusion LMs move across denoising steps (arXiv 2602.17664). Measured here: temporal
variance of the dominant sink position, Jaccard stability of the sink set between consecutive steps,
and spatial concentration (top-k share, normalised entropy). Each formula is written out in
``docs/METRICS.md``; sink sets come from the one sink rule in :mod:`attnprobe.analysis.sinks`. The
per-step functions on tensors live in :mod:`attnprobe.analysis.metrics`; the trajectory tables read
any object with ``num_steps``, ``layers``, ``attention_mass(step)``, ``valid(step)`` and
``step_meta(step)`` (an :class:`attnprobe.TrajectoryStore`, or a stand-in) and return pandas frames.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

# The per-step metrics (attnprobe.analysis.metrics) stay importable from here, where they are applied.
from attnprobe.analysis.metrics import (
    dominant_position,
    jaccard,
    normalized_entropy,
    sink_centroid,
    temporal_variance,
    top_share,
)
from attnprobe.analysis.sinks import DEFAULT_RATIO, DEFAULT_SINK_STD, SINK_RULES, sink_sets

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_TOP_FRAC = 0.05


class StoreLike(Protocol):
    """What the trajectory metrics read from a store (``attnprobe.TrajectoryStore`` satisfies it)."""

    num_steps: int
    layers: list[str]

    def attention_mass(self, step: int) -> Tensor: ...  # (layers, batch, heads, keys) float32

    def valid(self, step: int) -> Tensor | None: ...  # (batch, keys) bool

    def step_meta(self, step: int) -> dict[str, Any]: ...


# -- trajectory metrics over a store -----------------------------------------------------------------


@dataclass
class _Scan:
    """Everything the tables need, gathered in one pass over the store."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (step, sample)
    segments: list[list[int]] = field(default_factory=list)  # steps of each trajectory segment
    dominant: dict[int, Tensor] = field(default_factory=dict)  # step -> (batch,) relative position
    centroid: dict[int, Tensor] = field(default_factory=dict)  # step -> (batch,)
    layer_dominant: dict[int, Tensor] = field(default_factory=dict)  # step -> (layers, batch)
    layer_top1: dict[int, Tensor] = field(default_factory=dict)  # step -> (layers, batch)
    layer_entropy: dict[int, Tensor] = field(default_factory=dict)  # step -> (layers, batch)
    skipped: list[str] = field(default_factory=list)


def _segment_key(mass: Tensor, meta: dict[str, Any]) -> tuple:
    sequences = meta.get("sequences")
    sequences = tuple(sequences) if isinstance(sequences, list) else sequences
    return (mass.shape[1], mass.shape[-1], mass.shape[0], sequences)  # batch, keys, layers, sequences


def _break_reason(prev: tuple, key: tuple) -> str:
    if prev[0] != key[0]:
        return f"batch size changes {prev[0]} -> {key[0]}"
    if prev[1] != key[1]:
        return f"number of keys changes {prev[1]} -> {key[1]}"
    if prev[2] != key[2]:
        return f"number of layers changes {prev[2]} -> {key[2]}"
    return "the step holds other sequences (step_meta 'sequences' differs)"


def _options(store: Any, sink_std: float | None, top_frac: float, rule: str) -> float:
    if rule not in SINK_RULES:
        raise ValueError(f"rule must be one of {SINK_RULES}, got {rule!r}.")
    if not 0 < top_frac <= 1:
        raise ValueError(
            f"top_frac must be in (0, 1], got {top_frac}; it is the share of keys in topk_share."
        )
    if sink_std is None:
        options = getattr(store, "options", None) or {}
        sink_std = float(options.get("sink_std", DEFAULT_SINK_STD))
    return sink_std


def _scan(store: StoreLike, sink_std: float, rule: str, ratio: float, top_frac: float) -> _Scan:
    scan = _Scan()
    prev_key: tuple | None = None
    prev_sets: Tensor | None = None
    prev_rows: list[dict[str, Any]] = []
    for step in range(store.num_steps):
        layer_mass = store.attention_mass(step)  # (layers, batch, heads, keys)
        if layer_mass.ndim != 4:
            raise ValueError(
                f"store.attention_mass({step}) must be (layers, batch, heads, keys), got shape "
                f"{tuple(layer_mass.shape)}."
            )
        layer_mass = layer_mass.to(torch.float32)
        n_layers, batch, _, keys = layer_mass.shape
        meta = dict(store.step_meta(step) or {})
        valid = store.valid(step)
        if valid is not None and tuple(valid.shape) != (batch, keys):
            warnings.warn(
                f"step {step}: valid has shape {tuple(valid.shape)} but the mass has (batch, keys) = "
                f"{(batch, keys)}; treating every key as valid for this step.",
                stacklevel=3,
            )
            valid = None
        valid = torch.ones(batch, keys, dtype=torch.bool) if valid is None else valid.to(torch.bool)
        valid = valid.to(layer_mass.device)

        per_layer = layer_mass.sum(dim=2)  # (layers, batch, keys)
        mass = per_layer.sum(dim=0)  # (batch, keys)
        sets = sink_sets(mass, valid, rule=rule, sink_std=sink_std, ratio=ratio)
        n_valid = valid.sum(dim=-1)
        k = (n_valid.to(torch.float32) * top_frac).ceil().to(torch.int64).clamp(min=1)
        index, position = dominant_position(mass, valid)
        centroid = sink_centroid(sets, valid)
        scan.dominant[step], scan.centroid[step] = position, centroid

        flat_valid = valid.expand(n_layers, batch, keys).reshape(-1, keys)
        flat = per_layer.reshape(-1, keys)
        scan.layer_dominant[step] = dominant_position(flat, flat_valid)[1].view(n_layers, batch)
        scan.layer_top1[step] = top_share(flat, flat_valid, 1).view(n_layers, batch)
        scan.layer_entropy[step] = normalized_entropy(flat, flat_valid).view(n_layers, batch)

        key = _segment_key(layer_mass, meta)
        if prev_key is not None and key == prev_key and prev_sets is not None:
            for row, value in zip(prev_rows, jaccard(prev_sets, sets).tolist()):
                row["jaccard_with_next"] = value
                row["next_skip_reason"] = None
            scan.segments[-1].append(step)
        else:
            if prev_key is not None:
                reason = _break_reason(prev_key, key)
                scan.skipped.append(f"step {step - 1} -> {step}: {reason}")
                for row in prev_rows:
                    row["next_skip_reason"] = reason
            scan.segments.append([step])

        columns = {
            "n_valid": n_valid.tolist(),
            "n_sinks": sets.sum(dim=-1).tolist(),
            "top1_share": top_share(mass, valid, 1).tolist(),
            "topk_share": top_share(mass, valid, k).tolist(),
            "top_k": k.tolist(),
            "entropy": normalized_entropy(mass, valid).tolist(),
            "dominant_index": index.tolist(),
            "dominant_position": position.tolist(),
            "sink_centroid": centroid.tolist(),
        }
        prev_rows = []
        for b in range(batch):
            row = {"step": step, "batch": b, "segment": len(scan.segments) - 1}
            row.update({"t": meta.get("t"), "mask_ratio": meta.get("mask_ratio")})
            row.update({name: values[b] for name, values in columns.items()})
            row.update({"jaccard_with_next": math.nan, "next_skip_reason": "last step"})
            prev_rows.append(row)
        scan.rows.extend(prev_rows)
        prev_key, prev_sets = key, sets
    return scan


def _segment_variance(scan: _Scan, per_step: dict[int, Tensor]) -> Tensor:
    """Temporal variance of every trajectory (segment x sample), trajectories along the last dim.

    ``per_step`` values are ``(batch,)`` or ``(layers, batch)``; the result is ``(trajectories,)`` or
    ``(layers, trajectories)``, NaN for trajectories with fewer than two defined steps.
    """
    parts = [temporal_variance(torch.stack([per_step[s] for s in steps])) for steps in scan.segments]
    if not parts:
        return torch.empty(0)
    return torch.cat(parts, dim=-1)


def _nanmean(x: Tensor) -> float:
    defined = x[~x.isnan()]
    return float(defined.mean()) if defined.numel() else math.nan


def step_table(
    store: StoreLike,
    *,
    sink_std: float | None = None,
    rule: str = "std",
    ratio: float = DEFAULT_RATIO,
    top_frac: float = DEFAULT_TOP_FRAC,
) -> pd.DataFrame:
    """One row per (step, sample): sink count, concentration, dominant position, stability.

    Consecutive steps are compared (``jaccard_with_next``) only inside a trajectory *segment*: a run
    of steps with the same batch size, number of keys and ``step_meta["sequences"]`` (when recorded).
    Elsewhere the value is NaN and ``next_skip_reason`` says why.

    Args:
        store: a trajectory store or any object with its reading API.
        sink_std: sink-set threshold (``rule="std"``); default ``store.options["sink_std"]`` or 2.0.
        rule: "std" or "ratio" (:func:`sink_sets`).
        ratio: multiple of the mean for ``rule="ratio"``.
        top_frac: share of valid keys counted in ``topk_share`` (``k = ceil(top_frac * n_valid)``).

    Returns:
        DataFrame with columns step, batch, segment, t, mask_ratio, n_valid, n_sinks, top1_share,
        topk_share, top_k, entropy, dominant_index, dominant_position, sink_centroid,
        jaccard_with_next, next_skip_reason.

    Example:
        >>> table = step_table(attnprobe.open("runs/gen"))
        >>> len(table), bool(table.top1_share.between(0, 1).all())  # one row per (step, sample)
        (4, True)
    """
    import pandas as pd

    sink_std = _options(store, sink_std, top_frac, rule)
    return pd.DataFrame(_scan(store, sink_std, rule, ratio, top_frac).rows, columns=_STEP_COLUMNS)


_STEP_COLUMNS = [
    "step",
    "batch",
    "segment",
    "t",
    "mask_ratio",
    "n_valid",
    "n_sinks",
    "top1_share",
    "topk_share",
    "top_k",
    "entropy",
    "dominant_index",
    "dominant_position",
    "sink_centroid",
    "jaccard_with_next",
    "next_skip_reason",
]


def layer_table(store: StoreLike) -> pd.DataFrame:
    """One row per layer: how far its own dominant key moves over steps, and how concentrated it is.

    Per layer the mass is summed over heads; ``temporal_variance`` is the population variance over
    steps of the dominant key's relative position, averaged over trajectories (segment x sample);
    ``top1_share`` and ``entropy`` are averaged over steps and samples.

    Args:
        store: a trajectory store or any object with its reading API.

    Returns:
        DataFrame with columns layer, name, temporal_variance, mean_dominant_position, top1_share,
        entropy, n_trajectories.

    Example:
        >>> len(layer_table(attnprobe.open("runs/gen")))  # one row per layer
        4
    """
    import pandas as pd

    scan = _scan(store, DEFAULT_SINK_STD, "std", DEFAULT_RATIO, DEFAULT_TOP_FRAC)
    names = list(getattr(store, "layers", []) or [])
    n_layers = max((t.shape[0] for t in scan.layer_dominant.values()), default=0)
    # Segments share their layer count, so each segment's (layers, batch) variance stacks cleanly.
    per_segment = [
        temporal_variance(torch.stack([scan.layer_dominant[s] for s in steps])) for steps in scan.segments
    ]

    def over_steps(values: dict[int, Tensor], layer: int) -> Tensor:
        parts = [v[layer] for v in values.values() if layer < v.shape[0]]
        return torch.cat(parts) if parts else torch.empty(0)

    rows = []
    for layer in range(n_layers):
        var = [v[layer] for v in per_segment if layer < v.shape[0]]
        var = torch.cat(var) if var else torch.empty(0)
        rows.append(
            {
                "layer": layer,
                "name": names[layer] if layer < len(names) else None,
                "temporal_variance": _nanmean(var),
                "mean_dominant_position": _nanmean(over_steps(scan.layer_dominant, layer)),
                "top1_share": _nanmean(over_steps(scan.layer_top1, layer)),
                "entropy": _nanmean(over_steps(scan.layer_entropy, layer)),
                "n_trajectories": int((~var.isnan()).sum()),
            }
        )
    columns = ["layer", "name", "temporal_variance", "mean_dominant_position", "top1_share", "entropy"]
    return pd.DataFrame(rows, columns=[*columns, "n_trajectories"])


def summary(
    store: StoreLike,
    *,
    sink_std: float | None = None,
    rule: str = "std",
    ratio: float = DEFAULT_RATIO,
    top_frac: float = DEFAULT_TOP_FRAC,
) -> dict[str, Any]:
    """Aggregated trajectory metrics of a store (mass summed over layers and heads).

    Args:
        store, sink_std, rule, ratio, top_frac: as in :func:`step_table`.

    Returns:
        dict with ``n_steps``, ``n_segments``, ``n_trajectories`` (segment x sample with at least two
        steps), ``temporal_variance`` (mean over trajectories of the variance of the dominant
        position), ``centroid_variance`` (same for the sink-set centroid), ``mean_jaccard`` (over
        consecutive step pairs inside segments), ``top1_share``, ``topk_share``, ``entropy``,
        ``mean_n_sinks`` (means over steps and samples), the options used, and ``skipped``: one line
        per consecutive pair not compared, with the reason. ``pd.DataFrame([summary(store)])`` gives
        a one-row frame.

    Example:
        >>> summary(attnprobe.open("runs/gen"))["temporal_variance"] >= 0
        True
    """
    sink_std = _options(store, sink_std, top_frac, rule)
    scan = _scan(store, sink_std, rule, ratio, top_frac)
    variance = _segment_variance(scan, scan.dominant)
    centroid_variance = _segment_variance(scan, scan.centroid)

    def mean_of(name: str) -> float:
        values = [r[name] for r in scan.rows if r[name] is not None]
        return _nanmean(torch.tensor(values, dtype=torch.float64)) if values else math.nan

    return {
        "n_steps": store.num_steps,
        "n_segments": len(scan.segments),
        "n_trajectories": int((~variance.isnan()).sum()),
        "temporal_variance": _nanmean(variance),
        "centroid_variance": _nanmean(centroid_variance),
        "mean_jaccard": mean_of("jaccard_with_next"),
        "top1_share": mean_of("top1_share"),
        "topk_share": mean_of("topk_share"),
        "entropy": mean_of("entropy"),
        "mean_n_sinks": mean_of("n_sinks"),
        "rule": rule,
        "sink_std": sink_std,
        "ratio": ratio,
        "top_frac": top_frac,
        "skipped": list(scan.skipped),
    }
