import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from prune.methods.structured import (
    AttentionSpec,
    MlpSpec,
    StructuredPlan,
    apply_plan,
    channel_scores,
    find_structures,
    load_plan,
    plan_structured,
    save_plan,
    select_global,
    select_uniform,
)
from tests import models

ARCHS = {
    "llama": models.llama_bidirectional,
    "qwen2_gqa": models.qwen2_gqa,
    "llada": models.tiny_llada,
    "llada_gqa": lambda seed=0: models.tiny_llada(seed, n_kv_heads=2),
}


def _mistral(seed: int = 0) -> nn.Module:
    config = MistralConfig(
        attn_implementation="sdpa",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    torch.manual_seed(seed)
    return MistralForCausalLM(config).eval()


def _qwen3(seed: int = 0) -> nn.Module:
    config = Qwen3Config(
        attn_implementation="sdpa",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _norms(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(module.in_features, generator=gen) + 0.1
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def _masked_reference(dense: nn.Module, plan: StructuredPlan) -> nn.Module:
    """Independent check: zero the removed o_proj / down input columns in a copy of the dense model."""
    ref = copy.deepcopy(dense)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for spec in find_structures(ref):
            if isinstance(spec, AttentionSpec):
                removed = sorted(set(range(spec.num_heads)) - set(plan.keep_heads[spec.name]))
                for h in removed:
                    modules[spec.o].weight[:, h * spec.head_dim : (h + 1) * spec.head_dim] = 0
            else:
                removed = sorted(set(range(spec.width)) - set(plan.keep_channels[spec.name]))
                modules[spec.down].weight[:, removed] = 0
    return ref


# ---------------------------------------------------------------------------------------------
# pure scoring and selection, golden values
# ---------------------------------------------------------------------------------------------


def test_channel_scores_golden():
    # mean over rows of |W| = [2, 1], times norms [1, 10]
    scores = channel_scores(torch.tensor([[1.0, -2.0], [3.0, 0.0]]), torch.tensor([1.0, 10.0]))
    assert scores.dtype == torch.float32
    assert scores.tolist() == [2.0, 10.0]


def test_select_uniform_rounds_half_up_and_keeps_one():
    assert select_uniform(torch.tensor([3.0, 1.0, 2.0, 1.0]), 0.5) == [0, 2]  # ties: lower index goes first
    assert select_uniform(torch.tensor([3.0, 1.0, 2.0, 0.0]), 0.375) == [0, 2]  # 1.5 -> 2 removed
    assert select_uniform(torch.tensor([3.0, 1.0]), 0.99) == [0]  # never empty
    assert select_uniform(torch.tensor([3.0, 1.0]), 0.0) == [0, 1]


def test_select_global_standardises_per_layer():
    # z: [-1.22, 0, 1.22] and [-1, 1]; 0.4 * 5 = 2 removed: the two lowest z
    assert select_global([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 10.0])], 0.4) == [[1, 2], [1]]
    # scale-free: multiplying one layer's scores by 1000 changes nothing
    assert select_global([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 10000.0])], 0.4) == [[1, 2], [1]]


def test_select_global_keeps_one_unit_per_layer():
    # target 3 of 5; the single unit of layer 0 (z = 0) is skipped, the next-lowest goes instead
    kept = select_global([torch.tensor([5.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])], 0.6)
    assert kept == [[0], [3]]


# ---------------------------------------------------------------------------------------------
# hand-made statistics pick the lowest heads / channels
# ---------------------------------------------------------------------------------------------


def _set_o_and_down_to_ones(model: nn.Module) -> None:
    with torch.no_grad():
        for spec in find_structures(model):
            name = spec.o if isinstance(spec, AttentionSpec) else spec.down
            dict(model.named_modules())[name].weight.fill_(1.0)


def test_lowest_heads_and_channels_removed_llama():
    model = models.llama_bidirectional()
    _set_o_and_down_to_ones(model)  # score = act_norm, so the norms alone decide
    norms = _norms(model)
    head_values = [3.0, 1.0, 4.0, 2.0]  # per-head channel norm -> head scores 24, 8, 32, 16
    channel = torch.full((64,), 10.0)
    channel[[3, 7, 60]] = torch.tensor([1.0, 2.0, 3.0])
    for i in range(2):
        norms[f"model.layers.{i}.self_attn.o_proj"] = torch.tensor(head_values).repeat_interleave(8)
        norms[f"model.layers.{i}.mlp.down_proj"] = channel
    plan = plan_structured(model, norms, 0.5)
    assert plan.keep_heads["model.layers.0.self_attn"] == [0, 2]
    assert plan.head_scores["model.layers.0.self_attn"] == [24.0, 8.0, 32.0, 16.0]
    plan = plan_structured(model, norms, 0.05)  # 64 * 0.05 = 3.2 -> 3 channels, 4 * 0.05 -> 0 heads
    assert plan.keep_channels["model.layers.1.mlp"] == [c for c in range(64) if c not in (3, 7, 60)]
    assert plan.keep_heads["model.layers.1.self_attn"] == [0, 1, 2, 3]


