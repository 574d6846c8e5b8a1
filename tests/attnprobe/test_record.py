"""record(): capture on many architectures, golden mass from eager attention, steps, cleanup."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnprobe
from tests import models


def _eager_mass(model, ids, attention_mask=None):
    """Mass from transformers' own eager attention probabilities (an independent computation)."""
    eager = copy.deepcopy(model)
    models.use_eager_attention(eager)
    out = eager(input_ids=ids, attention_mask=attention_mask, output_attentions=True)
    probs = torch.stack(out.attentions).double()  # (layers, batch, heads, queries, keys)
    if attention_mask is not None:
        valid = attention_mask.bool()
        probs = probs * valid[None, :, None, :, None] * valid[None, :, None, None, :]
    return probs.sum(dim=3)


def _assert_close(actual, expected):
    rel = (actual.double() - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-5, f"relative error {rel:.2e}"


@pytest.mark.parametrize("build", [models.llama_bidirectional, models.qwen2_gqa, models.llama_causal])
def test_mass_matches_eager_attention(build, tmp_path):
    model = build()
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with attnprobe.record(model, tmp_path / "s") as store:
        model(input_ids=ids)
    assert store.num_steps == 1
    assert store.layers == [f"model.layers.{i}.self_attn" for i in range(2)]
    _assert_close(store.attention_mass(0), _eager_mass(model, ids))


@pytest.mark.parametrize("build", [models.llama_bidirectional, models.qwen2_gqa])
def test_padding_excluded_as_queries_and_keys(build, tmp_path):
    model = build()
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[0, :2] = 0  # left padding
    with attnprobe.record(model, tmp_path / "s") as store:
        model(input_ids=ids, attention_mask=mask)
    mass = store.attention_mass(0)
    assert torch.equal(store.valid(0), mask.bool())
    assert (mass[:, 1, :, 7:] == 0).all() and (mass[:, 0, :, :2] == 0).all()
    _assert_close(mass, _eager_mass(model, ids, mask))
    # each valid query spreads exactly one unit of mass over the keys of each head
    totals = mass.sum(-1)
    assert torch.allclose(totals[:, 0], torch.full_like(totals[:, 0], 8.0))
    assert torch.allclose(totals[:, 1], torch.full_like(totals[:, 1], 7.0))


def test_gpt2_causal_reference(tmp_path):
    model = models.gpt2_causal()
    ids = torch.randint(0, 60, (1, 9), generator=torch.Generator().manual_seed(2))
    with attnprobe.record(model, tmp_path / "s") as store:
        model(input_ids=ids)
    mass = store.attention_mass(0)
    _assert_close(mass, _eager_mass(model, ids))
    # causal: key 0 is seen by every query; the last key only by itself
    assert mass[..., -1].max() <= 1.0 + 1e-6


def test_tiny_llada_block_method_and_direct_forward(tmp_path):
    model = models.tiny_llada()
    ids = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with attnprobe.record(model, tmp_path / "s") as store:
        model(input_ids=ids, attention_mask=mask)
    assert all(name.startswith("model.transformer.blocks.") for name in store.layers)
    assert len(store.layers) == model.config.n_layers
    mass = store.attention_mass(0)
    assert (mass[:, 1, :, 5:] == 0).all()
    assert torch.allclose(mass.sum(-1)[:, 1], torch.full_like(mass.sum(-1)[:, 1], 5.0), atol=1e-5)


def test_tiny_llada_mass_matches_explicit_softmax(tmp_path):
    """Golden: recompute q, k inside the block with our own hooks, then an explicit float64 softmax."""
    model = models.tiny_llada()
    ids = torch.randint(0, 60, (1, 7), generator=torch.Generator().manual_seed(4))
    seen = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.append((q.detach().double(), k.detach().double()))
        return original(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )

    F.scaled_dot_product_attention = spy
    try:
        model(input_ids=ids)
    finally:
        F.scaled_dot_product_attention = original
    expected = []
    for q, k in seen:
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        expected.append(probs.sum(dim=2))
    with attnprobe.record(model, tmp_path / "s") as store:
        model(input_ids=ids)
    _assert_close(store.attention_mass(0), torch.stack(expected))


@pytest.mark.skipif(not models.TRANSFORMERS_5, reason="DiffusionGemma is in transformers 5.x only")
def test_diffusion_gemma_encoder_and_decoder(tmp_path):
    model = models.diffusion_gemma()
    inputs = models.diffusion_gemma_inputs(model, batch=1, seq=8)
    with attnprobe.record(model, tmp_path / "s") as store:
        model(**inputs)
    names = store.layers
    assert any("encoder" in n for n in names) and any("decoder" in n for n in names)
    for i in range(len(names)):
        assert torch.isfinite(store.layer_mass(0, i)).all()


def test_logits_bit_identical_and_nothing_left_behind(tmp_path):
    model = models.llama_bidirectional()
    ids = torch.randint(0, 60, (2, 12))
    before = model(input_ids=ids).logits
    with attnprobe.record(model, tmp_path / "s", linear_stats=True) as store:
        during = model(input_ids=ids).logits
    after = model(input_ids=ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    model(input_ids=ids)
    assert store.num_steps == 1  # nothing records after the block


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_cleanup_after_exception(tmp_path, error):
    model = models.llama_bidirectional()
    ids = torch.randint(0, 60, (1, 6))
    with pytest.raises(error):
        with attnprobe.record(model, tmp_path / "s") as store:
            model(input_ids=ids)
            raise error("stop")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    reopened = attnprobe.open(tmp_path / "s")  # the completed step survives
    assert reopened.num_steps == 1 and store.num_steps == 1


def test_crash_inside_forward_keeps_completed_steps(tmp_path):
    model = models.llama_bidirectional()
    ids = torch.randint(0, 60, (1, 6))

    def boom(module, args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with attnprobe.record(model, tmp_path / "s"):
            model(input_ids=ids)
            model(input_ids=ids)
            model.model.layers[1].register_forward_pre_hook(boom)
            model(input_ids=ids)
    assert attnprobe.open(tmp_path / "s").num_steps == 2


def test_two_models_at_once_do_not_interfere(tmp_path):
    a, b = models.llama_bidirectional(), models.tiny_llada()
    ids = torch.randint(0, 60, (1, 6))
    with attnprobe.record(a, tmp_path / "a") as sa, attnprobe.record(b, tmp_path / "b") as sb:
        a(input_ids=ids)
        b(input_ids=ids)
        b(input_ids=ids)
    assert sa.num_steps == 1 and sb.num_steps == 2
    assert sa.layers[0].startswith("model.layers") and sb.layers[0].startswith("model.transformer")


def test_explicit_steps_group_forwards_and_carry_metadata(tmp_path):
    model = models.llama_bidirectional()
    ids = torch.randint(0, 60, (2, 6))
    ids[:, :3] = 63
    with attnprobe.record(model, tmp_path / "s", mask_token_id=63) as rec:
        with rec.step(t=0.5, guidance="cfg"):
            model(input_ids=ids)
            model(input_ids=ids)
        model(input_ids=ids)
    assert rec.num_steps == 2
    meta = rec.step_meta(0)
    assert meta["t"] == 0.5 and meta["guidance"] == "cfg" and meta["num_forwards"] == 2
    assert meta["mask_ratio"] == pytest.approx(0.5)
    assert rec.attention_mass(0).shape[1] == 4 and rec.attention_mass(1).shape[1] == 2
    assert torch.equal(rec.input_ids(1), ids)


def test_eager_attention_is_refused_with_a_fix():
    model = models.llama_bidirectional()
    models.use_eager_attention(model)
    with attnprobe.record(model) as rec, pytest.raises(RuntimeError, match="sdpa"):
        model(input_ids=torch.randint(0, 60, (1, 5)))
    assert rec.num_steps == 0


def test_no_attention_found_lists_candidates():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="targets="):
        attnprobe.record(model)


def test_targets_override(tmp_path):
    model = models.llama_bidirectional()
    with attnprobe.record(model, tmp_path / "s", targets=r"model\.layers\.1\.self_attn") as store:
        with pytest.warns(UserWarning, match="outside the attention modules"):
            model(input_ids=torch.randint(0, 60, (1, 5)))
    assert store.layers == ["model.layers.1.self_attn"]


def test_temporary_store_lives_with_the_object():
    model = models.llama_bidirectional()
    with attnprobe.record(model) as rec:
        model(input_ids=torch.randint(0, 60, (1, 5)))
    path = rec.path
    assert path.exists() and attnprobe.open(path).num_steps == 1


def test_existing_store_refused_unless_asked(tmp_path):
    model = models.llama_bidirectional()
    ids = torch.randint(0, 60, (1, 5))
    with attnprobe.record(model, tmp_path / "s"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="overwrite"):
        attnprobe.record(model, tmp_path / "s").__enter__()
    with attnprobe.record(model, tmp_path / "s", append=True):
        model(input_ids=ids)
    assert attnprobe.open(tmp_path / "s").num_steps == 2
    with attnprobe.record(model, tmp_path / "s", overwrite=True):
        model(input_ids=ids)
    assert attnprobe.open(tmp_path / "s").num_steps == 1
