"""Trajectory metrics and tables on hand-checked examples."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from attnprobe.analysis import trajectory


class FakeStore:
    """The reading API the metrics use, over in-memory steps (mass, valid, meta)."""

    def __init__(self, steps, layers=None, options=None):
        self._steps = steps
        n_layers = steps[0][0].shape[0] if steps else 0
        self.layers = layers or [f"model.layers.{i}.self_attn" for i in range(n_layers)]
        self.options = options or {}

    @property
    def num_steps(self):
        return len(self._steps)

    def attention_mass(self, step):
        return self._steps[step][0]

    def valid(self, step):
        return self._steps[step][1]

    def step_meta(self, step):
        return self._steps[step][2]


def one_hot_mass(dominant, keys, *, layers=1, heads=2, base=1.0, peak=20.0):
    """(layers, batch, heads, keys) mass, flat ``base`` with ``peak`` at dominant[b] in every layer/head."""
    mass = torch.full((layers, len(dominant), heads, keys), base)
    for b, k in enumerate(dominant):
        mass[:, b, :, k] = peak
    return mass


# -- concentration, position, stability --------------------------------------------------------------


def test_top_share_and_entropy():
    m = torch.tensor([[1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(trajectory.top_share(m, k=1), torch.tensor([5 / 8, 1 / 4]))
    torch.testing.assert_close(trajectory.top_share(m, k=torch.tensor([2, 3])), torch.tensor([6 / 8, 3 / 4]))
    p = torch.tensor([1 / 8, 1 / 8, 1 / 8, 5 / 8])
    expected = -(p * p.log()).sum() / math.log(4)
    torch.testing.assert_close(trajectory.normalized_entropy(m), torch.stack([expected, torch.tensor(1.0)]))
    # padding carries no share and does not count in log(n)
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    torch.testing.assert_close(trajectory.normalized_entropy(m, valid)[1], torch.tensor(1.0))
    torch.testing.assert_close(trajectory.top_share(m, valid)[1], torch.tensor(0.5))
    assert trajectory.top_share(torch.zeros(1, 3)).isnan().all()


def test_dominant_position_is_relative_to_valid_keys():
    m = torch.tensor([[9.0, 0.0, 1.0, 5.0, 1.0], [0.0, 1.0, 5.0, 1.0, 1.0]])
    valid = torch.tensor([[False, True, True, True, True], [True] * 5])
    index, position = trajectory.dominant_position(m, valid)
    # sample 0: left padding ignored; key 3 is the 3rd of 4 valid keys -> 2/3
    assert index.tolist() == [3, 2]
    torch.testing.assert_close(position, torch.tensor([2 / 3, 0.5]))


def test_sink_centroid():
    sets = torch.tensor([[True, False, False, False, True], [False] * 5])
    centroid = trajectory.sink_centroid(sets)
    assert centroid[0].item() == 0.5 and centroid[1].isnan()


def test_jaccard_known_sets():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(trajectory.jaccard(a, b), torch.tensor([1 / 3, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="same batch and keys"):
        trajectory.jaccard(a, b[:, :3])


def test_temporal_variance_known_positions():
    # positions 0, 1, 0.5: mean 0.5, population variance (0.25 + 0.25 + 0) / 3 = 1/6
    x = torch.tensor([[0.0, 0.2], [1.0, 0.2], [0.5, math.nan]])
    var = trajectory.temporal_variance(x)
    torch.testing.assert_close(var, torch.tensor([1 / 6, 0.0]))
    assert trajectory.temporal_variance(torch.tensor([[0.3], [math.nan]])).isnan().all()


# -- trajectory tables --------------------------------------------------------------------------------


def moving_store():
    """9 keys, batch 2: sample 0's sink moves 0 -> 8 -> 4, sample 1's stays at 1."""
    steps = [
        (one_hot_mass([0, 1], 9), None, {"t": 1.0}),
        (one_hot_mass([8, 1], 9), None, {"t": 0.5}),
        (one_hot_mass([4, 1], 9), None, {"t": 0.0}),
    ]
    return FakeStore(steps)


def test_step_table_columns_and_values():
    table = trajectory.step_table(moving_store())
    assert isinstance(table, pd.DataFrame)
    assert len(table) == 6 and list(table.step) == [0, 0, 1, 1, 2, 2]
    for column in (
        "n_sinks",
        "top1_share",
        "topk_share",
        "entropy",
        "dominant_position",
        "jaccard_with_next",
    ):
        assert column in table.columns
    # every step: mass 2 * [1] * 8 + [40]; one outlier among 9 keys is sqrt(8) std above the mean,
    # so it is the one sink, holding 40/56 of the mass
    assert (table.n_sinks == 1).all()
    assert table.top1_share.tolist() == pytest.approx([40 / 56] * 6)
    assert table.top_k.tolist() == [1] * 6  # ceil(0.05 * 9)
    assert table.dominant_position.tolist() == pytest.approx([0.0, 0.125, 1.0, 0.125, 0.5, 0.125])
    assert table.t.tolist() == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    # sample 0's sink set changes every step ({0} -> {4} -> {2}), sample 1's never
    assert table.jaccard_with_next.tolist()[:4] == [0.0, 1.0, 0.0, 1.0]
    assert table.jaccard_with_next[4:].isna().all()
    assert set(table.next_skip_reason[4:]) == {"last step"}


def test_summary_temporal_variance_and_jaccard():
    result = trajectory.summary(moving_store())
    # sample 0: positions 0, 1, 0.5 -> 1/6; sample 1: constant -> 0; mean 1/12
    assert result["temporal_variance"] == pytest.approx(1 / 12)
    assert result["centroid_variance"] == pytest.approx(1 / 12)  # one sink per step: centroid = position
    assert result["mean_jaccard"] == pytest.approx(0.5)
    assert result["top1_share"] == pytest.approx(40 / 56)
    assert result["n_steps"] == 3 and result["n_trajectories"] == 2 and result["skipped"] == []
    assert len(pd.DataFrame([result])) == 1


def test_layer_table_per_layer_variance():
    # layer 0's peak stays at key 0; layer 1's peak moves 4 -> 0 (the aggregate follows layer 1's
    # bigger peak), one sample, one head
    steps = []
    for k in (4, 0):
        mass = torch.ones(2, 1, 1, 5)
        mass[0, 0, 0, 0] = 5.0
        mass[1, 0, 0, k] = 10.0
        steps.append((mass, None, {}))
    table = trajectory.layer_table(FakeStore(steps, layers=["a", "b"]))
    assert table.name.tolist() == ["a", "b"]
    # layer 1: positions 1.0, 0.0 -> variance 0.25
    assert table.temporal_variance.tolist() == pytest.approx([0.0, 0.25])
    assert table.top1_share.tolist() == pytest.approx([5 / 9, (10 / 14 + 10 / 14) / 2])
    assert table.n_trajectories.tolist() == [1, 1]


def test_padding_in_trajectory_metrics():
    mass = one_hot_mass([3], 6)
    mass[..., 0] = 1000.0  # a heavy padded key must be ignored
    valid = torch.tensor([[False, True, True, True, True, True]])
    table = trajectory.step_table(FakeStore([(mass, valid, {})]))
    assert table.n_valid.tolist() == [5]
    assert table.dominant_index.tolist() == [3]
    assert table.dominant_position.tolist() == pytest.approx([0.5])  # 3rd of 5 valid keys
    assert table.top1_share.tolist() == pytest.approx([40 / 48])


def test_steps_of_different_shapes_are_not_compared():
    steps = [
        (one_hot_mass([0], 5), None, {}),
        (one_hot_mass([4], 5), None, {}),
        (one_hot_mass([1], 7), None, {}),  # a new sequence of another length
        (one_hot_mass([1, 2], 7), None, {}),  # batch grows
        (one_hot_mass([3, 2], 7), None, {}),
    ]
    store = FakeStore(steps)
    table = trajectory.step_table(store)
    assert math.isnan(table.jaccard_with_next[1])
    assert table.next_skip_reason[1] == "number of keys changes 5 -> 7"
    assert table.next_skip_reason[2] == "batch size changes 1 -> 2"
    assert table.segment.tolist() == [0, 0, 1, 2, 2, 2, 2]
    result = trajectory.summary(store)
    assert result["n_segments"] == 3
    assert len(result["skipped"]) == 2 and "step 1 -> 2" in result["skipped"][0]
    # trajectories with >= 2 steps: segment 0 (positions 0 -> 1: variance 1/4) and the two samples of
    # segment 2 (1/6 -> 3/6: variance 1/36; 2/6 -> 2/6: 0)
    assert result["n_trajectories"] == 3
    assert result["temporal_variance"] == pytest.approx((1 / 4 + 1 / 36 + 0.0) / 3)


def test_sequences_meta_splits_segments():
    steps = [
        (one_hot_mass([0], 5), None, {"sequences": [0]}),
        (one_hot_mass([4], 5), None, {"sequences": [1]}),
    ]
    table = trajectory.step_table(FakeStore(steps))
    assert "other sequences" in table.next_skip_reason[0]
    assert math.isnan(trajectory.summary(FakeStore(steps))["temporal_variance"])


def test_sink_std_defaults_to_store_option():
    # mass per key [2, 2, 2, 40]: one outlier among 4 keys is sqrt(3) = 1.73 std above the mean, a
    # sink at the store's sink_std 1.5, not at 2.0
    store = FakeStore([(one_hot_mass([3], 4), None, {})], options={"sink_std": 1.5})
    assert trajectory.summary(store)["sink_std"] == 1.5
    assert trajectory.step_table(store).n_sinks.tolist() == [1]
    assert trajectory.step_table(store, sink_std=2.0).n_sinks.tolist() == [0]
    with pytest.raises(ValueError, match="top_frac"):
        trajectory.summary(store, top_frac=0.0)
