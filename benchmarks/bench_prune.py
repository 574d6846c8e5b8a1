"""Cost of sink-aware calibration and of SparseGPT.

Prints progress lines, then one JSON object as its last line:

- ``calibration_time_ratio``: seconds to collect sink-aware Wanda statistics over a calibration
  trajectory with our one-pass recording, over a two-pass implementation (the public Sink-Aware
  Pruning code's approach: one forward per step for the attention mass, a second for the activations,
  here ``record(..., two_pass=True)``), same model, data and steps, alternating runs in one process.
  Both produce the same statistics (checked here).
- ``sparsegpt_seconds_per_2048``: seconds of ``sparsegpt_prune`` on one 2048×2048 layer at 50%.

Usage: ``python benchmarks/bench_prune.py [--quick]``
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_record import build_model  # noqa: E402


def calibrate_seconds(model, ids, two_pass: bool, directory: Path):
    import attnprobe

    start = time.perf_counter()
    with attnprobe.record(model, directory, linear_stats=True, two_pass=two_pass) as store:
        attnprobe.calibrate(
            model, ids, mask_token_id=1023, steps=10, sample_interval=2, batch_size=4, progress=False
        )
    return time.perf_counter() - start, store


def sparsegpt_seconds(width: int = 2048, repeats: int = 2) -> float:
    from prune.methods.sparsegpt import sparsegpt_prune

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(width, width, generator=gen)
    x = torch.randn(4 * width, width, generator=gen)
    hessian = 2 / x.shape[0] * x.T @ x
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sparsegpt_prune(weight, hessian, 0.5)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    model = build_model()
    ids = torch.randint(0, 1000, (4, 512), generator=torch.Generator().manual_seed(0))
    one, two = [], []
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            seconds, store_one = calibrate_seconds(model, ids, False, Path(tmp) / f"one{i}")
            one.append(seconds)
            seconds, store_two = calibrate_seconds(model, ids, True, Path(tmp) / f"two{i}")
            two.append(seconds)
            print(f"run {i}: one-pass {one[-1]:.2f}s, two-pass {two[-1]:.2f}s", flush=True)
        a, b = store_one.linear_stats(0), store_two.linear_stats(0)
        same = all(torch.allclose(a[g]["wsumsq"], b[g]["wsumsq"], rtol=1e-5) for g in a)
        steps = store_one.num_steps
    result = {
        "calibration_time_ratio": statistics.median(one) / statistics.median(two),
        "one_pass_seconds": statistics.median(one),
        "two_pass_seconds": statistics.median(two),
        "calibration_steps": steps,
        "statistics_identical": same,
        "threads": torch.get_num_threads(),
    }
    print(f"calibration_time_ratio: {result['calibration_time_ratio']:.3f}", flush=True)
    result["sparsegpt_seconds_per_2048"] = sparsegpt_seconds(repeats=1 if args.quick else 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
