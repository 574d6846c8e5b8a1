"""prune.apply's store argument, its errors, the checkpoint fingerprint, atomic mask files, the
``unstable`` sink policy and sink-aware SparseGPT against a computation written out here."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import attnprobe
import prune
import prune.export.mask_files as prune_io
from attnprobe import fingerprint_problems
from prune.engine.statistics import SinkSettings, step_weights
from prune.methods.sparsegpt import sparsegpt_prune
from tests import models

MASK = models.MASK_TOKEN_ID


def _record(model, path, *, windows=4, batch_size=2, **options):
    ids = torch.randint(3, 60, (windows, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    with attnprobe.record(model, path, mask_token_id=MASK, **options) as store:
        attnprobe.calibrate(
            model, ids, mask_token_id=MASK, steps=4, sample_interval=2, batch_size=batch_size, progress=False
        )
    return store


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before):
    return all(torch.equal(before[n], p) for n, p in model.named_parameters())


def _sibling(model, scale=1e-2, seed=1):
    """The same architecture with slightly different weights: a fine-tuned checkpoint."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


# -- the store argument and its errors ------------------------------------------------------------------


def test_a_path_works_like_the_store(tmp_path):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s")
    by_store = prune.apply(copy.deepcopy(model), store, 0.5, progress=False)
    by_path = prune.apply(copy.deepcopy(model), tmp_path / "s", 0.5, progress=False)
    by_str = prune.apply(copy.deepcopy(model), str(tmp_path / "s"), 0.5, progress=False)
    for name, mask in by_store.masks.items():
        assert torch.equal(mask, by_path.masks[name]) and torch.equal(mask, by_str.masks[name])


@pytest.mark.parametrize("bad", [42, {"path": "runs/calib"}, torch.ones(3)])
def test_a_non_store_object_names_what_to_pass(bad):
    model = models.llama_bidirectional()
    before = _weights(model)
    with pytest.raises(TypeError, match=r"needs a calibration store, got .*attnprobe\.open\(path\)"):
        prune.apply(model, bad, 0.5, progress=False)
    assert _unchanged(model, before)


def test_a_string_that_is_no_store_says_how_to_record_one(tmp_path):
    model = models.llama_bidirectional()
    with pytest.raises(attnprobe.StoreError, match=r"no attnprobe store at .*attnprobe\.record\(model"):
        prune.apply(model, str(tmp_path / "missing"), 0.5, progress=False)


def test_a_store_without_the_statistics_a_method_needs(tmp_path):
    model = models.llama_bidirectional()
    before = _weights(model)
    attention_only = _record(model, tmp_path / "a", linear_stats=False)
    for kwargs in ({}, {"sink_aware": True}, {"pattern": "structured"}):
        with pytest.raises(ValueError, match=r"linear_stats=False.*attnprobe\.record\(model, path\)"):
            prune.apply(model, attention_only, 0.5, progress=False, **kwargs)
    default = _record(model, tmp_path / "d")  # statistics, no Hessians
    with pytest.raises(ValueError, match=r"Hessians.*hessians=True.*sequential=True"):
        prune.apply(model, default, 0.5, method="sparsegpt", progress=False)
    assert _unchanged(model, before)


# -- fingerprint ------------------------------------------------------------------------------------------


def test_another_checkpoint_is_refused_unless_allowed(tmp_path):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s")
    sibling = _sibling(model)
    before = _weights(sibling)
    with pytest.raises(ValueError, match=r"another checkpoint.*allow_other_weights=True"):
        prune.apply(sibling, store, 0.5, progress=False)
    assert _unchanged(sibling, before)
    result = prune.apply(sibling, store, 0.5, allow_other_weights=True, progress=False)
    assert result.report["sparsity"].between(0.49, 0.51).all()
    # another architecture stays refused even with the override
    wider = models.llama_bidirectional(intermediate_size=48)
    with pytest.raises(ValueError, match="another model.*shape"):
        prune.apply(wider, store, 0.5, allow_other_weights=True, progress=False)


def test_the_same_checkpoint_in_bfloat16_matches():
    model = models.llama_bidirectional()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    stored = attnprobe.model_fingerprint(model, linears)
    assert fingerprint_problems(stored, copy.deepcopy(model).to(torch.bfloat16)) == ([], [])
    problems, differ = fingerprint_problems(stored, _sibling(model, scale=1e-2))
    assert problems == [] and sorted(differ) == sorted(linears)


