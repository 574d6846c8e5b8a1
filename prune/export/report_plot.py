"""``prune.plot_report``: one figure of what a pruning run did, layer by layer.

Panels (each drawn only when its data exists):

- sparsity reached, as a heat map of blocks (rows) × linears (columns), values written in the cells;
- reconstruction error, the same map, from any ``*error*`` column of ``result.report``;
- mean sink weight ``w = 1 − s`` per attention layer (rows) and calibration step (columns), from the
  store (what sink-aware scoring multiplies each token row by; the last row is the sum over layers,
  the mass the pruning rule reads);
- mixture of experts: the share of each block's expert weights that was pruned.

Expert linears are one column per kind (``experts.*.gate_proj``), their sparsity weighted by size.
The title says model, method, sparsity, pattern and the recipe options that differ from the defaults.
matplotlib draws on an Agg canvas (no pyplot), so nothing global changes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["plot_report", "report_grid"]

MAX_STEPS = 64  # sink heat map columns: at most this many steps, evenly spaced
_BLOCK = re.compile(r"^(?P<block>.*?\.(?P<index>\d+))\.(?P<kind>.+)$")


def _kind(name: str) -> tuple[str, int, str]:
    """``(block, index, linear kind)`` of a linear's name; expert numbers become ``*``."""
    match = _BLOCK.match(name)
    if match is None:
        return name, 0, name
    kind = re.sub(r"experts\.\d+\.", "experts.*.", match["kind"])
    kind = re.sub(r"(experts\.[^.]+)\.\d+$", r"\1.*", kind)  # fused expert slices: <param>.<e>
    return match["block"], int(match["index"]), kind


def _numel(shape: str) -> int:
    dense = str(shape).split("->")[0]
    try:
        out, inp = (int(v) for v in dense.split("x"))
    except ValueError:
        return 1
    return out * inp


def report_grid(report: Any, column: str):
    """``report[column]`` as a blocks × linear-kinds table (size-weighted over experts of a kind).

    Example:
        >>> import pandas as pd
        >>> r = pd.DataFrame({"layer": ["m.layers.0.q", "m.layers.1.q"], "shape": ["2x2", "2x2"],
        ...                   "sparsity": [0.5, 0.25]})
        >>> report_grid(r, "sparsity")["q"].tolist()
        [0.5, 0.25]
    """
    import pandas as pd

    rows = []
    for layer, shape, value in zip(report["layer"], report["shape"], report[column]):
        block, index, kind = _kind(layer)
        rows.append({"block": block, "index": index, "kind": kind, "n": _numel(shape), "v": value})
    frame = pd.DataFrame(rows, columns=["block", "index", "kind", "n", "v"])
    frame["nv"] = frame["n"] * frame["v"]
    grouped = frame.groupby(["index", "block", "kind"], sort=True)[["nv", "n"]].sum()
    grid = (grouped["nv"] / grouped["n"]).unstack("kind")
    grid.index = [block for _, block in grid.index]
    kinds = list(dict.fromkeys(frame["kind"]))  # forward order of first appearance
    return grid[kinds]


def _error_column(report: Any) -> str | None:
    return next((c for c in report.columns if "error" in c.lower()), None)


def sink_weight_grid(store: Any, sink_std: float | None = None, sink_alpha: float | None = None):
    """Mean sink weight per (attention layer, step) and, last, over all layers: ``(layers + 1, steps)``
    numpy array, and the steps drawn."""
    import numpy as np

    from attnprobe import DEFAULT_SINK_ALPHA, DEFAULT_SINK_STD, sink_weights, step_mass

    std = sink_std if sink_std is not None else store.options.get("sink_std", DEFAULT_SINK_STD)
    alpha = sink_alpha if sink_alpha is not None else store.options.get("sink_alpha", DEFAULT_SINK_ALPHA)
    steps = list(range(store.num_steps))
    if len(steps) > MAX_STEPS:
        steps = sorted({int(round(v)) for v in np.linspace(0, len(steps) - 1, MAX_STEPS)})
    grid = np.full((len(store.layers) + 1, len(steps)), np.nan)
    for column, step in enumerate(steps):
        valid = store.valid(step)
        tokens = valid.shape[1]
        masses = []
        for layer in range(len(store.layers)):
            try:
                masses.append(store.layer_mass(step, layer))
            except KeyError:
                continue
            total = step_mass(masses[-1:], tokens)
            if total is not None:
                weight = sink_weights(total, valid, sink_std=std, sink_alpha=alpha)
                grid[layer, column] = float(weight[valid].mean())
        total = step_mass(masses, tokens)
        if total is not None:
            weight = sink_weights(total, valid, sink_std=std, sink_alpha=alpha)
            grid[-1, column] = float(weight[valid].mean())
    return grid, steps


def _heat(fig, ax, values, rows, columns, title, cmap, vmin=None, vmax=None, annotate=True):
    import numpy as np

    image = ax.imshow(np.asarray(values, dtype=float), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=10)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], fontsize=8, rotation=35, ha="right")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    if annotate and values.size <= 200:
        for (i, j), value in np.ndenumerate(np.asarray(values, dtype=float)):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black")


