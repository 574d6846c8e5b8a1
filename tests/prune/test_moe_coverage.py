"""Coverage report: what each block's pruning considered and left out, warnings and strict=True."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import attnprobe
import prune
from tests import models, moe_models

MASK = models.MASK_TOKEN_ID


class _Mystery(nn.Module):
    """A weight-bearing module no adapter knows (a 2-D parameter, not an nn.Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, 32))

    def forward(self, x):
        return x


def _store(model):
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    with attnprobe.record(model, mask_token_id=MASK) as store:
        attnprobe.calibrate(model, ids, mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
    return store


def test_unknown_weights_warn_listing_them_and_strict_raises_leaving_weights():
    model = models.llama_bidirectional()
    model.model.layers[0].mystery = _Mystery()
    store = _store(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mystery\.table.*strict=True"):
        prune.apply(model, store, 0.5, strict=True, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.warns(UserWarning, match=r"1 weight-bearing parameter.*model\.layers\.0\.mystery\.table"):
        result = prune.apply(model, store, 0.5, progress=False)
    table = result.coverage.set_index("block")
    layer0 = [p for n, p in model.named_parameters() if n.startswith("model.layers.0.") and p.dim() >= 2]
    total = sum(p.numel() for p in layer0)
    assert table.loc["model.layers.0", "weights"] == total
    assert table.loc["model.layers.0", "considered"] == pytest.approx(1 - 8 * 32 / total)
    # Zeros over every block weight: the dense mystery table pulls the block below one half.
    expected = sum(int((p == 0).sum()) for p in layer0) / total
    assert table.loc["model.layers.0", "sparsity"] == pytest.approx(expected) and expected < 0.5
    assert "mystery.table (no adapter" in table.loc["model.layers.0", "left_out"]
    assert table.loc["model.layers.1", "considered"] == 1.0 and table.loc["model.layers.1", "left_out"] == ""


def test_user_exclusions_are_reported_without_warning():
    model = moe_models.qwen3_moe()
    store = _store(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the router nor ignore= is a reason to warn
        result = prune.apply(model, store, 0.5, ignore=r".*experts\.down_proj\.[01]", progress=False)
    table = result.coverage.set_index("block")
    left = table.loc["model.layers.0", "left_out"]
    assert "model.layers.0.mlp.experts.down_proj[experts [0, 1]] (excluded" in left
    assert "model.layers.0.mlp.gate.weight (router" in left
    experts = model.model.layers[0].mlp.experts
    layer0 = [p for n, p in model.named_parameters() if n.startswith("model.layers.0.") and p.dim() >= 2]
    total = sum(p.numel() for p in layer0)
    left_out = model.model.layers[0].mlp.gate.weight.numel() + 2 * experts.down_proj[0].numel()
    assert table.loc["model.layers.0", "considered"] == pytest.approx(1 - left_out / total)
    overall = table.loc["(all blocks)"]
    all_weights = [p for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() >= 2]
    assert overall["weights"] == sum(p.numel() for p in all_weights)
    assert overall["sparsity"] == pytest.approx(
        sum(int((p == 0).sum()) for p in all_weights) / overall["weights"]
    )
