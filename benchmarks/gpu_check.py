"""One prepared script for a lent GPU: exactness, recording overhead, and onloaded block-wise pruning.

1. ``mass_max_rel_error_bf16``: a bf16 bidirectional Llama on CUDA; the recorded attention mass
   (SDPA observed, fp32 reduction) against the mass summed from eager attention probabilities
   (``output_attentions=True``, fp32 softmax) of the same model, relative to the mean mass.
2. ``time_ratio``: recorded (attention only) over plain forward, L = 4096, batch 1, an 8-block model at
   LLaDA-8B widths (hidden 4096, 32 heads, MLP 12288, bf16); median of alternating pairs.
3. ``blockwise_*``: the same 8 blocks living on the CPU, ``prune.apply(..., sequential=True,
   device="cuda:0")`` with sink-aware SparseGPT on an attention-only store (2 windows × 2 noise levels,
   L = 4096): ``torch.cuda.max_memory_allocated`` during apply, seconds per block, and the achieved
   sparsity. With onloading the device peak must not depend on the number of blocks.

4. ``moe_*``: a transformers Qwen3-MoE (fused 3-D experts) at LLaDA-MoE-7B-A1B widths (hidden 2048,
   16 heads, 64 experts of width 1024, top-8), 2 blocks, on the CPU, onloaded block by block
   (``device="cuda:0"``) with sink-aware Wanda and with SparseGPT (L = 2048): device peak, seconds
   per block, and the fused experts' sparsity *read back from the model* (0.5 unless a write went
   astray, as the stale expert views of issue 19 did).

``--small`` shrinks every size so that the script can be checked on a CPU (no numbers to report); on
a CPU the MoE case runs under the moving device (``prune.engine.onload.moving_device``), so that its onloads
copy and poison as a real move would.
Last line JSON. Usage: ``python benchmarks/gpu_check.py [--small]``.
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

VOCAB, MASK = 1024, 1023


def build(widths: dict, layers: int, device: str, attn: str = "sdpa") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        num_hidden_layers=layers,
        max_position_embeddings=8192,
        is_causal=False,
        mask_token_id=MASK,
        attn_implementation=attn,
        **widths,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def exactness(device: str, small: bool, tmp: Path) -> dict:
    import attnprobe

    widths = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512)
    model = build(widths, 4, device)
    ids = torch.randint(0, MASK, (2, 64 if small else 512), device=device)
    with attnprobe.record(model, tmp / "exact", linear_stats=False) as store:
        model(input_ids=ids)
    recorded = store.attention_mass(0).float().sum(dim=(0, 2))  # (batch, keys)
    model.set_attn_implementation("eager")
    probs = torch.stack(model(input_ids=ids, output_attentions=True).attentions).float()
    eager = probs.sum(dim=(0, 2, 3)).cpu()  # layers, heads, queries -> (batch, keys)
    error = ((recorded - eager).abs().max() / eager.mean()).item()
    return {"mass_max_rel_error_bf16": error, "exactness_length": ids.shape[1]}


@torch.no_grad()
def overhead(device: str, widths: dict, layers: int, length: int, tmp: Path, pairs: int) -> dict:
    import attnprobe

    model = build(widths, layers, device)
    ids = torch.randint(0, MASK, (1, length), device=device)
    plain, recorded = [], []
    model(input_ids=ids)  # warm-up
    with attnprobe.record(model, tmp / "warm", linear_stats=False):
        model(input_ids=ids)
    for i in range(pairs):
        sync(device)
        start = time.perf_counter()
        model(input_ids=ids)
        sync(device)
        plain.append(time.perf_counter() - start)
        with attnprobe.record(model, tmp / f"r{i}", linear_stats=False):
            sync(device)
            start = time.perf_counter()
            model(input_ids=ids)
            sync(device)
            recorded.append(time.perf_counter() - start)
    del model
    return {
        "time_ratio": statistics.median(recorded) / statistics.median(plain),
        "time_length": length,
        "plain_forward_seconds": statistics.median(plain),
    }


def blockwise(device: str, widths: dict, layers: int, length: int, tmp: Path) -> dict:
    import attnprobe
    import prune

    model = build(widths, layers, device)  # record on the device (fits here), then prune from the CPU
    ids = torch.randint(0, MASK, (2, length), generator=torch.Generator().manual_seed(0))
    with attnprobe.record(model, tmp / "calib", mask_token_id=MASK, linear_stats=False) as store:
        attnprobe.calibrate(
            model, ids.to(device), mask_token_id=MASK, steps=4, sample_interval=2, progress=False
        )
    model.to("cpu")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    start = time.perf_counter()
    result = prune.apply(
        model, store, 0.5, method="sparsegpt", sink_aware=True, sequential=True, device=device, progress=False
    )
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else 0
    on_device = {p.device.type for p in model.parameters()}
    return {
        "blockwise_device_peak_gib": peak / 2**30,
        "blockwise_block_seconds": seconds / layers,
        "blockwise_sparsity": float(result.report["sparsity"].mean()),
        "blockwise_length": length,
        "blockwise_blocks": layers,
        "model_left_on": sorted(on_device),
    }


def build_moe(widths: dict, layers: int, device: str) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        num_hidden_layers=layers,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=8192,
        is_causal=False,
        mask_token_id=MASK,
        attn_implementation="sdpa",
        **widths,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def moe_blockwise(device: str, widths: dict, layers: int, length: int, tmp: Path) -> dict:
    import attnprobe
    import prune
    from prune.engine.onload import moving_device

    model = build_moe(widths, layers, device)
    ids = torch.randint(0, MASK, (1, length), generator=torch.Generator().manual_seed(0))
    with attnprobe.record(model, tmp / "moe", mask_token_id=MASK, linear_stats=False) as store:
        attnprobe.calibrate(
            model, ids.to(device), mask_token_id=MASK, steps=4, sample_interval=2, progress=False
        )
    model.to("cpu")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    out: dict = {"moe_length": length, "moe_blocks": layers, "moe_experts": widths["num_experts"]}
    for method in ("wanda", "sparsegpt"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(dense[name])
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
        start = time.perf_counter()
        with moving_device(device == "cpu"):  # on a CPU: copy and poison as a real move would
            prune.apply(
                model,
                store,
                0.5,
                method=method,
                sink_aware=True,
                sequential=True,
                device=device,
                progress=False,
            )
        sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else 0
        experts = [p for n, p in model.named_parameters() if ".experts." in n]
        zeros = sum(int((p == 0).sum()) for p in experts) / sum(p.numel() for p in experts)
        out.update(
            {
                f"moe_{method}_device_peak_gib": peak / 2**30,
                f"moe_{method}_block_seconds": seconds / layers,
                f"moe_{method}_expert_sparsity": zeros,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes; runs on a CPU")
    args = parser.parse_args(argv)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.small:
        print("no CUDA device: run with --small to check the script on a CPU", file=sys.stderr)
        return 2
    if args.small:
        widths = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, intermediate_size=384)
        layers, length, pairs = 2, 128, 2
        moe = dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
        )
        moe_length = 64
    else:
        widths = dict(
            hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=12288
        )
        layers, length, pairs = 8, 4096, 5
        moe = dict(
            hidden_size=2048,
            num_attention_heads=16,
            num_key_value_heads=16,
            head_dim=128,
            intermediate_size=8192,
            moe_intermediate_size=1024,
            num_experts=64,
            num_experts_per_tok=8,
        )
        moe_length = 2048
    result = {
        "device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu",
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for part in (
            lambda: exactness(device, args.small, Path(tmp)),
            lambda: overhead(device, widths, layers, length, Path(tmp), pairs),
            lambda: blockwise(device, widths, layers, length, Path(tmp)),
            lambda: moe_blockwise(device, moe, 2, moe_length, Path(tmp)),
        ):
            result.update(part())
            print(json.dumps(result), flush=True)  # partial results survive a timeout
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
