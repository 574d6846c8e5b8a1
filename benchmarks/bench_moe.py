"""Mixture-of-experts: cost of per-expert statistics while recording, and of pruning every expert.

Model: transformers ``Qwen3MoeForCausalLM``, bidirectional, hidden 256, 4 layers, 8 heads (4 KV, head
dim 32), 16 experts of width 256, top-4, vocabulary 1024, float32, random weights.

- ``time_ratio_attention``: median time of a recorded forward (attention mass only, statistics off)
  over a plain forward, batch 4, L = 256, alternating pairs after a warm-up.
- ``time_ratio_statistics``: the same with linear statistics on (the default), which for this model
  includes the per-expert statistics (routing captured, each expert's down input recomputed).
- ``time_ratio_experts_share``: (statistics − attention) / plain: the statistics' extra cost.
- ``apply_seconds_wanda`` / ``apply_seconds_sparsegpt``: one-shot ``prune.apply`` at 0.5 from a
  store of 4 calibration steps (SparseGPT from a store recorded with Hessians).
- ``expert_slice_sparsity_min/max`` and ``block_sparsity`` (zeros over all block weights, from
  ``PruneResult.coverage``) after Wanda.

Usage: ``python benchmarks/bench_moe.py [--quick]``. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MASK = 1023


def build_model(hidden: int = 256, layers: int = 4, experts: int = 16):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        moe_intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        num_experts=experts,
        num_experts_per_tok=4,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=4096,
        is_causal=False,
        mask_token_id=MASK,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).float().eval()


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    import attnprobe
    import prune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    args = parser.parse_args(argv)
    hidden, tokens, repeats = (128, 128, 3) if args.quick else (256, 256, 7)
    model = build_model(hidden=hidden)
    ids = torch.randint(0, MASK, (4, tokens), generator=torch.Generator().manual_seed(0))

    def plain():
        model(input_ids=ids)

    def recorded(stats: bool):
        def run():
            with attnprobe.record(model, linear_stats=stats, mask_token_id=MASK):
                model(input_ids=ids)

        return run

    pairs = {"plain": [], "attention": [], "statistics": []}
    for fn in (plain, recorded(False), recorded(True)):
        fn()  # warm-up
    for _ in range(repeats):  # alternate, so that a noisy machine moves every side
        for key, fn in (("plain", plain), ("attention", recorded(False)), ("statistics", recorded(True))):
            start = time.perf_counter()
            fn()
            pairs[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in pairs.items()}
    print(f"forward medians (s): {med}", file=sys.stderr)

    out: dict[str, object] = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "hidden": hidden,
        "tokens": tokens,
        "batch": 4,
        "experts": 16,
        "top_k": 4,
        "time_ratio_attention": round(med["attention"] / med["plain"], 3),
        "time_ratio_statistics": round(med["statistics"] / med["plain"], 3),
        "time_ratio_experts_share": round((med["statistics"] - med["attention"]) / med["plain"], 3),
    }
    with tempfile.TemporaryDirectory() as tmp:
        calib = torch.randint(0, MASK, (2, tokens), generator=torch.Generator().manual_seed(1))
        with attnprobe.record(model, Path(tmp) / "s", hessians=True, mask_token_id=MASK) as store:
            attnprobe.calibrate(model, calib, mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        for method in ("sparsegpt", "wanda"):
            model.load_state_dict(dense)
            start = time.perf_counter()
            result = prune.apply(model, store, 0.5, method=method, sink_aware=True, progress=False)
            out[f"apply_seconds_{method}"] = round(time.perf_counter() - start, 3)
            print(f"{method}: {out[f'apply_seconds_{method}']} s", file=sys.stderr)
    slices = [p[e] for n, p in model.named_parameters() if ".experts." in n for e in range(p.shape[0])]
    sparsity = [float((s == 0).float().mean()) for s in slices]
    out["expert_slice_sparsity_min"] = round(min(sparsity), 4)
    out["expert_slice_sparsity_max"] = round(max(sparsity), 4)
    out["block_sparsity"] = round(float(result.coverage["sparsity"].iloc[-1]), 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
