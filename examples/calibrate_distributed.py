"""Calibrate and prune the shipped tiny DLM data-parallel: one process per rank, launched by torchrun.

    torchrun --nproc_per_node 2 examples/calibrate_distributed.py --out out/ddp

Every rank loads the same model and the same calibration windows. ``attnprobe.calibrate`` runs each
rank's share of the windows into one sharded store under ``--out`` (one shard per rank), and
``prune.apply`` splits the per-linear work across the ranks (one-shot), or the calibration steps with
block statistics all-reduced (``--sequential``); every rank ends with the same pruned model. Rank 0
saves the masks and prints a summary. Without torchrun (plain ``python``) it runs as one process.

Uses gloo on the CPU and NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import attnprobe
import prune

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/ddp"), help="store and masks go here")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-dlm")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows (all ranks together)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--method", choices=prune.METHODS, default="wanda")
    parser.add_argument("--sink-aware", action="store_true")
    parser.add_argument("--sequential", action="store_true", help="block-wise sequential pruning")
    args = parser.parse_args(argv)

    launched = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK
    device = torch.device("cpu")
    if launched:
        cuda = torch.cuda.is_available()
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = attnprobe.distributed.rank()

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval().to(device)
    ids = load_file(str(ROOT / "data" / "calibration.safetensors"))["input_ids"][: args.windows]
    mask_token_id = model.config.mask_token_id

    # One sharded store: each rank records its share of the windows (hessians for one-shot SparseGPT).
    hessians = args.method == "sparsegpt" and not args.sequential
    with attnprobe.record(model, args.out / "store", overwrite=True, hessians=hessians) as store:
        attnprobe.calibrate(
            model, ids.to(device), mask_token_id=mask_token_id, steps=10, sample_interval=5, progress=False
        )
    result = prune.apply(
        model,
        store,
        args.sparsity,
        method=args.method,
        sink_aware=args.sink_aware,
        sequential=args.sequential,
        progress=False,
    )
    if rank == 0:
        prune.save_masks(
            result.masks,
            args.out / "masks.safetensors",
            settings=result.settings,
            model=model,
            weights=result.weights or None,
        )
        summary = {
            "world_size": attnprobe.distributed.world_size(),
            "store": str(store.path),
            "steps": store.num_steps,
            "shards": [s["num_steps"] for s in getattr(store.store, "shards", [])],
            "linears": len(result.masks),
            "sparsity": round(float(result.report["sparsity"].mean()), 4),
        }
        print(json.dumps(summary))
    if launched:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
