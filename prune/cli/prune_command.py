"""``attnprobe prune MODEL --calibration FILE --output DIR``: record, prune and save a model in one go.

Phases (each announced on stderr, with progress bars inside): load the model → cut the calibration
data into windows → record the calibration store (or reuse the one in DIR) → ``prune.apply`` →
write. The recipe comes from :class:`prune.Recipe`'s defaults, then ``--recipe FILE``, then the flags
(generated from the recipe's fields). How the store is recorded follows from the recipe:

- ``--sequential``: an attention-only store (input ids and attention mass, all block-wise pruning
  reads), recorded block by block (``prune.record_blockwise``; each block visits ``--device`` once);
- one-shot: ``attnprobe.record`` with linear statistics (and Hessians for SparseGPT), the whole model
  on ``--device`` (or the CPU);
- ``--method magnitude`` needs no store: no calibration is read.

DIR receives ``calibration/`` (the store) and ``calibration.json`` (what it was recorded from),
``masks.safetensors``, ``recipe.yaml``, ``report.csv``, ``coverage.csv``, ``summary.json``, the pruned
checkpoint in ``model/`` (with the tokenizer; ``AutoModelForCausalLM.from_pretrained(DIR/model)``)
and ``report.png``. Run again on the same DIR, the store is reused once its fingerprint (model class,
shapes, weight sample) and ``calibration.json`` match; ``--overwrite`` records it again.

Under ``torchrun`` every rank loads the model and runs its share (sharded recording, split pruning
work, :func:`attnprobe.init_from_env`); rank 0 writes everything but the store shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from prune.cli.options import add_fields, given
from prune.recipe import RECIPE_FILE, Calibration, Recipe, RecipeError

STORE_DIR, PROVENANCE, CHECKPOINT_DIR = "calibration", "calibration.json", "model"
STORE_KINDS = ("attention", "linear_stats", "hessians")  # each provides what the ones before it do
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "prune",
        help="record a calibration store, prune a model and save it (with masks, recipe and report)",
        description="Prune a hub model or local checkpoint: calibration windows from a text or dataset "
        "file, a calibration store (reused when DIR already holds a matching one), prune.apply with the "
        "recipe, then the store, masks, recipe.yaml, report.csv, report.png and the pruned checkpoint "
        "(DIR/model, with the tokenizer) are written to DIR. Options: prune.Recipe's defaults, then "
        "--recipe FILE, then the flags below.",
    )
    parser.add_argument("model", metavar="MODEL", help="hub model id or local checkpoint directory")
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="calibration data: a UTF-8 text file, .jsonl/.json records with a 'text' field, or a "
        ".safetensors file with an input_ids matrix (not needed for --method magnitude)",
    )
    parser.add_argument("--output", type=Path, required=True, metavar="DIR", help="directory to write")
    parser.add_argument(
        "--recipe",
        type=Path,
        metavar="FILE",
        help="recipe file (YAML or JSON) to start from; flags override it",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype the weights are loaded in (default: auto, the checkpoint's)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the checkpoint's own modeling code (LLaDA, Dream)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan (device and host peak) from the config alone and exit (no weights read)",
    )
    parser.add_argument("--overwrite", action="store_true", help="record the calibration store again")
    parser.add_argument("--no-checkpoint", action="store_true", help="skip writing the pruned checkpoint")
    parser.add_argument("--no-plot", action="store_true", help="skip report.png")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_fields(
        parser,
        Recipe,
        "recipe (prune.Recipe; --device without --sequential moves the whole model)",
        "recipe__",
    )
    add_fields(parser, Calibration, "calibration (how the store is recorded)", "calibration__")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RecipeError) as err:
        print(f"attnprobe: error: {err}", file=sys.stderr)
        return 2


class _Phases:
    """``[2/5] recording ...`` lines on stderr, with the seconds each phase took."""

    def __init__(self, total: int, quiet: bool, rank: int) -> None:
        self.total, self.done, self.quiet, self.rank = total, 0, quiet, rank
        self.start = self.phase_start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.name: str | None = None

    def __call__(self, name: str, detail: str = "") -> None:
        self.finish()
        self.done += 1
        self.name, self.phase_start = name, time.perf_counter()
        if self.rank == 0:
            print(
                f"[{self.done}/{self.total}] {name}{': ' + detail if detail else ''}",
                file=sys.stderr,
                flush=True,
            )

    def finish(self) -> None:
        if self.name is not None:
            self.seconds[self.name] = time.perf_counter() - self.phase_start
            self.name = None


def build_recipe(args: argparse.Namespace) -> Recipe:
    """Defaults < ``--recipe`` < flags."""
    base = Recipe.load(args.recipe) if args.recipe is not None else Recipe()
    calibration = {**base.calibration.to_dict(), **given(args, Calibration, "calibration__")}
    return Recipe.from_dict(
        {**base.to_dict(), **given(args, Recipe, "recipe__"), "calibration": calibration}, "the command line"
    )


def _store_kind(recipe: Recipe) -> str | None:
    if recipe.method == "magnitude" and not recipe.sequential:
        return None
    if recipe.sequential:
        return "attention"
    return "hessians" if recipe.method == "sparsegpt" else "linear_stats"


def _dtype(name: str, config: Any):
    from prune.hub import DTYPES, checkpoint_dtype

    return checkpoint_dtype(config) if name == "auto" else DTYPES[name]


def dry_run(args: argparse.Namespace, recipe: Recipe) -> int:
    from prune.engine.memory_plan import plan_from_config
    from prune.hub import default_seq_len, load_config

    config = load_config(args.model, args.trust_remote_code)
    calibration = recipe.calibration
    seq_len = calibration.seq_len or default_seq_len(config)
    dtype = _dtype(args.dtype, config)
    plan, shape = plan_from_config(
        config,
        trust_remote_code=args.trust_remote_code,
        dtype=dtype,
        method=recipe.method,
        sequential=recipe.sequential,
        device=recipe.device,
        windows=calibration.windows,
        seq_len=seq_len,
        batch_size=calibration.batch_size,
        noise_levels=max(1, calibration.steps // calibration.sample_interval),
    )
    print(f"{args.model}: {shape.blocks} blocks, {shape.total_bytes / 2**30:.3f} GiB of weights in {dtype}")
    print(
        f"{recipe.method}{' sink-aware' if recipe.sink_aware else ''} at sparsity {recipe.sparsity}, "
        f"{calibration.windows} windows x {seq_len} tokens, batch {calibration.batch_size}"
    )
    print(plan.table())
    return 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _provenance(args, recipe: Recipe, windows, mask_id: int, kind: str) -> dict[str, Any]:
    return {
        "model": args.model,
        "calibration_file": str(args.calibration),
        "calibration_sha256": _sha256(args.calibration),
        "windows": list(windows.shape),
        "calibration": {**recipe.calibration.to_dict(), "mask_token_id": mask_id},
        "store": kind,
    }


def _reusable_store(out: Path, model, wanted: dict[str, Any], overwrite: bool):
    """The store in ``out`` if it was recorded from the same data and model; None to record anew."""
    import attnprobe
    from prune.engine.store_checks import check_fingerprint

    path, provenance = out / STORE_DIR, out / PROVENANCE
    if overwrite or not path.exists() or not provenance.is_file():  # no record: an unfinished recording
        return None
    recorded = json.loads(provenance.read_text())
    differ = [
        key
        for key in ("calibration_sha256", "windows", "calibration")
        if recorded.get(key) != wanted.get(key)
    ]
    if STORE_KINDS.index(recorded.get("store", "attention")) < STORE_KINDS.index(wanted["store"]):
        differ.append(f"store (holds {recorded.get('store')}, this recipe needs {wanted['store']})")
    if differ:
        raise ValueError(
            f"{path} was recorded with other settings ({', '.join(differ)}; see {provenance}). Pass "
            "--overwrite to record it again, or choose another --output."
        )
    store = attnprobe.open(path)
    check_fingerprint(model, store)  # another checkpoint: a ValueError that says so
    return store


def _record(args, recipe: Recipe, model, windows, mask_id: int, kind: str, world: int):
    import attnprobe
    from prune.engine.record_blockwise import record_blockwise

    path = args.output / STORE_DIR
    cal = recipe.calibration
    noising = dict(
        steps=cal.steps, sample_interval=cal.sample_interval, batch_size=cal.batch_size, seed=cal.seed
    )
    if kind == "attention" and world == 1:  # block by block: the device never holds the whole model
        return record_blockwise(
            model,
            windows,
            path,
            mask_token_id=mask_id,
            device=recipe.device,
            overwrite=True,
            progress=not args.quiet,
            **noising,
        )
    options = {"linear_stats": kind != "attention", "hessians": kind == "hessians"}
    with attnprobe.record(model, path, mask_token_id=mask_id, overwrite=True, **options) as store:
        device = next(model.parameters()).device
        attnprobe.calibrate(
            model, windows.to(device), mask_token_id=mask_id, progress=not args.quiet, **noising
        )
    return store


def _join_group(device: str | None) -> tuple[bool, int, int, str | None]:
    """Under ``torchrun``, start its process group (:func:`attnprobe.init_from_env`): NCCL when the
    recipe computes on CUDA, else gloo. Returns (started here, rank, world size, this rank's device):
    ``device="cuda"`` (no index) becomes ``cuda:LOCAL_RANK``."""
    from attnprobe import init_from_env, rank, world_size

    cuda = device is not None and device.startswith("cuda")
    started = init_from_env("nccl" if cuda else "gloo")
    world = world_size()
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return started, rank(), world, device


def run(args: argparse.Namespace) -> int:
    recipe = build_recipe(args)
    if args.dry_run:
        return dry_run(args, recipe)
    kind = _store_kind(recipe)
    if kind is not None and args.calibration is None:
        raise ValueError(f"--method {recipe.method} needs calibration data: pass --calibration FILE")
    import torch

    import prune
    from attnprobe import barrier
    from prune.hub import calibration_windows, default_seq_len, load_config, load_model, mask_token_id

    started, rank, world, device = _join_group(recipe.device)
    if device != recipe.device:
        recipe = recipe.replace(device=device)
    phases = _Phases(4 if kind else 3, args.quiet, rank)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    try:
        config = load_config(args.model, args.trust_remote_code)
        phases("loading the model", f"{args.model} in {_dtype(args.dtype, config)}")
        tokenizer, model = load_model(args.model, _dtype(args.dtype, config), args.trust_remote_code)
        if recipe.device is not None and not recipe.sequential:
            model.to(recipe.device)  # one-shot: the whole model where it computes
        store = None
        if kind is not None:
            seq_len = recipe.calibration.seq_len or default_seq_len(config)
            windows = calibration_windows(tokenizer, args.calibration, seq_len, recipe.calibration.windows)
            mask_id = mask_token_id(model, tokenizer, recipe.calibration.mask_token_id)
            wanted = _provenance(args, recipe, windows, mask_id, kind)
            store = _reusable_store(out, model, wanted, args.overwrite)
            if store is not None:
                phases("calibration store", f"reusing {out / STORE_DIR} (fingerprint and data match)")
            else:
                phases(
                    "recording the calibration store",
                    f"{windows.shape[0]} windows x {windows.shape[1]} tokens, {kind}",
                )
                (out / PROVENANCE).unlink(missing_ok=True)
                store = _record(args, recipe, model, windows, mask_id, kind, world)
                barrier()
                if world > 1:  # every rank's shard written: read them as one store
                    import attnprobe

                    store = attnprobe.open(out / STORE_DIR)
                if rank == 0:
                    (out / PROVENANCE).write_text(json.dumps(wanted, indent=2) + "\n")
        phases("pruning", f"{recipe.method} at sparsity {recipe.sparsity}, {recipe.pattern}")
        apply_recipe = recipe if recipe.sequential else recipe.replace(device=None)
        result = prune.apply(model, store, apply_recipe, progress=not args.quiet)
        result.recipe = recipe  # the recipe as given (with its device), for the files
        result.settings["recipe"] = recipe.to_dict()
        phases("writing", str(out))
        if rank == 0:
            _write(args, recipe, model, tokenizer, result, store, phases)
        barrier()
        phases.finish()
    finally:
        if started:
            torch.distributed.destroy_process_group()
    if rank == 0:
        sparsity = float(result.report["sparsity"].mean()) if len(result.report) else 0.0
        print(f"pruned {len(result.report)} linears to {sparsity:.4f} mean sparsity; everything is in {out}")
    return 0


def _write(args, recipe: Recipe, model, tokenizer, result, store, phases: _Phases) -> None:
    import prune

    out: Path = args.output
    recipe.save(out / RECIPE_FILE)
    prune.save_masks(
        result.masks, out / "masks.safetensors", settings=result.settings, model=model, weights=result.weights
    )
    result.report.to_csv(out / "report.csv", index=False)
    if result.coverage is not None:
        result.coverage.to_csv(out / "coverage.csv", index=False)
    if not args.no_checkpoint:
        prune.save_pretrained(model, out / CHECKPOINT_DIR, result, tokenizer=tokenizer)
    summary = {
        "model": args.model,
        "settings": {k: v for k, v in result.settings.items() if k != "recipe"},
        "linears": len(result.report),
        "achieved_sparsity": float(result.report["sparsity"].mean()) if len(result.report) else 0.0,
        "seconds": dict(phases.seconds),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.no_plot:
        try:
            prune.plot_report(result, out / "report.png", store=store, model_name=args.model)
        except ImportError as err:  # matplotlib is an optional extra
            print(f"attnprobe: report.png not written: {err}", file=sys.stderr)
