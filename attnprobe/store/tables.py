"""The store's attention mass as a pandas long table (``TrajectoryStore.to_pandas``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import pandas as pd

    from attnprobe.store.reader import TrajectoryStore

AGGREGATES = ("layer", "key")  # to_pandas(aggregate=...): sum over heads / over layers and heads


def mass_table(
    store: TrajectoryStore,
    steps: Iterable[int] | None = None,
    layers: Sequence[int | str] | None = None,
    *,
    aggregate: str | None = None,
) -> pd.DataFrame:
    """Attention mass as a long table, one row per (step, layer, batch, head, key).

    Large: ``steps x layers x batch x heads x keys`` rows; select steps/layers or aggregate.

    Args:
        steps: step indices (default: all).
        layers: layer indices or names (default: all); layers absent at a step are skipped.
        aggregate: ``None`` keeps every head; ``"layer"`` sums over heads (no ``head`` column);
            ``"key"`` sums over layers and heads (columns step, batch, key, mass).

    Returns:
        DataFrame with columns ``step, layer, batch, head, key, mass`` (``layer`` is the index into
        :attr:`layers`; ``mass`` float32).

    Example:
        >>> df = attnprobe.open("runs/gen").to_pandas(steps=[0], aggregate="key")
        >>> list(df.columns), len(df)  # one row per (step, batch, key)
        (['step', 'batch', 'key', 'mass'], 16)
    """
    import numpy as np
    import pandas as pd

    if aggregate is not None and aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be None or one of {AGGREGATES}, got {aggregate!r}")
    columns = {
        None: ["step", "layer", "batch", "head", "key", "mass"],
        "layer": ["step", "layer", "batch", "key", "mass"],
        "key": ["step", "batch", "key", "mass"],
    }[aggregate]
    steps = list(range(store.num_steps) if steps is None else steps)
    wanted = None if layers is None else [store._layer_index(layer) for layer in layers]
    frames = []
    for step in steps:
        present = store._mass_layers(step)
        chosen = present if wanted is None else [i for i in wanted if i in present]
        tensors = store._read(step, lambda n: n.startswith("mass/"))
        for i in chosen:
            mass = tensors[f"mass/{i}"].to(torch.float32)  # (batch, heads, keys)
            if aggregate is not None:
                mass = mass.sum(dim=1, keepdim=True)
            grid = np.indices(tuple(mass.shape)).reshape(3, -1)
            frame = {
                "step": np.full(grid.shape[1], step),
                "layer": np.full(grid.shape[1], i),
                "batch": grid[0],
                "head": grid[1],
                "key": grid[2],
                "mass": mass.reshape(-1).numpy(),
            }
            frames.append(pd.DataFrame({c: frame[c] for c in columns}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="float32" if c == "mass" else "int64") for c in columns})
    table = pd.concat(frames, ignore_index=True)
    if aggregate == "key":
        table = table.groupby(["step", "batch", "key"], as_index=False, sort=True)["mass"].sum()
    return table.astype({c: "int64" for c in columns if c != "mass"})
