"""Linear-input statistics: one pass and two passes against a direct computation written here."""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from tests import models


def _direct(model, ids, mask, sink_std=2.0, sink_alpha=5.0):
    """Inputs of layer 0's q_proj and the sink weights, computed without attnprobe."""
    inputs = {}

    def keep_input(module, args):
        inputs["x"] = args[0].detach().double()  # returns None: the input is not replaced

    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(keep_input)
    model(input_ids=ids, attention_mask=mask)
    handle.remove()
    eager = copy.deepcopy(model)
    models.use_eager_attention(eager)
    probs = torch.stack(eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions).double()
    valid = mask.bool()
    probs = probs * valid[None, :, None, :, None] * valid[None, :, None, None, :]
    total = probs.sum(dim=(0, 2, 3))  # (batch, keys): over layers, heads and queries
    weights = torch.zeros_like(total)
    for b in range(total.shape[0]):
        m = total[b, valid[b]]
        thr = m.mean() + sink_std * m.std(unbiased=False)
        weights[b, valid[b]] = 1 - torch.sigmoid(sink_alpha * (m - thr))
    return inputs["x"], valid, weights


def _assert_rel(actual, expected, tol=1e-5):
    """Float32 accumulation against float64: error relative to the largest entry."""
    err = (actual.double() - expected.detach()).abs().max() / expected.abs().max()
    assert err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("two_pass", [False, True])
def test_statistics_match_direct_computation(tmp_path, two_pass):
    model = models.llama_bidirectional()
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    with attnprobe.record(model, tmp_path / "s", hessians=True, two_pass=two_pass) as store:
        model(input_ids=ids, attention_mask=mask)
    x, valid, w = _direct(model, ids, mask)
    group = "model.layers.0.self_attn.q_proj"
    groups = store.linear_groups(0)
    assert groups[group] == [group, "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    stats = store.linear_stats(0)[group]
    keep = valid.double()[..., None]
    expected_sumsq = (x.square() * keep).sum(1)
    expected_wsumsq = (x.square() * keep * w.square()[..., None]).sum(1)
    assert torch.allclose(stats["sumsq"].double(), expected_sumsq, rtol=1e-5)
    assert torch.allclose(stats["wsumsq"].double(), expected_wsumsq, rtol=1e-5)
    rows = (x * keep).reshape(-1, x.shape[-1])
    wrows = (x * keep * w[..., None]).reshape(-1, x.shape[-1])
    hessians = store.hessians()
    _assert_rel(hessians[group]["plain"], rows.T @ rows)
    _assert_rel(hessians[group]["weighted"], wrows.T @ wrows)
    assert int(hessians[group]["nsamples"]) == 2
    # candidate rows: the squared inputs of tokens above mean + 1·std
    index = store.candidates(0)
    cand = stats["cand_rows"].double()
    assert cand.shape[0] == index.shape[0]
    if index.numel():
        assert torch.allclose(cand, x[index[:, 0], index[:, 1]].square(), rtol=1e-5)


def test_one_pass_and_two_pass_agree(tmp_path):
    model = models.tiny_llada()
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    stores = {}
    for two_pass in (False, True):
        with attnprobe.record(model, tmp_path / str(two_pass), linear_stats=True, two_pass=two_pass) as s:
            model(input_ids=ids)
            model(input_ids=ids)
        stores[two_pass] = s
    for step in range(2):
        one, two = stores[False].linear_stats(step), stores[True].linear_stats(step)
        assert one.keys() == two.keys() and len(one) == 4 * model.config.n_layers
        for group in one:
            for key in ("sumsq", "wsumsq", "cand_rows"):
                assert torch.allclose(one[group][key], two[group][key], rtol=1e-6)
    assert stores[False].peak_buffer_bytes > 0


def test_statistics_on_by_default_and_opt_out(tmp_path):
    model = models.llama_bidirectional()
    with attnprobe.record(model, tmp_path / "on") as store:
        model(input_ids=torch.randint(0, 60, (1, 6)))
    assert store.options["linear_stats"] and len(store.linear_stats(0)) == 4 * model.config.num_hidden_layers
    with attnprobe.record(model, tmp_path / "off", linear_stats=False) as store:
        model(input_ids=torch.randint(0, 60, (1, 6)))
    assert store.linear_stats(0) == {} and not store.options["linear_stats"]
