"""prune.apply on mixture-of-experts models: every expert slice pruned, masks equal independent per-expert
Wanda / SparseGPT, magnitude fallback, N:M, masks on disk, clear refusals."""

from __future__ import annotations

import pytest
import torch

import attnprobe
import prune
from prune.methods.masks import select_unstructured
from prune.methods.sparsegpt import sparsegpt_prune
from tests import moe_models
from tests.assertions import assert_pruned_like
from tests.prune.moe_reference import expert_statistics, sink_weights

MASK = moe_models.MASK_TOKEN_ID


def _calibrated(model, **options):
    ids = torch.randint(3, 60, (3, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    with attnprobe.record(model, mask_token_id=MASK, **options) as store:
        attnprobe.calibrate(
            model, ids, mask_token_id=MASK, steps=4, sample_interval=2, batch_size=3, progress=False
        )
    return store


def _expert_weights(model):
    """{slice name: (out, in) weight} of every routed expert, read directly from the modules."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        experts, prefix = layer.mlp.experts, f"model.layers.{i}.mlp.experts"
        if isinstance(experts, torch.nn.ModuleList):
            for e, mlp in enumerate(experts):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    out[f"{prefix}.{e}.{p}"] = getattr(mlp, p).weight
        else:
            for p, param in experts.named_parameters():
                for e in range(param.shape[0]):
                    out[f"{prefix}.{p}.{e}"] = param[e]
    return out


def test_qwen3_moe_half_of_attention_and_expert_weights(recwarn):
    model = moe_models.qwen3_moe()
    store = _calibrated(model)
    result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True, progress=False)
    experts = _expert_weights(model)
    assert len(experts) == 2 * 4 * 2  # 2 layers, 4 experts, gate_up + down
    for name, weight in experts.items():
        assert 0.49 <= float((weight == 0).float().mean()) <= 0.51, name
    linears = model.named_modules()
    attention = [m.weight for n, m in linears if ".self_attn." in n and isinstance(m, torch.nn.Linear)]
    pruned = [*experts.values(), *attention]
    zeros = sum(int((w == 0).sum()) for w in pruned)
    assert zeros / sum(w.numel() for w in pruned) >= 0.49
    assert not [w for w in recwarn.list if "no adapter" in str(w.message)]
    # Coverage: everything but the routers considered; sparsity is zeros over every block weight.
    table = result.coverage.set_index("block")
    block = dict(model.named_parameters())
    layer0 = {n: p for n, p in block.items() if n.startswith("model.layers.0.") and p.dim() >= 2}
    router = layer0["model.layers.0.mlp.gate.weight"].numel()
    total = sum(p.numel() for p in layer0.values())
    row = table.loc["model.layers.0"]
    assert row["weights"] == total
    assert row["considered"] == pytest.approx((total - router) / total)
    assert row["sparsity"] == pytest.approx(sum(int((p == 0).sum()) for p in layer0.values()) / total)
    assert "model.layers.0.mlp.gate.weight (router" in row["left_out"]


@pytest.mark.parametrize("sink_aware", [False, True])
@pytest.mark.parametrize(
    "build",
    [moe_models.olmoe_style, moe_models.llada2_style, lambda: moe_models.llada2_style(fused=True)],
    ids=["olmoe-list", "llada2-list", "llada2-fused"],
)
def test_expert_masks_equal_independent_per_expert_wanda(build, sink_aware):
    model = build()
    store = _calibrated(model)
    weights = sink_weights(store) if sink_aware else None
    golden = expert_statistics(model, store, weights)
    dense = {n: w.detach().clone() for n, w in _expert_weights(model).items()}
    result = prune.apply(model, store, 0.5, method="wanda", sink_aware=sink_aware, progress=False)
    assert set(golden) == set(dense)
    # The golden sums are float64, the store's float32: masks agree but for near-ties, and Wanda's
    # objective (the layer error with the diagonal of the Gram matrix) is within 1%.
    expected = {n: select_unstructured(dense[n].abs().double() * t.sqrt(), 0.5) for n, t in golden.items()}
    pruned = _expert_weights(model)
    assert_pruned_like(
        dense,
        ({n: result.masks[n] for n in golden}, pruned),
        (expected, {n: dense[n] * m for n, m in expected.items()}),
        {n: torch.diag(t) for n, t in golden.items()},
    )
    for name in golden:  # the written weight is the dense one times the returned mask, exactly
        assert torch.equal(pruned[name], dense[name] * result.masks[name]), name
    assert "model.layers.0.mlp.gate" not in result.masks  # routers stay dense unless targeted


@pytest.mark.moving_device  # sequential=True: plainly and under the moving device (tests/conftest.py)
@pytest.mark.parametrize("sequential", [False, True])
def test_expert_without_tokens_falls_back_to_magnitude(sequential):
    model = moe_models.llada2_style(fused=True)
    with torch.no_grad():
        # Expert 0 of layer 0 is never chosen, and neither is expert 1: the router scores a group of
        # experts (0, 1) by its best two, so that group always loses the group-limited top-k.
        model.model.layers[0].mlp.gate.expert_bias[0] = -10.0
    store = _calibrated(model)
    dense = {n: w.detach().clone() for n, w in _expert_weights(model).items()}
    result = prune.apply(model, store, 0.5, method="wanda", sequential=sequential, progress=False)
    notes = dict(zip(result.report["layer"], result.report["note"]))
    projections = ("gate_proj", "up_proj", "down_proj")
    starved = [f"model.layers.0.mlp.experts.{p}.{e}" for p in projections for e in (0, 1)]
    assert {n for n, note in notes.items() if note} == set(starved)
    for name in starved:
        assert "magnitude" in notes[name]
        assert torch.equal(result.masks[name], select_unstructured(dense[name].abs(), 0.5))


def test_expert_sparsegpt_equals_per_slice_sparsegpt_with_routed_hessian():
    model = moe_models.qwen3_moe()
    store = _calibrated(model, hessians=True)
    golden = expert_statistics(model, store, None, hessian=True)
    samples = {m: int(h["nsamples"]) for g, h in store.hessians().items() for m in store.linear_groups(0)[g]}
    dense = {n: w.detach().clone() for n, w in _expert_weights(model).items()}
    result = prune.apply(model, store, 0.5, method="sparsegpt", progress=False)
    # The golden Hessians are float64, the store's float32 summed in another order: near-ties aside,
    # the same masks, and each slice's layer error within 1% (tests/assertions.py).
    expected = {}
    for name, hessian in golden.items():
        h = (hessian * (2.0 / samples[name])).float()
        new_weight, keep = sparsegpt_prune(dense[name].clone(), h, 0.5)
        expected[name] = (keep, new_weight * keep)
    pruned = _expert_weights(model)
    assert_pruned_like(
        dense,
        ({n: result.masks[n] for n in golden}, pruned),
        ({n: e[0] for n, e in expected.items()}, {n: e[1] for n, e in expected.items()}),
        golden,
    )


def test_n_m_on_every_expert_slice():
    model = moe_models.qwen3_moe()
    store = _calibrated(model)
    prune.apply(model, store, 0.5, method="wanda", pattern="2:4", sink_aware=True, progress=False)
    for name, weight in _expert_weights(model).items():
        zeros = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert bool((zeros == 2).all()), name


def test_expert_masks_round_trip_through_disk(tmp_path):
    model = moe_models.qwen3_moe()
    store = _calibrated(model)
    result = prune.apply(model, store, 0.5, method="wanda", progress=False)
    assert "model.layers.1.mlp.experts.gate_up_proj.3" in result.masks
    assert result.masks["model.layers.1.mlp.experts.gate_up_proj.3"].shape == (64, 32)  # one (out, in) key
    path = prune.save_masks(result.masks, tmp_path / "m.safetensors", settings=result.settings, model=model)
    fresh = moe_models.qwen3_moe()
    prune.load_masks(fresh, path)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_bfloat16_moe_prunes_in_its_dtype():
    model = moe_models.qwen3_moe().to(torch.bfloat16)
    store = _calibrated(model)
    prune.apply(model, store, 0.5, method="wanda", sink_aware=True, progress=False)
    for name, weight in _expert_weights(model).items():
        assert weight.dtype == torch.bfloat16 and 0.49 <= float((weight == 0).float().mean()) <= 0.51, name


def test_targets_may_name_fused_experts_only():
    model = moe_models.qwen3_moe()
    store = _calibrated(model)
    result = prune.apply(model, store, 0.5, targets=r".*experts\.down_proj\.\d+", progress=False)
    assert sorted(result.masks) == sorted(n for n in _expert_weights(model) if ".down_proj." in n)


def test_routers_pruned_only_when_targeted():
    model = moe_models.olmoe_style()
    store = _calibrated(model)
    result = prune.apply(model, store, 0.5, targets=r".*mlp\.gate", progress=False)
    assert sorted(result.masks) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_store_without_expert_statistics_is_refused():
    model = moe_models.qwen3_moe()
    store = _calibrated(model, linear_stats=False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="linear|statistics"):
        prune.apply(model, store, 0.5, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_structured_refuses_fused_qkv():
    llada2 = moe_models.llada2_style()
    with pytest.raises(ValueError, match="query_key_value"):
        prune.apply(llada2, _calibrated(llada2), 0.5, pattern="structured", progress=False)
