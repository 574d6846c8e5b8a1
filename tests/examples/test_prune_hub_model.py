"""The hub recipe end to end, offline, on the LLaDA-style test model saved with remote code."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import attnprobe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import prune_hub_model  # noqa: E402
from tiny_tokenizer import ByteTokenizer  # noqa: E402

# A trust_remote_code checkpoint as LLaDA ships it: config + modeling file beside the weights. The
# modules are the test model's (tests/models.py): LLaDA's names and call structure.
MODELING = """
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tests.models import LLaDAConfig, LLaDAModel


class TinyLLaDAConfig(PretrainedConfig):
    model_type = "tiny_llada"

    def __init__(self, d_model=32, n_heads=4, n_layers=3, mlp_hidden_size=64, vocab_size=264,
                 mask_token_id=259, **kwargs):
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.mlp_hidden_size, self.vocab_size, self.mask_token_id = mlp_hidden_size, vocab_size, mask_token_id
        super().__init__(**kwargs)


class TinyLLaDAModelLM(PreTrainedModel):
    config_class = TinyLLaDAConfig
    base_model_prefix = "model"
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.model = LLaDAModel(LLaDAConfig(
            vocab_size=config.vocab_size, d_model=config.d_model, n_heads=config.n_heads,
            n_layers=config.n_layers, mlp_hidden_size=config.mlp_hidden_size,
            mask_token_id=config.mask_token_id))
        self.post_init()

    def _init_weights(self, module):
        # Weights come from the checkpoint; the rotary inv_freq buffer is not saved (non-persistent), and
        # transformers 5 builds the model on the meta device: recompute it, or it holds uninitialised memory.
        if hasattr(module, "inv_freq"):
            dim = 2 * module.inv_freq.numel()
            arange = torch.arange(0, dim, 2, dtype=torch.float32, device=module.inv_freq.device)
            module.inv_freq.copy_(1.0 / 10000.0 ** (arange / dim))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.model.forward(input_ids=input_ids, attention_mask=attention_mask)
