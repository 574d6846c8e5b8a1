"""prune.save_pretrained: pruned checkpoints that plain from_pretrained reloads with identical logits."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import attnprobe
import prune
from prune.methods.structured import apply_plan, find_structures, load_plan
from tests import models, moe_models

ROOT = Path(__file__).resolve().parents[2]
REMOTE = Path(__file__).resolve().parent / "remote_code" / "modeling_tiny_llada.py"


def _ids() -> torch.Tensor:
    return torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=_ids()).logits


def _record(model: nn.Module, path) -> attnprobe.TrajectoryStore:
    ids = torch.randint(3, 60, (3, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    with attnprobe.record(model, path, linear_stats=True) as store:
        attnprobe.calibrate(
            model, ids, mask_token_id=models.MASK_TOKEN_ID, steps=4, sample_interval=2, progress=False
        )
    return store


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory):
    return _record(models.llama_bidirectional(), tmp_path_factory.mktemp("store") / "llama")


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_unstructured_and_nm_reload_identically_with_sparsity_config(tmp_path, pattern):
    model = models.llama_bidirectional()
    result = prune.apply(model, None, 0.5, method="magnitude", pattern=pattern, progress=False)
    prune.save_pretrained(model, tmp_path, result)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    block = _config(tmp_path)["sparsity_config"]
    assert block["format"] == "dense" and block["sparsity_structure"] == pattern
    assert block["method"] == "magnitude" and block["sink_aware"] is False
    linears = [n for n, m in reloaded.named_modules() if isinstance(m, nn.Linear)]
    assert block["targets"] == sorted(n for n in linears if ".layers." in n)
    assert block["ignore"] == ["lm_head"]
    # global sparsity: zero entries over all parameters of the reloaded model, counted here
    params = list(reloaded.parameters())
    zeros = sum(int((p == 0).sum()) for p in params)
    assert block["global_sparsity"] == pytest.approx(zeros / sum(p.numel() for p in params))
    if pattern == "2:4":  # every 4 consecutive inputs of a target row keep at most 2 weights
        weight = dict(reloaded.named_modules())[block["targets"][0]].weight
        assert int((weight.reshape(-1, 4) != 0).sum(dim=1).max()) <= 2
    # the in-memory model's config is left as it was
    assert not hasattr(model.config, "sparsity_config")


def test_fused_expert_slices_are_targets_and_the_checkpoint_reloads(tmp_path):
    model = moe_models.qwen3_moe()
    result = prune.apply(model, None, 0.5, method="magnitude", progress=False)
    slices = [n for n in result.masks if ".experts." in n]
    assert slices  # the fused (E, out, in) parameters were pruned slice by slice
    prune.save_pretrained(model, tmp_path, result)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), _logits(model.eval()))
    block = _config(tmp_path)["sparsity_config"]
    assert block["targets"] == sorted(result.masks)
    # every saved expert slice is half zeros in the reloaded 3-D parameter, read here by index
    modules = dict(reloaded.named_modules())
    for name in slices:
        owner, param, expert = name.rsplit(".", 2)
        weight = getattr(modules[owner], param)[int(expert)]
        assert float((weight == 0).float().mean()) == pytest.approx(0.5)


def test_sink_aware_settings_and_tokenizer_travel_with_the_checkpoint(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ROOT / "examples" / "models" / "tiny-dlm").eval()
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples" / "models" / "tiny-dlm")
    ids = torch.tensor([tokenizer("In the beginning God created the heaven and the earth.").input_ids] * 2)
    with attnprobe.record(model, tmp_path / "store", linear_stats=True) as store:
        attnprobe.calibrate(model, ids, mask_token_id=259, steps=4, sample_interval=2, progress=False)
    result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True, sink_std=1.5, progress=False)
    prune.save_pretrained(model, tmp_path / "out", result, tokenizer=tokenizer)
    block = _config(tmp_path / "out")["sparsity_config"]
    assert (block["method"], block["sink_aware"], block["sink_std"]) == ("wanda", True, 1.5)
    assert _config(tmp_path / "out")["mask_token_id"] == 259
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("é").input_ids == [257, 195, 169]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("build", [models.llama_bidirectional, models.qwen2_gqa])
def test_structured_uniform_is_a_smaller_model_that_reloads(tmp_path, build):
    model = build()
    dense_params = sum(p.numel() for p in model.parameters())
    store = _record(model, tmp_path / "store")
    result = prune.apply(model, store, 0.5, pattern="structured", progress=False)
    prune.save_pretrained(model, tmp_path / "out", result)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # no custom code, no plan
    config = _config(tmp_path / "out")
    assert config["num_attention_heads"] == 2 and config["intermediate_size"] == 32
    assert sum(p.numel() for p in reloaded.parameters()) < dense_params
    assert torch.equal(_logits(reloaded), _logits(model))
    assert config["attnprobe_pruning"]["pattern"] == "structured" and "sparsity_config" not in config


def test_structured_global_says_why_and_saves_the_plan(tmp_path, llama_store):
    dense = models.llama_bidirectional()
    model = copy.deepcopy(dense)
    result = prune.apply(
        model, llama_store, 0.5, pattern="structured", structured_mode="global", progress=False
    )
    widths = {s.name: s.width for s in find_structures(model) if hasattr(s, "width")}
    assert len(set(widths.values())) > 1, widths  # the premise: layers ended with different MLP widths
    with pytest.raises(ValueError, match="differ between layers.*cannot rebuild per-layer widths.*load_plan"):
        prune.save_pretrained(model, tmp_path, result)
    assert not (tmp_path / "config.json").exists()
    apply_plan(dense, load_plan(tmp_path / "structured_plan.json"))  # what can be reloaded
    assert torch.equal(_logits(dense), _logits(model))


@pytest.fixture
def remote_checkpoint(tmp_path) -> Path:
    """A dense remote-code (LLaDA-style) checkpoint: config.json with auto_map + the modeling file."""
    spec = importlib.util.spec_from_file_location("modeling_tiny_llada", REMOTE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_tiny_llada"] = module
    spec.loader.exec_module(module)
    module.TinyLLaDAConfig.register_for_auto_class()
    module.TinyLLaDAModelLM.register_for_auto_class("AutoModelForCausalLM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = module.TinyLLaDAModelLM(module.TinyLLaDAConfig())
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def test_remote_code_llada_unstructured_reloads(tmp_path, remote_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(remote_checkpoint, trust_remote_code=True).eval()
    result = prune.apply(model, None, 0.5, method="magnitude", progress=False)
    prune.save_pretrained(model, tmp_path / "out", result)
    assert (tmp_path / "out" / "modeling_tiny_llada.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    assert _config(tmp_path / "out")["sparsity_config"]["targets"][0].startswith("model.transformer.blocks.0")


def test_remote_code_llada_structured_refuses_and_saves_the_plan(tmp_path, remote_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(remote_checkpoint, trust_remote_code=True).eval()
    store = _record(model, tmp_path / "store")
    result = prune.apply(model, store, 0.5, pattern="structured", progress=False)
    with pytest.raises(ValueError, match="derives its attention heads"):
        prune.save_pretrained(model, tmp_path / "out", result)
    fresh = AutoModelForCausalLM.from_pretrained(remote_checkpoint, trust_remote_code=True).eval()
    apply_plan(fresh, load_plan(tmp_path / "out" / "structured_plan.json"))
    assert torch.equal(_logits(fresh), _logits(model))


def test_refuses_plain_modules_and_results_of_other_models(tmp_path):
    plain = models.tiny_llada()
    result = prune.apply(plain, None, 0.5, method="magnitude", progress=False)
    with pytest.raises(ValueError, match="not a transformers PreTrainedModel.*save_masks"):
        prune.save_pretrained(plain, tmp_path, result)
    pruned = models.llama_bidirectional()
    result = prune.apply(pruned, None, 0.5, method="magnitude", progress=False)
    with pytest.raises(ValueError, match="removed are not zero"):
        prune.save_pretrained(models.llama_bidirectional(), tmp_path, result)  # the dense model
    assert not (tmp_path / "config.json").exists()
