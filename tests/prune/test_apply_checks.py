"""prune.apply reads back what it wrote: a planted write failure raises, naming the weight, and every
weight is restored bit-exactly; the report's sparsity is measured from the model's weights.

Every test here runs plainly and under the moving device (tests/conftest.py)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import prune
from prune.engine.write_check import WriteCheckError
from tests import models, moe_models
from tests.prune.test_blockwise import _record
from tests.prune.test_moe import _calibrated

pytestmark = pytest.mark.moving_device

apply_module = importlib.import_module("prune.engine.planning")  # where a weight is written

CASES = [
    pytest.param("model.layers.1.mlp.up_proj", {}, id="one-shot"),
    pytest.param("model.layers.1.mlp.up_proj", dict(sequential=True, device="cpu"), id="block-wise"),
]


def _skip_write_of(monkeypatch, module):
    real = apply_module.write

    def flaky(target, mask, new_weight):
        if getattr(target, "name", None) == module or target is module:
            return  # the planted failure: this weight is never written
        real(target, mask, new_weight)

    monkeypatch.setattr(apply_module, "write", flaky)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("name, options", CASES)
def test_a_weight_left_unwritten_raises_and_restores_every_weight(
    tmp_path, monkeypatch, method, name, options
):
    model = models.llama_bidirectional(num_hidden_layers=2)
    store = _record(model, tmp_path / "s", hessians=True)
    before = copy.deepcopy(model.state_dict())
    _skip_write_of(monkeypatch, dict(model.named_modules())[name])
    with pytest.raises(WriteCheckError, match=name.replace(".", r"\.")):
        prune.apply(model, store, 0.5, method=method, blocksize=16, progress=False, **options)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_an_expert_slice_left_unwritten_raises_and_restores(monkeypatch):
    model = moe_models.qwen3_moe()
    store = _calibrated(model)
    before = copy.deepcopy(model.state_dict())
    _skip_write_of(monkeypatch, "model.layers.1.mlp.experts.down_proj.2")
    with pytest.raises(WriteCheckError, match=r"1 pruned weight.*experts\.down_proj\.2"):
        prune.apply(model, store, 0.5, sink_aware=True, sequential=True, device="cpu", progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_report_sparsity_is_read_from_the_weights(tmp_path, monkeypatch):
    model = models.llama_bidirectional(num_hidden_layers=2)
    store = _record(model, tmp_path / "s")
    q = model.model.layers[0].self_attn.q_proj
    real = apply_module.write

    def and_more(target, mask, new_weight):  # a write that zeros more than planned still covers it
        real(target, mask, new_weight)
        if target is q:
            target.weight[:, :4] = 0

    monkeypatch.setattr(apply_module, "write", and_more)
    result = prune.apply(model, store, 0.5, sequential=True, device="cpu", progress=False)
    rows = dict(zip(result.report["layer"], result.report["sparsity"]))
    assert (
        rows["model.layers.0.self_attn.q_proj"]
        > 0.5
        == float((~result.masks["model.layers.0.self_attn.q_proj"]).float().mean())
    )
    for name, module in model.named_modules():
        if name in rows:
            assert rows[name] == float((module.weight == 0).float().mean()), name
