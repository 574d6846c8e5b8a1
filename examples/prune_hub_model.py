"""Prune a diffusion LM from the Hugging Face hub (or a local checkpoint) on one GPU, block by block.

The full recipe for models of any size (LLaDA-8B, Dream-7B, ...) with only one block on the device:

1. load the model on the CPU in bf16 (``trust_remote_code`` for LLaDA and Dream);
2. cut a calibration text file into windows of ``--seq-len`` tokens;
3. record the calibration trajectory (forward noising, ``--steps``/``--sample-interval``) into an
   attention-only store: input ids and every layer's attention mass, which is all that sink weights and
   block-wise pruning need. With ``--device`` the dense model runs block by block
   (``prune.record_blockwise``: each block visits the device once and runs over every step), so the
   recording never needs the whole model there; ``--record streamed`` instead runs ordinary
   whole-model forwards with the blocks streamed through the device (``prune.onload.streamed``, each
   block's weights moved once per forward). Without ``--device`` everything runs on the CPU;
4. prune block-wise and sequentially: ``prune.apply(..., sequential=True, device=...)`` onloads one
   block at a time, measures it on the outputs of the pruned blocks before it, prunes it, moves it back;
5. write the masks, the report, a summary and the pruned checkpoint (``save_pretrained``) to
   ``--output``; ``--eval-windows N`` also scores N held-out windows before and after.

Under ``torchrun`` the same command runs data-parallel
(:func:`attnprobe.distributed.group_from_env` starts the process group): the calibration store is
recorded as one sharded store, each rank its share of the windows (``--record streamed`` with
``--device``, else ``whole``; block-wise recording is not sharded and is refused there), and block-wise
pruning gives each rank a share of the steps with every block's statistics all-reduced. Every rank
ends with the same pruned model; rank 0 alone writes masks, report, summary and checkpoint. A CUDA
``--device`` becomes each rank's ``cuda:LOCAL_RANK``.

Example:
    python examples/prune_hub_model.py GSAI-ML/LLaDA-8B-Instruct --trust-remote-code \\
        --calibration wikitext2_train.txt --method sparsegpt --sink-aware --sparsity 0.5 \\
        --output runs/llada8b-sparsegpt50 --device cuda:0
    torchrun --nproc-per-node 4 examples/prune_hub_model.py GSAI-ML/LLaDA-8B-Instruct ... --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers

import attnprobe
import prune
from attnprobe import distributed
from prune.engine.blockwise import find_blocks
from prune.engine.onload import streamed

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="hub id or local directory")
    parser.add_argument("--calibration", type=Path, required=True, help="UTF-8 text file")
    parser.add_argument("--output", type=Path, required=True, help="directory for masks, report, model")
    parser.add_argument("--method", choices=prune.METHODS, default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured", help='"unstructured" or "N:M", e.g. "2:4"')
    parser.add_argument("--sink-aware", action="store_true", help="down-weight sink tokens (2602.17664)")
    parser.add_argument("--device", default=None, help="e.g. cuda:0; default: everything on the CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--trust-remote-code", action="store_true", help="needed for LLaDA and Dream")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--windows", type=int, default=128, help="calibration windows")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sample-interval", type=int, default=5)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="windows per recorded forward (spreads block transfers)"
    )
    parser.add_argument("--mask-token-id", type=int, default=None, help="default: from the config")
    parser.add_argument(
        "--record",
        choices=("blockwise", "streamed", "whole"),
        default=None,
        help="how the calibration store is recorded; default: blockwise with --device, else whole",
    )
    parser.add_argument(
        "--offload-device",
        default="cpu",
        help='where block-wise pruning caches block inputs: "cpu" or "disk" (memory-mapped files, '
        "host memory a few steps' worth; see --cache-dir)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="directory for --offload-device disk")
    parser.add_argument("--eval-windows", type=int, default=0, help="held-out windows to score")
    parser.add_argument("--no-save-model", action="store_true", help="skip save_pretrained")
    return parser.parse_args(argv)


def load(name: str, dtype: torch.dtype, trust_remote_code: bool):
    """Tokenizer and model on the CPU, SDPA attention where the model lets us choose it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {dtype_key: dtype, "trust_remote_code": trust_remote_code}
    model = None
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):  # LLaDA/Dream: AutoModel
        for extra in ({"attn_implementation": "sdpa"}, {}):
            try:
                model = auto.from_pretrained(name, **kwargs, **extra)
                break
            except (ValueError, TypeError, KeyError):
                continue
        if model is not None:
            break
    if model is None:
        raise SystemExit(f"could not load {name} with AutoModelForCausalLM or AutoModel")
    return tokenizer, model.eval()


