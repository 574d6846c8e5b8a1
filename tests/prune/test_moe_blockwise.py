"""Block-wise (sequential, onloaded) pruning of mixture-of-experts models: fused 3-D and ModuleList
experts, Wanda, SparseGPT, N:M, bf16, expert statistics in bounded passes.

Every test here runs plainly and under the moving device (tests/conftest.py): with ``device="cpu"``
each block is then copied into fresh storage and its host weights are NaN while it is away, as on a
real accelerator. Sparsity is read back from the model's weights, never from the returned masks.
"""

from __future__ import annotations

import copy

import pytest
import torch

import prune
from prune.engine import block_experts
from prune.methods.masks import select_unstructured
from tests import moe_models
from tests.assertions import assert_pruned_like
from tests.prune.moe_reference import expert_statistics, sink_weights
from tests.prune.test_moe import _calibrated, _expert_weights

pytestmark = pytest.mark.moving_device

FUSED_AND_LIST = [
    pytest.param(moe_models.qwen3_moe, id="qwen3-fused"),
    pytest.param(lambda: moe_models.llada2_style(fused=True), id="llada2-fused"),
    pytest.param(moe_models.olmoe_style, id="olmoe-list"),
]


def _attention(model):
    return {
        n: m.weight for n, m in model.named_modules() if ".self_attn." in n and isinstance(m, torch.nn.Linear)
    }


def _zeros(weight):
    return float((weight == 0).float().mean())


def test_qwen3_moe_fused_experts_end_half_sparse_when_onloaded():
    """The issue's case: Wanda, sink-aware, sequential, onloaded; the fused experts must end at 0.5."""
    model = moe_models.qwen3_moe()
    store = _calibrated(model)
    result = prune.apply(
        model, store, 0.5, method="wanda", sink_aware=True, sequential=True, device="cpu", progress=False
    )
    for layer in model.model.layers:
        for param in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            assert _zeros(param) == 0.5  # (E, out, in), every row exactly half
    for name, weight in _attention(model).items():
        assert _zeros(weight) == 0.5, name
    assert (result.report["sparsity"] == 0.5).all()  # measured from the weights read back
    table = result.coverage.set_index("block")
    assert table.loc["model.layers.0", "sparsity"] > 0.45  # routers (dense) are the rest


@pytest.mark.parametrize("build", FUSED_AND_LIST)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_every_expert_slice_is_pruned_in_the_model(build, method):
    model = build()
    store = _calibrated(model)
    result = prune.apply(
        model,
        store,
        0.5,
        method=method,
        sink_aware=True,
        sequential=True,
        device="cpu",
        blocksize=16,
        progress=False,
    )
    for name, weight in _expert_weights(model).items():
        assert _zeros(weight) >= 0.5, name
        assert not bool(weight[~result.masks[name]].any()), name
        if method == "sparsegpt":
            assert torch.equal(weight, result.weights[name].to(weight.dtype)), name


def test_n_m_on_every_expert_slice_block_wise():
    model = moe_models.qwen3_moe()
    store = _calibrated(model)
    prune.apply(
        model, store, 0.5, method="wanda", pattern="2:4", sequential=True, device="cpu", progress=False
    )
    for name, weight in _expert_weights(model).items():
        zeros = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert bool((zeros == 2).all()), name


def test_bfloat16_moe_block_wise_sparsegpt_keeps_its_dtype():
    model = moe_models.qwen3_moe().to(torch.bfloat16)
    store = _calibrated(model)
    prune.apply(
        model, store, 0.5, method="sparsegpt", sequential=True, device="cpu", blocksize=16, progress=False
    )
    for name, weight in _expert_weights(model).items():
        assert weight.dtype == torch.bfloat16 and 0.5 <= _zeros(weight) <= 0.51, name


@pytest.mark.parametrize("build", FUSED_AND_LIST)
def test_expert_passes_of_one_expert_each_give_the_one_pass_result(build, monkeypatch):
    """SparseGPT's expert Hessians in passes of one expert: the same arithmetic per expert, the same
    masks and weights, and the block written only after its last pass."""
    model = build()
    store = _calibrated(model)
    one_pass = copy.deepcopy(model)
    expected = prune.apply(
        one_pass, store, 0.5, method="sparsegpt", sequential=True, device="cpu", blocksize=16, progress=False
    )
    passes = []
    real = block_experts.ExpertBlockStatistics.passes

    def counted(self):
        for part in real(self):
            passes.append(len(part.groups))
            yield part

    monkeypatch.setattr(block_experts, "EXPERT_PASS_BYTES", 1)  # every expert alone
    monkeypatch.setattr(block_experts.ExpertBlockStatistics, "passes", counted)
    result = prune.apply(
        model, store, 0.5, method="sparsegpt", sequential=True, device="cpu", blocksize=16, progress=False
    )
    experts = (
        len(model.model.layers[0].mlp.experts)
        if isinstance(model.model.layers[0].mlp.experts, torch.nn.ModuleList)
        else model.model.layers[0].mlp.experts.down_proj.shape[0]
    )
    assert len(passes) == 2 * experts  # two blocks, one pass per expert
    assert result.masks.keys() == expected.masks.keys()
    for name, mask in expected.masks.items():
        assert torch.equal(result.masks[name], mask), name
    for (name, a), b in zip(model.state_dict().items(), one_pass.state_dict().values()):
        assert torch.equal(a, b), name


def test_expert_passes_split_by_bytes():
    assert block_experts.expert_passes([4, 4, 4], 8) == [[0, 1], [2]]
    assert block_experts.expert_passes([9, 1], 8) == [[0], [1]]  # a too-large expert still gets a pass
    assert block_experts.expert_passes([], 8) == []


@pytest.mark.parametrize("build", [moe_models.qwen3_moe, moe_models.llada2_style], ids=["qwen3", "llada2"])
def test_sequential_expert_masks_equal_routing_on_pruned_earlier_blocks(build):
    """Block-wise: layer 0 from the dense model, layer 1 from inputs through the pruned layer 0."""
    model = build()
    store = _calibrated(model)
    weights = sink_weights(store)
    golden_model = build()
    dense = {n: w.detach().clone() for n, w in _expert_weights(model).items()}
    result = prune.apply(model, store, 0.5, sink_aware=True, sequential=True, progress=False)
    for layer in (0, 1):
        golden = expert_statistics(golden_model, store, weights)
        golden = {n: t for n, t in golden.items() if n.startswith(f"model.layers.{layer}.")}
        expected = {
            n: select_unstructured(dense[n].abs().double() * t.sqrt(), 0.5) for n, t in golden.items()
        }
        assert_pruned_like(  # float64 golden sums: near-ties aside (tests/assertions.py)
            dense,
            ({n: result.masks[n] for n in golden}, {n: dense[n] * result.masks[n] for n in golden}),
            (expected, {n: dense[n] * m for n, m in expected.items()}),
            {n: torch.diag(t) for n, t in golden.items()},
        )
        with torch.no_grad():  # prune the golden copy's layer as the engine did, before the next layer
            everything = {**_expert_weights(golden_model), **dict(golden_model.named_parameters())}
            for name, weight in everything.items():
                key = name.removesuffix(".weight")
                if key.startswith(f"model.layers.{layer}.") and key in result.masks:
                    weight.mul_(result.masks[key].to(weight.dtype))
