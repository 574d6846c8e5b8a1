"""prune.apply(..., pattern="structured") end to end: calibration store → activation norms → plan → slice."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import attnprobe
import prune
from prune.engine.statistics import activation_norms
from prune.methods.structured import (
    AttentionSpec,
    StructuredPlan,
    apply_plan,
    find_structures,
    load_plan,
    plan_structured,
    save_plan,
)
from tests import models

ARCHS = {
    "llama": models.llama_bidirectional,  # 4 heads, 4 KV heads, MLP 64
    "qwen2_gqa": models.qwen2_gqa,  # 4 heads, 2 KV heads
    "llada": models.tiny_llada,  # LLaDA module names, attention as a block method
}
# dense (heads, kv heads) -> at ratio 0.5: half the KV groups go, with all their query heads
HEADS_AT_HALF = {"llama": (2, 2), "qwen2_gqa": (2, 1), "llada": (2, 2)}


def _calibration_ids(n: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


def _record(model: nn.Module, path):
    with attnprobe.record(model, path, linear_stats=True) as store:
        attnprobe.calibrate(
            model,
            _calibration_ids(),
            mask_token_id=models.MASK_TOKEN_ID,
            steps=4,
            sample_interval=2,
            progress=False,
        )
    return store


def _ids() -> torch.Tensor:
    return torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(7))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("sink_aware", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_structured_apply_shrinks_heads_and_channels(arch, sink_aware, tmp_path):
    model = ARCHS[arch]()
    store = _record(model, tmp_path / "s")
    dense_params = sum(p.numel() for p in model.parameters())
    result = prune.apply(model, store, 0.5, pattern="structured", sink_aware=sink_aware, progress=False)
    assert isinstance(result.plan, StructuredPlan)
    assert result.masks == {} and result.settings["structured_mode"] == "uniform"
    assert result.settings["sink_aware"] is sink_aware
    for spec in find_structures(model):
        if isinstance(spec, AttentionSpec):
            assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (*HEADS_AT_HALF[arch], 8)
            assert len(result.plan.keep_heads[spec.name]) == spec.num_heads
        else:
            assert spec.width == 32 and result.plan.keep_channels[spec.name] == sorted(
                result.plan.keep_channels[spec.name]
            )
    # every q/k/v/o and gate/up/down of both layers lost half its weights (here all widths halve)
    assert len(result.report) == 14 and (result.report["sparsity"] == 0.5).all()
    assert result.report["shape"].str.contains("->").all()
    assert sum(p.numel() for p in model.parameters()) < dense_params
    logits = _logits(model)
    assert logits.shape == (2, 12, models.VOCAB_SIZE) and torch.isfinite(logits).all()


@pytest.mark.parametrize("sink_aware", [False, True])
def test_plan_comes_from_the_requested_statistics(sink_aware, tmp_path):
    dense = models.llama_bidirectional()
    store = _record(dense, tmp_path / "s")
    model = copy.deepcopy(dense)
    result = prune.apply(model, store, 0.5, pattern="structured", sink_aware=sink_aware, progress=False)
    expected = plan_structured(dense, activation_norms(store, sink_aware=sink_aware), 0.5)
    assert result.plan == expected


def test_sink_aware_and_baseline_statistics_differ(tmp_path):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s")
    plain, weighted = activation_norms(store), activation_norms(store, sink_aware=True)
    for spec in find_structures(model):
        name = spec.o if isinstance(spec, AttentionSpec) else spec.down
        assert not torch.equal(plain[name], weighted[name])
        assert (weighted[name] <= plain[name] * (1 + 1e-6)).all()  # w = 1 - s <= 1 only removes mass
    # both variants run on copies of the same dense model (on a tiny model their plans may coincide)
    for sink_aware in (False, True):
        pruned = copy.deepcopy(model)
        prune.apply(pruned, store, 0.5, pattern="structured", sink_aware=sink_aware, progress=False)
        assert torch.isfinite(_logits(pruned)).all()


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_ratio_zero_is_bit_identical(arch, mode, tmp_path):
    model = ARCHS[arch]()
    store = _record(model, tmp_path / "s")
    dense_logits, before = _logits(model), _state(model)
    result = prune.apply(
        model, store, 0.0, pattern="structured", sink_aware=True, structured_mode=mode, progress=False
    )
    assert len(result.report) == 0
    assert torch.equal(_logits(model), dense_logits)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["llama", "qwen2_gqa"])
def test_uniform_reloads_with_save_pretrained(arch, tmp_path):
    model = ARCHS[arch]()
    store = _record(model, tmp_path / "s")
    prune.apply(model, store, 0.5, pattern="structured", sink_aware=True, progress=False)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="sdpa").eval()
    heads, kv_heads = HEADS_AT_HALF[arch]
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (heads, kv_heads)
    assert reloaded.config.intermediate_size == 32
    assert torch.equal(_logits(reloaded), expected)


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_plan_reapplied_to_fresh_dense_model(arch, mode, tmp_path):
    model = ARCHS[arch]()
    store = _record(model, tmp_path / "s")
    result = prune.apply(
        model, store, 0.5, pattern="structured", sink_aware=True, structured_mode=mode, progress=False
    )
    save_plan(result.plan, tmp_path / "plan.json")
    fresh = ARCHS[arch]()  # same seed: the dense checkpoint
    apply_plan(fresh, load_plan(tmp_path / "plan.json"))
    assert torch.equal(_logits(fresh), _logits(model))


def test_gqa_removes_whole_kv_groups(tmp_path):
    model = models.qwen2_gqa()  # groups {0, 1} and {2, 3}
    store = _record(model, tmp_path / "s")
    dense_k = [layer.self_attn.k_proj.weight.detach().clone() for layer in model.model.layers]
    result = prune.apply(model, store, 0.5, pattern="structured", progress=False)
    for i, layer in enumerate(model.model.layers):
        kept = result.plan.keep_heads[f"model.layers.{i}.self_attn"]
        assert kept in ([0, 1], [2, 3])
        group = kept[0] // 2
        attn = layer.self_attn
        assert attn.num_key_value_groups == 2 and attn.q_proj.weight.shape == (16, 32)
        assert torch.equal(attn.k_proj.weight, dense_k[i][group * 8 : (group + 1) * 8])
        assert attn.v_proj.weight.shape == (8, 32) and attn.o_proj.weight.shape == (32, 16)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert torch.isfinite(_logits(model)).all()


def test_gpt2_is_refused_before_any_change(tmp_path):
    model = models.gpt2_causal()
    store = _record(model, tmp_path / "s")
    before = _state(model)
    with pytest.raises(ValueError):  # fused Conv1D c_attn: no adapter knows its heads
        prune.apply(model, store, 0.5, pattern="structured", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="sparsegpt"), "method='wanda'"),
        (dict(sequential=True), "sequential=False"),
        (dict(structured_mode="layerwise"), "mode"),
        (dict(sparsity=1.0), "sparsity"),
    ],
)
def test_bad_structured_arguments_leave_the_model_untouched(kwargs, match, tmp_path):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s")
    before = _state(model)
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        prune.apply(model, store, kwargs.pop("sparsity"), pattern="structured", progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_structured_needs_a_store():
    model = models.llama_bidirectional()
    with pytest.raises(ValueError, match="calibration store"):
        prune.apply(model, None, 0.5, pattern="structured", progress=False)
