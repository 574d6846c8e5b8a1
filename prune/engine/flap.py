"""FLAP's structured score and bias compensation, from the per-channel moments a store keeps.

FLAP (An et al., AAAI 2024, arXiv 2312.11983) scores input channel ``j`` of an output projection
(``o_proj``/``down_proj``) by how much its contribution *fluctuates* around its mean over the
calibration tokens, since a constant contribution can be moved into the bias when the channel goes:

    fluct[j] = Var_t(x_tj) · ‖W[:, j]‖²

with ``Var_t(x_j) = E[x_j²] − E[x_j]²`` over every valid token of every recorded step (population
variance, float64 sums of the store's float32 per-sample ``sum``/``sumsq``). Sink-aware, the token rows
are ``w_t · x_t`` as for sink-aware Wanda (``wsum``/``wsumsq``): the moments of the down-weighted rows.
A head's score is the sum over its channels, a KV group's over its heads (:mod:`prune.methods.structured`).

Bias compensation (FLAP): the removed channels' mean contribution ``W[:, removed] @ E[x_removed]`` is
added to the output bias, with the plain (not sink-weighted) mean, since it replaces the expected
output of the dense model. Models without output biases (Llama, Qwen) get one: the pruned model then
no longer matches its config, so ``prune.save_pretrained`` writes the plan, not a checkpoint.

Global allocation with per-layer standardisation, as FLAP's adaptive structure does, is
``structured_mode="global"`` (:func:`prune.methods.structured.select_global`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prune.engine.statistics import SinkSettings

SCORES = ("wanda-sp", "flap")


def _exact(store, settings: SinkSettings) -> None:
    recorded = (store.options.get("sink_std"), store.options.get("sink_alpha"))
    if settings.policy != "all" or recorded != (settings.sink_std, settings.sink_alpha):
        raise ValueError(
            f"sink-aware FLAP uses the sink-weighted sums recorded with sink_std={recorded[0]}, "
            f"sink_alpha={recorded[1]} and policy 'all'; got sink_std={settings.sink_std}, "
            f"sink_alpha={settings.sink_alpha}, policy {settings.policy!r}. Use the recorded parameters "
            "(the defaults) or score='wanda-sp'."
        )


def channel_moments(store, *, sink_aware: bool = False, settings: SinkSettings | None = None):
    """Per-linear input mean and mean square over every valid token of every step.

    Returns:
        ``{linear name: (mean (in,), mean_square (in,))}`` float64, sink-weighted rows with
        ``sink_aware`` (``w·x``).

    Raises:
        ValueError: a store recorded before the sums were kept, or sink parameters it cannot honour.
    """
    if sink_aware and settings is not None:
        _exact(store, settings)
    first, second = ("wsum", "wsumsq") if sink_aware else ("sum", "sumsq")
    totals: dict[str, list[Tensor]] = {}
    members: dict[str, list[str]] = {}
    tokens = 0.0
    for step in range(store.num_steps):
        stats = store.linear_stats(step)
        for group, names in store.linear_groups(step).items():
            if "tokens" in stats.get(group, {}):  # routed experts: not a structured unit
                continue
            if first not in stats.get(group, {}):
                raise ValueError(
                    f"the store at {store.path} has no per-channel input sums ({first!r}) for {group}: it "
                    "was recorded before attnprobe kept them. Record the calibration again for score='flap' "
                    "or bias_compensation=True."
                )
            members.setdefault(group, names)
            s1 = stats[group][first].double().sum(0)
            s2 = stats[group][second].double().sum(0)
            if group in totals:
                totals[group][0] += s1
                totals[group][1] += s2
            else:
                totals[group] = [s1, s2]
        tokens += float(store.valid(step).sum())
    if not totals or tokens == 0:
        raise ValueError(f"the store at {store.path} holds no linear-input statistics to score with.")
    out = {}
    for group, (s1, s2) in totals.items():
        for name in members[group]:
            out[name] = (s1 / tokens, s2 / tokens)
    return out


def fluctuation_scores(model: nn.Module, moments: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """FLAP's ``Var(x_j) · ‖W[:, j]‖²`` for every linear with moments (float32, on the CPU).

    Example:
        >>> lin = nn.Linear(2, 3, bias=False)
        >>> _ = lin.weight.data.copy_(torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 1.0]]))
        >>> m = {"": (torch.tensor([1.0, 0.0]), torch.tensor([2.0, 4.0]))}
        >>> fluctuation_scores(lin, m)[""].tolist()   # var = [1, 4], ‖W[:, j]‖² = [5, 2]
        [5.0, 8.0]
    """
    modules = dict(model.named_modules())
    scores = {}
    for name, (mean, square) in moments.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            continue
        var = torch.clamp(square - mean.square(), min=0)  # float rounding can go below 0
        col = module.weight.detach().double().square().sum(0).cpu()
        scores[name] = (var * col).float()
    return scores


def structured_inputs(
    store, model: nn.Module, score: str, bias_compensation: bool, sink_aware: bool, settings
):
    """What :func:`prune.methods.structured.plan_structured` needs beyond the Wanda norms: ``(scores,
    act_means)``."""
    if score not in SCORES:
        raise ValueError(f"unknown structured score {score!r}; choose one of {SCORES}")
    scores = None
    if score == "flap":
        scores = fluctuation_scores(model, channel_moments(store, sink_aware=sink_aware, settings=settings))
    means = None
    if bias_compensation:
        means = {name: m.float() for name, (m, _) in channel_moments(store).items()}
    return scores, means
