"""Devices and dtypes of block-wise pruning: onloading, accelerate-dispatched models, bf16/fp16, and
tensors of one step living on different devices (the meta device stands in for a second one here)."""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
import prune
from attnprobe.analysis import sinks
from attnprobe.denoising.sampler import _candidates
from attnprobe.recording.linear_stats import reduce_inputs
from prune.engine import blockwise
from tests import models
from tests.assertions import assert_masks_agree
from tests.prune.test_blockwise import _record, assert_like_reference, reference_sequential

# every test here runs plainly and under the moving device (tests/conftest.py)
pytestmark = pytest.mark.moving_device

META = torch.device("meta")


# -- tensors of one step on several devices -------------------------------------------------------


def test_sampler_generator_on_another_device_than_the_logits():
    logits = torch.zeros(2, 5, 7, device=META)
    out = _candidates(logits, 1.0, torch.Generator().manual_seed(0))  # CPU generator, "device" logits
    assert out.device == META and out.shape == (2, 5)


def test_step_mass_sums_layers_on_different_devices():
    total = sinks.step_mass([torch.ones(1, 2, 3, device=META), torch.ones(1, 2, 3)], 3)
    assert total.device == META and total.shape == (1, 3)


def test_reduce_inputs_moves_the_step_tensors_to_the_layer():
    x = torch.ones(2, 3, 4, device=META)
    out = reduce_inputs(
        x,
        torch.ones(2, 3, dtype=torch.bool),
        torch.ones(2, 3),
        torch.zeros(0, 2, dtype=torch.long),
        hessians=True,
    )
    assert {t.device for t in out.values()} == {META}


# -- onloading --------------------------------------------------------------------------------------


def test_onloading_visits_one_block_at_a_time_with_identical_masks(tmp_path, monkeypatch):
    model = models.sharpen(models.llama_bidirectional(num_hidden_layers=3), 5.0)
    store = _record(model, tmp_path / "s", linear_stats=False)  # attention and input ids only
    plain = prune.apply(copy.deepcopy(model), store, 0.5, sink_aware=True, sequential=True, progress=False)
    events = []
    real = blockwise.onloaded

    def spy(modules, device, *, exclude=()):
        name = getattr(modules, "_spy_name", "model")
        events.append(("enter", name, len(list(exclude))))
        with real(modules, device, exclude=exclude):
            yield
        events.append(("exit", name, 0))

    monkeypatch.setattr(blockwise, "onloaded", __import__("contextlib").contextmanager(spy))
    onload = copy.deepcopy(model)
    for i, layer in enumerate(onload.model.layers):
        layer._spy_name = f"block{i}"
    result = prune.apply(onload, store, 0.5, sink_aware=True, sequential=True, device="cpu", progress=False)
    assert events == [
        ("enter", "model", 3),
        ("exit", "model", 0),  # the capture: everything but the blocks
        ("enter", "block0", 0),
        ("exit", "block0", 0),
        ("enter", "block1", 0),
        ("exit", "block1", 0),
        ("enter", "block2", 0),
        ("exit", "block2", 0),
    ]
    for name, mask in plain.masks.items():
        assert torch.equal(result.masks[name], mask)


def test_capture_onloads_no_block_even_when_later_blocks_are_not_pruned(tmp_path, monkeypatch):
    model = models.llama_bidirectional(num_hidden_layers=3)
    store = _record(model, tmp_path / "s")
    excluded = []
    real = blockwise.onloaded

    def spy(modules, device, *, exclude=()):
        excluded.append(len(list(exclude)))
        return real(modules, device, exclude=exclude)

    monkeypatch.setattr(blockwise, "onloaded", spy)
    result = prune.apply(
        model, store, 0.5, sequential=True, targets=r".*layers\.0\..*", device="cpu", progress=False
    )
    assert excluded[0] == 3  # all three blocks stay where they are during the capture
    assert excluded[1:] == [0]  # then only block 0 runs: nothing after the last pruned block
    assert all(name.startswith("model.layers.0.") for name in result.masks)


def test_device_needs_sequential(tmp_path):
    model = models.tiny_llada()
    store = _record(model, tmp_path / "s")
    with pytest.raises(ValueError, match="sequential=True"):
        prune.apply(model, store, 0.5, device="cpu", progress=False)


def test_blocks_that_are_not_one_chain_are_refused():
    model = models.diffusion_gemma() if models.TRANSFORMERS_5 else None
    if model is None:
        pytest.skip("DiffusionGemma needs transformers 5")
    with pytest.raises(ValueError, match="sequential=False"):
        blockwise.find_blocks(model, [])


# -- accelerate ---------------------------------------------------------------------------------------


