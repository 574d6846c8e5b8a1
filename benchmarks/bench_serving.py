"""Speed of the pruning that serves faster: one denoising step of a smaller dense model over the dense one.

Prints progress lines, then one JSON object as its last line:

- ``latency_ratio_blocks_0.25``: ``prune.apply(..., 0.25, pattern="blocks")`` (2 of 8 blocks, i.e. one
  block in four) on the bench model of ``bench_structured.py`` (bidirectional Llama, hidden 512, 8
  layers, 8 heads, intermediate 2048, vocab 1024; batch 4, L = 512, a half-masked canvas);
- ``latency_ratio_structured_0.3`` / ``..._0.3_compensated``: ``pattern="structured"``, ratio 0.3,
  ``score="flap"`` without / with ``bias_compensation=True`` (the compensated model carries output biases);
- ``latency_ratio_experts_0.5``: ``pattern="experts"`` at 0.5 (REAP) on the Qwen3-MoE bench model of
  ``bench_moe.py`` (hidden 256, 4 layers, 16 experts of width 256, top-4; batch 4, L = 256). Every
  token still runs top-4 experts, so the compute per token is unchanged; what shrinks is the expert
  weights held and the number of experts the layer loops over.
- ``params_ratio_<variant>``: parameters over the dense model's; ``dense_ms`` / ``moe_dense_ms``.

Each ratio is the median step time of the pruned model over the dense one's, timed in alternating runs in
one process after a warm-up. Weights are random: only speed and size mean anything here.

Usage: ``python benchmarks/bench_serving.py [--quick] [--device cuda] [--threads N] [--repeats N]``
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

from benchmarks import bench_moe  # noqa: E402
from benchmarks.bench_record import build_model  # noqa: E402
from benchmarks.bench_structured import calibrated_store, step_seconds  # noqa: E402

MASK_TOKEN_ID = 1023


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _time(models: dict, batch: int, length: int, repeats: int, device: str, label: str) -> dict[str, float]:
    """Median step seconds of each model, timed in alternation (dense first) after a warm-up."""
    ids = torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
    ids[:, ::2] = MASK_TOKEN_ID  # a half-masked canvas, as mid-way through sampling
    ids = ids.to(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.to(device)
            step_seconds(model, ids)
        for i in range(repeats):
            for name, model in models.items():
                times[name].append(step_seconds(model, ids))
            print(
                f"{label} run {i}: " + ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()),
                flush=True,
            )
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    import prune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 9, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 9)
    batch = 1 if args.quick else 4
    result: dict = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "repeats": repeats,
    }
    dense = build_model()
    moe = bench_moe.build_model()
    variants = {
        "blocks_0.25": dict(ratio=0.25, pattern="blocks"),
        "structured_0.3": dict(ratio=0.3, pattern="structured", score="flap"),
        "structured_0.3_compensated": dict(
            ratio=0.3, pattern="structured", score="flap", bias_compensation=True
        ),
    }
    models = {"dense": dense}
    with tempfile.TemporaryDirectory() as tmp:
        store = calibrated_store(dense, Path(tmp) / "dense", 128)
        for name, options in variants.items():
            pruned = copy.deepcopy(dense)
            start = time.perf_counter()
            prune.apply(pruned, store, options.pop("ratio"), progress=False, **options)
            print(f"{name}: pruned in {time.perf_counter() - start:.1f}s", flush=True)
            models[name] = pruned
        moe_store = calibrated_store(moe, Path(tmp) / "moe", 64)
        experts = copy.deepcopy(moe)
        prune.apply(experts, moe_store, 0.5, pattern="experts")
    for name in variants:
        result[f"params_ratio_{name}"] = _params(models[name]) / _params(dense)
    result["params_ratio_experts_0.5"] = _params(experts) / _params(moe)
    medians = _time(models, batch, 512, repeats, args.device, "llama")
    result["dense_ms"] = medians["dense"] * 1e3
    for name in variants:
        result[f"latency_ratio_{name}"] = medians[name] / medians["dense"]
    moe_medians = _time({"dense": moe, "experts_0.5": experts}, batch, 256, repeats, args.device, "moe")
    result["moe_dense_ms"] = moe_medians["dense"] * 1e3
    result["latency_ratio_experts_0.5"] = moe_medians["experts_0.5"] / moe_medians["dense"]
    print(", ".join(f"{k} x{v:.3f}" for k, v in result.items() if k.startswith("latency_ratio")), flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
