"""Reduce a trajectory store into per-linear activation statistics for scoring.

The store keeps, per (step, sample, input group), ``sumsq = Σ_t x²`` and ``wsumsq = Σ_t w² x²`` (w from
the sink rule at record time) and the squared input rows of *candidate* tokens (mass above
``mean + candidate_floor_std · std``). From these, without running the model:

- plain statistics: ``sumsq``;
- sink-weighted at the recorded ``sink_std``/``sink_alpha``: ``wsumsq``, exact;
- sink-weighted at other parameters (``sink_std >= candidate_floor_std``) or under the ``unstable``
  policy: ``sumsq − Σ_c (1 − w_c²) x_c²`` over candidate tokens c. Tokens below the floor count with
  w = 1; their true weight is at least ``1 − sigmoid(−alpha · (sink_std − floor) · std)``, which for
  the default parameters and attention mass in units of layers × heads is 1 to many decimals.

Two ways to accumulate over (sample, step) pairs, each a calibration "sequence" (defined once, in
:mod:`prune.methods.wanda`: ``ACCUMULATIONS``, ``accumulation_term``, ``finish_norm``):

- ``"wanda"`` (arXiv 2306.11695): ``norm_j = sqrt(mean over sequences of Σ_t x̃_tj²)``;
- ``"reference"`` (the Sink-Aware Pruning public code): ``norm_j = Σ over sequences of ||x̃_:j||₂``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnprobe import sink_scores, step_mass
from prune.methods.wanda import ACCUMULATIONS, accumulation_term, check_accumulation, finish_norm

__all__ = ["ACCUMULATIONS", "SINK_POLICIES", "SinkSettings", "activation_norms", "step_weights"]

SINK_POLICIES = ("all", "unstable")


@dataclass(frozen=True)
class SinkSettings:
    """How sink tokens are down-weighted.

    Attributes:
        sink_std, sink_alpha: the sink rule (``attnprobe.analysis.sinks``).
        policy: ``"all"`` down-weights every sink; ``"unstable"`` only positions whose sink score
            varies across the steps of the same sequence (variance above ``unstable_threshold``).
        unstable_threshold: variance of the sink score over steps above which a position is unstable.
    """

    sink_std: float = 2.0
    sink_alpha: float = 5.0
    policy: str = "all"
    unstable_threshold: float = 0.05


def _layer_masses(store, step: int):
    """Each recorded layer's mass at ``step``, skipping layers that did not run in it."""
    for layer in range(len(store.layers)):
        try:
            yield store.layer_mass(step, layer)  # (batch, heads, keys)
        except KeyError:
            continue


def _sequence_ids(store, step: int, batch: int) -> list:
    """Which calibration sequence each sample of a step is (calibrate() stores them); else its index."""
    return list(store.step_meta(step).get("sequences") or range(batch))


def step_weights(store, settings: SinkSettings) -> dict[int, Tensor]:
    """The sink weights ``w = 1 − s`` of every step, (batch, tokens) float32.

    Under the ``unstable`` policy, positions whose sink score barely changes across the steps of the
    same sequence keep ``w = 1``: those sinks are stable and, as in autoregressive models, protected.
    """
    scores: dict[int, Tensor] = {}
    for step in range(store.num_steps):
        valid = store.valid(step)
        total = step_mass(_layer_masses(store, step), valid.shape[1])
        if total is None:
            raise ValueError(
                f"step {step} of {store.path} has no layer whose keys are its {valid.shape[1]} tokens"
            )
        scores[step] = sink_scores(total, valid, sink_std=settings.sink_std, sink_alpha=settings.sink_alpha)
    if settings.policy == "all":
        return {step: 1 - s for step, s in scores.items()}
    by_sequence: dict[object, list[Tensor]] = {}
    for step, s in scores.items():
        for row, seq in enumerate(_sequence_ids(store, step, s.shape[0])):
            by_sequence.setdefault((seq, s.shape[1]), []).append(s[row])
    unstable = {
        key: torch.stack(rows).var(dim=0, unbiased=False) > settings.unstable_threshold
        for key, rows in by_sequence.items()
    }
    weights = {}
    for step, s in scores.items():
        seqs = _sequence_ids(store, step, s.shape[0])
        mask = torch.stack([unstable[(seq, s.shape[1])] for seq in seqs])
        weights[step] = torch.where(mask, 1 - s, torch.ones_like(s))
    return weights


