"""Per-expert statistics: a hand-checked reduction; recordings of every layout against explicit routing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnprobe
from attnprobe.layout.experts import ExpertSet
from attnprobe.recording.expert_stats import reduce_experts
from prune.engine.statistics import SinkSettings, activation_norms
from tests import models, moe_models
from tests.prune.moe_reference import expert_statistics, sink_weights

MASK = moe_models.MASK_TOKEN_ID
BUILDERS = {
    "qwen3-moe": moe_models.qwen3_moe,
    "olmoe": moe_models.olmoe_style,
    "llada2-list": moe_models.llada2_style,
    "llada2-fused": lambda: moe_models.llada2_style(fused=True),
}


def _recorded(kind: str, **options):
    model = models.sharpen(BUILDERS[kind](), 4.0, norms=True)
    ids = torch.randint(3, 60, (3, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    with attnprobe.record(model, mask_token_id=MASK, **options) as store:
        attnprobe.calibrate(
            model, ids, mask_token_id=MASK, steps=4, sample_interval=2, batch_size=3, progress=False
        )
    return model, store


class _Experts(nn.Module):
    """Three fused experts, each gate = x₀ and up = x₁ (so the down input is x₀·x₁), act = identity."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.eye(2).repeat(3, 1, 1))  # (E, 2I, H) with I = 1
        self.down_proj = nn.Parameter(torch.ones(3, 2, 1))
        self.act_fn = nn.Identity()


def test_reduce_experts_by_hand():
    es = ExpertSet("experts", "fused-gate-up", 3, 2, None, "experts", None)
    modules = {"experts": _Experts()}
    hidden = torch.tensor([[1.0, 2], [3, 1], [2, 0], [1, 1], [0, 3], [5, 5]])  # row = sample · 3 + pos
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1], [0, 2]])  # expert 0: rows 0, 2, 4, 5
    valid = torch.tensor([[True, True, True], [True, True, False]])  # row 5 is padding
    weights = torch.tensor([[1.0, 0.5, 0.25], [0.8, 0.1, 0.9]])
    candidates = torch.tensor([[0, 1], [1, 1]])  # rows 1 (not routed to 0) and 4 (routed)
    out = reduce_experts(modules, es, hidden, index, valid, weights, candidates)
    first = out["experts.gate_up_proj.0"]
    assert first["sumsq"].tolist() == [[5.0, 4.0], [0.0, 9.0]]
    assert torch.allclose(first["wsumsq"], torch.tensor([[1.0 + 0.0625 * 4, 4.0], [0.0, 0.01 * 9]]))
    assert first["tokens"].tolist() == [2.0, 1.0]
    assert first["cand_sel"].tolist() == [1] and first["cand_rows"].tolist() == [[0.0, 9.0]]
    down = out["experts.down_proj.0"]  # x₀·x₁: rows 0, 2, 4 give 2, 0, 0
    assert down["sumsq"].tolist() == [[4.0], [0.0]] and down["wsumsq"].tolist() == [[4.0], [0.0]]
    # Expert 1: rows 0, 1, 3, 4 with weights 1, 0.5, 0.8, 0.1.
    expected = torch.tensor([[1 + 9 * 0.25, 4 + 0.25], [0.64 + 0, 0.64 + 0.09]])
    assert torch.allclose(out["experts.gate_up_proj.1"]["wsumsq"], expected)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_recorded_expert_statistics_equal_explicit_routing(kind):
    model, store = _recorded(kind)
    weights = sink_weights(store)
    assert min(float(w.min()) for w in weights.values()) < 0.5  # sinks exist: the weighting matters
    for sink_aware in (False, True):
        golden = expert_statistics(model, store, weights if sink_aware else None)
        norms = activation_norms(store, sink_aware=sink_aware)
        samples = sum(store.valid(s).shape[0] for s in range(store.num_steps))
        assert set(golden) <= set(norms) and len(golden) >= 16
        for name, total in golden.items():
            expected = (total / samples).sqrt().float()
            assert torch.allclose(norms[name], expected, rtol=1e-4, atol=1e-6), (kind, sink_aware, name)


