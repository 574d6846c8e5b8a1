"""Block-wise sequential pruning: the masks of the published sequential procedure, in O(blocks).

The reference here is the quadratic procedure written out explicitly: for block b, the whole (partially
pruned) model runs on every recorded step and is stopped after block b; the inputs of b's linears are
collected, their statistics computed in float64 from the formulas, and b is pruned before b + 1 is
measured. prune.apply(sequential=True) must produce the same masks, but for near-ties (the reference
sums in float64): tests/assertions.py.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import attnprobe
import prune
from prune.methods.masks import select_mask
from prune.methods.sparsegpt import sparsegpt_prune
from tests import models
from tests.assertions import assert_pruned_like

# every test here runs plainly and under the moving device (tests/conftest.py)
pytestmark = pytest.mark.moving_device

MASK = models.MASK_TOKEN_ID


class _Stop(Exception):
    pass


def _record(model, path, n=3, length=16, attention_mask=None, **options):
    ids = torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    with attnprobe.record(model, path, mask_token_id=MASK, **options) as store:
        attnprobe.calibrate(
            model,
            ids,
            mask_token_id=MASK,
            steps=4,
            sample_interval=2,
            attention_mask=attention_mask,
            progress=False,
        )
    return store


def _sink_weights(store, step, sink_aware):
    """w = 1 − sigmoid(α (mass − mean − k·std)) on valid tokens, 0 on padding; mass summed over
    layers and heads, mean and population std over valid tokens (float64)."""
    valid = store.valid(step).double()
    if not sink_aware:
        return valid
    mass = sum(store.layer_mass(step, layer).double().sum(1) for layer in range(len(store.layers)))
    count = valid.sum(-1, keepdim=True)
    mean = (mass * valid).sum(-1, keepdim=True) / count
    std = (((mass - mean) ** 2 * valid).sum(-1, keepdim=True) / count).sqrt()
    return (1 - torch.sigmoid(5.0 * (mass - (mean + 2.0 * std)))) * valid


def _blocks(model):
    names = list(dict(model.named_modules()))
    return sorted(set(attnprobe.discover(model).blocks.values()), key=names.index)


def reference_sequential(
    model, store, method, sink_aware, pattern="unstructured", sparsity=0.5, accumulate="wanda", out=None
):
    """The quadratic sequential procedure, explicitly (block b's inputs from a full forward).

    Returns the masks; ``out`` (a dict), if given, receives ``"weights"`` (the pruned weights) and
    ``"hessians"`` (Σ (w x)(w x)ᵀ of each linear's input, float64)."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    masks = {}
    for block in _blocks(model):
        linears = {
            n: m for n, m in modules.items() if n.startswith(block + ".") and isinstance(m, torch.nn.Linear)
        }
        sumsq = {n: [] for n in linears}
        hessian = {n: 0 for n in linears}
        count = 0
        for step in range(store.num_steps):
            w = _sink_weights(store, step, sink_aware)
            seen = {}
            handles = [
                m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].detach().double()))
                for n, m in linears.items()
            ]
            handles.append(modules[block].register_forward_hook(lambda *a: (_ for _ in ()).throw(_Stop())))
            try:
                valid = store.valid(step)
                padding = {} if bool(valid.all()) else {"attention_mask": valid.long()}
                model(input_ids=store.input_ids(step), **padding)
            except _Stop:
                pass
            for h in handles:
                h.remove()
            for n, x in seen.items():
                xw = x * w[..., None]  # (batch, tokens, in)
                sumsq[n].append(xw.square().sum(1))
                flat = xw.reshape(-1, xw.shape[-1])
                hessian[n] = hessian[n] + flat.T @ flat
            count += w.shape[0]
        with torch.no_grad():
            for n, module in linears.items():
                weight = module.weight
                if method == "sparsegpt":
                    h = (2.0 / count) * hessian[n]
                    n_m = (0, 0) if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
                    new, mask = sparsegpt_prune(
                        weight, h.float(), sparsity, prune_n=n_m[0], prune_m=n_m[1], blocksize=16
                    )
                    weight.copy_(new)
                else:
                    per_sequence = torch.cat(sumsq[n])  # (sequences, in)
                    if accumulate == "wanda":
                        norm = per_sequence.mean(0).sqrt()
                    else:  # the public Sink-Aware code: a sum of per-sequence L2 norms
                        norm = per_sequence.sqrt().sum(0)
                    mask = select_mask(weight.abs().double() * norm, pattern, sparsity)
                weight.mul_(mask)
                masks[n] = mask
                if out is not None:
                    out.setdefault("weights", {})[n] = weight.detach().clone()
                    out.setdefault("hessians", {})[n] = hessian[n]
    return masks


