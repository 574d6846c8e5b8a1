"""pattern="structured" with score="flap" and bias_compensation: FLAP's fluctuation and bias shift against
an independent computation from the raw inputs of the output projections."""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
import prune
from prune.engine.flap import channel_moments, fluctuation_scores
from prune.engine.statistics import SinkSettings, step_weights
from tests import models

MASK = models.MASK_TOKEN_ID
OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")


def _calibrated():
    model = models.llama_bidirectional()
    ids = torch.randint(3, 60, (3, 16), generator=torch.Generator().manual_seed(2))
    with attnprobe.record(model, mask_token_id=MASK) as store:
        attnprobe.calibrate(model, ids, mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
    return model, store


def _raw_moments(model, store, sink_aware: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and mean square of each output projection's input rows (w·x when sink-aware), float64,
    from our own hooks on a replay of the store's recorded inputs."""
    weights = step_weights(store, SinkSettings()) if sink_aware else {}
    names = [f"model.layers.{i}.{o}" for i in range(2) for o in OUTPUTS]
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for step in range(store.num_steps):
        seen = {}
        handles = [
            modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].double()))
            for n in names
        ]
        with torch.no_grad():
            model(input_ids=store.input_ids(step))
        for h in handles:
            h.remove()
        w = weights[step].double()[..., None] if sink_aware else 1.0
        for n in names:
            rows[n].append((seen[n] * w).reshape(-1, seen[n].shape[-1]))
    out = {}
    for n, parts in rows.items():
        x = torch.cat(parts)
        out[n] = (x.mean(0), x.square().mean(0))
    return out


@pytest.mark.parametrize("sink_aware", [False, True])
def test_fluctuation_equals_variance_times_column_norm(sink_aware):
    model, store = _calibrated()
    raw = _raw_moments(model, store, sink_aware)
    got = channel_moments(store, sink_aware=sink_aware, settings=SinkSettings())
    scores = fluctuation_scores(model, got)
    modules = dict(model.named_modules())
    for name, (mean, square) in raw.items():
        torch.testing.assert_close(got[name][0], mean, rtol=1e-4, atol=1e-6)
        var = square - mean.square()
        expected = var * modules[name].weight.detach().double().square().sum(0)
        torch.testing.assert_close(scores[name].double(), expected, rtol=1e-3, atol=1e-7)


def test_flap_keeps_the_highest_fluctuation_channels():
    model, store = _calibrated()
    dense = copy.deepcopy(model)
    raw = _raw_moments(dense, store, sink_aware=False)
    prune.apply(model, store, 0.5, pattern="structured", score="flap")
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj"
        mean, square = raw[name]
        w = dense.get_submodule(name).weight.detach().double()
        score = (square - mean.square()) * w.square().sum(0)
        kept = sorted(torch.argsort(score, descending=True)[: score.numel() // 2].tolist())
        torch.testing.assert_close(model.get_submodule(name).weight, w[:, kept].float())


def test_bias_compensation_adds_the_removed_mean_output():
    model, store = _calibrated()
    dense = copy.deepcopy(model)
    raw = _raw_moments(dense, store, sink_aware=False)
    result = prune.apply(model, store, 0.5, pattern="structured", score="flap", bias_compensation=True)
    assert result.settings["bias_compensation"] and result.settings["score"] == "flap"
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj"
        kept = result.plan.keep_channels[f"model.layers.{i}.mlp"]
        removed = [c for c in range(64) if c not in kept]
        w = dense.get_submodule(name).weight.detach().double()
        expected = w[:, removed] @ raw[name][0][removed]
        torch.testing.assert_close(model.get_submodule(name).bias.double(), expected, rtol=1e-4, atol=1e-6)


def test_flap_refuses_unknown_scores_and_unrecorded_sink_parameters():
    model, store = _calibrated()
    with pytest.raises(ValueError, match="choose one of"):
        prune.apply(copy.deepcopy(model), store, 0.3, pattern="structured", score="magnitude-sp")
    with pytest.raises(ValueError, match="recorded parameters"):
        prune.apply(
            copy.deepcopy(model),
            store,
            0.3,
            pattern="structured",
            score="flap",
            sink_aware=True,
            sink_std=1.5,
        )