def _title(settings: dict, recipe: Any, model_name: str | None) -> str:
    method = settings.get("method", "?")
    if settings.get("sink_aware"):
        method = f"sink-aware {method}"
    head = f"{model_name or settings.get('model_class', 'model')}: {method}, sparsity "
    head += f"{settings.get('sparsity', float('nan')):.2f}, {settings.get('pattern', '?')}"
    if recipe is not None:
        changed = {
            k: v
            for k, v in recipe.changed().items()
            if k not in ("method", "sparsity", "pattern", "sink_aware")
        }
        if changed:
            head += "\nrecipe: " + ", ".join(f"{k}={v}" for k, v in changed.items())
    return head


def _from_directory(path: Path):
    """report, settings, recipe, store and model name of an ``attnprobe prune`` output directory."""
    import json

    import pandas as pd

    from prune.recipe import RECIPE_FILE, Recipe

    if not (path / "report.csv").is_file():
        raise FileNotFoundError(
            f"{path} has no report.csv: pass the --output directory of attnprobe prune (or a PruneResult)"
        )
    report = pd.read_csv(path / "report.csv")
    recipe = Recipe.load(path / RECIPE_FILE) if (path / RECIPE_FILE).is_file() else None
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    settings = {**(recipe.to_dict() if recipe else {}), **summary.get("settings", {})}
    store = None
    if (path / "calibration").is_dir():
        import attnprobe

        store = attnprobe.open(path / "calibration")
    return report, settings, recipe, store, summary.get("model")


def plot_report(
    result: Any,
    output: str | Path | None = None,
    *,
    store: Any = None,
    model_name: str | None = None,
):
    """Draw one figure of a pruning run: per layer sparsity, error, sink weights, experts.

    Args:
        result: a :class:`prune.PruneResult`, or the ``--output`` directory of ``attnprobe prune``
            (its ``report.csv``, ``recipe.yaml``, ``summary.json`` and calibration store are read).
        output: PNG path to write; None only returns the figure.
        store: the calibration store, for the sink-weight heat map (a directory brings its own).
        model_name: shown in the title (default: the model class).

    Returns:
        The matplotlib ``Figure``.

    Example:
        >>> store = attnprobe.open("runs/calib")
        >>> result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True, progress=False)
        >>> figure = prune.plot_report(result, "report.png", store=store, model_name="tiny-dlm")
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plot_report needs matplotlib ({err}): pip install 'attnprobe[plot]'") from None

    if isinstance(result, (str, Path)):
        report, settings, recipe, dir_store, name = _from_directory(Path(result))
        store = store if store is not None else dir_store
        model_name = model_name or name
    else:
        report, settings, recipe = result.report, dict(result.settings), getattr(result, "recipe", None)
    if store is not None and not hasattr(store, "layer_mass"):
        from prune.engine.store_checks import as_store

        store = as_store(store)
    panels = []
    if len(report):
        panels.append(("sparsity", report_grid(report, "sparsity")))
        error = _error_column(report)
        if error is not None:
            panels.append((error, report_grid(report, error)))
    experts = report[report["layer"].str.contains(r"experts\.", regex=True)] if len(report) else report
    if store is not None and store.num_steps:
        panels.append(("sinks", store))
    if len(experts):
        panels.append(("experts", experts))
    if not panels:
        raise ValueError("nothing to draw: the report has no rows and there is no calibration store")

    fig = Figure(figsize=(7.5 * min(len(panels), 2), 5.2 * ((len(panels) + 1) // 2)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots((len(panels) + 1) // 2, min(len(panels), 2), squeeze=False).flatten()
    for ax, (kind, data) in zip(axes, panels):
        if kind == "sinks":
            grid, steps = sink_weight_grid(store, settings.get("sink_std"), settings.get("sink_alpha"))
            rows = [_short(layer) for layer in store.layers] + ["all layers"]
            _heat(fig, ax, grid, rows, steps, "mean sink weight w = 1 - s per step", "magma", annotate=False)
            ax.set_xlabel("calibration step")
            if len(steps) > 16:
                ax.set_xticks(range(0, len(steps), max(1, len(steps) // 8)))
                ax.set_xticklabels([steps[i] for i in range(0, len(steps), max(1, len(steps) // 8))])
        elif kind == "experts":
            frame = data.assign(n=[_numel(s) for s in data["shape"]])
            frame = frame.assign(
                block=[_kind(n)[0] for n in frame["layer"]], nv=frame["n"] * frame["sparsity"]
            )
            share = frame.groupby("block", sort=False)[["nv", "n"]].sum()
            ax.barh(range(len(share)), share["nv"] / share["n"], color="tab:purple")
            ax.set_yticks(range(len(share)), list(share.index), fontsize=8)
            ax.set_xlim(0, 1)
            ax.set_xlabel("share of expert weights pruned")
            ax.set_title("mixture of experts: pruned share per block", fontsize=10)
        else:
            label = "sparsity reached" if kind == "sparsity" else f"reconstruction {kind}"
            vmax = 1 if kind == "sparsity" else None
            _heat(fig, ax, data.to_numpy(), list(data.index), list(data.columns), label, "viridis", 0, vmax)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if _error_column(report) is None and len(report):
        fig.text(0.01, 0.005, "reconstruction error: not reported by this method", fontsize=8, color="gray")
    fig.suptitle(_title(settings, recipe, model_name), fontsize=11)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=110)
    return fig


def _short(layer: str) -> str:
    """``model.layers.3.self_attn`` → ``layers.3.self_attn`` (labels fit)."""
    parts = layer.split(".")
    return ".".join(parts[-3:]) if len(parts) > 3 else layer
