"""The stand-in models of tests/models.py: they run, stay finite, and attend the way they claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests import models

BIDIRECTIONAL = [models.llama_bidirectional, models.qwen2_gqa, models.tiny_llada]
CAUSAL = [models.llama_causal, models.gpt2_causal]


def _ids(batch: int = 2, seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 60, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _padding(batch: int = 2, seq: int = 10) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 7:] = 0
    return mask


def _last_token_changed(ids: torch.Tensor) -> torch.Tensor:
    other = ids.clone()
    other[:, -1] = (ids[:, -1] + 1) % 60
    return other


@pytest.mark.parametrize("build", BIDIRECTIONAL + CAUSAL)
def test_forward_with_and_without_padding(build):
    model = build()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = _ids()
    plain = model(input_ids=ids).logits
    padded = model(input_ids=ids, attention_mask=_padding()).logits
    assert plain.shape == padded.shape == (2, 10, models.VOCAB_SIZE)
    assert torch.isfinite(plain).all() and torch.isfinite(padded).all()
    # an all-ones mask is the same as no mask
    ones = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(ones, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", BIDIRECTIONAL)
def test_bidirectional_models_see_the_future(build):
    model = build()
    ids = _ids()
    first = model(input_ids=ids).logits[:, 0]
    changed = model(input_ids=_last_token_changed(ids)).logits[:, 0]
    assert (first - changed).abs().max() > 1e-4


def test_qwen2_flag_matches_behaviour():
    model = models.qwen2_gqa()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = _ids()
    first = model(input_ids=ids).logits[:, 0]
    moved = (first - model(input_ids=_last_token_changed(ids)).logits[:, 0]).abs().max()
    assert bool(moved > 1e-4) == models.QWEN2_BIDIRECTIONAL


@pytest.mark.parametrize("build", BIDIRECTIONAL)
def test_padded_keys_are_invisible(build):
    model = build()
    ids, mask = _ids(), _padding()
    base = model(input_ids=ids, attention_mask=mask).logits
    other = ids.clone()
    other[1, 7:] = (ids[1, 7:] + 5) % 60  # change only padded tokens of row 1
    changed = model(input_ids=other, attention_mask=mask).logits
    torch.testing.assert_close(changed[1, :7], base[1, :7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", CAUSAL)
def test_causal_models_do_not_see_the_future(build):
    model = build()
    ids = _ids()
    base = model(input_ids=ids).logits
    changed = model(input_ids=_last_token_changed(ids)).logits
    torch.testing.assert_close(changed[:, :-1], base[:, :-1], rtol=1e-5, atol=1e-5)
    assert (changed[:, -1] - base[:, -1]).abs().max() > 1e-4


def test_constructors_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = models.tiny_llada(), models.tiny_llada()
    assert torch.equal(torch.rand(3), expected)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = models.tiny_llada(seed=1)
    assert not torch.equal(a.model.transformer.wte.weight, c.model.transformer.wte.weight)


def test_tiny_llada_structure_and_direct_forward():
    model = models.tiny_llada(n_kv_heads=2)
    cfg = model.config
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.n_layers, cfg.mask_token_id) == (4, 2, 32, 2, 63)
    tr = model.model.transformer
    assert {"wte", "blocks", "ln_f", "ff_out"} <= set(tr.keys())
    block = tr.blocks[0]
    assert type(block).__name__ == "LLaDALlamaBlock"
    for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
        assert isinstance(getattr(block, name), torch.nn.Linear)
    assert block.k_proj.out_features == 2 * block.head_dim
    # the outer forward calls self.model.forward directly: a forward hook on .model never fires
    fired = []
    handle = model.model.register_forward_hook(lambda *args: fired.append(1))
    try:
        out = model(input_ids=_ids())
    finally:
        handle.remove()
    assert fired == [] and torch.isfinite(out.logits).all()
    # attention is the block method, going through F.scaled_dot_product_attention non-causally
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        model(input_ids=_ids())
    finally:
        F.scaled_dot_product_attention = original
    assert calls == [False] * cfg.n_layers


def test_tiny_llada_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_kv_heads"):
        models.tiny_llada(n_kv_heads=3)


def test_diffusion_gemma_runs_with_padding_and_is_small():
    model = models.diffusion_gemma()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    inputs = models.diffusion_gemma_inputs(model, batch=2, seq=8)
    assert inputs["decoder_input_ids"].shape == (2, model.config.canvas_length)
    out = model(**inputs).logits
    assert out.shape == (2, model.config.canvas_length, models.VOCAB_SIZE) and torch.isfinite(out).all()
    mask = inputs["attention_mask"].clone()
    mask[1, :3] = 0  # left padding in the prompt
    padded = model(**{**inputs, "attention_mask": mask}).logits
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[0], out[0], rtol=1e-5, atol=1e-5)
    # the canvas is bidirectional: its first position sees a change at its last
    canvas = inputs["decoder_input_ids"].clone()
    canvas[:, -1] = (canvas[:, -1] + 1) % 60
    moved = model(**{**inputs, "decoder_input_ids": canvas}).logits
    assert (moved[:, 0] - out[:, 0]).abs().max() > 1e-4
    # deterministic inputs
    again = models.diffusion_gemma_inputs(model, batch=2, seq=8)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
