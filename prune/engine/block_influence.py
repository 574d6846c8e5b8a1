"""Block Influence over the denoising trajectory, from a calibration store.

ShortGPT (arXiv 2403.03853) scores block b by ``BI_b = 1 − E_t[cos(h_b, h_{b+1})]``, ``h_b`` the block's
input hidden state and ``h_{b+1}`` its output, averaged over the tokens of one clean forward. A diffusion
LM runs every block at every denoising step, on inputs whose masked share changes from step to step, so
here the mean runs over every recorded step, sample and valid token:

    BI_b = 1 − Σ_(step, b, t) u_t · cos_t / Σ_(step, b, t) u_t

with ``u_t = 1`` on valid tokens (plain) or ``u_t = w_t``, the sink weight ``1 − s_t`` of the step
(sink-aware, :func:`prune.engine.statistics.step_weights`, any sink parameters: the store keeps the cosine
of every token, :mod:`attnprobe.recording.block_cosine`). The per-step table gives the same mean within each
step, so the score can be read per noise level.

``score="bi-clean"`` is the autoregressive-style baseline: the same formula over the steps whose input
had no masked token (mask ratio 0), one clean forward per calibration window, as ShortGPT measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prune.engine.statistics import SinkSettings, step_weights

SCORES = ("bi", "bi-clean")


@dataclass
class BlockScores:
    """Block Influence of every block, overall and per step.

    Attributes:
        blocks: block names in model order.
        score: float64 (blocks,) BI over the steps used.
        per_step: float64 (steps used, blocks) BI of each step.
        steps: the store's step indices used; mask_ratio: each one's mask ratio (or None).
    """

    blocks: list[str]
    score: Tensor
    per_step: Tensor
    steps: list[int]
    mask_ratio: list[float | None]


def _steps_for(store, score: str) -> list[int]:
    steps = list(range(store.num_steps))
    if score == "bi":
        return steps
    clean = [s for s in steps if store.step_meta(s).get("mask_ratio") == 0]
    if not clean:
        raise ValueError(
            f"score='bi-clean' averages over clean (unmasked) forwards, and none of the {len(steps)} "
            f"steps of {store.path} has mask ratio 0. Record one forward on the clean calibration ids "
            "into the store (`with attnprobe.record(model, path, append=True): model(input_ids=ids)`), "
            "or use score='bi'."
        )
    return clean


def block_influence(
    store,
    blocks: list[str],
    *,
    score: str = "bi",
    sink_aware: bool = False,
    settings: SinkSettings | None = None,
) -> BlockScores:
    """Block Influence of ``blocks`` from the per-token cosines the store recorded.

    Args:
        store: a trajectory store recorded with linear statistics (the default), which keeps
            ``block_cos/<block>`` per step.
        blocks: block names in model order (each must be in the store).
        score: ``"bi"`` (every step) or ``"bi-clean"`` (steps with mask ratio 0).
        sink_aware: weight each token by its sink weight ``w = 1 − s``.
        settings: sink parameters (default: those recorded).

    Returns:
        A :class:`BlockScores`.

    Raises:
        ValueError: unknown score, a store without block cosines, or a block it did not record.
    """
    if score not in SCORES:
        raise ValueError(f"unknown block score {score!r}; choose one of {SCORES}")
    steps = _steps_for(store, score)
    if settings is None:
        settings = SinkSettings(store.options.get("sink_std", 2.0), store.options.get("sink_alpha", 5.0))
    weights = step_weights(store, settings) if sink_aware else {}
    num = torch.zeros(len(steps), len(blocks), dtype=torch.float64)
    den = torch.zeros(len(steps), dtype=torch.float64)
    for row, step in enumerate(steps):
        cos = store.block_cosines(step)
        missing = [b for b in blocks if b not in cos]
        if missing:
            raise ValueError(
                f"step {step} of {store.path} has no block cosines for {missing[:3]}: the store was recorded "
                "before attnprobe kept them, or with linear_stats=False. Record the calibration again "
                "with the default `attnprobe.record(model, path)`."
            )
        u = store.valid(step).to(torch.float64)
        if sink_aware:
            u = u * weights[step].to(torch.float64)
        den[row] = u.sum()
        for col, block in enumerate(blocks):
            num[row, col] = (u * cos[block].to(torch.float64)).sum()
    if not bool((den > 0).all()):
        raise ValueError(f"a step of {store.path} has no valid token weight; its block scores are undefined")
    return BlockScores(
        blocks=list(blocks),
        score=1 - num.sum(0) / den.sum(),
        per_step=1 - num / den[:, None],
        steps=steps,
        mask_ratio=[store.step_meta(s).get("mask_ratio") for s in steps],
    )
