"""Scale of block-wise sequential pruning: linear in depth, one block's memory, 8B widths on one GPU.

- ``depth_time_ratio_<method>``: CPU seconds (``time.process_time`` of a single-threaded child, robust
  to other jobs on a shared machine; the wall-clock ratio is reported too) of
  ``prune.apply(..., sequential=True, sink_aware=True)`` on a narrow bidirectional Llama (hidden 256,
  8 heads, MLP 688) at depth 16 over depth 4, the same store size (calibration windows × noise
  levels). Linear cost gives about 4; the old replay gave ~10.
- ``depth_memory_ratio_<method>``: peak extra memory of the same runs, 16 over 4. Each run is a fresh
  subprocess; extra = peak RSS (``ru_maxrss``) − RSS before ``apply`` − what ``apply`` keeps by design
  until it returns: the result's masks and SparseGPT weights and the rollback copy of the original
  weights (with a GPU and ``offload_device="cpu"`` all three live on the host, not the device). The
  raw figure is reported too (``..._raw``).
- ``block_seconds_8b`` / ``block_extra_gib_8b``: per-block seconds and peak extra memory of block-wise
  sink-aware SparseGPT at LLaDA-8B block widths (hidden 4096, 32 heads, MLP 12288, bf16), 2 blocks,
  batch 1, L = 1024 (and L = 256 for the slope in L).
- ``projected_device_peak_gib``: the device peak for the whole 32-block LLaDA-8B at L = 4096 with
  onloading (docs/BENCHMARKS.md explains the formula).
- ``projected_host_extra_gib`` / ``projected_host_extra_gib_ram``: the host memory of the cached block
  inputs for LLaDA-8B at the paper's recipe (128 windows × 10 noise levels × L = 4096, hidden 4096,
  bf16), beyond the model's weights, with ``offload_device="disk"`` and in memory. Measured on a slice:
  the cache (:mod:`prune.engine.block_cache`) driven in fresh subprocesses with the engine's access pattern
  (capture every step, then per block a statistics pass reading every step and a pass replacing every
  step's hidden states) at LLaDA-8B's step size, for a few step counts and batch sizes; projected
  linearly in steps (memory) and in step size (disk). ``projected_host_retained_gib``: what ``apply``
  keeps by design besides (masks, rollback copy; SparseGPT's weights), not in those figures.

- ``moe_block_device_peak_gib``: ``{model: GiB}``, the device peak of one MoE block with block-wise
  SparseGPT at the widths of LLaDA-MoE-7B-A1B and LLaDA2.0-mini, projected from a slice of experts
  measured on the CPU (``benchmarks/bench_moe_block.py`` explains the method).

Usage: ``python benchmarks/bench_scale.py [--quick] [--skip-8b] [--skip-moe] [--only-host]``; last line JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prune.engine.memory_plan import project_peaks

NARROW = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=688)
WIDE = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=12288)
VOCAB = 512
MASK = VOCAB - 1
# LLaDA-8B: 32 blocks, vocabulary 126,464, untied input embedding and output head (bf16).
LLADA_BLOCKS, LLADA_VOCAB, GIB = 32, 126_464, 2**30


def build(depth: int, widths: dict, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        num_hidden_layers=depth,
        max_position_embeddings=4096,
        is_causal=False,
        mask_token_id=MASK,
        attn_implementation="sdpa",
        **widths,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def record(model: torch.nn.Module, path: Path, windows: int, length: int, batch: int) -> None:
    """Attention-only calibration store: input ids and every layer's mass (all block-wise pruning needs)."""
    import attnprobe

    ids = torch.randint(0, MASK, (windows, length), generator=torch.Generator().manual_seed(0))
    with attnprobe.record(model, path, mask_token_id=MASK, linear_stats=False):
        attnprobe.calibrate(
            model, ids, mask_token_id=MASK, steps=4, sample_interval=2, batch_size=batch, progress=False
        )


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(depth: int, wide: bool, method: str, store: str) -> None:
    """Apply once in this fresh process; print seconds and memory figures as JSON."""
    import attnprobe
    import prune

    model = build(depth, WIDE if wide else NARROW, torch.bfloat16 if wide else torch.float32)
    store = attnprobe.open(store)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    before = _rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = prune.apply(model, store, 0.5, method=method, sink_aware=True, sequential=True, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    retained = sum(m.numel() for m in result.masks.values())  # bool masks
    retained += sum(w.numel() * w.element_size() for w in result.weights.values())
    retained += sum(m.weight.numel() * m.weight.element_size() for m in linears)  # rollback copy
    print(
        json.dumps({"seconds": seconds, "cpu": cpu, "raw": peak - before, "extra": peak - before - retained})
    )


def run_child(depth: int, wide: bool, method: str, store: Path) -> dict:
    args = [sys.executable, __file__, "--child", str(depth), str(int(wide)), method, str(store)]
    # Depth scaling runs single-threaded: on a shared machine, idle OpenMP threads spin and bill CPU
    # time that has nothing to do with the work. The 8B-width runs use every thread.
    threads = str(torch.get_num_threads()) if wide else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def depth_scaling(tmp: Path, windows: int, repeats: int) -> dict:
    stores = {}
    for depth in (4, 16):
        stores[depth] = tmp / f"narrow{depth}"
        record(build(depth, NARROW, torch.float32), stores[depth], windows, 128, 4)
    out = {}
    for method in ("wanda", "sparsegpt"):
        runs: dict[int, list[dict]] = {4: [], 16: []}
        for _ in range(repeats):  # alternate, so that load on the shared machine hits both depths
            for depth in (4, 16):
                runs[depth].append(run_child(depth, False, method, stores[depth]))
        best = {d: min(r, key=lambda x: x["cpu"]) for d, r in runs.items()}
        for depth in (4, 16):
            print(f"{method} depth {depth}: {best[depth]}", flush=True)
        # CPU seconds of the process: other jobs on a shared machine stretch wall time, not these
        out[f"depth_time_ratio_{method}"] = best[16]["cpu"] / best[4]["cpu"]
        out[f"depth_wall_ratio_{method}"] = best[16]["seconds"] / best[4]["seconds"]
        out[f"depth_memory_ratio_{method}"] = max(r["extra"] for r in runs[16]) / max(
            r["extra"] for r in runs[4]
        )
        out[f"depth_memory_ratio_{method}_raw"] = max(r["raw"] for r in runs[16]) / max(
            r["raw"] for r in runs[4]
        )
        out[f"seconds_depth4_{method}"] = best[4]["seconds"]
        out[f"seconds_depth16_{method}"] = best[16]["seconds"]
    out["depth_time_ratio"] = max(out["depth_time_ratio_wanda"], out["depth_time_ratio_sparsegpt"])
    out["depth_memory_ratio"] = max(out["depth_memory_ratio_wanda"], out["depth_memory_ratio_sparsegpt"])
    return out


def eight_b(tmp: Path) -> dict:
    """Per-block cost at LLaDA-8B widths (2 blocks, bf16), at L = 1024 and L = 256; the projection."""
    measured = {}
    for length in (256, 1024):
        store = tmp / f"wide{length}"
        record(build(2, WIDE, torch.bfloat16), store, 1, length, 1)  # 1 window × 2 noise levels
        measured[length] = run_child(2, True, "sparsegpt", store)
        print(f"8B widths, L={length}: {measured[length]}", flush=True)
    hidden, mlp = WIDE["hidden_size"], WIDE["intermediate_size"]
    block_bytes = (4 * hidden * hidden + 3 * hidden * mlp) * 2  # bf16 weights of one block
    # The extra peak of one block grows with the tokens of one forward (activations, float32 chunks);
    # extrapolate linearly from the two lengths (a CPU upper bound: CPU SDPA may build L x L scores).
    slope = max(0.0, (measured[1024]["extra"] - measured[256]["extra"]) / (1024 - 256))
    block_extra_4096 = measured[1024]["extra"] + slope * (4096 - 1024)
    # The capture puts everything outside the blocks on the device: embedding + head (+ one output).
    # The projection is the library's (prune.engine.memory_plan, what `attnprobe prune --dry-run` prints),
    # here fed the measured extra instead of its estimate from the shapes.
    peaks = project_peaks(block_bytes, block_extra_4096, 2 * LLADA_VOCAB * hidden * 2, 4096 * hidden * 2)
    block_phase, capture_phase = peaks["block_phase"], peaks["capture_phase"]
    return {
        "block_seconds_8b": measured[1024]["seconds"] / 2,
        "block_extra_gib_8b": measured[1024]["extra"] / GIB,
        "block_extra_raw_gib_8b": measured[1024]["raw"] / GIB,
        "block_extra_gib_8b_L256": measured[256]["extra"] / GIB,
        "block_weights_gib_8b": block_bytes / GIB,
        "projected_block_phase_gib": block_phase / GIB,
        "projected_capture_phase_gib": capture_phase / GIB,
        "projected_device_peak_gib": peaks["device_peak"] / GIB,
        "projected_blocks": LLADA_BLOCKS,
        "projected_length": 4096,
    }


# LLaDA-8B at the paper's recipe: 128 windows x 10 noise levels, L = 4096, hidden 4096, bf16; the
# recipe's steps hold RECIPE_BATCH windows each (examples/prune_hub_model.py's --batch-size default).
RECIPE_SEQUENCES, RECIPE_LENGTH, RECIPE_BATCH, HEAD_DIM = 128 * 10, 4096, 8, 128


def host_child(mode: str, steps: int, batch: int) -> None:
    """Drive one block-input cache as the engine does at LLaDA-8B's step size; print memory as JSON.

    The blocks' compute is left out: on a GPU it happens on the device, and what the host sees of a
    block's output is the copy that replaces the cached step, allocated here as ``hidden + 1``.
    """
    from prune.engine.block_cache import open_cache
    from prune.engine.blockwise import _BlockInput

    hidden_size = WIDE["hidden_size"]
    gen = torch.Generator().manual_seed(0)
    angles = torch.arange(RECIPE_LENGTH, dtype=torch.float32)[:, None] * torch.ones(HEAD_DIM)
    before = _rss()
    start = time.perf_counter()
    with open_cache(mode) as cache:
        for _ in range(steps):  # capture: every forward makes its own (equal) rotary tables
            shape = (batch, RECIPE_LENGTH, hidden_size)
            hidden = torch.empty(shape, dtype=torch.bfloat16).normal_(generator=gen)
            rotary = (angles.cos()[None], angles.sin()[None])  # (1, L, head_dim) float32
            kwargs = {"position_embeddings": rotary, "attention_mask": None}
            cache.add(_BlockInput(hidden, (None,), kwargs, 0))
            del hidden, rotary
        for _ in range(2):  # two blocks
            for entry in cache:  # statistics pass: the block reads every step
                float(entry.hidden[0, 0, 0])
            for number, entry in enumerate(cache):  # the pruned block's outputs replace its inputs
                cache.replace_hidden(number, entry.hidden + 1)
                del entry
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_bytes = batch * RECIPE_LENGTH * hidden_size * 2
    seconds = time.perf_counter() - start
    print(json.dumps({"extra": peak - before, "step_bytes": step_bytes, "seconds": seconds}))


def run_host_child(mode: str, steps: int, batch: int) -> dict:
    args = [sys.executable, __file__, "--host-child", mode, str(steps), str(batch)]
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"host cache {mode}, {steps} steps of batch {batch}: {result}", flush=True)
    return result


