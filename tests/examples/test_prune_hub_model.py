"""``attnprobe prune`` (the hub recipe; examples/prune_hub_model.py became it) end to end, offline, on the
LLaDA-style test model saved with remote code, through the installed console script."""

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
import prune
from prune.engine.blockwise import find_blocks
from prune.engine.onload import streamed
from prune.hub import calibration_windows, load_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from tiny_tokenizer import ByteTokenizer  # noqa: E402

SCRIPT = Path(sys.executable).parent / "attnprobe"

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


def _text(tmp_path: Path) -> Path:
    text = tmp_path / "calibration.txt"
    text.write_text("In the beginning was the word, and the word was with the model. " * 12)
    return text


@pytest.mark.skipif(not SCRIPT.is_file(), reason="attnprobe console script not installed")
def test_the_command_runs_offline_on_a_remote_code_checkpoint(tmp_path):
    checkpoint = tmp_path / "tiny-llada"
    _save_checkpoint(checkpoint)
    out = tmp_path / "out"
    argv = [
        str(SCRIPT),
        "prune",
        str(checkpoint),
        "--trust-remote-code",
        "--calibration",
        str(_text(tmp_path)),
    ]
    argv += [
        "--output",
        str(out),
        "--method",
        "sparsegpt",
        "--sink-aware",
        "--sparsity",
        "0.5",
        "--sequential",
    ]
    argv += [
        "--seq-len",
        "64",
        "--windows",
        "4",
        "--steps",
        "4",
        "--sample-interval",
        "2",
        "--batch-size",
        "4",
    ]
    argv += ["--dtype", "bfloat16", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # the modeling file imports tests
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["achieved_sparsity"] - 0.5) < 1e-6
    with safe_open(str(out / "masks.safetensors"), "pt") as masks:
        names = list(masks.keys())
    assert len(names) >= 21  # 3 blocks x 7 linears (plus the SparseGPT weights)
    sys.path.insert(0, str(ROOT))
    reloaded = transformers.AutoModel.from_pretrained(out / "model", trust_remote_code=True)
    weight = reloaded.model.transformer.blocks[2].ff_out.weight
    assert weight.dtype == torch.bfloat16 and float((weight == 0).float().mean()) == 0.5
    store = attnprobe.open(out / "calibration")  # 4 windows per forward x 2 noise levels
    assert store.num_steps == 2 and store.valid(0).shape == (4, 64)
    assert not store.options["linear_stats"]  # attention and input ids are all block-wise pruning reads
    assert store.options["recorded"] == "block-wise"  # --sequential records block by block


def test_streamed_recording_gives_the_blockwise_store(tmp_path, monkeypatch):
    """Whole-model forwards with the blocks streamed through a device record the block-wise store."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = tmp_path / "tiny-llada"
    _save_checkpoint(checkpoint)
    tokenizer, model = load_model(str(checkpoint), torch.float32, trust_remote_code=True)
    windows = calibration_windows(tokenizer, _text(tmp_path), 64, 4)
    noising = dict(steps=4, sample_interval=2, batch_size=2)
    mask = model.config.mask_token_id
    blockwise = prune.record_blockwise(
        model, windows, tmp_path / "b", mask_token_id=mask, device="cpu", **noising
    )
    blocks = [block.module for block in find_blocks(model, [])]
    with (
        streamed(model, blocks, "cpu"),
        attnprobe.record(model, tmp_path / "s", mask_token_id=mask, linear_stats=False),
    ):
        attnprobe.calibrate(model, windows, mask_token_id=mask, progress=False, **noising)
    stream = attnprobe.open(tmp_path / "s")
    assert blockwise.num_steps == stream.num_steps == 4
    for step in range(stream.num_steps):
        assert torch.equal(blockwise.input_ids(step), stream.input_ids(step))
        torch.testing.assert_close(blockwise.attention_mass(step), stream.attention_mass(step))
