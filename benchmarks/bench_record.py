"""Cost of attnprobe.record(): time against a plain forward, memory against one L×L matrix.

Prints progress lines, then one JSON object as its last line:

- ``time_ratio``: median seconds of a recorded forward over a plain one (attention mass only,
  ``linear_stats=False``, as when recording a generation), alternating plain and recorded runs in one
  process, on a bidirectional Llama (hidden 512, 8 layers, 8 heads, L = 512, batch 4). Measured in
  ``--rounds`` rounds; ``time_ratio_rounds`` lists each round's ratio (the spread), ``time_ratio`` is
  their median.
- ``time_ratio_default``: the same for ``record()``'s defaults (one-pass linear-input statistics on),
  with ``time_ratio_default_rounds``.
- ``memory_ratio``: peak extra memory of recording (statistics off) at L = 4096 over the size of one
  (batch, heads, L, L) float32 matrix. Each measurement runs in a fresh subprocess; on CUDA the
  peak is ``torch.cuda.max_memory_allocated``, on CPU the peak resident set size (``ru_maxrss``), and
  the extra is recorded − plain.
- ``stats_buffer_bytes_one_pass``: the largest buffer of held linear inputs in one step at L = 4096
  (it grows with L × hidden × layers), and ``stats_extra_bytes_two_pass``: peak extra memory of
  two-pass statistics at the same size.

Usage: ``python benchmarks/bench_record.py [--quick] [--rounds N] [--profile]``; ``--profile`` prints
where one recorded forward spends its time (cProfile, top functions by own time) and exits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(layers: int = 8, hidden: int = 512, heads: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        is_causal=False,
        attn_implementation="sdpa",
        max_position_embeddings=8192,
    )
    return LlamaForCausalLM(config).eval()


def time_ratio(model, batch: int, length: int, repeats: int, **record_options) -> float:
    import attnprobe

    ids = torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(0))
    plain, recorded = [], []
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        model(input_ids=ids)  # warm-up
        with attnprobe.record(model, Path(tmp) / "warm", **record_options):
            model(input_ids=ids)
        for i in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            plain.append(time.perf_counter() - start)
            with attnprobe.record(model, Path(tmp) / f"r{i}", **record_options):
                start = time.perf_counter()
                model(input_ids=ids)
                recorded.append(time.perf_counter() - start)
    return statistics.median(recorded) / statistics.median(plain)


def profile(model, batch: int = 4, length: int = 512, **record_options) -> None:
    """Print the functions one recorded forward spends most time in (after a warm-up)."""
    import cProfile
    import pstats

    import attnprobe

    ids = torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for name in ("warm", "profiled"):
            with attnprobe.record(model, Path(tmp) / name, **record_options):
                profiler = cProfile.Profile()
                profiler.enable()
                model(input_ids=ids)
                profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def _peak_child(mode: str, batch: int, length: int) -> None:
    """Run one forward in this (fresh) process and print its peak memory and buffer size."""
    import resource

    import attnprobe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model().to(device)
    ids = torch.randint(0, 1024, (batch, length), device=device)
    buffer = 0
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        model(input_ids=ids[:, :16])  # load kernels before the baseline is taken
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if mode == "plain":
            model(input_ids=ids)
        else:
            options = {"linear_stats": mode != "mass", "two_pass": mode == "two-pass"}
            with attnprobe.record(model, Path(tmp) / "s", **options) as rec:
                model(input_ids=ids)
            buffer = rec.peak_buffer_bytes
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "buffer": buffer}))


def peak(mode: str, batch: int, length: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--batch", str(batch), "--length", str(length)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and L = 1024 for memory")
    parser.add_argument("--child", choices=["plain", "mass", "one-pass", "two-pass"], help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (the spread is reported)")
    parser.add_argument("--profile", action="store_true", help="profile one recorded forward and exit")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    if args.child:
        _peak_child(args.child, args.batch, args.length)
        return
    torch.set_num_threads(torch.get_num_threads())
    repeats = 3 if args.quick else 7
    model = build_model()
    if args.profile:
        profile(model, linear_stats=False)
        return
    result = {"device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}
    for key, options in (("time_ratio", {"linear_stats": False}), ("time_ratio_default", {})):
        rounds = [time_ratio(model, 4, 512, repeats, **options) for _ in range(max(1, args.rounds))]
        result[key], result[f"{key}_rounds"] = statistics.median(rounds), [round(r, 3) for r in rounds]
        print(f"{key}: {result[key]:.3f} (rounds {result[f'{key}_rounds']})", flush=True)
    length = 1024 if args.quick else args.length
    batch, heads = args.batch, model.config.num_attention_heads
    matrix = batch * heads * length * length * 4
    peaks = {mode: peak(mode, batch, length) for mode in ("plain", "mass", "one-pass", "two-pass")}
    base = peaks["plain"]["peak"]
    result.update(
        memory_length=length,
        memory_batch=batch,
        full_matrix_bytes=matrix,
        memory_ratio=(peaks["mass"]["peak"] - base) / matrix,
        stats_buffer_bytes_one_pass=peaks["one-pass"]["buffer"],
        stats_extra_bytes_one_pass=peaks["one-pass"]["peak"] - base,
        stats_extra_bytes_two_pass=peaks["two-pass"]["peak"] - base,
    )
    print(f"memory_ratio at L={length}: {result['memory_ratio']:.4f}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