def test_weight_magnitude_enters_the_score():
    model = models.llama_bidirectional()
    norms = {k: torch.ones_like(v) for k, v in _norms(model).items()}
    o = model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        o.weight.fill_(1.0)
        o.weight[:, 16:24] = 0.01  # head 2 is nearly silent
    plan = plan_structured(model, norms, 0.25)
    assert plan.keep_heads["model.layers.0.self_attn"] == [0, 1, 3]


def test_gqa_removes_whole_groups_scored_by_their_query_heads():
    model = models.qwen2_gqa()  # 4 query heads, 2 KV heads: groups {0, 1} and {2, 3}
    _set_o_and_down_to_ones(model)
    norms = _norms(model)
    # head 0 is the lowest query head, but group {0, 1} (1 + 5 = 6) outscores group {2, 3} (2 + 2 = 4)
    for i in range(2):
        norms[f"model.layers.{i}.self_attn.o_proj"] = torch.tensor([1.0, 5.0, 2.0, 2.0]).repeat_interleave(8)
    plan = plan_structured(model, norms, 0.5)
    assert plan.keep_heads == {"model.layers.0.self_attn": [0, 1], "model.layers.1.self_attn": [0, 1]}
    dense_k = model.model.layers[0].self_attn.k_proj.weight[:8].clone()
    apply_plan(model, plan)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (8, 32) and torch.equal(attn.k_proj.weight, dense_k)
    assert attn.num_key_value_groups == 2
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1


def test_gqa_plan_with_partial_group_is_rejected():
    model = models.qwen2_gqa()
    plan = plan_structured(model, _norms(model), 0.0)
    plan.keep_heads["model.layers.0.self_attn"] = [0, 2, 3]
    with pytest.raises(ValueError, match="whole KV groups"):
        apply_plan(model, plan)


# ---------------------------------------------------------------------------------------------
# shapes, attributes, forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shapes_and_head_counts(arch):
    model = ARCHS[arch]()
    plan = plan_structured(model, _norms(model), 0.5)
    apply_plan(model, plan)
    for spec in find_structures(model):
        if isinstance(spec, AttentionSpec):
            assert (spec.num_heads, spec.head_dim) == (2, 8)
            assert spec.num_kv_heads == (1 if arch.endswith("gqa") else 2)
        else:
            assert spec.width == 32
    logits = _logits(model, _ids())
    assert logits.shape == (2, 12, 64) and torch.isfinite(logits).all()


def test_llada_blocks_get_their_own_config():
    model = models.tiny_llada()
    blocks = model.model.transformer.blocks
    plan = plan_structured(model, _norms(model), 0.5, mode="global")
    apply_plan(model, plan)
    for block in blocks:
        assert block.config is not model.config
        assert block.config.n_heads == len(plan.keep_heads[f"model.transformer.blocks.{block.layer_id}"])
    assert model.config.n_heads == 4  # the shared config (and the rotary size it implies) is untouched


# ---------------------------------------------------------------------------------------------
# equivalence with an independently masked dense model; ratio 0
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("arch", list(ARCHS) + ["mistral_gqa", "qwen3"])
def test_pruned_equals_masked_dense(arch, mode):
    factory = {"mistral_gqa": _mistral, "qwen3": _qwen3}.get(arch) or ARCHS[arch]
    dense = factory()
    plan = plan_structured(dense, _norms(dense), 0.5, mode=mode)
    reference = _logits(_masked_reference(dense, plan), _ids())
    pruned = copy.deepcopy(dense)
    apply_plan(pruned, plan)
    torch.testing.assert_close(_logits(pruned, _ids()), reference, rtol=1e-5, atol=1e-5)


def test_pruned_equals_masked_dense_with_biases():
    dense = models.llama_bidirectional(attention_bias=True, mlp_bias=True)
    plan = plan_structured(dense, _norms(dense), 0.5)
    reference = _logits(_masked_reference(dense, plan), _ids())
    apply_plan(dense, plan)
    assert dense.model.layers[0].self_attn.q_proj.bias.shape == (16,)
    torch.testing.assert_close(_logits(dense, _ids()), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_ratio_zero_is_bit_identical(arch, mode):
    model = ARCHS[arch]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = copy.deepcopy(model.config.to_dict())
    dense = _logits(model, _ids())
    plan = plan_structured(model, _norms(model), 0.0, mode=mode)
    apply_plan(model, plan)
    assert torch.equal(_logits(model, _ids()), dense)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.to_dict() == config


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, math.nan, True, "0.5"])
def test_bad_ratio(ratio):
    model = models.llama_bidirectional()
    with pytest.raises(ValueError, match="ratio"):
        plan_structured(model, _norms(model), ratio)


def test_bad_mode_and_missing_norm():
    model = models.llama_bidirectional()
    with pytest.raises(ValueError, match="mode"):
        plan_structured(model, _norms(model), 0.5, mode="layerwise")
    norms = _norms(model)
    del norms["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*activation_norms"):
        plan_structured(model, norms, 0.5)