def test_accelerate_dispatched_model_records_and_prunes(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = models.sharpen(models.llama_bidirectional(num_hidden_layers=3), 5.0)
    reference = copy.deepcopy(model)
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    device_map = {name: "cpu" for name in names + [f"model.layers.{i}" for i in range(3)]}
    dispatched = accelerate.dispatch_model(copy.deepcopy(model), device_map=device_map, force_hooks=True)
    assert hasattr(dispatched.model.layers[0], "_hf_hook")
    store = _record(dispatched, tmp_path / "s", hessians=True)
    out = {}
    expected = reference_sequential(reference, store, "sparsegpt", True, out=out)
    result = prune.apply(
        dispatched,
        store,
        0.5,
        method="sparsegpt",
        sink_aware=True,
        sequential=True,
        blocksize=16,
        progress=False,
    )
    assert_like_reference(reference, dispatched, result, expected, out)
    one_shot = prune.apply(copy.deepcopy(reference), store, 0.5, method="wanda", progress=False)
    assert set(one_shot.masks) == set(expected)
    with pytest.raises(ValueError, match="accelerate hooks"):
        prune.apply(  # (already pruned above: its weights differ from the recorded sample)
            dispatched, store, 0.5, sequential=True, device="cpu", allow_other_weights=True, progress=False
        )


def test_accelerate_offloaded_weights_are_refused_with_a_pointer_to_onloading(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s")
    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    assert offloaded.model.layers[0].self_attn.q_proj.weight.is_meta
    for sequential in (False, True):
        with pytest.raises(ValueError, match=r"meta device.*device='cuda:0'"):
            prune.apply(offloaded, store, 0.5, sequential=sequential, progress=False)


# -- low precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16_sequential_masks_equal_the_quadratic_procedure(tmp_path, method):
    model = models.sharpen(models.tiny_llada(n_layers=3), 5.0).to(torch.bfloat16)
    store = _record(model, tmp_path / "s")
    expected = reference_sequential(model, store, method, True)
    pruned = copy.deepcopy(model)
    result = prune.apply(
        pruned, store, 0.5, method=method, sink_aware=True, sequential=True, blocksize=16, progress=False
    )
    for name, mask in expected.items():
        if method == "wanda" or ".blocks.0." in name:  # float32 vs float64 sums: near-ties aside
            assert_masks_agree(result.masks[name], mask, name)
        else:
            # SparseGPT rewrites the kept weights: a last-bit difference of the Hessian (float32 here,
            # float64 in the reference) moves some reconstructed bf16 weights by one ulp, and later
            # blocks (96 calibration rows for up to 64 columns: ill-conditioned) amplify it. With
            # float64 accumulators the engine's masks equal the reference's exactly (checked by hand).
            agree = float((result.masks[name] == mask).float().mean())
            assert agree > 0.9, f"{name}: {agree:.4f}"
    q = pruned.model.transformer.blocks[2].q_proj.weight
    assert q.dtype == torch.bfloat16 and float((q == 0).float().mean()) == 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_end_to_end(tmp_path, dtype):
    model = models.sharpen(models.tiny_llada(n_layers=2), 5.0).to(dtype)
    store = _record(model, tmp_path / "s", hessians=True)
    prompt = torch.randint(3, 60, (1, 4), generator=torch.Generator().manual_seed(1))
    out = attnprobe.generate(
        model,
        prompt,
        mask_token_id=models.MASK_TOKEN_ID,
        steps=4,
        gen_length=8,
        block_length=8,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (1, 12)
    held_out = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(2))
    for method in ("magnitude", "wanda", "sparsegpt"):
        for sequential in (False, True):
            pruned = copy.deepcopy(model)
            result = prune.apply(
                pruned,
                store,
                0.5,
                method=method,
                sink_aware=method != "magnitude",
                sequential=sequential,
                blocksize=16,
                progress=False,
            )
            assert pruned.model.transformer.blocks[1].ff_out.weight.dtype == dtype
            assert result.report["sparsity"].between(0.49, 0.51).all()
            nll = prune.evaluate(pruned, held_out, num_samples=2, progress=False)
            assert torch.isfinite(torch.tensor(float(nll.nll)))


def test_streamed_forwards_onload_each_block_when_called_and_record_the_same(tmp_path, monkeypatch):
    from prune.engine import onload

    model = models.sharpen(models.tiny_llada(n_layers=2), 5.0)
    plain = _record(copy.deepcopy(model), tmp_path / "plain", linear_stats=False)
    events = []
    real = onload.onloaded

    def spy(modules, device, *, exclude=(), write_back=True):
        events.append((getattr(modules, "layer_id", "rest"), write_back))
        return real(modules, device, exclude=exclude, write_back=write_back)

    monkeypatch.setattr(onload, "onloaded", spy)
    blocks = list(model.model.transformer.blocks)
    with onload.streamed(model, blocks, "cpu"):
        streamed = _record(model, tmp_path / "streamed", linear_stats=False)
    steps = streamed.num_steps
    assert events == [("rest", False)] + [(0, False), (1, False)] * steps  # weights are only read
    assert all(not block._forward_pre_hooks and not block._forward_hooks for block in blocks)
    for step in range(steps):
        assert torch.equal(streamed.attention_mass(step), plain.attention_mass(step))