def assert_like_reference(model, pruned, result, expected, out):
    """Masks agree but for near-ties and each layer's error is within 1% of the reference's: the
    reference sums in float64, the engine in float32, so near-tied scores may fall either way on a
    given CPU (tests/assertions.py)."""
    dense = {n: m.weight.detach() for n, m in model.named_modules() if n in expected}
    mine = {n: m.weight.detach() for n, m in pruned.named_modules() if n in expected}
    assert_pruned_like(dense, (result.masks, mine), (expected, out["weights"]), out["hessians"])


CASES = [
    ("llama", lambda: models.llama_bidirectional(num_hidden_layers=3)),
    ("llada", lambda: models.tiny_llada(n_layers=3)),
    ("qwen2", lambda: models.qwen2_gqa(num_hidden_layers=3)),
]


@pytest.mark.parametrize("arch, build", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(
    "method, sink_aware, pattern",
    [("wanda", True, "unstructured"), ("wanda", False, "2:4"), ("sparsegpt", True, "unstructured")],
)
def test_sequential_masks_equal_the_quadratic_procedure(tmp_path, arch, build, method, sink_aware, pattern):
    model = models.sharpen(build(), 5.0)
    store = _record(model, tmp_path / "s", linear_stats=True)
    out = {}
    expected = reference_sequential(model, store, method, sink_aware, pattern, out=out)
    pruned = copy.deepcopy(model)
    result = prune.apply(
        pruned,
        store,
        0.5,
        method=method,
        sink_aware=sink_aware,
        pattern=pattern,
        sequential=True,
        blocksize=16,
        progress=False,
    )
    assert set(result.masks) == set(expected)
    assert_like_reference(model, pruned, result, expected, out)
    if sink_aware:  # the reference's weights matter: sinks were down-weighted somewhere
        assert any((_sink_weights(store, s, True) < 0.5).any() for s in range(store.num_steps))


def test_a_failure_in_a_later_block_restores_every_block(tmp_path, monkeypatch):
    apply_mod = importlib.import_module("prune.engine.planning")  # where one linear is planned
    model = models.tiny_llada(n_layers=3)
    store = _record(model, tmp_path / "s")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    real = apply_mod.plan_linear

    def failing(name, *args, **kwargs):
        if ".blocks.2." in name:
            raise RuntimeError("planted failure")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(apply_mod, "plan_linear", failing)
    with pytest.raises(RuntimeError, match="planted"):
        prune.apply(model, store, 0.5, method="sparsegpt", sequential=True, blocksize=16, progress=False)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_store_without_input_ids_is_refused(tmp_path):
    model = models.tiny_llada()
    store = _record(model, tmp_path / "s", save_input_ids=False)
    with pytest.raises(ValueError, match="save_input_ids=True"):
        prune.apply(model, store, 0.5, sequential=True, progress=False)


def test_reference_accumulation_equals_the_quadratic_procedure(tmp_path):
    model = models.sharpen(models.tiny_llada(n_layers=3), 5.0)
    store = _record(model, tmp_path / "s")
    out = {}
    expected = reference_sequential(model, store, "wanda", True, accumulate="reference", out=out)
    pruned = copy.deepcopy(model)
    result = prune.apply(
        pruned,
        store,
        0.5,
        sink_aware=True,
        accumulate="reference",
        sequential=True,
        progress=False,
    )
    assert_like_reference(model, pruned, result, expected, out)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padding_is_left_out_as_in_the_quadratic_procedure(tmp_path, method):
    model = models.sharpen(models.llama_bidirectional(num_hidden_layers=3), 5.0)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 11:] = 0  # the second window is 11 tokens long
    store = _record(model, tmp_path / "s", attention_mask=mask)
    assert any(not bool(store.valid(step).all()) for step in range(store.num_steps))
    out = {}
    expected = reference_sequential(model, store, method, True, out=out)
    pruned = copy.deepcopy(model)
    result = prune.apply(
        pruned,
        store,
        0.5,
        method=method,
        sink_aware=True,
        sequential=True,
        blocksize=16,
        progress=False,
    )
    assert_like_reference(model, pruned, result, expected, out)
