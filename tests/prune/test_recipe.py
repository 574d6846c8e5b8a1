"""prune.Recipe: the one place of apply's defaults, files that round-trip and refuse bad keys, and a
recipe that reproduces its masks bit for bit; the memory plan's formula; plot_report's panels."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys

import pytest
import torch

import attnprobe
import prune
from prune.engine.memory_plan import estimate_block_extra, model_shape, plan_memory
from prune.recipe import Calibration, Recipe, RecipeError
from tests import models

MASK = models.MASK_TOKEN_ID
APPLY = sys.modules["prune.apply"].apply  # the module, not the re-exported function's namesake


def _record(model, path):
    ids = torch.randint(3, 60, (3, 16), generator=torch.Generator().manual_seed(0))
    with attnprobe.record(model, path, mask_token_id=MASK, hessians=True) as store:
        attnprobe.calibrate(model, ids, mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
    return store


def test_every_apply_option_is_a_recipe_field_with_the_same_default():
    parameters = inspect.signature(APPLY).parameters
    options = {n: p for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    options.pop("progress")  # how to show the run, not what it computes
    assert sorted(options) == sorted(k for k in Recipe.apply_keys() if k != "sparsity")
    defaults = Recipe()
    for name, parameter in options.items():
        assert parameter.default == getattr(defaults, name), name


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_recipe_round_trips_through_its_file(tmp_path, suffix):
    recipe = Recipe(
        method="sparsegpt",
        sparsity=0.5,
        pattern="2:4",
        sink_aware=True,
        sink_std=1.5,
        targets=r".*mlp.*",
        device="cuda:0",
        sequential=True,
        calibration=Calibration(windows=16, seq_len=256),
    )
    path = recipe.save(tmp_path / f"recipe{suffix}")
    assert Recipe.load(path) == recipe
    text = path.read_text()
    assert (
        "sink_std" in text and "windows: 16" in text
        if suffix == ".yaml"
        else json.loads(text)["sink_std"] == 1.5
    )


def test_an_unknown_key_is_refused_with_the_valid_keys(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: wanda\nsparsty: 0.5\n")
    with pytest.raises(RecipeError) as err:
        Recipe.load(path)
    message = str(err.value)
    assert "sparsty" in message and str(path) in message
    for field in dataclasses.fields(Recipe):
        assert field.name in message
    path.write_text("calibration:\n  window: 3\n")
    with pytest.raises(RecipeError, match=r"'window'.*seq_len.*windows"):
        Recipe.load(path)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"method": "wandaa"}, "['magnitude', 'wanda', 'sparsegpt']"),
        ({"sparsity": 1.0}, "[0, 1)"),
        ({"sparsity": "half"}, "float"),
        ({"pattern": "2-4"}, "N:M"),
        ({"pattern": "2:4", "sparsity": 0.3}, "2:4"),
        ({"sink_aware": "yes"}, "bool"),
        ({"targets": "("}, "regular expression"),
    ],
)
def test_a_bad_value_is_refused_naming_it_and_what_is_valid(changes, named):
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(changes)
    assert named in str(err.value) and next(iter(changes)) in str(err.value)


def test_apply_takes_a_recipe_and_its_masks_are_reproduced_from_the_saved_recipe(tmp_path):
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "store")
    recipe = Recipe(method="sparsegpt", sink_aware=True, sparsity=0.5, blocksize=8)
    pruned = models.llama_bidirectional()
    result = prune.apply(pruned, store, recipe, progress=False)
    assert result.recipe == recipe and result.settings["recipe"] == recipe.to_dict()
    prune.save_masks(result.masks, tmp_path / "masks.safetensors", settings=result.settings, model=pruned)
    prune.save_pretrained(pruned, tmp_path / "ckpt", result)
    for saved in (tmp_path / "masks.safetensors", tmp_path / "ckpt"):  # the recipe alone, from each file
        again = prune.apply(models.llama_bidirectional(), store, Recipe.load(saved), progress=False)
        assert again.masks.keys() == result.masks.keys()
        assert all(torch.equal(again.masks[n], result.masks[n]) for n in result.masks)
    keywords = prune.apply(
        models.llama_bidirectional(),
        store,
        0.5,
        method="sparsegpt",
        sink_aware=True,
        blocksize=8,
        progress=False,
    )
    assert keywords.recipe == recipe  # the keyword form records the same recipe
    assert all(torch.equal(keywords.masks[n], result.masks[n]) for n in result.masks)


def test_a_recipe_and_a_recipe_keyword_together_are_refused(tmp_path):
    model = models.llama_bidirectional()
    with pytest.raises(TypeError, match=r"\['method'\].*recipe.replace"):
        prune.apply(model, None, Recipe(method="magnitude"), method="wanda")
    assert all(
        float((m.weight == 0).float().mean()) < 0.1 for m in model.modules() if isinstance(m, torch.nn.Linear)
    )


def test_the_memory_plan_follows_the_shapes():
    model = models.llama_bidirectional()
    shape = model_shape(model)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers.0." in n]
    hidden, mlp = model.config.hidden_size, model.config.intermediate_size
    tokens = 2 * 64
    # SparseGPT: a float32 Hessian per linear + max(activations, 3 more of the widest), written out here
    hessians = sum(m.in_features**2 * 4 for m in linears)
    solver = 3 * max(m.in_features for m in linears) ** 2 * 4
    activations = tokens * (4 * hidden + 3 * mlp) * 4
    assert estimate_block_extra(shape, "sparsegpt", tokens) == hessians + max(activations, solver)
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    outside = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n)
    assert shape.block_bytes == block_bytes and shape.outside_bytes == outside
    plan = plan_memory(
        shape,
        method="sparsegpt",
        sequential=True,
        device="cuda:0",
        windows=4,
        seq_len=64,
        batch_size=2,
        noise_levels=2,
        element_size=4,
    )
    block_phase = block_bytes + hessians + max(activations, solver)
    assert plan.device_peak == max(block_phase, outside + tokens * hidden * 4)
    assert "device peak" in plan.table() and "host peak" in plan.table()


def test_plot_report_draws_every_panel_it_has_data_for(tmp_path):
    pytest.importorskip("matplotlib")
    model = models.llama_bidirectional()
    store = _record(model, tmp_path / "store")
    result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True, progress=False)
    figure = prune.plot_report(result, tmp_path / "r.png", store=store, model_name="tiny")
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible() and ax.get_title()]
    # the store's Gram matrices are at hand, so the report has each linear's error and its panel
    assert "error" in result.report.columns
    assert titles == ["sparsity reached", "reconstruction error", "mean sink weight w = 1 - s per step"]
    assert "tiny: sink-aware wanda, sparsity 0.50" in figure._suptitle.get_text()
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    result.report = result.report.drop(columns="error")  # without the column, no panel
    figure = prune.plot_report(result)
    assert "reconstruction error" not in [ax.get_title() for ax in figure.axes]