def host_memory(quick: bool) -> dict:
    """Measured cache memory on slices, projected to LLaDA-8B at the paper's recipe."""
    few, many = (4, 12) if quick else (8, 32)
    ram = {n: run_host_child("cpu", n, 1) for n in (few, many)}
    disk = {n: run_host_child("disk", n, 1) for n in (few, many)}
    disk_wide = run_host_child("disk", few, 4)
    step1 = ram[few]["step_bytes"]  # one window: 4096 x 4096 x 2 B = 32 MiB
    # In memory: extra = base + per_step x steps; the slope is what one more cached step costs.
    per_step = (ram[many]["extra"] - ram[few]["extra"]) / (many - few)
    base = ram[few]["extra"] - per_step * few
    recipe_steps_batch1 = RECIPE_SEQUENCES  # the cache holds every sequence whatever the batch
    projected_ram = base + per_step * recipe_steps_batch1
    # On disk: extra does not depend on the number of steps (few vs many), only on the step size:
    # fit extra = fixed + k x step_bytes from one-window and four-window steps.
    k = (disk_wide["extra"] - disk[few]["extra"]) / (disk_wide["step_bytes"] - step1)
    fixed = disk[few]["extra"] - k * step1
    recipe_step = RECIPE_BATCH * step1

    # Whatever grew with the steps on disk (bookkeeping, allocator slack) is projected too.
    growth = max(0.0, (disk[many]["extra"] - disk[few]["extra"]) / (many - few))

    def disk_at(step_bytes: float) -> float:
        steps = RECIPE_SEQUENCES * step1 / step_bytes
        return fixed + k * step_bytes + growth * steps

    hidden, mlp = WIDE["hidden_size"], WIDE["intermediate_size"]
    block_weights = LLADA_BLOCKS * (4 * hidden * hidden + 3 * hidden * mlp)  # the linears apply prunes
    return {
        "host_ram_extra_gib": {str(n): r["extra"] / GIB for n, r in ram.items()},
        "host_disk_extra_gib": {str(n): r["extra"] / GIB for n, r in disk.items()},
        "host_disk_extra_gib_batch4": disk_wide["extra"] / GIB,
        "host_ram_bytes_per_step_over_step": per_step / step1,
        "host_disk_growth_mib_per_step": growth / 2**20,
        "host_disk_steps_held": k,
        "projected_host_extra_gib": disk_at(recipe_step) / GIB,
        "projected_host_extra_gib_batch1": disk_at(step1) / GIB,
        "projected_host_extra_gib_ram": projected_ram / GIB,
        "projected_host_recipe": f"{RECIPE_SEQUENCES} sequences x L={RECIPE_LENGTH}, steps of {RECIPE_BATCH}",
        # what apply keeps by design until it returns, in memory in both modes (bool masks 1 B per weight,
        # the bf16 rollback copy; SparseGPT also returns its bf16 weights)
        "projected_host_retained_gib": block_weights * (1 + 2) / GIB,
        "projected_host_retained_gib_sparsegpt": block_weights * (1 + 2 + 2) / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer windows and one repeat")
    parser.add_argument("--skip-8b", action="store_true", help="only the depth scaling (minutes saved)")
    parser.add_argument("--only-host", action="store_true", help="only the host-memory projection")
    parser.add_argument("--skip-moe", action="store_true", help="no MoE block projection (minutes saved)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--host-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.host_child:
        mode, steps, batch = args.host_child
        host_child(mode, int(steps), int(batch))
        return 0
    if args.child:
        depth, wide, method, store = args.child
        child(int(depth), bool(int(wide)), method, store)
        return 0
    result = {"device": "cpu", "threads": torch.get_num_threads(), "depth_threads": 1}
    result.update(host_memory(args.quick))
    if args.only_host:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        windows = 8 if args.quick else 32
        result.update(windows=windows, length=128, noise_levels=2)
        result.update(depth_scaling(Path(tmp), windows, 1 if args.quick else 3))
        if not args.skip_8b:
            result.update(eight_b(Path(tmp)))
    if not args.skip_moe:
        from bench_moe_block import moe_block_device_peak  # a sibling script (benchmarks/ is on sys.path)

        result.update(moe_block_device_peak())
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
