"""The sink rule on hand-checked examples."""

from __future__ import annotations

import math

import pytest
import torch

from attnprobe.analysis import sinks

# mass [1]*9 + [10]: mean 1.9, population variance (9 * 0.81 + 8.1**2) / 10 = 7.29, std 2.7,
# threshold at sink_std=2: 1.9 + 5.4 = 7.3
TEN = torch.tensor([[1.0] * 9 + [10.0]])


# -- the sink rule ----------------------------------------------------------------------------------


def test_threshold_and_scores_by_hand():
    assert sinks.sink_threshold(TEN).item() == pytest.approx(7.3, abs=1e-5)
    s = sinks.sink_scores(TEN)
    assert s[0, -1].item() == pytest.approx(1 / (1 + math.exp(-5 * 2.7)), rel=1e-6)  # sigmoid(13.5)
    assert s[0, 0].item() == pytest.approx(1 / (1 + math.exp(5 * 6.3)), rel=1e-4)  # sigmoid(-31.5)
    torch.testing.assert_close(sinks.sink_weights(TEN), 1 - s)
    assert sinks.sink_sets(TEN).nonzero().tolist() == [[0, 9]]


def test_population_std_not_unbiased():
    m = torch.tensor([[1.0, 1.0, 1.0, 10.0]])
    # mean 3.25, population variance (3 * 2.25**2 + 6.75**2) / 4 = 15.1875 (unbiased would be 20.25)
    assert sinks.sink_threshold(m, sink_std=1.0).item() == pytest.approx(3.25 + math.sqrt(15.1875), rel=1e-6)
    # with four keys one outlier is sqrt(3) = 1.73 std above the mean: a sink at sink_std=1, not at 2
    assert sinks.sink_sets(m, sink_std=1.0).tolist() == [[False, False, False, True]]
    assert not sinks.sink_sets(m, sink_std=2.0).any()


def test_ratio_rule():
    # mean 1.9: 10 > 5 * 1.9 = 9.5 but not > 6 * 1.9 = 11.4
    assert sinks.sink_sets(TEN, rule="ratio", ratio=5.0).nonzero().tolist() == [[0, 9]]
    assert not sinks.sink_sets(TEN, rule="ratio", ratio=6.0).any()


def test_padding_excluded_from_mean_and_std():
    padded = torch.cat([TEN, torch.tensor([[100.0, 100.0]])], dim=1)
    valid = torch.tensor([[True] * 10 + [False] * 2])
    assert sinks.sink_threshold(padded, valid).item() == pytest.approx(7.3, abs=1e-5)
    s = sinks.sink_scores(padded, valid)
    torch.testing.assert_close(s[:, :10], sinks.sink_scores(TEN))
    assert (s[:, 10:] == 0).all()
    assert (sinks.sink_weights(padded, valid)[:, 10:] == 1).all()
    assert sinks.sink_sets(padded, valid).nonzero().tolist() == [[0, 9]]


def test_rows_are_independent_samples():
    two = torch.cat([TEN, TEN.flip(-1) * 2])
    assert sinks.sink_sets(two).nonzero().tolist() == [[0, 9], [1, 0]]
    torch.testing.assert_close(sinks.sink_threshold(two), torch.tensor([7.3, 14.6]))


def test_uniform_mass_has_no_sink_and_no_nan():
    flat = torch.ones(1, 6)
    assert not sinks.sink_sets(flat).any()
    torch.testing.assert_close(sinks.sink_scores(flat), torch.full((1, 6), 0.5))  # sigmoid(0)
    no_valid = torch.zeros(1, 6, dtype=torch.bool)
    assert torch.isfinite(sinks.sink_scores(flat, no_valid)).all()


def test_candidate_mask_floor():
    m = torch.tensor([[1.0] * 8 + [6.0, 10.0]])
    # mean 2.4, population std sqrt((8 * 1.96 + 12.96 + 57.76) / 10) = sqrt(8.64) = 2.939
    assert sinks.candidate_mask(m, floor_std=1.0)[0].nonzero().flatten().tolist() == [8, 9]
    assert sinks.candidate_mask(m, floor_std=2.0)[0].nonzero().flatten().tolist() == [9]
    # candidates at a floor cover the sink set of any sink_std above it
    assert (sinks.candidate_mask(m, floor_std=1.0) >= sinks.sink_sets(m, sink_std=2.0)).all()


def test_total_mass():
    layer_mass = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    torch.testing.assert_close(sinks.total_mass(layer_mass), layer_mass.sum(dim=(0, 2)))
    torch.testing.assert_close(sinks.total_mass(layer_mass[0]), layer_mass[0].sum(dim=1))
    with pytest.raises(ValueError, match="layers, batch, heads, keys"):
        sinks.total_mass(torch.ones(4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_mass"):
        sinks.sink_scores(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="valid must be a bool"):
        sinks.sink_scores(torch.ones(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="rule must be one of"):
        sinks.sink_sets(TEN, rule="mean")
