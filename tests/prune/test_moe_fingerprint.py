"""The weight-sample fingerprint covers fused 3-D expert weights: a store (or mask file) from a checkpoint
whose experts differ is refused unless ``allow_other_weights=True``; old stores without the sample stay
readable."""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
import prune
from attnprobe import fingerprint_problems
from tests import moe_models

MASK = moe_models.MASK_TOKEN_ID
# The fused expert parameters of the tiny Qwen3-MoE, named by hand (2 layers, gate_up_proj and down_proj).
FUSED = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]


def _calibrated(model):
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    with attnprobe.record(model, mask_token_id=MASK) as store:
        attnprobe.calibrate(
            model, ids, mask_token_id=MASK, steps=2, sample_interval=1, batch_size=2, progress=False
        )
    return store


def _other_experts(model, names=FUSED, scale=1e-2):
    """A copy whose fused expert weights (only) are moved, as in another checkpoint of the same model."""
    other = copy.deepcopy(model)
    params = dict(other.named_parameters())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in names:
            params[name].add_(scale * torch.randn(params[name].shape, generator=gen))
    return other


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_store_of_other_expert_weights_is_refused():
    model = moe_models.qwen3_moe()
    store = _calibrated(model)
    assert sorted(store.fingerprint["expert_weight_sample"]) == sorted(FUSED)
    sibling = _other_experts(model)
    # nn.Linear samples alone would miss it: every linear (attention, router) is untouched.
    linears_only = {k: v for k, v in store.fingerprint.items() if k != "expert_weight_sample"}
    assert fingerprint_problems(linears_only, sibling) == ([], [])
    problems, differ = fingerprint_problems(store.fingerprint, sibling)
    assert problems == [] and sorted(differ) == sorted(FUSED)
    one = _other_experts(model, names=[FUSED[3]])
    assert fingerprint_problems(store.fingerprint, one) == ([], [FUSED[3]])
    before = _weights(sibling)
    with pytest.raises(ValueError, match="another checkpoint.*experts.gate_up_proj.*allow_other_weights"):
        prune.apply(sibling, store, 0.5, progress=False)
    assert all(torch.equal(before[k], v) for k, v in sibling.state_dict().items())
    result = prune.apply(sibling, store, 0.5, allow_other_weights=True, progress=False)
    assert "model.layers.1.mlp.experts.down_proj.2" in result.masks


def test_same_experts_in_bfloat16_match_and_other_shapes_are_another_model():
    model = moe_models.qwen3_moe()
    stored = attnprobe.model_fingerprint(model, [])
    assert fingerprint_problems(stored, copy.deepcopy(model).to(torch.bfloat16)) == ([], [])
    wider = moe_models.qwen3_moe(moe_intermediate_size=16)
    problems, _ = fingerprint_problems(stored, wider)
    assert f"{FUSED[0]} shape [4, 64, 32] vs [4, 32, 32]" in problems


def test_a_sample_entry_changed_by_hand_is_found_and_meta_weights_are_skipped():
    model = moe_models.qwen3_moe()
    stored = attnprobe.model_fingerprint(model, [])
    # Entry 5 of 16 of (4, 32, 32) down_proj: flat index (2*5+1)*4096 // 32 = 1408 = (1, 12, 0).
    sample = stored["expert_weight_sample"][FUSED[1]]
    assert sample["values"][5] == model.model.layers[0].mlp.experts.down_proj[1, 12, 0].item()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.experts.down_proj[1, 12, 0] += 0.5
    assert fingerprint_problems(stored, other) == ([], [FUSED[1]])
    assert fingerprint_problems(stored, other, check_weights=False) == ([], [])
    # an old store (no expert sample) reads and compares linears only
    old = {k: v for k, v in stored.items() if k != "expert_weight_sample"}
    assert fingerprint_problems(old, other) == ([], [])


def test_mask_file_checks_kept_expert_entries(tmp_path):
    model = moe_models.qwen3_moe()
    dense = copy.deepcopy(model)
    result = prune.apply(model, _calibrated(model), 0.5, method="wanda", progress=False)
    path = prune.save_masks(result.masks, tmp_path / "m.safetensors", settings=result.settings, model=model)
    prune.load_masks(copy.deepcopy(dense), path)  # pruned entries are not compared: accepted
    sibling = _other_experts(dense)
    before = _weights(sibling)
    with pytest.raises(ValueError, match=r"differ.*experts\.(gate_up|down)_proj.*allow_other_weights=True"):
        prune.load_masks(sibling, path)
    assert all(torch.equal(before[k], v) for k, v in sibling.state_dict().items())
    prune.load_masks(sibling, path, allow_other_weights=True)