def test_load_masks_checks_the_whole_fingerprint(tmp_path):
    model = models.llama_bidirectional()
    dense = copy.deepcopy(model)
    result = prune.apply(model, _record(model, tmp_path / "s"), 0.5, progress=False)
    path = prune.save_masks(result.masks, tmp_path / "m.safetensors", settings=result.settings, model=model)
    sibling = _sibling(dense)
    before = _weights(sibling)
    with pytest.raises(ValueError, match=r"weights of \d+ linear\(s\) differ.*allow_other_weights=True"):
        prune.load_masks(sibling, path)
    assert _unchanged(sibling, before)
    prune.load_masks(sibling, path, allow_other_weights=True)
    prune.load_masks(dense, path)  # the dense model the masks were made from: accepted
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), dense.parameters()))


def test_save_masks_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    masks = {"a": torch.tensor([[True, False], [False, True]])}
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd)))
    prune.save_masks(masks, target)
    assert fsynced and prune_io.read_masks(target)[0]["a"].equal(masks["a"])
    original = target.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        prune.save_masks({"a": ~masks["a"]}, target)
    assert target.read_bytes() == original  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary left


# -- the unstable policy ----------------------------------------------------------------------------------


class _Store:
    """Hand-built per-layer mass: a stable sink at key 0, a sink moving between keys 5 and 6."""

    path = "hand-built"
    layers = ["layer"]
    num_steps = 3

    def __init__(self):
        self._mass = []
        for moving in (5, 6, 5):
            mass = torch.ones(1, 1, 16)  # (batch, heads, keys)
            mass[..., 0] = mass[..., moving] = 40.0
            self._mass.append(mass)
        # 16 keys, two at 40: mean 5.875, std 12.9, threshold (sink_std 2) 31.7: both are sinks

    def layer_mass(self, step, layer):
        return self._mass[step]

    def valid(self, step):
        return torch.ones(1, 16, dtype=torch.bool)

    def step_meta(self, step):
        return {"sequences": [0]}


def test_unstable_policy_down_weights_moving_sinks_and_keeps_stable_ones():
    store = _Store()
    # Scores are ~1 on a sink and ~0 elsewhere, so over the 3 steps the stable key varies by ~0 and the
    # moving keys 5 and 6 by 2/9.
    unstable = step_weights(store, SinkSettings(policy="unstable", unstable_threshold=0.05))
    for step, moving in enumerate((5, 6, 5)):
        w = unstable[step][0]
        assert w[0] == 1.0  # the stable sink is kept
        assert w[moving] < 1e-6  # the moving sink is down-weighted
        assert torch.allclose(w[[k for k in range(16) if k not in (0, moving)]], torch.ones(14))
    # other direction: a threshold above 2/9 calls the moving sink stable too; policy "all" drops both
    lenient = step_weights(store, SinkSettings(policy="unstable", unstable_threshold=0.25))
    assert all(torch.equal(w, torch.ones(1, 16)) for w in lenient.values())
    everything = step_weights(store, SinkSettings(policy="all"))
    assert everything[0][0, 0] < 1e-6 and everything[1][0, 6] < 1e-6


def test_unstable_policy_through_apply_in_both_limits(tmp_path):
    model = models.sharpen(models.llama_bidirectional(), 6.0)
    store = _record(model, tmp_path / "s")
    run = dict(method="wanda", sink_aware=True, sink_policy="unstable", progress=False)
    base = prune.apply(copy.deepcopy(model), store, 0.5, method="wanda", progress=False)
    aware = prune.apply(copy.deepcopy(model), store, 0.5, method="wanda", sink_aware=True, progress=False)
    none_unstable = prune.apply(copy.deepcopy(model), store, 0.5, unstable_threshold=1.0, **run)
    all_unstable = prune.apply(copy.deepcopy(model), store, 0.5, unstable_threshold=-1.0, **run)
    assert any(not torch.equal(base.masks[n], aware.masks[n]) for n in base.masks)  # sinks matter here
    for name in base.masks:
        assert torch.equal(none_unstable.masks[name], base.masks[name])
        # every position unstable: the "all" policy, recomputed from candidate rows (tokens below the
        # recorded floor count with w = 1, so this is close to the exact wsumsq, not equal)
        assert (all_unstable.masks[name] == aware.masks[name]).float().mean() > 0.97
    assert any(not torch.equal(all_unstable.masks[n], base.masks[n]) for n in base.masks)