"""


def _save_checkpoint(directory: Path) -> None:
    directory.mkdir()
    (directory / "modeling_tiny_llada.py").write_text(MODELING)
    spec = importlib.util.spec_from_file_location("modeling_tiny_llada", directory / "modeling_tiny_llada.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.TinyLLaDAConfig()
    config.auto_map = {
        "AutoConfig": "modeling_tiny_llada.TinyLLaDAConfig",
        "AutoModel": "modeling_tiny_llada.TinyLLaDAModelLM",
    }
    torch.manual_seed(0)
    model = module.TinyLLaDAModelLM(config)
    with torch.no_grad():  # peaked attention, so that sinks exist
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(5.0)
    model.save_pretrained(directory)
    ByteTokenizer().save(directory)


def test_recipe_runs_offline_on_a_remote_code_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = tmp_path / "tiny-llada"
    _save_checkpoint(checkpoint)
    text = tmp_path / "calibration.txt"
    text.write_text("In the beginning was the word, and the word was with the model. " * 12)
    out = tmp_path / "out"
    code = prune_hub_model.main(
        [
            str(checkpoint),
            "--trust-remote-code",
            "--calibration",
            str(text),
            "--output",
            str(out),
            "--method",
            "sparsegpt",
            "--sink-aware",
            "--sparsity",
            "0.5",
            "--seq-len",
            "64",
            "--windows",
            "4",
            "--steps",
            "4",
            "--sample-interval",
            "2",
            "--eval-windows",
            "1",
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["windows"] == 4 and abs(summary["achieved_sparsity"] - 0.5) < 1e-6
    assert summary["nll_dense"] > 0 and summary["nll_pruned"] > 0
    with safe_open(str(out / "masks.safetensors"), "pt") as masks:
        names = list(masks.keys())
    assert len(names) >= 21  # 3 blocks x 7 linears (plus whatever the file adds)
    reloaded = transformers.AutoModel.from_pretrained(out / "model", trust_remote_code=True)
    weight = reloaded.model.transformer.blocks[2].ff_out.weight
    assert weight.dtype == torch.bfloat16 and float((weight == 0).float().mean()) == 0.5
    store = attnprobe.open(out / "calibration")  # 4 windows per forward x 2 noise levels
    assert store.num_steps == 2 and store.valid(0).shape == (4, 64)
    assert not store.options["linear_stats"]  # attention and input ids are all block-wise pruning reads
    assert summary["record"] == "blockwise" and store.options["recorded"] == "block-wise"  # --device default


def test_streamed_recording_gives_the_blockwise_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = tmp_path / "tiny-llada"
    _save_checkpoint(checkpoint)
    text = tmp_path / "calibration.txt"
    text.write_text("In the beginning was the word, and the word was with the model. " * 12)
    stores = {}
    for mode in ("blockwise", "streamed"):
        out = tmp_path / mode
        argv = [str(checkpoint), "--trust-remote-code", "--calibration", str(text), "--output", str(out)]
        argv += ["--seq-len", "64", "--windows", "4", "--steps", "4", "--sample-interval", "2"]
        argv += ["--batch-size", "2", "--device", "cpu", "--record", mode, "--no-save-model"]
        assert prune_hub_model.main(argv) == 0
        assert json.loads((out / "summary.json").read_text())["record"] == mode
        stores[mode] = attnprobe.open(out / "calibration")
    blockwise, streamed = stores["blockwise"], stores["streamed"]
    assert blockwise.num_steps == streamed.num_steps == 4
    for step in range(streamed.num_steps):
        assert torch.equal(blockwise.input_ids(step), streamed.input_ids(step))
        torch.testing.assert_close(blockwise.attention_mass(step), streamed.attention_mass(step))


def test_torchrun_prunes_data_parallel_and_rank_0_alone_writes(tmp_path):
    """Two gloo ranks under torchrun (--standalone: torch picks the port) against one process."""
    checkpoint = tmp_path / "tiny-llada"
    _save_checkpoint(checkpoint)
    text = tmp_path / "calibration.txt"
    text.write_text("In the beginning was the word, and the word was with the model. " * 12)
    argv = [str(checkpoint), "--trust-remote-code", "--calibration", str(text), "--sink-aware"]
    argv += ["--seq-len", "64", "--windows", "4", "--steps", "4", "--sample-interval", "2"]
    argv += ["--batch-size", "1", "--device", "cpu", "--no-save-model"]
    root = EXAMPLES.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ran = subprocess.run(
        [*launcher, str(EXAMPLES / "prune_hub_model.py"), *argv, "--output", str(tmp_path / "ddp")],
        env=env, cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "rank 1 of 2: pruned; outputs are written by rank 0" in ran.stderr
    assert f"rank 0 of 2: wrote {tmp_path / 'ddp'}" in ran.stderr
    assert "rank 1 of 2: wrote" not in ran.stderr
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["record"] == "streamed"  # sharded recording
    store = attnprobe.open(tmp_path / "ddp" / "calibration")
    assert store.world_size == 2 and store.num_steps == 4 * 2  # every window once, 2 noise levels

    assert prune_hub_model.main([*argv, "--output", str(tmp_path / "one"), "--record", "streamed"]) == 0
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert single["world_size"] == 1 and abs(summary["achieved_sparsity"] - 0.5) < 1e-6
    with safe_open(str(tmp_path / "ddp" / "masks.safetensors"), "pt") as a:
        with safe_open(str(tmp_path / "one" / "masks.safetensors"), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            same = sum(int((a.get_tensor(k) == b.get_tensor(k)).sum()) for k in a.keys())
            total = sum(a.get_tensor(k).numel() for k in a.keys())
    # The ranks' statistics are summed in another order than one process's: near-ties may flip.
    assert same / total >= 0.999


def test_blockwise_recording_is_refused_under_torchrun():
    args = prune_hub_model.parse_args(["m", "--calibration", "c", "--output", "o", "--record", "blockwise"])
    with pytest.raises(SystemExit, match="--record streamed"):
        prune_hub_model.record_mode(args, world=2)
    args.record = None
    assert prune_hub_model.record_mode(args, world=1) == "whole"  # no --device
    args.device = "cuda:0"
    assert prune_hub_model.record_mode(args, world=1) == "blockwise"
    assert prune_hub_model.record_mode(args, world=2) == "streamed"
