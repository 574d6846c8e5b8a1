"""pattern="blocks": Block Influence against an independent computation, removal that reloads with the
same logits, the config and layer indices following, refusals that leave the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import attnprobe
import prune
from prune.engine.block_influence import block_influence
from prune.engine.statistics import SinkSettings, step_weights
from tests import models, moe_models

MASK = models.MASK_TOKEN_ID


def _ids(rows: int = 3, length: int = 16) -> torch.Tensor:
    ids = torch.randint(3, 60, (rows, length), generator=torch.Generator().manual_seed(4))
    ids[:, 0] = 1
    return ids


def _store(model, **options):
    with attnprobe.record(model, mask_token_id=MASK, **options) as store:
        attnprobe.calibrate(model, _ids(), mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
    return store


def _qwen3(**overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kwargs = dict(
        vocab_size=models.VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        is_causal=False,
        mask_token_id=MASK,
    )
    kwargs.update(overrides)
    config = Qwen3Config(attn_implementation="sdpa", **kwargs)
    return models._build(lambda: Qwen3ForCausalLM(config), 0)


BUILDERS = {
    "llama": lambda: models.llama_bidirectional(num_hidden_layers=4),
    "qwen2": lambda: models.qwen2_gqa(num_hidden_layers=4),
    "qwen3": _qwen3,
    "qwen3-moe": lambda: moe_models.qwen3_moe(num_hidden_layers=4),
    "qwen3-moe-dense-layer": lambda: moe_models.qwen3_moe(num_hidden_layers=4, mlp_only_layers=[2]),
}


def _manual_llada_bi(model, store, sink_aware: bool) -> torch.Tensor:
    """BI from our own forward of the LLaDA-style model, block by block, with cos written out."""
    blocks = model.model.transformer.blocks
    weights = step_weights(store, SinkSettings()) if sink_aware else {}
    num = torch.zeros(len(blocks), dtype=torch.float64)
    den = 0.0
    with torch.no_grad():
        for step in range(store.num_steps):
            x = model.model.transformer.wte(store.input_ids(step))
            u = weights[step].double() if sink_aware else torch.ones(x.shape[:2], dtype=torch.float64)
            den += float(u.sum())
            for b, block in enumerate(blocks):
                y = block(x, None)
                a, c = x.double(), y.double()
                cos = (a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1))
                num[b] += float((u * cos).sum())
                x = y
    return 1 - num / den


@pytest.mark.parametrize("sink_aware", [False, True])
def test_bi_equals_independent_block_by_block_forward(sink_aware):
    model = models.tiny_llada(n_layers=4)
    store = _store(model)
    names = [f"model.transformer.blocks.{i}" for i in range(4)]
    got = block_influence(store, names, sink_aware=sink_aware)
    expected = _manual_llada_bi(model, store, sink_aware)
    torch.testing.assert_close(got.score, expected, rtol=0, atol=1e-5)
    assert got.per_step.shape == (store.num_steps, 4)
    # The overall score is the token-weighted mean of the per-step scores (every step has equal tokens
    # here without sink weights).
    if not sink_aware:
        torch.testing.assert_close(got.per_step.mean(0), got.score, rtol=0, atol=1e-9)


def _identity_logits(dense, block, ids):
    """Logits of the dense model with ``block`` skipped: a hook makes it return its own input."""

    def skip(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(skip, with_kwargs=True)
    try:
        with torch.no_grad():
            return dense(input_ids=ids).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_removal_saves_and_reloads_with_identical_logits(arch, tmp_path):
    model = BUILDERS[arch]()
    dense = copy.deepcopy(model)
    store = _store(model)
    result = prune.apply(model, store, 0.25, pattern="blocks")
    removed = [int(name.rsplit(".", 1)[1]) for name in result.plan.removed]
    assert len(removed) == 1 and removed[0] in (1, 2)  # never the first or the last
    assert removed[0] == min((1, 2), key=lambda i: (result.plan.scores[i], i))
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    ids = _ids(2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = _identity_logits(dense, dense.model.layers[removed[0]], ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    prune.save_pretrained(model, tmp_path / "pruned", result)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_hidden_layers == 3 and len(reloaded.model.layers) == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=1e-6)


def test_qwen3_moe_dense_layer_keeps_its_kind():
    model = BUILDERS["qwen3-moe-dense-layer"]()  # layer 2 has a plain MLP, the others experts
    store = _store(model)
    result = prune.apply(model, store, 0.25, pattern="blocks", keep_ends=False)
    (name,) = result.plan.removed
    kept = [i for i in range(4) if i != int(name.rsplit(".", 1)[1])]
    dense_at = [new for new, old in enumerate(kept) if old == 2]
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert [i for i, k in enumerate(kinds) if k == "Qwen3MoeMLP"] == dense_at
    assert model.config.mlp_only_layers == dense_at and model.config.decoder_sparse_step == 1


def test_llada_style_model_loses_a_block_and_n_layers_follows():
    model = models.tiny_llada(n_layers=4)
    dense = copy.deepcopy(model)
    store = _store(model)
    result = prune.apply(model, store, 0.25, pattern="blocks")
    (name,) = result.plan.removed
    removed = int(name.rsplit(".", 1)[1])
    assert model.config.n_layers == 3 and len(model.model.transformer.blocks) == 3
    assert [b.layer_id for b in model.model.transformer.blocks] == [0, 1, 2]
    ids = _ids(2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = _identity_logits(dense, dense.model.transformer.blocks[removed], ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    # The report lists each block's score overall and per recorded step.
    assert list(result.report["layer"]) == [f"model.transformer.blocks.{i}" for i in range(4)]
    assert sum(c.startswith("step ") for c in result.report.columns) == store.num_steps


def test_keep_ends_refuses_and_leaves_the_model_untouched():
    model = models.tiny_llada(n_layers=4)
    store = _store(model)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="keep_ends=False"):
        prune.apply(model, store, 0.75, pattern="blocks")  # 3 of 4, only 2 may go
    assert len(model.model.transformer.blocks) == 4 and model.config.n_layers == 4
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    result = prune.apply(model, store, 0.75, pattern="blocks", keep_ends=False)
    assert len(result.plan.removed) == 3 and len(model.model.transformer.blocks) == 1


def test_iterative_remeasures_after_each_removal_and_restores_between_rounds():
    model = models.tiny_llada(n_layers=4)
    dense = copy.deepcopy(model)
    store = _store(model)
    result = prune.apply(model, store, 0.5, pattern="blocks", iterative=True, keep_ends=False)
    assert len(result.plan.removed) == 2 and len(result.plan.rounds) == 2
    # Round 1 is the store's BI; round 2 re-measures the 3 remaining blocks on the recorded inputs.
    first = list(result.plan.rounds[0].values())
    torch.testing.assert_close(torch.tensor(first), torch.tensor(result.plan.scores), rtol=0, atol=1e-6)
    first_pick = min(result.plan.rounds[0], key=lambda n: (result.plan.rounds[0][n], n))
    assert len(result.plan.rounds[1]) == 3 and first_pick not in result.plan.rounds[1]
    assert first_pick in result.plan.removed
    kept = [i for i in range(4) if f"model.transformer.blocks.{i}" not in result.plan.removed]
    for new, old in enumerate(kept):  # the kept blocks are the dense ones, in order
        for a, b in zip(
            model.model.transformer.blocks[new].parameters(), dense.model.transformer.blocks[old].parameters()
        ):
            assert torch.equal(a, b)


def test_bi_clean_needs_a_clean_step_and_uses_only_it():
    model = models.tiny_llada(n_layers=4)
    store = _store(model)
    with pytest.raises(ValueError, match="mask ratio 0"):
        prune.apply(copy.deepcopy(model), store, 0.25, pattern="blocks", score="bi-clean")
    with attnprobe.record(model, mask_token_id=MASK) as clean:
        with torch.no_grad():
            model(input_ids=_ids())
    names = [f"model.transformer.blocks.{i}" for i in range(4)]
    got = block_influence(clean, names, score="bi-clean")
    assert got.steps == [0]
    torch.testing.assert_close(got.score, block_influence(clean, names).score, rtol=0, atol=0)


def test_block_wise_recording_keeps_the_same_block_cosines():
    model = models.tiny_llada(n_layers=4)
    ids = _ids()
    with attnprobe.record(model, mask_token_id=MASK) as whole:
        attnprobe.calibrate(model, ids, mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
    blockwise = prune.record_blockwise(
        model, ids, mask_token_id=MASK, steps=4, sample_interval=2, progress=False
    )
    names = [f"model.transformer.blocks.{i}" for i in range(4)]
    for sink_aware in (False, True):
        a = block_influence(whole, names, sink_aware=sink_aware)
        b = block_influence(blockwise, names, sink_aware=sink_aware)
        torch.testing.assert_close(b.per_step, a.per_step, rtol=0, atol=1e-5)
