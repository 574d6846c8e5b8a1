"""Attention sinks: the one sink rule of Sink-Aware Pruning (arXiv 2602.17664).

The rule is defined here and nowhere else; the recorder and ``prune`` both call :func:`sink_scores` /
:func:`sink_weights`. For one step and sample, with ``m[k]`` the attention mass of key ``k`` summed over
layers and heads and only valid (non-padding) keys counted::

    thr  = mean(m) + sink_std * std(m)         # population std
    s[k] = sigmoid(sink_alpha * (m[k] - thr))  # 0 on padding
    w[k] = 1 - s[k]

How sinks move along a denoising trajectory (temporal variance, Jaccard stability, concentration, and
the tables over a store) lives in :mod:`attnprobe.analysis.trajectory`. Every function here is pure.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

SINK_RULES = ("std", "ratio")
DEFAULT_SINK_STD = 2.0
DEFAULT_SINK_ALPHA = 5.0
DEFAULT_RATIO = 5.0


# -- the sink rule of one step -----------------------------------------------------------------------


def check_mass(mass: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """float32 ``(batch, keys)`` mass and bool validity (all True when ``valid`` is None)."""
    if not isinstance(mass, Tensor) or mass.ndim != 2:
        shape = tuple(mass.shape) if isinstance(mass, Tensor) else type(mass).__name__
        raise ValueError(
            f"mass must be a (batch, keys) tensor, got {shape}; reduce per-layer mass "
            "(layers, batch, heads, keys) with total_mass() first."
        )
    if valid is None:
        return mass.to(torch.float32), torch.ones(mass.shape, dtype=torch.bool, device=mass.device)
    if valid.dtype != torch.bool or valid.shape != mass.shape:
        raise ValueError(
            f"valid must be a bool tensor shaped like mass {tuple(mass.shape)}, got {valid.dtype} "
            f"{tuple(valid.shape)}; pass the step's valid(step) (False on padding)."
        )
    return mass.to(torch.float32), valid.to(mass.device)


def total_mass(layer_mass: Tensor) -> Tensor:
    """Attention mass per key summed over layers and heads.

    Args:
        layer_mass: ``(layers, batch, heads, keys)`` as ``store.attention_mass(step)`` returns it,
            or one layer's ``(batch, heads, keys)``.

    Returns:
        float32 ``(batch, keys)``.

    Example:
        >>> total_mass(torch.ones(3, 2, 4, 5)).shape, float(total_mass(torch.ones(3, 2, 4, 5))[0, 0])
        (torch.Size([2, 5]), 12.0)
    """
    if layer_mass.ndim == 4:
        return layer_mass.to(torch.float32).sum(dim=(0, 2))
    if layer_mass.ndim == 3:
        return layer_mass.to(torch.float32).sum(dim=1)
    raise ValueError(
        f"layer_mass must be (layers, batch, heads, keys) or (batch, heads, keys), got shape "
        f"{tuple(layer_mass.shape)}."
    )


def step_mass(layer_masses: Iterable[Tensor], tokens: int) -> Tensor | None:
    """The step mass the sink rule reads: summed over heads and over every layer whose keys are the
    step's ``tokens`` (layers attending over other sequences, e.g. an encoder's, are left out).

    Args:
        layer_masses: one ``(batch, heads, keys)`` tensor per layer.
        tokens: the step's sequence length.

    Returns:
        float32 ``(batch, tokens)`` on the first such layer's device (layers of a model dispatched
        over several devices are summed there), or None when no layer attends over the step's tokens.

    Example:
        >>> step_mass([torch.ones(1, 2, 3), torch.ones(1, 2, 4)], 3).tolist()
        [[2.0, 2.0, 2.0]]
    """
    total = None
    for mass in layer_masses:
        if mass.shape[-1] == tokens:
            total = total_mass(mass) if total is None else total + total_mass(mass).to(total.device)
    return total


def _mean_std(mass: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean and population std over valid keys, each ``(batch, 1)``; 0 with no valid key."""
    weight = valid.to(torch.float32)
    count = weight.sum(dim=-1, keepdim=True).clamp(min=1.0)
    mean = (mass * weight).sum(dim=-1, keepdim=True) / count
    var = ((mass - mean).square() * weight).sum(dim=-1, keepdim=True) / count
    return mean, var.sqrt()


def sink_threshold(mass: Tensor, valid: Tensor | None = None, sink_std: float = DEFAULT_SINK_STD) -> Tensor:
    """Per-sample sink threshold ``mean + sink_std * std`` over valid keys (population std).

    Args:
        mass: ``(batch, keys)`` attention mass summed over layers and heads.
        valid: bool ``(batch, keys)``, False on padding; None means every key is valid.
        sink_std: how many standard deviations above the mean a sink lies.

    Returns:
        float32 ``(batch,)``.

    Example:
        >>> m = torch.tensor([[1.0] * 9 + [10.0]])  # mean 1.9, std 2.7
        >>> round(float(sink_threshold(m)), 4)
        7.3
    """
    mass, valid = check_mass(mass, valid)
    mean, std = _mean_std(mass, valid)
    return (mean + sink_std * std).squeeze(-1)