def test_expert_reweighting_at_other_sink_parameters_uses_own_candidate_rows():
    model, store = _recorded("olmoe")
    settings = SinkSettings(sink_std=1.5, sink_alpha=5.0)  # not recorded: re-weighted from candidates
    weights = sink_weights(store, settings.sink_std, settings.sink_alpha)
    # The documented contract: tokens below the recorded floor count with w = 1 (their true weight is
    # within 1 - sigmoid(-alpha (sink_std - floor) std) of it); the candidates get their own weight.
    on_candidates = {}
    for step, w in weights.items():
        keep = torch.ones_like(w)
        cand = store.candidates(step)
        keep[cand[:, 0], cand[:, 1]] = w[cand[:, 0], cand[:, 1]]
        on_candidates[step] = keep
    assert any(bool((w < 0.9).any()) for w in on_candidates.values())
    golden = expert_statistics(model, store, on_candidates)
    norms = activation_norms(store, sink_aware=True, settings=settings)
    samples = sum(store.valid(s).shape[0] for s in range(store.num_steps))
    for name, total in golden.items():
        assert torch.allclose(norms[name], (total / samples).sqrt().float(), rtol=1e-4, atol=1e-6), name


def test_two_pass_equals_one_pass_for_experts():
    _, one = _recorded("qwen3-moe")
    _, two = _recorded("qwen3-moe", two_pass=True)
    for step in range(one.num_steps):
        a, b = one.linear_stats(step), two.linear_stats(step)
        experts = [g for g in a if ".experts." in g]
        assert experts and set(experts) <= set(b)
        for group in experts:
            for key, value in a[group].items():
                assert torch.allclose(value.float(), b[group][key].float(), atol=1e-6), (group, key)


def test_expert_hessians_equal_explicit_routing():
    model, store = _recorded("llada2-fused", hessians=True)
    golden = expert_statistics(model, store, None, hessian=True)
    stored = store.hessians()
    groups = store.linear_groups(0)
    members = {m: g for g, ms in groups.items() for m in ms}
    for name, hessian in golden.items():
        assert torch.allclose(stored[members[name]]["plain"].double(), hessian, rtol=1e-4, atol=1e-5), name


def test_expert_linears_no_longer_warn_and_routers_stay_linear_groups(recwarn):
    _, store = _recorded("olmoe")
    assert not [w for w in recwarn.list if "not recorded" in str(w.message)]
    groups = store.linear_groups(0)
    assert "model.layers.0.mlp.gate" in groups  # the router's input is an ordinary (batch, tokens) input
    assert groups["model.layers.0.mlp.experts.3.gate_proj"] == [
        "model.layers.0.mlp.experts.3.gate_proj",
        "model.layers.0.mlp.experts.3.up_proj",
    ]
    assert store.fingerprint["experts"]["model.layers.0.mlp.experts"]["num_experts"] == 8


def test_grouped_forwards_and_padding_use_each_rows_own_weight():
    """Two forwards in one step (stacked along the batch) and padded tokens: candidate rows of the second
    forward index the step's candidates, padding counts nowhere."""
    model = models.sharpen(moe_models.olmoe_style(), 4.0, norms=True)
    ids = torch.randint(3, 60, (5, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[4, 7:] = 0
    with attnprobe.record(model, mask_token_id=MASK) as store:
        for lo, hi in ((0, 2), (2, 5)):
            with store.step(t=0.5):
                model(input_ids=ids[lo:hi], attention_mask=mask[lo:hi])
                model(input_ids=ids[lo:hi].flip(0), attention_mask=mask[lo:hi].flip(0))
    assert store.num_steps == 2 and not bool(store.valid(0).all())
    samples = sum(store.valid(s).shape[0] for s in range(store.num_steps))
    for settings in (SinkSettings(), SinkSettings(sink_std=1.5)):  # exact, then re-weighted
        weights = sink_weights(store, settings.sink_std, settings.sink_alpha)
        if settings.sink_std != 2.0:
            for step, w in weights.items():
                keep = torch.ones_like(w)
                cand = store.candidates(step)
                keep[cand[:, 0], cand[:, 1]] = w[cand[:, 0], cand[:, 1]]
                weights[step] = keep
        golden = expert_statistics(model, store, weights)
        norms = activation_norms(store, sink_aware=True, settings=settings)
        for name, total in golden.items():
            assert torch.allclose(norms[name], (total / samples).sqrt().float(), rtol=1e-4, atol=1e-6), name
