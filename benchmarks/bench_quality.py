"""Cost of mask refinement and of layer allocation.

Prints progress lines, then one JSON object as its last line:

- ``refine_seconds_per_2048``: seconds of :func:`prune.methods.refine.refine_mask` (default bounds: 30
  iterations, 16 candidates per side) on one 2048×2048 layer whose Wanda mask is 60% sparse, with a
  Gram matrix of 8,192 correlated input rows; ``sparsegpt_seconds_per_2048``: SparseGPT on the same
  layer and Hessian, same run; ``refine_over_sparsegpt``: their ratio. ``refine_error_ratio``: the
  layer's relative error after refinement over before (what the time buys).
- ``allocation_overhead``: ``prune.apply`` seconds (one-shot Wanda, 60%, the tiny Llama of the tests
  scaled up) with ``allocation="owl"`` and ``"sensitivity"`` over the same call with ``"uniform"``,
  alternating runs, median of each.

Usage: ``python benchmarks/bench_quality.py [--quick]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def layer(width: int):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(width, width, generator=gen)
    mix = torch.randn(width, width, generator=gen) / width**0.5  # correlated inputs, uneven scales
    x = torch.randn(4 * width, width, generator=gen) @ (torch.eye(width) + mix)
    x = x * torch.linspace(0.1, 3.0, width)
    return weight, x.T @ x


def refine_vs_sparsegpt(width: int, repeats: int) -> dict:
    from prune.methods.layer_error import relative_error
    from prune.methods.masks import select_mask
    from prune.methods.refine import refine_mask
    from prune.methods.sparsegpt import sparsegpt_prune

    weight, gram = layer(width)
    keep = select_mask(weight.abs() * gram.diagonal().sqrt(), "unstructured", 0.6)
    refine_times, gpt_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        _, refined, swaps = refine_mask(weight, weight * keep, keep, gram)
        refine_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        sparsegpt_prune(weight, gram, 0.6)
        gpt_times.append(time.perf_counter() - start)
        print(f"refine {refine_times[-1]:.2f}s ({swaps} swaps), sparsegpt {gpt_times[-1]:.2f}s", flush=True)
    before = relative_error(weight, weight * keep, gram)
    return {
        "refine_seconds_per_2048": min(refine_times),
        "sparsegpt_seconds_per_2048": min(gpt_times),
        "refine_over_sparsegpt": min(refine_times) / min(gpt_times),
        "refine_error_ratio": relative_error(weight, refined, gram) / before,
    }


def allocation_overhead(repeats: int) -> dict:
    import attnprobe
    import prune
    from tests import models

    model = models.llama_bidirectional(hidden_size=256, intermediate_size=512)
    ids = torch.randint(3, 60, (8, 64), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        with attnprobe.record(
            model, Path(tmp) / "s", mask_token_id=models.MASK_TOKEN_ID, hessians=True
        ) as store:
            attnprobe.calibrate(
                model, ids, mask_token_id=models.MASK_TOKEN_ID, steps=8, sample_interval=2, progress=False
            )
        times: dict[str, list[float]] = {"uniform": [], "owl": [], "sensitivity": []}
        prune.apply(copy.deepcopy(model), store, 0.6, progress=False)  # warm-up, not timed
        for _ in range(repeats):
            for allocation in times:
                start = time.perf_counter()
                prune.apply(copy.deepcopy(model), store, 0.6, allocation=allocation, progress=False)
                times[allocation].append(time.perf_counter() - start)
        print({k: [round(t, 2) for t in v] for k, v in times.items()}, flush=True)
    base = statistics.median(times["uniform"])
    return {
        f"allocation_overhead_{k}": statistics.median(v) / base for k, v in times.items() if k != "uniform"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 512-wide layer and fewer repeats")
    args = parser.parse_args()
    result = {"threads": torch.get_num_threads()}
    result.update(refine_vs_sparsegpt(512 if args.quick else 2048, 1 if args.quick else 2))
    result.update(allocation_overhead(1 if args.quick else 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