def _reweighted(stats: dict[str, Tensor], cand_index: Tensor, weights: Tensor) -> Tensor:
    """``sumsq − Σ_c (1 − w_c²) x_c²`` per sample, from the stored candidate rows."""
    out = stats["sumsq"].clone()
    if "cand_sel" in stats:  # an expert keeps rows only of the candidates routed to it
        cand_index = cand_index[stats["cand_sel"]]
    if cand_index.numel():
        w = weights[cand_index[:, 0], cand_index[:, 1]]
        out.index_add_(0, cand_index[:, 0], -(1 - w.square())[:, None] * stats["cand_rows"])
    return out.clamp_(min=0)


def _check_settings(store, settings: SinkSettings) -> bool:
    """Validate against what the store recorded; True when its exact ``wsumsq`` applies."""
    options = store.options
    _require_linear_stats(store)
    if settings.policy not in SINK_POLICIES:
        raise ValueError(f"unknown sink_policy {settings.policy!r}; choose one of {SINK_POLICIES}")
    recorded = (options.get("sink_std"), options.get("sink_alpha"))
    exact = settings.policy == "all" and recorded == (settings.sink_std, settings.sink_alpha)
    floor = options.get("candidate_floor_std")
    if not exact and (floor is None or settings.sink_std < floor):
        raise ValueError(
            f"sink_std={settings.sink_std} needs candidate rows above mean + {settings.sink_std}·std, but "
            f"the store at {store.path} kept rows only above mean + {floor}·std (recorded with "
            f"sink_std={recorded[0]}, sink_alpha={recorded[1]}). Use sink_std >= {floor}, or re-record "
            "with record(..., candidate_floor_std=<lower>)."
        )
    return exact


def _require_linear_stats(store) -> None:
    if not store.options.get("linear_stats"):
        raise ValueError(
            f"the store at {store.path} was recorded without linear-input statistics (linear_stats=False, "
            f"{store.num_steps} steps of attention mass only), and Wanda and SparseGPT score weights with "
            "them. Record the calibration again with the default: `with attnprobe.record(model, path) as "
            "store: attnprobe.calibrate(model, ids)`; or use method='magnitude', which needs no store."
        )


def activation_norms(
    store,
    *,
    sink_aware: bool = False,
    settings: SinkSettings | None = None,
    accumulate: str = "wanda",
) -> dict[str, Tensor]:
    """Per-linear input-feature norms for Wanda-family scores, from the store alone.

    Args:
        store: a trajectory store recorded with ``linear_stats=True``.
        sink_aware: weight token rows by ``w = 1 − s`` (arXiv 2602.17664).
        settings: sink parameters; default: those the store was recorded with.
        accumulate: ``"wanda"`` or ``"reference"`` (module docstring).

    Returns:
        ``{linear name: (in_features,) float32}``.

    Example:
        >>> norms = activation_norms(attnprobe.open("runs/calib"), sink_aware=True)
        >>> norms["model.layers.0.mlp.up_proj"].shape  # one norm per input feature
        torch.Size([192])
    """
    check_accumulation(accumulate)
    _require_linear_stats(store)
    if settings is None:
        settings = SinkSettings(store.options.get("sink_std", 2.0), store.options.get("sink_alpha", 5.0))
    exact = _check_settings(store, settings) if sink_aware else True
    weights = step_weights(store, settings) if sink_aware and not exact else {}
    totals: dict[str, Tensor] = {}
    count = 0
    members: dict[str, list[str]] = {}
    for step in range(store.num_steps):
        stats = store.linear_stats(step)
        cand_index = store.candidates(step) if weights else None
        for group, names in store.linear_groups(step).items():
            members.setdefault(group, names)
            per_sample = stats[group]["sumsq"]
            if sink_aware:
                per_sample = (
                    stats[group]["wsumsq"] if exact else _reweighted(stats[group], cand_index, weights[step])
                )
            term = accumulation_term(per_sample, accumulate)
            totals[group] = totals[group] + term if group in totals else term
        count += next(iter(stats.values()))["sumsq"].shape[0] if stats else 0
    if not totals:
        raise ValueError(
            f"the store at {store.path} holds no linear-input statistics: its {store.num_steps} steps have "
            "none (no step ran, or no block linear saw (batch, tokens, features) inputs). Record a "
            "calibration into it: `with attnprobe.record(model, path) as store: attnprobe.calibrate(model, "
            "ids)`."
        )
    norms = {}
    for group, total in totals.items():
        norm = finish_norm(total, count, accumulate)
        for name in members[group]:
            norms[name] = norm
    return norms