def test_unsupported_architecture():
    model = models.gpt2_causal()
    with pytest.raises(ValueError, match=r"GPT2Attention.*LlamaAttention"):
        find_structures(model)


def test_plan_cannot_be_applied_twice():
    model = models.llama_bidirectional()
    plan = plan_structured(model, _norms(model), 0.5)
    apply_plan(model, plan)
    with pytest.raises(ValueError, match="dense checkpoint"):
        apply_plan(model, plan)


def test_global_mode_removes_the_overall_fraction_and_keeps_one_per_layer():
    model = models.llama_bidirectional(num_hidden_layers=3)
    norms = _norms(model)
    norms["model.layers.2.self_attn.o_proj"] = torch.full((32,), 1e-6)  # layer 2's heads all tie: z = 0
    plan = plan_structured(model, norms, 0.75, mode="global")
    kept = [len(v) for v in plan.keep_heads.values()]
    assert sum(kept) == 12 - 9 and min(kept) >= 1
    assert sum(len(v) for v in plan.keep_channels.values()) == 192 - 144


# ---------------------------------------------------------------------------------------------
# saving: save_pretrained (uniform) and plans re-applied to a dense model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2_gqa"])
def test_save_pretrained_roundtrip_uniform(arch, tmp_path):
    model = ARCHS[arch]()
    apply_plan(model, plan_structured(model, _norms(model), 0.5))
    expected = _logits(model, _ids())
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert reloaded.config.num_attention_heads == 2 and reloaded.config.intermediate_size == 32
    assert reloaded.config.head_dim == 8
    assert torch.equal(_logits(reloaded, _ids()), expected)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_plan_reapplied_to_dense_model(arch, tmp_path):
    model = ARCHS[arch]()
    plan = plan_structured(model, _norms(model), 0.5, mode="global")
    apply_plan(model, plan)
    save_plan(plan, tmp_path / "plan.json")
    loaded = load_plan(tmp_path / "plan.json")
    assert loaded == plan
    assert StructuredPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    fresh = ARCHS[arch]()
    apply_plan(fresh, loaded)
    assert torch.equal(_logits(fresh, _ids()), _logits(model, _ids()))


def test_load_plan_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="save_plan"):
        load_plan(tmp_path / "x.json")


# ---------------------------------------------------------------------------------------------
# bias compensation
# ---------------------------------------------------------------------------------------------


def _mean_filled_reference(
    dense: nn.Module, plan: StructuredPlan, means: dict[str, torch.Tensor]
) -> nn.Module:
    """Dense copy whose removed o_proj/down inputs are replaced by their calibration mean."""
    ref = copy.deepcopy(dense)
    modules = dict(ref.named_modules())
    for spec in find_structures(ref):
        if isinstance(spec, AttentionSpec):
            keep = [h * 8 + j for h in plan.keep_heads[spec.name] for j in range(8)]
            name, width = spec.o, spec.num_heads * spec.head_dim
        else:
            name, keep, width = spec.down, plan.keep_channels[spec.name], spec.width
        removed = torch.ones(width, dtype=torch.bool)
        removed[keep] = False
        mean = means[name]

        def hook(module, args, removed=removed, mean=mean):
            x = args[0].clone()
            x[..., removed] = mean[removed]
            return (x,)

        modules[name].register_forward_pre_hook(hook)
    return ref


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_compensation_equals_mean_filled_inputs(with_bias):
    dense = models.llama_bidirectional(attention_bias=with_bias, mlp_bias=with_bias)
    gen = torch.Generator().manual_seed(3)
    means = {
        name: torch.randn(m.in_features, generator=gen)
        for name, m in dense.named_modules()
        if isinstance(m, nn.Linear)
    }
    plan = plan_structured(dense, _norms(dense), 0.5, act_means=means, create_bias=not with_bias)
    assert set(plan.bias_shift) == {
        s.o if isinstance(s, AttentionSpec) else s.down for s in find_structures(dense)
    }
    reference = _logits(_mean_filled_reference(dense, plan, means), _ids())
    apply_plan(dense, plan)
    assert dense.model.layers[0].mlp.down_proj.bias is not None
    torch.testing.assert_close(_logits(dense, _ids()), reference, rtol=1e-5, atol=1e-5)


def test_bias_compensation_needs_create_bias_without_bias():
    model = models.llama_bidirectional()
    means = {name: torch.ones(m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    with pytest.warns(UserWarning, match="create_bias=True"):
        plan = plan_structured(model, _norms(model), 0.5, act_means=means)
    assert plan.bias_shift == {}


def test_find_structures_specs():
    specs = find_structures(models.qwen2_gqa())
    assert specs[0] == AttentionSpec(
        "model.layers.0.self_attn",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        adapter="hf-attention",
    )
    assert specs[1] == MlpSpec(
        "model.layers.0.mlp",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        width=64,
        adapter="hf-mlp",
    )
