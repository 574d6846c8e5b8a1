"""Data-parallel calibration + one-shot pruning: wall time with 1 rank vs 2 ranks on the same work.

Each run spawns its ranks (gloo, CPU, one thread per rank, file:// rendezvous), builds the same
model, and times from a barrier after start-up to the end: ``attnprobe.calibrate`` of the same
windows into a (sharded) store with Hessians, then ``prune.apply`` one-shot with Wanda and with
SparseGPT. Process start-up and imports are not timed. The masks of the two runs are compared.

Prints progress lines, then one JSON object as its last line: ``seconds_1``, ``seconds_2``
(median over ``--repeats``), ``speedup`` = seconds_1 / seconds_2, the calibration and apply parts
of each, ``cpu_speedup`` (CPU seconds of one rank over those of the busiest of two: the wall-time
speedup two otherwise idle cores would give) and ``mask_agreement`` (per method, the fraction
of equal mask entries, 1 vs 2 ranks).

Usage: ``python benchmarks/bench_distributed.py [--quick] [--sequential]`` (``--sequential``: apply
block-wise, each rank running its share of the steps, block statistics all-reduced). The speedup is
bounded by the cores that are free: on a 2-core machine shared with other work it is far from 2.
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
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_record import build_model  # noqa: E402

MASK = 1023


def _worker(rank: int, world: int, tmp: str, shape: dict) -> None:
    import attnprobe
    import prune

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{Path(tmp) / 'rendezvous'}", rank=rank, world_size=world
    )
    model = build_model(layers=shape["layers"], hidden=shape["hidden"], heads=4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MASK, (shape["windows"], shape["tokens"]), generator=generator)
    torch.distributed.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    with attnprobe.record(model, Path(tmp) / "store", hessians=True) as store:
        attnprobe.calibrate(model, ids, mask_token_id=MASK, steps=4, sample_interval=2, progress=False)
    calibrated = time.perf_counter()
    masks = {}
    for method in ("wanda", "sparsegpt"):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        result = prune.apply(model, store, 0.5, method=method, sequential=shape["sequential"], progress=False)
        masks[method] = result.masks
        model.load_state_dict(state)
    cpu = time.process_time() - cpu_start  # this rank's own work (and waiting spins), whatever the load
    torch.distributed.barrier()
    end = time.perf_counter()
    cpus = attnprobe.distributed.all_gather_object(cpu)
    if rank == 0:
        out = {"calibrate": calibrated - start, "apply": end - calibrated, "cpu": max(cpus), "masks": masks}
        torch.save(out, Path(tmp) / "out.pt")
    torch.distributed.destroy_process_group()


def run(world: int, shape: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, tmp, shape), nprocs=world, join=True)
        return torch.load(Path(tmp) / "out.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sequential", action="store_true", help="block-wise apply: steps split, statistics all-reduced"
    )
    args = parser.parse_args()
    shape = {"layers": 4, "hidden": 256, "windows": 8, "tokens": 128}
    repeats = args.repeats
    if args.quick:
        shape, repeats = {"layers": 2, "hidden": 128, "windows": 4, "tokens": 64}, 1
    shape["sequential"] = args.sequential
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for i in range(repeats):
        for world in (1, 2):  # alternate, so that load changes on the machine hit both alike
            out = run(world, shape)
            runs[world].append(out)
            print(
                f"repeat {i} world {world}: calibrate {out['calibrate']:.2f}s apply {out['apply']:.2f}s "
                f"cpu of the busiest rank {out['cpu']:.2f}s"
            )
    total = {w: statistics.median(r["calibrate"] + r["apply"] for r in runs[w]) for w in runs}
    keys = ("calibrate", "apply", "cpu")
    part = {w: {k: statistics.median(r[k] for r in runs[w]) for k in keys} for w in runs}
    agreement = {}
    for method, masks in runs[1][0]["masks"].items():
        other = runs[2][0]["masks"][method]
        agree = sum(int((mask == other[name]).sum()) for name, mask in masks.items())
        agreement[method] = agree / sum(mask.numel() for mask in masks.values())
    result = {
        "shape": shape,
        "repeats": repeats,
        "seconds_1": round(total[1], 3),
        "seconds_2": round(total[2], 3),
        "speedup": round(total[1] / total[2], 3),
        "calibrate_speedup": round(part[1]["calibrate"] / part[2]["calibrate"], 3),
        "apply_speedup": round(part[1]["apply"] / part[2]["apply"], 3),
        # CPU seconds of the busiest rank: the speedup two free cores would give, load aside.
        "cpu_seconds_1": round(part[1]["cpu"], 3),
        "cpu_seconds_2_busiest_rank": round(part[2]["cpu"], 3),
        "cpu_speedup": round(part[1]["cpu"] / part[2]["cpu"], 3),
        "mask_agreement": agreement,
        "cpu_count": torch.multiprocessing.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
