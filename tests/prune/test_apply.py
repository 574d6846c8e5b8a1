"""prune.apply end to end: golden two-pass computations written here, transactions, errors, masks I/O."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import attnprobe
import prune
from prune.methods.masks import select_unstructured
from prune.methods.sparsegpt import sparsegpt_prune
from tests import models

MASK = models.MASK_TOKEN_ID


def _calibration_ids(n=3, length=16, seed=0):
    ids = torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


def _record(model, path, ids, **options):
    with attnprobe.record(model, path, mask_token_id=MASK, **options) as store:
        attnprobe.calibrate(model, ids, mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
    return store


def _direct_norms(model, store, sink_std, sink_alpha, accumulate):
    """Two passes per recorded step, as the public code: eager mass first, then the inputs."""
    eager = copy.deepcopy(model)
    models.use_eager_attention(eager)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for step in range(store.num_steps):
        ids = store.input_ids(step)
        probs = torch.stack(eager(input_ids=ids, output_attentions=True).attentions).double()
        mass = probs.sum(dim=(0, 2, 3))  # (batch, keys)
        thr = mass.mean(-1, keepdim=True) + sink_std * mass.std(-1, unbiased=False, keepdim=True)
        w = 1 - torch.sigmoid(sink_alpha * (mass - thr))
        inputs = {}
        handles = [
            m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach().double()))
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n
        ]
        model(input_ids=ids)
        for h in handles:
            h.remove()
        for name, x in inputs.items():
            per_sample = (x * w[..., None]).square().sum(1)  # (batch, in)
            term = per_sample.sum(0) if accumulate == "wanda" else per_sample.sqrt().sum(0)
            sums[name] = sums.get(name, 0) + term
        count += ids.shape[0]
    return {n: (s / count).sqrt() if accumulate == "wanda" else s for n, s in sums.items()}


@pytest.mark.parametrize("accumulate", ["wanda", "reference"])
def test_sink_aware_wanda_matches_direct_two_pass(tmp_path, accumulate):
    model = models.sharpen(models.llama_bidirectional(), 4.0)
    dense = copy.deepcopy(model)
    store = _record(model, tmp_path / "s", _calibration_ids(), linear_stats=True)
    result = prune.apply(
        model, store, 0.5, method="wanda", sink_aware=True, accumulate=accumulate, progress=False
    )
    norms = _direct_norms(dense, store, 2.0, 5.0, accumulate)
    modules = dict(dense.named_modules())
    assert set(result.masks) == set(norms)
    for name, mask in result.masks.items():
        expected = select_unstructured(modules[name].weight.abs().double() * norms[name], 0.5)
        agree = (mask == expected).float().mean()
        assert agree >= 0.995, f"{name}: masks agree on {agree:.4f}"  # float32 vs float64 ties only
        assert (mask.sum(1) == mask.shape[1] // 2).all()


def test_changed_sink_parameters_without_running_the_model(tmp_path):
    # Tokens below the candidate floor count with w = 1; their true weight is within
    # sigmoid(-alpha·(sink_std - floor)·std) of 1. The mass of this 8-head model has std ~0.2..1 (a
    # real 8B model: hundreds), so a steep alpha makes that bound negligible here too.
    model = models.sharpen(models.llama_bidirectional(), 6.0)
    dense = copy.deepcopy(model)
    store = _record(model, tmp_path / "s", _calibration_ids(), linear_stats=True)
    from prune.engine.statistics import SinkSettings, activation_norms

    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    norms = activation_norms(store, sink_aware=True, settings=SinkSettings(3.0, 50.0))
    hook.remove()
    assert not calls
    direct = _direct_norms(dense, store, 3.0, 50.0, "wanda")
    for name, norm in norms.items():
        rel = ((norm.double() - direct[name]).abs() / direct[name].clamp(min=1e-6)).max()
        assert rel < 1e-3, f"{name}: {rel:.2e}"
    with pytest.raises(ValueError, match="candidate"):
        activation_norms(store, sink_aware=True, settings=SinkSettings(0.5, 5.0))


def test_baseline_wanda_is_plain_wanda(tmp_path):
    model = models.llama_bidirectional()
    dense = copy.deepcopy(model)
    store = _record(model, tmp_path / "s", _calibration_ids(), linear_stats=True)
    result = prune.apply(model, store, 0.5, method="wanda", progress=False)
    norms = _direct_norms(dense, store, 2.0, 0.0, "wanda")  # alpha 0: s = 0.5 for all, w uniform
    modules = dict(dense.named_modules())
    for name, mask in result.masks.items():
        expected = select_unstructured(modules[name].weight.abs().double() * norms[name], 0.5)
        assert (mask == expected).float().mean() >= 0.995


def test_one_shot_sparsegpt_uses_stored_hessians(tmp_path):
    model = models.llama_bidirectional()
    dense = copy.deepcopy(model)
    store = _record(model, tmp_path / "s", _calibration_ids(), hessians=True)
    result = prune.apply(model, store, 0.5, method="sparsegpt", blocksize=16, progress=False)
    name = "model.layers.1.mlp.down_proj"
    inputs = []
    handle = dict(dense.named_modules())[name].register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    for step in range(store.num_steps):
        dense(input_ids=store.input_ids(step))
    handle.remove()
    x = torch.cat(inputs).double()
    hessian = (2 / store.num_steps * x.T @ x).float()
    weight, mask = sparsegpt_prune(dict(dense.named_modules())[name].weight, hessian, 0.5, blocksize=16)
    assert (mask == result.masks[name]).float().mean() > 0.99
    assert torch.allclose(dict(model.named_modules())[name].weight, weight, atol=1e-4)


def test_n_m_pattern_valid_and_embeddings_untouched(tmp_path):
    model = models.llama_bidirectional()
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    store = _record(model, tmp_path / "s", _calibration_ids(), linear_stats=True)
    result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True, pattern="2:4", progress=False)
    for name, mask in result.masks.items():
        assert ((~mask).view(mask.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    assert result.report["sparsity"].between(0.4999, 0.5001).all()


@pytest.mark.moving_device  # plainly and under the moving device (tests/conftest.py)
def test_sequential_first_block_equals_one_shot(tmp_path):
    model = models.tiny_llada()
    store = _record(model, tmp_path / "s", _calibration_ids(), linear_stats=True)
    one_shot = prune.apply(copy.deepcopy(model), store, 0.5, method="wanda", progress=False)
    sequential = prune.apply(
        copy.deepcopy(model), store, 0.5, method="wanda", sequential=True, progress=False
    )
    first = [n for n in one_shot.masks if n.startswith("model.transformer.blocks.0.")]
    later = [n for n in one_shot.masks if n.startswith("model.transformer.blocks.1.")]
    assert first and later
    for name in first:
        assert (one_shot.masks[name] == sequential.masks[name]).float().mean() > 0.99
    assert any(not torch.equal(one_shot.masks[n], sequential.masks[n]) for n in later)
    seq_gpt = prune.apply(
        copy.deepcopy(model), store, 0.5, method="sparsegpt", sequential=True, blocksize=16, progress=False
    )
    assert set(seq_gpt.masks) == set(one_shot.masks)


def test_unstable_policy_keeps_stable_sinks(tmp_path):
    model = models.sharpen(models.llama_bidirectional(), 6.0)
    store = _record(model, tmp_path / "s", _calibration_ids(), linear_stats=True)
    base = prune.apply(copy.deepcopy(model), store, 0.5, method="wanda", progress=False)
    everything_stable = prune.apply(
        copy.deepcopy(model),
        store,
        0.5,
        method="wanda",
        sink_aware=True,
        sink_policy="unstable",
        unstable_threshold=1.0,
        progress=False,
    )
    for name in base.masks:  # threshold 1.0: no variance exceeds it, so nothing is down-weighted
        assert torch.equal(base.masks[name], everything_stable.masks[name])


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.6, "pattern": "2:4"}, "2:4|N/M|0.5"),
        ({"sparsity": 0.5, "method": "obs"}, "method"),
        ({"sparsity": 0.5, "pattern": "blocky"}, "pattern|unstructured"),
        ({"sparsity": 0.5, "method": "sparsegpt"}, "hessians=True"),
        ({"sparsity": 0.5, "sink_aware": True, "sink_std": 0.2}, "candidate"),
    ],
)
def test_bad_input_is_refused_and_model_untouched(tmp_path, kwargs, match):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s", _calibration_ids(2), linear_stats=True)
    before = _weights(model)
    with pytest.raises(ValueError, match=match):
        prune.apply(model, store, progress=False, **kwargs)
    after = _weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_store_from_another_model_is_refused(tmp_path):
    store = _record(models.llama_bidirectional(), tmp_path / "s", _calibration_ids(2), linear_stats=True)
    other = models.qwen2_gqa()
    with pytest.raises(ValueError, match="another model"):
        prune.apply(other, store, 0.5, progress=False)


def test_nan_statistics_refused_before_any_change(tmp_path, monkeypatch):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s", _calibration_ids(2), linear_stats=True)
    apply_module = importlib.import_module("prune.engine.apply")  # the module, not the function

    real = apply_module.activation_norms

    def poisoned(*args, **kwargs):
        norms = real(*args, **kwargs)
        last = sorted(norms)[-1]
        norms[last] = norms[last].clone().fill_(float("nan"))
        return norms

    monkeypatch.setattr(apply_module, "activation_norms", poisoned)
    before = _weights(model)
    with pytest.raises(ValueError, match="NaN"):
        prune.apply(model, store, 0.5, progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_masks_round_trip_reproduce_weights(tmp_path):
    model = models.llama_bidirectional()
    fresh, dense = copy.deepcopy(model), copy.deepcopy(model)
    store = _record(model, tmp_path / "s", _calibration_ids(2), hessians=True)
    result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True, progress=False)
    path = prune.save_masks(result.masks, tmp_path / "m.safetensors", settings=result.settings, model=model)
    header = prune.load_masks(fresh, path)
    assert header["settings"]["method"] == "wanda" and header["settings"]["sink_aware"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    # SparseGPT also changes kept weights: saved alongside, they reproduce the model exactly
    gpt, gpt_fresh = copy.deepcopy(dense), copy.deepcopy(dense)  # `fresh` is pruned now
    result = prune.apply(gpt, store, 0.5, method="sparsegpt", blocksize=16, progress=False)
    path = prune.save_masks(result.masks, tmp_path / "g.safetensors", model=gpt, weights=result.weights)
    prune.load_masks(gpt_fresh, path)
    assert all(torch.equal(p, q) for p, q in zip(gpt.parameters(), gpt_fresh.parameters()))


def test_load_masks_names_every_mismatch(tmp_path):
    model = models.llama_bidirectional()
    result = prune.apply(model, None, 0.5, method="magnitude", progress=False)
    path = prune.save_masks(result.masks, tmp_path / "m.safetensors", model=model)
    other = models.llama_bidirectional(intermediate_size=48)
    before = _weights(other)
    with pytest.raises(ValueError, match="gate_proj.*up_proj|mask"):
        prune.load_masks(other, path)
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())
