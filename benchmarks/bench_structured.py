"""Speed and size of structured pruning: one denoising step of a pruned model against the dense one.

Prints progress lines, then one JSON object as its last line:

- ``latency_ratio_<r>``: median seconds of one full forward over (batch, L) of the model pruned with
  ``prune.apply(..., pattern="structured")`` at ratio r, over the dense model's median, timed in
  alternating runs (dense, 0.5, 0.3, dense, ...) in one process, on a bidirectional Llama (hidden 512,
  8 layers, 8 heads, intermediate 2048, vocab 1024; L = 512, batch 4). One forward over the whole
  canvas is what a masked-diffusion sampler pays per denoising step.
- ``params_ratio_<r>``: parameter count of the pruned model over the dense one (embeddings and LM head
  included, they are not pruned).
- ``dense_ms``: median dense step latency; ``threads``: ``torch.get_num_threads()``; ``device``.

The calibration store is small (2 sequences of 128 tokens, 4 noising steps, sink-aware statistics): it
only decides *which* heads and channels go, not the speed. Weights are random, so only speed and size
are meaningful here, not quality.

Usage: ``python benchmarks/bench_structured.py [--quick] [--device cuda] [--threads N] [--repeats N]``
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

from benchmarks.bench_record import build_model  # noqa: E402

RATIOS = (0.5, 0.3)
MASK_TOKEN_ID = 1023


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def calibrated_store(model, directory: Path, length: int = 128):
    """A calibration store of two random windows (4 noise levels, sampled every 2)."""
    import attnprobe

    ids = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(1))
    with attnprobe.record(model, directory, mask_token_id=MASK_TOKEN_ID) as store:
        attnprobe.calibrate(
            model, ids, mask_token_id=MASK_TOKEN_ID, steps=4, sample_interval=2, progress=False
        )
    return store


def step_seconds(model, ids: torch.Tensor) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(input_ids=ids)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    import prune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    batch, length = (1 if args.quick else 4), 512
    dense = build_model()  # hidden 512, 8 layers, 8 heads, intermediate 2048, vocab 1024, bidirectional
    models = {"dense": dense}
    result: dict = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "length": length,
    }
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = calibrated_store(dense, Path(tmp) / "calib")
        print(f"calibration store: {store.num_steps} steps in {time.perf_counter() - start:.1f}s", flush=True)
        for ratio in RATIOS:
            pruned = copy.deepcopy(dense)
            start = time.perf_counter()
            out = prune.apply(pruned, store, ratio, pattern="structured", sink_aware=True, progress=False)
            layer0 = pruned.model.layers[0]
            print(
                f"ratio {ratio}: pruned in {time.perf_counter() - start:.1f}s; layer 0 keeps "
                f"{len(out.plan.keep_heads['model.layers.0.self_attn'])} of 8 heads, "
                f"{layer0.mlp.down_proj.in_features} of 2048 MLP channels",
                flush=True,
            )
            models[f"{ratio}"] = pruned
    result["params_dense"] = _params(dense)
    for ratio in RATIOS:
        result[f"params_ratio_{ratio}"] = _params(models[f"{ratio}"]) / result["params_dense"]
    ids = torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
    ids[:, ::2] = MASK_TOKEN_ID  # a half-masked canvas, as mid-way through sampling
    ids = ids.to(args.device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.to(args.device)
            step_seconds(model, ids)  # warm-up
        for i in range(repeats):
            for name, model in models.items():
                times[name].append(step_seconds(model, ids))
            print(f"run {i}: " + ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()), flush=True)
    dense_s = statistics.median(times["dense"])
    result["dense_ms"] = dense_s * 1e3
    for ratio in RATIOS:
        pruned_s = statistics.median(times[f"{ratio}"])
        result[f"latency_ratio_{ratio}"] = pruned_s / dense_s
        result[f"pruned_ms_{ratio}"] = pruned_s * 1e3
    result["repeats"] = repeats
    print(
        f"ratio 0.5: latency x{result['latency_ratio_0.5']:.3f}, params x{result['params_ratio_0.5']:.3f}; "
        f"ratio 0.3: latency x{result['latency_ratio_0.3']:.3f}, params x{result['params_ratio_0.3']:.3f}",
        flush=True,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
