"""Figures of where attention sinks sit along a trajectory, and how far they move.

Sink-Aware Pruning (arXiv 2602.17664) observes that the sinks of diffusion LMs move across denoising
steps while those of AR models stay on the first tokens. :func:`plot_sinks` draws that side by side,
one column per store. Everything it shows comes from :mod:`attnprobe.analysis.sinks` (the one sink rule and
the
per-layer metrics); this module only draws. matplotlib is imported inside the function and draws on an
Agg canvas (no pyplot, no backend switch), so importing or calling it needs no display and changes no
global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from attnprobe.analysis import sinks, trajectory

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from attnprobe.store.reader import TrajectoryStore

_PROGRESS_MIN_STEPS = 32  # below this a store reads in a blink; no progress bar
_FLOOR = 1e-5  # lowest share drawn on the log colour scale


@dataclass
class _Column:
    """What one column of the figure draws, gathered in one pass over a store."""

    label: str
    share: np.ndarray  # (steps, max keys) per-step share of the mass; NaN on padding / skipped steps
    sink_steps: list[int] = field(default_factory=list)  # sink markers: step ...
    sink_keys: list[int] = field(default_factory=list)  # ... and key position
    dominant_steps: list[int] = field(default_factory=list)
    dominant_keys: list[int] = field(default_factory=list)
    layers: pd.DataFrame | None = None  # trajectory.layer_table
    notes: list[str] = field(default_factory=list)


def _gather(store: TrajectoryStore, label: str, batch: int, sink_std: float, progress: bool) -> _Column:
    import numpy as np
    from tqdm.auto import tqdm

    n_steps = store.num_steps
    if n_steps == 0:
        raise ValueError(f"store {label!r} has no recorded steps; nothing to plot.")
    rows: list[np.ndarray | None] = []
    column = _Column(label=label, share=np.empty((0, 0)))
    missing: list[int] = []
    steps = tqdm(
        range(n_steps),
        desc=f"reading {label}",
        unit="step",
        disable=not progress or n_steps < _PROGRESS_MIN_STEPS,
        leave=False,
    )
    for step in steps:
        layer_mass = store.attention_mass(step)  # (layers, batch, heads, keys)
        if batch >= layer_mass.shape[1]:
            missing.append(step)
            rows.append(None)
            continue
        mass = sinks.total_mass(layer_mass)[batch : batch + 1]  # (1, keys)
        valid = store.valid(step)
        if valid is None or tuple(valid.shape) != (layer_mass.shape[1], layer_mass.shape[-1]):
            valid = torch.ones_like(mass, dtype=torch.bool)
        else:
            valid = valid[batch : batch + 1].to(torch.bool)
        total = float(mass[valid].sum())
        share = (mass / total if total > 0 else torch.zeros_like(mass)).masked_fill(~valid, math.nan)
        rows.append(share[0].numpy())

        for key in sinks.sink_sets(mass, valid, sink_std=sink_std)[0].nonzero().flatten().tolist():
            column.sink_steps.append(step)
            column.sink_keys.append(key)
        index, _ = trajectory.dominant_position(mass, valid)
        if int(index[0]) >= 0:
            column.dominant_steps.append(step)
            column.dominant_keys.append(int(index[0]))

    if len(missing) == n_steps:
        raise ValueError(
            f"store {label!r} has no sample {batch} at any step (batch size "
            f"{store.attention_mass(0).shape[1]}); pick a sample with --batch / batch=."
        )
    if missing:
        column.notes.append(f"{len(missing)} step(s) without sample {batch} skipped")
    lengths = {len(r) for r in rows if r is not None}
    width = max(lengths)
    if len(lengths) > 1:
        column.notes.append(f"keys vary {min(lengths)}-{width}: padded")
    column.share = np.full((n_steps, width), math.nan, dtype=np.float32)
    for step, row in enumerate(rows):
        if row is not None:
            column.share[step, : len(row)] = row
    column.layers = trajectory.layer_table(store)
    return column


def plot_sinks(
    stores: Sequence[TrajectoryStore],
    labels: Sequence[str],
    out: str | Path,
    *,
    batch: int = 0,
    sink_std: float = sinks.DEFAULT_SINK_STD,
    progress: bool = True,
) -> Path:
    """Draw where the sinks of each store sit at every step, one column per store, into a PNG.

    Rows of the figure, per store:

    1. heat map of step x key position of the step's attention mass (summed over layers and heads,
       sample ``batch``) as a share of that step's total, on a log colour scale shared by all
       columns; the step's sinks (``sinks.sink_sets``, ``mass > mean + sink_std * std``) are marked;
    2. the dominant key position (argmax of the mass) at each step;
    3. per-layer temporal variance of the dominant position (``trajectory.layer_table``, all samples);
       0 means the layer's sink never moves, 0.25 is the most a position in [0, 1] can vary.

    Steps with fewer keys than the longest are padded (blank cells); steps without sample ``batch``
    are skipped. Either is noted in the column title.

    Args:
        stores: trajectory stores (``attnprobe.open(path)``), e.g. a diffusion LM and an AR model.
        labels: one title per store.
        out: PNG path to write; parent directories are created.
        batch: which sample of each step to draw in rows 1 and 2.
        sink_std: sink threshold in standard deviations above the mean.
        progress: show a tqdm bar while reading stores with many steps.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no stores, labels that do not match the stores, a negative ``batch``, a store
            without steps or without sample ``batch``.
        ImportError: matplotlib is not installed (``pip install 'attnprobe[plot]'``).

    Example:
        >>> figure = plot_sinks([attnprobe.open("runs/gen"), attnprobe.open("runs/calib")],
        ...                     ["generation", "calibration"], "sinks.png")
        >>> import os; os.path.getsize("sinks.png") > 0
        True
    """
    if not stores:
        raise ValueError("plot_sinks needs at least one store.")
    if len(labels) != len(stores):
        raise ValueError(f"got {len(labels)} label(s) for {len(stores)} store(s); give one label per store.")
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}.")
    out = Path(out)

    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    columns = [_gather(s, label, batch, sink_std, progress) for s, label in zip(stores, labels)]
    # One colour scale for all columns: from the 1st percentile of the drawn shares to the largest.
    positive = np.concatenate([c.share[np.isfinite(c.share) & (c.share > 0)] for c in columns])
    low = max(float(np.percentile(positive, 1)), _FLOOR) if positive.size else _FLOOR
    high = max(float(positive.max()) if positive.size else 1.0, 10 * low)
    norm = LogNorm(vmin=low, vmax=high, clip=True)
    # One variance scale too, so that columns compare at a glance; 0.25 is the most it can be.
    variances = [v for c in columns if c.layers is not None for v in c.layers["temporal_variance"]]
    top = max([v for v in variances if not math.isnan(v)], default=0.0)
    var_top = min(max(1.25 * top, 0.01), 0.26)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#d9d9d9")  # bad: padding, skipped steps

    n = len(columns)
    # A bare Figure on an Agg canvas, not pyplot: no global backend switch, no figure registry.
    fig = Figure(figsize=(5.2 * n + 1.0, 10.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, n, gridspec_kw={"height_ratios": [3.0, 1.4, 1.4]}, squeeze=False)
    image = None
    for j, col in enumerate(columns):
        n_steps, n_keys = col.share.shape
        heat, dom, var = axes[0, j], axes[1, j], axes[2, j]

        title = col.label if not col.notes else f"{col.label}\n({'; '.join(col.notes)})"
        heat.set_title(title, fontsize=12, fontweight="bold")
        image = heat.imshow(
            np.where(col.share > 0, col.share, np.nan) if n_keys else col.share,
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            norm=norm,
            extent=(-0.5, n_keys - 0.5, n_steps - 0.5, -0.5),
        )
        size = float(np.clip(1500.0 / max(len(col.sink_keys), 1), 4.0, 30.0))
        heat.scatter(
            col.sink_keys,
            col.sink_steps,
            s=size,
            facecolors="none",
            edgecolors="#00e5ff",
            linewidths=0.8,
        )
        heat.set_xlabel(f"key position   (\u25cb sink: mass > mean + {sink_std:g} std)")
        heat.set_ylabel("denoising step")

        marker = 3.0 if n_steps <= 64 else 1.5
        dom.plot(col.dominant_steps, col.dominant_keys, "-o", color="#d62728", markersize=marker, linewidth=1)
        dom.set_xlim(-0.5, n_steps - 0.5)
        dom.set_ylim(-0.5, n_keys - 0.5)
        dom.set_xlabel("denoising step")
        dom.set_ylabel("dominant key position")
        dom.set_title(f"dominant sink (argmax of mass), sample {batch}", fontsize=10)
        dom.grid(alpha=0.3)

        layers = col.layers
        if layers is not None and len(layers):
            values = layers["temporal_variance"].to_numpy(dtype=float)
            drawn = np.nan_to_num(values, nan=0.0)
            x = layers["layer"].to_numpy()
            var.bar(x, drawn, color="#1f77b4")
            if len(layers) <= 16:
                var.set_xticks(x)
                for xi, value in zip(x, values):
                    text = "n/a" if math.isnan(value) else f"{value:.3f}"
                    var.annotate(
                        text,
                        (xi, 0.0 if math.isnan(value) else min(value, var_top)),
                        xytext=(0, 2),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
            empty = None
            if np.isnan(values).all():
                empty = "undefined: no two consecutive steps\nof the same shape to compare"
            elif np.nanmax(values) == 0.0:
                empty = "0 in every layer: the dominant key never moves"
            if empty is not None:
                var.text(
                    0.5,
                    0.55,
                    empty,
                    transform=var.transAxes,
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="0.4",
                )
        var.set_ylim(0.0, var_top)
        var.set_xlabel("layer")
        var.set_ylabel("temporal variance")
        var.set_title("per-layer temporal variance of the dominant position (all samples)", fontsize=10)
        var.grid(axis="y", alpha=0.3)

    if image is not None:
        bar = fig.colorbar(image, ax=list(axes[0]), shrink=0.9, pad=0.01)
        bar.set_label("share of the step's attention mass (log)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    return out
