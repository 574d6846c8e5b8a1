"""Per-step metrics of where attention mass sits: concentration (top-k share, normalised entropy),
the dominant position and sink centroid, and how sink sets and positions change over steps (Jaccard,
temporal variance). Pure functions on tensors; each formula is written out in ``docs/METRICS.md``.
:mod:`attnprobe.analysis.trajectory` applies them over a whole store.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnprobe.analysis.sinks import check_mass

__all__ = [
    "top_share",
    "normalized_entropy",
    "dominant_position",
    "sink_centroid",
    "jaccard",
    "temporal_variance",
]


# -- concentration and position of one step ----------------------------------------------------------


def top_share(mass: Tensor, valid: Tensor | None = None, k: int | Tensor = 1) -> Tensor:
    """Share of the valid mass held by the ``k`` heaviest valid keys of each sample.

    Args:
        mass: ``(batch, keys)`` non-negative attention mass.
        valid: bool ``(batch, keys)``; None means every key is valid.
        k: keys counted, an int or a per-sample int64 ``(batch,)``; clipped to ``[1, valid keys]``.

    Returns:
        float32 ``(batch,)``; NaN where a sample has no mass.

    Example:
        >>> float(top_share(torch.tensor([[1.0, 1.0, 1.0, 5.0]]), k=2))
        0.75
    """
    mass, valid = check_mass(mass, valid)
    if mass.shape[-1] == 0:
        return torch.full((mass.shape[0],), torch.nan, device=mass.device)
    kept = mass.masked_fill(~valid, 0.0)
    ranked = kept.sort(dim=-1, descending=True).values.cumsum(dim=-1)  # (batch, keys)
    count = valid.sum(dim=-1)
    k = torch.as_tensor(k, device=mass.device).expand(mass.shape[0])
    index = torch.minimum(k, count).clamp(min=1) - 1
    top = ranked.gather(-1, index[:, None]).squeeze(-1)
    total = ranked[:, -1]
    return torch.where(total > 0, top / total.clamp(min=torch.finfo(torch.float32).tiny), torch.nan)


def normalized_entropy(mass: Tensor, valid: Tensor | None = None) -> Tensor:
    """Shannon entropy of the mass distribution over valid keys, divided by ``log(valid keys)``.

    1 means mass spread evenly over all valid keys, 0 means all of it on one key.

    Args:
        mass: ``(batch, keys)`` non-negative attention mass.
        valid: bool ``(batch, keys)``; None means every key is valid.

    Returns:
        float32 ``(batch,)``; 0 with a single valid key, NaN where a sample has no mass.

    Example:
        >>> normalized_entropy(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 3.0, 0.0]])).tolist()
        [1.0, 0.0]
    """
    mass, valid = check_mass(mass, valid)
    kept = mass.masked_fill(~valid, 0.0)
    total = kept.sum(dim=-1, keepdim=True)
    p = kept / total.clamp(min=torch.finfo(torch.float32).tiny)
    entropy = 0.0 - torch.special.xlogy(p, p).sum(dim=-1)  # 0.0 - x, not -x: no "-0.0"
    log_n = valid.sum(dim=-1).to(torch.float32).log()
    norm = torch.where(log_n > 0, entropy / log_n.clamp(min=1e-12), torch.zeros_like(entropy))
    return torch.where(total.squeeze(-1) > 0, norm, torch.nan)


def _relative_position(valid: Tensor) -> Tensor:
    """Position of each key among the valid keys of its sample, scaled to [0, 1]: ``(batch, keys)``."""
    rank = valid.to(torch.float32).cumsum(dim=-1) - 1
    span = (valid.sum(dim=-1, keepdim=True) - 1).clamp(min=1).to(torch.float32)
    return rank / span


def dominant_position(mass: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The heaviest valid key of each sample: its index and its relative position in [0, 1].

    The relative position is the key's rank among the valid keys divided by ``(valid keys - 1)``,
    so left or right padding does not shift it; without padding it is ``index / (keys - 1)``.

    Args:
        mass: ``(batch, keys)`` attention mass.
        valid: bool ``(batch, keys)``; None means every key is valid.

    Returns:
        ``(index, position)``: int64 ``(batch,)`` (-1 where undefined) and float32 ``(batch,)``
        (NaN where a sample has no valid key or no mass).

    Example:
        >>> index, pos = dominant_position(torch.tensor([[0.0, 1.0, 5.0, 1.0, 1.0]]))
        >>> int(index[0]), float(pos[0])
        (2, 0.5)
    """
    mass, valid = check_mass(mass, valid)
    if mass.shape[-1] == 0:
        empty = torch.full((mass.shape[0],), -1, dtype=torch.int64, device=mass.device)
        return empty, torch.full((mass.shape[0],), torch.nan, device=mass.device)
    index = mass.masked_fill(~valid, -torch.inf).argmax(dim=-1)
    defined = (mass.masked_fill(~valid, 0.0) > 0).any(dim=-1)
    position = _relative_position(valid).gather(-1, index[:, None]).squeeze(-1)
    return torch.where(defined, index, -1), torch.where(defined, position, torch.nan)


def sink_centroid(sinks: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean relative position (as in :func:`dominant_position`) of each sample's sink set.

    Args:
        sinks: bool ``(batch, keys)`` sink sets (:func:`sink_sets`).
        valid: bool ``(batch, keys)``; None means every key is valid.

    Returns:
        float32 ``(batch,)``; NaN where the set is empty.

    Example:
        >>> float(sink_centroid(torch.tensor([[True, False, False, False, True]])))
        0.5
    """
    sinks_f, valid = check_mass(sinks, valid)
    count = sinks_f.sum(dim=-1)
    total = (_relative_position(valid) * sinks_f).sum(dim=-1)
    return torch.where(count > 0, total / count.clamp(min=1.0), torch.nan)


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Jaccard index ``|a & b| / |a | b|`` of bool sets along the last dim; 1 for two empty sets.

    Example:
        >>> a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]).bool()
        >>> b = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]]).bool()
        >>> jaccard(a, b)
        tensor([0.3333, 1.0000])
    """
    if a.shape != b.shape or a.dtype != torch.bool or b.dtype != torch.bool:
        raise ValueError(
            f"jaccard needs two bool tensors of one shape, got {a.dtype} {tuple(a.shape)} and "
            f"{b.dtype} {tuple(b.shape)}; compare sink sets of steps with the same batch and keys."
        )
    inter = (a & b).sum(dim=-1).to(torch.float32)
    union = (a | b).sum(dim=-1).to(torch.float32)
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


def temporal_variance(positions: Tensor) -> Tensor:
    """Population variance over steps (dim 0) of each trajectory, ignoring NaN steps.

    Args:
        positions: float ``(steps, trajectories)``, e.g. dominant relative positions; NaN marks a
            step where the quantity is undefined.

    Returns:
        float32 ``(trajectories,)``; NaN where fewer than two steps are defined.

    Example:
        >>> round(float(temporal_variance(torch.tensor([[0.0], [1.0], [0.5], [float("nan")]]))), 4)
        0.1667
    """
    x = positions.to(torch.float32)
    defined = ~x.isnan()
    count = defined.sum(dim=0).to(torch.float32)
    x0 = torch.where(defined, x, torch.zeros_like(x))
    mean = x0.sum(dim=0) / count.clamp(min=1.0)
    var = torch.where(defined, (x0 - mean).square(), torch.zeros_like(x)).sum(dim=0) / count.clamp(min=1.0)
    return torch.where(count >= 2, var, torch.nan)