# -- sink-aware SparseGPT against a computation written here ----------------------------------------------


def _eager_sink_weights(model, ids, sink_std=2.0, sink_alpha=5.0):
    """w = 1 − sigmoid(alpha (m − mean − std_k · std)) from eager attention probabilities (float64)."""
    eager = models.use_eager_attention(copy.deepcopy(model))
    probs = torch.stack(eager(input_ids=ids, output_attentions=True).attentions).double()
    mass = probs.sum(dim=(0, 2, 3))  # (batch, keys): over layers, heads, queries
    thr = mass.mean(-1, keepdim=True) + sink_std * mass.std(-1, unbiased=False, keepdim=True)
    return 1 - torch.sigmoid(sink_alpha * (mass - thr))


def _independent_sparsegpt(dense, store, *, sequential):
    """Sink-aware SparseGPT, H = 2/n Σ (w x)(w x)ᵀ over the n recorded sequences, block by block
    through the already-pruned blocks when ``sequential``."""
    model = copy.deepcopy(dense)
    steps = [store.input_ids(s) for s in range(store.num_steps)]
    weights = [_eager_sink_weights(dense, ids) for ids in steps]
    n = sum(ids.shape[0] for ids in steps)
    modules = dict(model.named_modules())
    layers = [f"model.layers.{i}." for i in range(dense.config.num_hidden_layers)]
    groups = [tuple(layers)] if not sequential else [(prefix,) for prefix in layers]
    masks = {}
    for prefixes in groups:
        names = [
            k for k, m in modules.items() if isinstance(m, torch.nn.Linear) and k.startswith(tuple(prefixes))
        ]
        grams = {name: 0 for name in names}
        for ids, w in zip(steps, weights):
            seen = {}
            handles = [
                modules[name].register_forward_pre_hook(
                    lambda m, a, k=name: seen.__setitem__(k, a[0].double())
                )
                for name in names
            ]
            model(input_ids=ids)
            for h in handles:
                h.remove()
            for name, x in seen.items():
                rows = (x * w[..., None]).reshape(-1, x.shape[-1])
                grams[name] = grams[name] + rows.T @ rows
        for name in names:  # the block's inputs are measured before any of its linears changes
            weight = modules[name].weight
            new, mask = sparsegpt_prune(weight, (2.0 / n * grams[name]).float(), 0.5, blocksize=16)
            with torch.no_grad():
                weight.copy_(new * mask)
            masks[name] = mask
    return masks, model


@pytest.mark.moving_device  # sequential=True: plainly and under the moving device (tests/conftest.py)
@pytest.mark.parametrize("sequential", [False, True])
def test_sink_aware_sparsegpt_matches_independent_computation(tmp_path, sequential):
    dense = models.sharpen(models.llama_bidirectional(), 4.0)
    store = _record(copy.deepcopy(dense), tmp_path / "s", hessians=True)
    # nsamples counts sequences (batch rows) over every step: 4 windows x 2 noise levels
    samples = sum(store.valid(s).shape[0] for s in range(store.num_steps))
    assert samples == 8 and store.valid(0).shape[0] == 2
    assert all(int(h["nsamples"]) == samples for h in store.hessians().values())
    model = copy.deepcopy(dense)
    result = prune.apply(
        model,
        store,
        0.5,
        method="sparsegpt",
        sink_aware=True,
        sequential=sequential,
        blocksize=16,
        progress=False,
    )
    masks, expected = _independent_sparsegpt(dense, store, sequential=sequential)
    assert set(result.masks) == set(masks)
    plain = prune.apply(copy.deepcopy(dense), store, 0.5, method="sparsegpt", blocksize=16, progress=False)
    assert any(not torch.equal(plain.masks[n], result.masks[n]) for n in masks)  # the sink weights matter
    for name, mask in masks.items():
        assert (result.masks[name] == mask).float().mean() > 0.99, name
    mine, theirs = dict(model.named_modules()), dict(expected.named_modules())
    for name in masks:
        # A near-tie that falls the other way (float32 vs float64 Gram matrices) changes the OBS updates
        # of the rest of its row: compare the rows whose masks agree entirely.
        rows = (result.masks[name] == masks[name]).all(dim=1)
        assert rows.float().mean() > 0.9, name
        torch.testing.assert_close(mine[name].weight[rows], theirs[name].weight[rows], atol=2e-3, rtol=0)
