"""pattern="experts": REAP / frequency / norm scores against an independent computation, routed experts
removed from fused and ModuleList layouts, checkpoints that reload with identical logits, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import attnprobe
import prune
from attnprobe import discover_experts
from prune.engine.expert_removal import expert_scores
from tests import moe_models

MASK = moe_models.MASK_TOKEN_ID


def _ids(rows: int = 3) -> torch.Tensor:
    ids = torch.randint(3, 60, (rows, 16), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = 1
    return ids


def _store(model):
    with attnprobe.record(model, mask_token_id=MASK) as store:
        attnprobe.calibrate(model, _ids(), mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
    return store


def _reference_qwen3_moe(model, store):
    """Per layer and expert: Σ g·‖y‖, Σ ‖y‖ and the routed-token count, from our own capture of the
    experts' arguments and our own expert MLP, over a replay of the recorded inputs."""
    layers = model.model.layers
    sums = {
        i: torch.zeros(3, layer.mlp.experts.num_experts, dtype=torch.float64)
        for i, layer in enumerate(layers)
    }
    for step in range(store.num_steps):
        calls = {}
        handles = [
            layer.mlp.experts.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, a))
            for i, layer in enumerate(layers)
        ]
        with torch.no_grad():
            model(input_ids=store.input_ids(step))
        for h in handles:
            h.remove()
        for i, (hidden, index, gates) in calls.items():
            hidden, gates = hidden.detach(), gates.detach()
            experts = layers[i].mlp.experts
            up_gate, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
            for token in range(hidden.shape[0]):
                for slot in range(index.shape[1]):
                    e = int(index[token, slot])
                    gate, up = (up_gate[e] @ hidden[token].double()).chunk(2)
                    y = down[e] @ (F.silu(gate) * up)
                    sums[i][:, e] += torch.tensor(
                        [float(gates[token, slot]) * float(y.norm()), float(y.norm()), 1.0],
                        dtype=torch.float64,
                    )
    return sums


def test_scores_equal_an_independent_computation():
    model = moe_models.qwen3_moe()
    store = _store(model)
    sets = discover_experts(model)
    reference = _reference_qwen3_moe(model, store)
    for score, row in (("reap", 0), ("norm", 1), ("frequency", 2)):
        got = expert_scores(store, sets, score, sink_aware=False)
        for i, es in enumerate(sets):
            ref = reference[i]
            expected = ref[2] if score == "frequency" else ref[row] / ref[2].clamp(min=1)
            torch.testing.assert_close(got[es.name], expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("score", ["reap", "frequency", "norm"])
def test_qwen3_moe_fused_experts_removed_and_reloaded(score, tmp_path):
    model = moe_models.qwen3_moe()
    dense = copy.deepcopy(model)
    store = _store(model)
    result = prune.apply(model, store, 0.5, pattern="experts", score=score)
    for i, layer in enumerate(model.model.layers):
        keep = result.plan.keep[f"model.layers.{i}.mlp.experts"]
        scores = result.plan.scores[f"model.layers.{i}.mlp.experts"]
        assert len(keep) == 2 and min(scores[e] for e in keep) >= max(
            s for e, s in enumerate(scores) if e not in keep
        )
        old = dense.model.layers[i].mlp
        assert torch.equal(layer.mlp.experts.gate_up_proj, old.experts.gate_up_proj[keep])
        assert torch.equal(layer.mlp.experts.down_proj, old.experts.down_proj[keep])
        assert torch.equal(layer.mlp.gate.weight, old.gate.weight[keep])
        assert layer.mlp.experts.num_experts == 2 and layer.mlp.gate.num_experts == 2
    assert model.config.num_experts == 2
    ids = _ids(2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    prune.save_pretrained(model, tmp_path / "pruned", result)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_experts == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=1e-6)


def test_module_list_experts_and_router_rows_go():
    model = moe_models.olmoe_style()
    dense = copy.deepcopy(model)
    store = _store(model)
    result = prune.apply(model, store, 0.25, pattern="experts")
    for name, keep in result.plan.keep.items():
        assert len(keep) == 6  # 8 experts, round(0.25 · 8) = 2 removed
        parent = name.rpartition(".")[0]
        new, old = model.get_submodule(parent), dense.get_submodule(parent)
        assert len(new.experts) == 6 and new.gate.out_features == 6
        assert torch.equal(new.gate.weight, old.gate.weight[keep])
        for j, e in enumerate(keep):
            assert new.experts[j] is not None and torch.equal(
                new.experts[j].down_proj.weight, old.experts[e].down_proj.weight
            )
    with torch.no_grad():
        assert torch.isfinite(model(_ids(2)).logits).all()


def test_refuses_fewer_experts_than_top_k_and_group_routers_untouched():
    model = moe_models.qwen3_moe()  # 4 experts, top-2
    store = _store(model)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="top-k"):
        prune.apply(model, store, 0.75, pattern="experts")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    grouped = moe_models.llada2_style()
    with pytest.raises(ValueError, match="n_group"):
        prune.apply(grouped, _store(grouped), 0.5, pattern="experts")
    with pytest.raises(ValueError, match="no MoE layer"):
        from tests import models

        dense = models.llama_bidirectional()
        prune.apply(dense, _store(dense), 0.5, pattern="experts")