def sink_scores(
    mass: Tensor,
    valid: Tensor | None = None,
    *,
    sink_std: float = DEFAULT_SINK_STD,
    sink_alpha: float = DEFAULT_SINK_ALPHA,
) -> Tensor:
    """Sink score ``s = sigmoid(sink_alpha * (mass - thr))`` per key, 0 on padding.

    Args:
        mass: ``(batch, keys)`` attention mass summed over layers and heads.
        valid: bool ``(batch, keys)``, False on padding; None means every key is valid.
        sink_std: threshold in standard deviations above the mean (:func:`sink_threshold`).
        sink_alpha: sharpness of the sigmoid. Mass is in units of layers x heads, so the default
            5.0 makes ``s`` practically a 0/1 step.

    Returns:
        float32 ``(batch, keys)`` in ``[0, 1]``.

    Example:
        >>> s = sink_scores(torch.tensor([[1.0] * 9 + [10.0]]))  # thr = 7.3
        >>> round(float(s[0, -1]), 6), float(s[0, 0]) < 1e-10
        (0.999999, True)
    """
    mass, valid = check_mass(mass, valid)
    thr = sink_threshold(mass, valid, sink_std)
    scores = torch.sigmoid(sink_alpha * (mass - thr[:, None]))
    return scores * valid


def sink_weights(
    mass: Tensor,
    valid: Tensor | None = None,
    *,
    sink_std: float = DEFAULT_SINK_STD,
    sink_alpha: float = DEFAULT_SINK_ALPHA,
) -> Tensor:
    """Down-weighting factor ``w = 1 - s`` of each token row (1 on padding, where ``s = 0``).

    Args:
        mass, valid, sink_std, sink_alpha: as in :func:`sink_scores`.

    Returns:
        float32 ``(batch, keys)`` in ``[0, 1]``.

    Example:
        >>> w = sink_weights(torch.tensor([[1.0] * 9 + [10.0]]))
        >>> float(w[0, 0]), round(float(w[0, -1]), 6)
        (1.0, 1e-06)
    """
    return 1.0 - sink_scores(mass, valid, sink_std=sink_std, sink_alpha=sink_alpha)


def sink_sets(
    mass: Tensor,
    valid: Tensor | None = None,
    rule: str = "std",
    sink_std: float = DEFAULT_SINK_STD,
    ratio: float = DEFAULT_RATIO,
) -> Tensor:
    """Which keys are sinks: ``mass > mean + sink_std * std`` ("std") or ``mass > ratio * mean`` ("ratio").

    Mean and std are over the valid keys of each sample; padding is never a sink.

    Args:
        mass: ``(batch, keys)`` attention mass summed over layers and heads.
        valid: bool ``(batch, keys)``, False on padding; None means every key is valid.
        rule: "std" (the rule of :func:`sink_scores`) or "ratio".
        sink_std: standard deviations above the mean, for ``rule="std"``.
        ratio: multiple of the mean, for ``rule="ratio"``.

    Returns:
        bool ``(batch, keys)``.

    Example:
        >>> m = torch.tensor([[1.0] * 9 + [10.0]])  # mean 1.9
        >>> int(sink_sets(m).nonzero()[0, 1]), int(sink_sets(m, rule="ratio", ratio=6.0).sum())
        (9, 0)
    """
    mass, valid = check_mass(mass, valid)
    if rule == "std":
        thr = sink_threshold(mass, valid, sink_std)[:, None]
    elif rule == "ratio":
        thr = ratio * _mean_std(mass, valid)[0]
    else:
        raise ValueError(f"rule must be one of {SINK_RULES}, got {rule!r}.")
    return (mass > thr) & valid


def candidate_mask(mass: Tensor, valid: Tensor | None = None, floor_std: float = 1.0) -> Tensor:
    """Candidate sink tokens: valid keys with ``mass > mean + floor_std * std``.

    The recorder keeps the input rows of these tokens so that ``prune`` can recompute sink-weighted
    statistics for any ``sink_std >= floor_std`` without re-running the model.

    Args:
        mass: ``(batch, keys)`` attention mass summed over layers and heads.
        valid: bool ``(batch, keys)``, False on padding; None means every key is valid.
        floor_std: the recorded floor, in standard deviations above the mean.

    Returns:
        bool ``(batch, keys)``.

    Example:
        >>> m = torch.tensor([[1.0] * 8 + [6.0, 10.0]])
        >>> candidate_mask(m, floor_std=1.0)[0, -2:].tolist()
        [True, True]
    """
    return sink_sets(mass, valid, rule="std", sink_std=floor_std)
