"""Device peak of one MoE block pruned block-wise with SparseGPT, projected from a slice of its experts.

``moe_block_device_peak_gib``: ``{model: GiB}``, the device memory one MoE block needs under
``prune.apply(..., method="sparsegpt", sink_aware=True, sequential=True, device="cuda:0")`` (model and
cached block inputs on the host), at the widths of

- **LLaDA-MoE-7B-A1B** (OLMoE layout, ``ModuleList`` experts, softmax top-k): hidden 2048, 16 heads
  (16 KV), 64 experts, top-8, expert width 1024, no shared expert;
- **LLaDA2.0-mini** (Ling/Bailing layout, ``ModuleList`` experts as in the official file, sigmoid
  group-limited router): hidden 2048, 16 heads / 4 KV (head dim 128), 256 experts, top-8, expert
  width 512, 1 shared expert, 8 groups / top-4 groups.

Method. A block with all 256 (or 64) experts at full width does not fit a quick CPU run, and its
peak is dominated by what scales with the experts in one pass. So one block of the tests' stand-in
models (``tests/moe_models.py``, same layouts) is built at full width with a *slice* of 8 experts
(top-k capped at 8, so each expert sees more tokens than in the model), bf16, calibrated on one
window of L = 128 (2 noise levels), and pruned block-wise in a fresh process; extra = peak RSS − RSS
before ``apply`` − what ``apply`` keeps on the host by design (masks, SparseGPT weights, the rollback
copy), as in ``bench_scale.py``. The projection to E experts:

    peak(E) = block bf16 weights(E) + P · A + (extra − 8 · A) + activations(L = 4096)

- ``A`` = one expert's float32 Hessians, (H² + I²) · 4 B (exact: the accumulators of
  ``prune.engine.block_experts``), and ``P`` = the experts in the largest pass: min(E, EXPERT_PASS_BYTES // A)
  with ``EXPERT_PASS_BYTES`` = 2 GiB;
- ``extra − 8 · A`` is the measured rest of the slice (attention and shared-expert Hessians,
  SparseGPT's float32 temporaries for one linear, one expert's routed rows, activations at L = 128);
- activations at L = 4096: an allowance of 16 float32 (L, H) tensors (512 MiB at H = 2048), not a
  measurement; the 8B-width block of ``bench_scale.py`` showed almost no growth of the extra peak
  from L = 256 to L = 1024.

Usage: ``python benchmarks/bench_moe_block.py``; last line JSON. ``bench_scale.py`` reports the same
mapping.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "LLaDA-MoE-7B-A1B": dict(
        style="olmoe",
        hidden_size=2048,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=1024,
        num_shared_experts=0,
    ),
    "LLaDA2.0-mini": dict(
        style="llada2",
        hidden_size=2048,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        num_shared_experts=1,
        n_group=8,
        topk_group=4,
    ),
}
SLICE = 8  # experts in the measured block
LENGTH = 128  # calibration tokens of the measured block
TARGET_LENGTH = 4096
ACTIVATION_TENSORS = 16  # float32 (L, H) tensors allowed for one step's activations at TARGET_LENGTH


def _slice_config(widths: dict, experts: int) -> dict:
    """The model's widths with ``experts`` experts (group-limited routing keeps 2 experts per group)."""
    config = {k: v for k, v in widths.items() if k != "style"}
    config.update(num_experts=experts, num_hidden_layers=1, vocab_size=512, mask_token_id=511)
    # top-k of a slice: at most every expert (each then sees more tokens than in the model: an upper bound)
    config["num_experts_per_tok"] = min(config["num_experts_per_tok"], experts)
    if "n_group" in config:
        config.update(n_group=experts // 2, topk_group=min(config["topk_group"], experts // 2))
    return config


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(name: str, experts: int, length: int) -> None:
    """Build one block with ``experts`` experts, record, prune block-wise; print the extra peak as JSON."""
    sys.path.insert(0, str(ROOT))  # the stand-in models live in the tests
    import attnprobe
    import prune
    from tests import moe_models

    widths = MODELS[name]
    build = moe_models.olmoe_style if widths["style"] == "olmoe" else moe_models.llada2_style
    model = build(**_slice_config(widths, experts)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 511, (1, length), generator=torch.Generator().manual_seed(0))
    with attnprobe.record(model, mask_token_id=511, linear_stats=False) as store:
        attnprobe.calibrate(model, ids, mask_token_id=511, steps=4, sample_interval=2, progress=False)
    weights = [p for n, p in model.named_parameters() if ".layers." in n and p.dim() >= 2]
    before = _rss()
    result = prune.apply(
        model, store, 0.5, method="sparsegpt", sink_aware=True, sequential=True, device="cpu", progress=False
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    retained = sum(m.numel() for m in result.masks.values())  # bool masks
    retained += sum(w.numel() * w.element_size() for w in result.weights.values())
    retained += sum(w.numel() * w.element_size() for w in weights)  # rollback copy (upper bound)
    print(json.dumps({"raw": peak - before, "extra": peak - before - retained}))


def _run(name: str, experts: int, length: int) -> dict:
    args = [sys.executable, __file__, "--child", name, str(experts), str(length)]
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def expert_bytes(widths: dict) -> int:
    """One routed expert's float32 Hessians: gate/up input (H, H) and down input (I, I)."""
    hidden, width = widths["hidden_size"], widths["moe_intermediate_size"]
    return 4 * (hidden * hidden + width * width)


def block_weight_bytes(widths: dict) -> int:
    """bf16 weights of one MoE block: attention, router, routed and shared experts."""
    hidden, heads, kv = widths["hidden_size"], widths["num_attention_heads"], widths["num_key_value_heads"]
    head_dim = hidden // heads
    attention = hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden
    experts = widths["num_experts"] * 3 * hidden * widths["moe_intermediate_size"]
    shared = widths["num_shared_experts"] * 3 * hidden * widths["moe_intermediate_size"]
    return 2 * (attention + hidden * widths["num_experts"] + experts + shared)


def project(name: str) -> dict:
    """Measure the slice of one model and project its block's device peak (module docstring)."""
    from prune.engine.block_experts import EXPERT_PASS_BYTES

    widths = MODELS[name]
    measured = _run(name, SLICE, LENGTH)
    print(f"{name}: {SLICE} experts, L = {LENGTH}: {measured}", flush=True)
    per_expert = expert_bytes(widths)
    rest = measured["extra"] - SLICE * per_expert
    activations = ACTIVATION_TENSORS * TARGET_LENGTH * widths["hidden_size"] * 4
    per_pass = min(widths["num_experts"], max(1, EXPERT_PASS_BYTES // per_expert))
    weights = block_weight_bytes(widths)
    peak = weights + per_pass * per_expert + rest + activations
    return {
        "peak_gib": peak / GIB,
        "block_weights_gib": weights / GIB,
        "expert_hessians_mib": per_expert / 2**20,
        "experts_per_pass": per_pass,
        "passes": -(-widths["num_experts"] // per_pass),
        "slice_extra_gib": measured["extra"] / GIB,
        "slice_rest_gib": rest / GIB,
        "activations_gib": activations / GIB,
        # the same block with every expert's Hessians at once (one pass)
        "one_pass_peak_gib": (peak + (widths["num_experts"] - per_pass) * per_expert) / GIB,
    }


def moe_block_device_peak() -> dict:
    """``{"moe_block_device_peak_gib": {model: GiB}, "moe_block_detail": {...}}``."""
    detail = {name: project(name) for name in MODELS}
    peaks = {name: round(d["peak_gib"], 3) for name, d in detail.items()}
    rounded = {
        n: {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()} for n, d in detail.items()
    }
    return {
        "moe_block_device_peak_gib": peaks,
        "moe_block_detail": rounded,
        "moe_block_length": TARGET_LENGTH,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, experts, length = args.child
        child(name, int(experts), int(length))
        return 0
    result = {"device": "cpu", "threads": torch.get_num_threads()}
    result.update(moe_block_device_peak())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