def windows(
    tokenizer, path: Path, length: int, count: int, held_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows of ``length`` tokens: the first ``count`` calibrate, the last ``held_out``
    score."""
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    available = len(ids) // length
    if available < 1 + (held_out > 0):
        raise SystemExit(f"{path} has {len(ids)} tokens: too few for windows of {length}; lower --seq-len")
    stacked = torch.tensor(ids[: available * length]).view(available, length)
    evaluation = stacked[available - held_out :] if held_out else stacked[:0]
    calibration = stacked[: min(count, available - held_out)]
    return calibration, evaluation


def mask_token(args, model, tokenizer) -> int:
    for candidate in (
        args.mask_token_id,
        getattr(model.config, "mask_token_id", None),
        tokenizer.mask_token_id,
    ):
        if candidate is not None:
            return int(candidate)
    raise SystemExit("no mask token id in the config or tokenizer: pass --mask-token-id (LLaDA: 126336)")


def record(args, model, calibration: torch.Tensor, mask_id: int, on_device):
    """The attention-only calibration store, recorded block-wise or with whole-model forwards."""
    path = args.output / "calibration"
    noising = dict(steps=args.steps, sample_interval=args.sample_interval, batch_size=args.batch_size)
    if args.record == "blockwise":
        return prune.record_blockwise(
            model, calibration, path, mask_token_id=mask_id, device=args.device, overwrite=True, **noising
        )
    streaming = on_device if args.record == "streamed" else nullcontext
    with (
        streaming(),
        attnprobe.record(model, path, mask_token_id=mask_id, linear_stats=False, overwrite=True) as store,
    ):
        device = args.device if args.record == "streamed" else "cpu"  # where the model's embedding is
        attnprobe.calibrate(model, calibration.to(device or "cpu"), mask_token_id=mask_id, **noising)
    return store


def record_mode(args, world: int) -> str:
    """How the store is recorded: ``--record``, or block-wise with a device (streamed in a group)."""
    if args.record is None:
        return ("streamed" if world > 1 else "blockwise") if args.device else "whole"
    if args.record == "blockwise" and world > 1:
        raise SystemExit(
            "--record blockwise writes one unsharded store and cannot be split across torchrun's ranks; "
            "use --record streamed (with --device) or --record whole, which record a sharded store."
        )
    return args.record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with distributed.group_from_env():
        return run(args)


def run(args: argparse.Namespace) -> int:
    rank, world = distributed.rank(), distributed.world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    log = logging.getLogger("prune_hub_model")
    if world > 1 and args.device and torch.device(args.device).type == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"  # one GPU per rank
    args.record = record_mode(args, world)
    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer, model = load(args.model, DTYPES[args.dtype], args.trust_remote_code)
    mask_id = mask_token(args, model, tokenizer)
    calibration, held_out = windows(
        tokenizer, args.calibration, args.seq_len, args.windows, args.eval_windows
    )
    log.info("calibration: %d windows of %d tokens", *calibration.shape)
    blocks = [block.module for block in find_blocks(model, [])]
    # Whole-model forwards (evaluation; --record streamed) stream the blocks through the device.
    on_device = (lambda: streamed(model, blocks, args.device)) if args.device else nullcontext

    def score() -> float | None:
        if not len(held_out):
            return None
        with on_device():
            return prune.evaluate(model, held_out, mask_token_id=mask_id, num_samples=4, progress=False).nll

    summary = {
        "model": args.model,
        "method": args.method,
        "sparsity": args.sparsity,
        "pattern": args.pattern,
        "sink_aware": args.sink_aware,
        "windows": int(calibration.shape[0]),
        "seq_len": args.seq_len,
        "world_size": world,
        "nll_dense": score(),
    }
    start = time.perf_counter()
    summary["record"] = args.record
    store = record(args, model, calibration, mask_id, on_device)
    summary["record_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    result = prune.apply(
        model,
        store,
        args.sparsity,
        method=args.method,
        sink_aware=args.sink_aware,
        pattern=args.pattern,
        sequential=True,
        device=args.device,
        offload_device=args.offload_device,
        cache_dir=args.cache_dir,
    )
    summary["prune_seconds"] = time.perf_counter() - start
    summary["achieved_sparsity"] = float(result.report["sparsity"].mean())
    summary["nll_pruned"] = score()
    if rank != 0:  # every rank holds the same pruned model; one writes it
        print(f"rank {rank} of {world}: pruned; outputs are written by rank 0", file=sys.stderr)
        return 0
    prune.save_masks(result.masks, args.output / "masks.safetensors", settings=result.settings, model=model)
    result.report.to_csv(args.output / "report.csv", index=False)
    if not args.no_save_model:
        model.save_pretrained(args.output / "model")
        tokenizer.save_pretrained(args.output / "model")
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s", json.dumps(summary))
    print(f"rank {rank} of {world}: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
