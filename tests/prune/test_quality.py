"""Per-layer error, layer allocation and mask refinement: golden values written out here."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

import attnprobe
import prune
from prune.methods import allocation as allocation_mod
from prune.methods.layer_error import relative_error
from prune.methods.masks import select_mask
from prune.methods.refine import RefineSettings, refine_mask
from tests import models

MASK = models.MASK_TOKEN_ID


def _ids(n=3, length=16, seed=0):
    ids = torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


def _record(model, path, **options):
    options.setdefault("hessians", True)
    with attnprobe.record(model, path, mask_token_id=MASK, **options) as store:
        attnprobe.calibrate(model, _ids(), mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
    return store


def _inputs(model, store, name):
    """Every recorded step's input rows of ``name`` (plain), by running the dense model again."""
    rows = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_pre_hook(
        lambda m, a: rows.append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for step in range(store.num_steps):
            model(input_ids=store.input_ids(step))
    handle.remove()
    return torch.cat(rows).double()


def _output_error(w, w_hat, x):
    """‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖² from the outputs themselves."""
    w, w_hat = w.double(), w_hat.double()
    return float(((w - w_hat) @ x.T).square().sum() / (w @ x.T).square().sum())


def _row_error(w, w_hat, g):
    r = (w - w_hat).double()
    return (r @ g.double() * r).sum(dim=1)


def test_relative_error_equals_the_output_error():
    torch.manual_seed(0)
    w, x = torch.randn(6, 10), torch.randn(40, 10)
    keep = torch.rand(6, 10) > 0.5
    expected = _output_error(w, w * keep, x.double())
    assert relative_error(w, w * keep, x.T @ x) == pytest.approx(expected, rel=1e-4)
    assert relative_error(w, w * keep, 7.0 * x.T @ x) == pytest.approx(expected, rel=1e-4)  # scale-free


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_report_error_equals_the_output_error_of_the_pruned_linear(tmp_path, method):
    model = models.llama_bidirectional()
    dense = copy.deepcopy(model)
    store = _record(model, tmp_path / "s", linear_stats=True)
    result = prune.apply(model, store, 0.5, method=method, blocksize=16, progress=False)
    name = "model.layers.1.mlp.down_proj"
    x = _inputs(dense, store, name)
    w = dict(dense.named_modules())[name].weight.detach()
    w_hat = dict(model.named_modules())[name].weight.detach()
    row = result.report.set_index("layer").loc[name]
    assert row["error"] == pytest.approx(_output_error(w, w_hat, x), rel=1e-3)


def test_refine_takes_the_best_exhaustive_swap_and_keeps_counts():
    torch.manual_seed(1)
    w, x = torch.randn(5, 8), torch.randn(30, 8) * torch.linspace(0.2, 3, 8)
    g = x.T @ x
    keep = select_mask(w.abs(), "unstructured", 0.5)
    # one iteration, candidates covering the row: every row takes its best of all 4 × 4 swaps (if any)
    new_keep, new_w, swaps = refine_mask(
        w, w * keep, keep, g, settings=RefineSettings(iterations=1, candidates=8)
    )
    base = _row_error(w, w * keep, g)
    for i in range(5):
        best = base[i]
        for p, q in itertools.product(torch.nonzero(~keep[i]).flatten(), torch.nonzero(keep[i]).flatten()):
            trial = keep[i].clone()
            trial[p], trial[q] = True, False
            best = min(best, _row_error(w[i : i + 1], w[i : i + 1] * trial, g)[0])
        assert _row_error(w[i : i + 1], new_w[i : i + 1], g)[0] == pytest.approx(float(best), rel=1e-4)
    assert torch.equal(new_w, w * new_keep)
    assert ((~new_keep).sum(1) == (~keep).sum(1)).all() and swaps > 0
    # many iterations: never worse than the start, counts still exact
    keep_all, w_all, _ = refine_mask(w, w * keep, keep, g, settings=RefineSettings(iterations=50))
    assert (_row_error(w, w_all, g) <= base + 1e-6).all()
    assert ((~keep_all).sum(1) == 4).all()


def test_refine_with_rows_of_different_counts():
    torch.manual_seed(3)
    w, x = torch.randn(4, 8), torch.randn(30, 8) * torch.linspace(0.2, 3, 8)
    g = x.T @ x
    keep = torch.ones(4, 8, dtype=torch.bool)
    keep[1, :5] = False  # row 0 and 3 keep everything, row 2 prunes one weight
    keep[2, 7] = False
    new_keep, new_w, _ = refine_mask(w, w * keep, keep, g)
    assert torch.equal((~new_keep).sum(1), (~keep).sum(1))
    assert (_row_error(w, new_w, g) <= _row_error(w, w * keep, g) + 1e-6).all()


def test_refine_keeps_n_m_groups():
    torch.manual_seed(2)
    w, x = torch.randn(6, 16), torch.randn(50, 16) * torch.linspace(0.2, 3, 16)
    g = x.T @ x
    keep = select_mask(w.abs(), "2:4", 0.5)
    new_keep, new_w, swaps = refine_mask(w, w * keep, keep, g, n_m=(2, 4))
    assert swaps > 0
    assert ((~new_keep).view(6, 4, 4).sum(-1) == 2).all()
    assert (_row_error(w, new_w, g) <= _row_error(w, w * keep, g) + 1e-6).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_apply_refine_lowers_the_error(tmp_path, method):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s", linear_stats=True)
    plain = prune.apply(copy.deepcopy(model), store, 0.6, method=method, blocksize=16, progress=False)
    result = prune.apply(model, store, 0.6, method=method, blocksize=16, refine=True, progress=False)
    report = result.report
    assert (report["error"] <= report["error_before"] + 1e-7).all()
    assert report["error"].mean() < 0.95 * plain.report["error"].mean()
    assert report["error_before"].to_numpy() == pytest.approx(plain.report["error"].to_numpy(), rel=1e-5)
    if method != "sparsegpt":  # per-row counts exact
        for name, mask in result.masks.items():
            assert torch.equal((~mask).sum(1), (~plain.masks[name]).sum(1)), name
    assert result.settings["refine"] == "sparseswaps" and result.settings["refine_iterations"] == 30


def test_refine_without_hessians_is_refused_untouched(tmp_path):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s", linear_stats=True, hessians=False)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="hessians=True"):
        prune.apply(model, store, 0.5, refine=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_owl_formula():
    # D = (0.01, 0.03): rescaled to (0, 2λ) = (0, 0.16), mean 0.08; keep = 0.5 ± 0.08
    out = allocation_mod.owl_sparsities({"a": 0.01, "b": 0.03}, {"a": 10, "b": 10}, 0.5, 0.08)
    assert out["a"] == pytest.approx(0.58) and out["b"] == pytest.approx(0.42)


def test_owl_ratios_count_outliers_of_the_wanda_metric():
    w = {"blk.0.x": torch.tensor([[1.0, 1.0, 1.0, 10.0]]), "blk.1.x": torch.ones(1, 4)}
    norms = {"blk.0.x": torch.ones(4), "blk.1.x": torch.ones(4)}
    ratios = allocation_mod.owl_ratios(w, norms, {"blk.0.x": "blk.0", "blk.1.x": "blk.1"}, 2.0)
    assert ratios == {"blk.0": 0.25, "blk.1": 0.0}  # 10 > 2 × mean 3.25; a flat block has none


def test_sensitivity_solver_moves_sparsity_to_the_flat_curve():
    curves = {"flat": [(0.4, 0.0), (0.6, 0.01)], "steep": [(0.4, 0.0), (0.6, 1.0)]}
    out = allocation_mod.sensitivity_sparsities(curves, {"flat": 100, "steep": 100}, 0.5, 0.1)
    assert out["flat"] == pytest.approx(0.6) and out["steep"] == pytest.approx(0.4)


def _zeros(masks):
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("allocation", ["owl", "sensitivity"])
def test_allocations_meet_the_global_budget(tmp_path, allocation, sequential):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s", linear_stats=True)
    result = prune.apply(
        model, store, 0.6, method="wanda", allocation=allocation, sequential=sequential, progress=False
    )
    assert abs(_zeros(result.masks) - 0.6) <= 0.005
    assert result.report["sparsity"].max() - result.report["sparsity"].min() > 0.01  # not uniform
    assert result.report["sparsity"].between(0.6 - 0.1 - 0.01, 0.6 + 0.1 + 0.01).all()
    assert set(result.settings["layer_sparsity"]) == set(result.masks)
    assert result.settings["allocation"] == allocation


def test_user_mapping_and_callable(tmp_path):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s", linear_stats=True)
    result = prune.apply(copy.deepcopy(model), store, 0.5, allocation={r".*mlp\..*": 0.75}, progress=False)
    for _, row in result.report.iterrows():
        assert row["sparsity"] == pytest.approx(0.75 if ".mlp." in row["layer"] else 0.5, abs=0.02)
    by_call = prune.apply(
        copy.deepcopy(model),
        store,
        0.5,
        allocation=lambda n, w: 0.75 if ".mlp." in n else None,
        progress=False,
    )
    assert all(torch.equal(by_call.masks[n], m) for n, m in result.masks.items())
    assert by_call.settings["allocation"] == "callable"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"allocation": "owl", "pattern": "2:4"}, "N:M or structured"),
        ({"allocation": "nope"}, "unknown allocation"),
        ({"allocation": {".*": 1.5}}, r"in \[0, 1\)"),
        ({"refine": "yes"}, "refine must be"),
        ({"refine": True, "refine_iterations": -1}, "refine_iterations"),
        ({"owl_lambda": 0.7, "allocation": "owl"}, "owl_lambda"),
    ],
)
def test_bad_options_are_refused(tmp_path, kwargs, match):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "s", linear_stats=True)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        prune.apply(model, store, 0.5, progress=False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_saved_masks_carry_and_reproduce_the_allocation(tmp_path):
    model = models.llama_bidirectional()
    fresh = copy.deepcopy(model)
    store = _record(model, tmp_path / "s", linear_stats=True)
    result = prune.apply(model, store, 0.6, allocation="owl", refine=True, progress=False)
    path = prune.save_masks(result.masks, tmp_path / "m.safetensors", settings=result.settings, model=model)
    settings = prune.load_masks(copy.deepcopy(fresh), path)["settings"]
    assert settings["allocation"] == "owl" and settings["owl_m"] == 5.0 and settings["owl_lambda"] == 0.08
    assert settings["refine"] == "sparseswaps"
    again = prune.apply(fresh, store, 0.6, allocation=settings["layer_sparsity"], refine=True, progress=False)
    assert all(torch.equal(again.masks[n], m) for n, m in result.masks.items())
    prune.save_pretrained(model, tmp_path / "ckpt", result)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["attnprobe_pruning"]
    assert saved["allocation"] == "owl" and saved["refine"] == "sparseswaps"
    assert saved["layer_sparsity"] == pytest.approx(result.settings["layer_sparsity"])


def test_sequential_refine_and_error(tmp_path):
    model = models.tiny_llada()
    store = _record(model, tmp_path / "s", linear_stats=True)
    result = prune.apply(model, store, 0.6, method="wanda", sequential=True, refine=True, progress=False)
    assert (result.report["error"] < result.report["error_before"]).any()
    assert (result.report["error"] <= result.report["error_before"] + 1e-7).all()
    plain = prune.apply(
        copy.deepcopy(models.tiny_llada()), store, 0.6, sequential=True, layer_error=True, progress=False
    )
    assert plain.report["error"].notna().all()


def test_moe_experts_take_allocation_and_refinement(tmp_path):
    from tests import moe_models

    model = moe_models.qwen3_moe()
    store = _record(model, tmp_path / "s", linear_stats=True)
    result = prune.apply(model, store, 0.6, allocation="sensitivity", refine=True, progress=False)
    assert any("experts" in n for n in result.masks)
    assert abs(_zeros(result.masks) - 0.6) <= 0.005
