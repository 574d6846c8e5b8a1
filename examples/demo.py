"""The one-command demo: sinks move in a diffusion LM and stay put in its AR twin; prune sink-aware.

On the shipped pair (``examples/models/tiny-dlm`` and ``tiny-ar``) it:

1. records a generation trajectory of each (LLaDA-style sampler for the DLM, greedy for the AR),
2. records a calibration trajectory of each (forward noising for the DLM, clean text for the AR),
3. draws the sink plots, DLM and AR side by side, and prints the sink metrics,
4. prunes the DLM at 50% with magnitude, Wanda and sink-aware Wanda, evaluates held-out NLL of each,
   and prints the table (SparseGPT, plain and sink-aware, is in docs/RESULTS.md),
5. runs the same as a user would from the shell, ``attnprobe prune`` (record, prune, save the
   checkpoint, masks, recipe and report) then ``attnprobe report``, on the shipped DLM,
6. scores the dense, Wanda-pruned and sink-aware-Wanda-pruned DLM (from their saved masks) and the AR
   twin on the local lm-eval task ``attnprobe_continuation`` (4-way continuation of held-out windows,
   chance 0.25) through the ``attnprobe`` lm-eval model.

It is sized to finish in a few minutes on 2 CPU cores: 8 calibration windows at 5 noise levels, a
32-step generation, 96 held-out windows with 2 draws each, and the task on its first 40 items with 2
Monte-Carlo draws per choice (standard errors say how much that leaves).
``examples/write_results.py`` measures the full tables (3 seeds, every item) for docs/RESULTS.md.
Stores, masks, figures and tables land in ``--out``. Usage::

    python examples/demo.py --out out/demo [--quick]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline  # noqa: E402
import task_eval  # noqa: E402

import attnprobe  # noqa: E402
import prune  # noqa: E402
from attnprobe.analysis import trajectory  # noqa: E402

# magnitude, wanda, sink-aware wanda; SparseGPT (its Hessians cost most of a demo's minutes) is measured
# by examples/write_results.py
VARIANTS = pipeline.UNSTRUCTURED_VARIANTS[:3]


def run(out: Path, *, quick: bool = False) -> dict:
    """Run the whole demo into ``out``; return the tables it printed."""
    import pandas as pd

    start = time.perf_counter()
    torch.manual_seed(0)
    stores_dir, masks_dir, figures = out / "stores", out / "masks", out / "figures"
    for directory in (stores_dir, masks_dir, figures):
        directory.mkdir(parents=True, exist_ok=True)
    pair = pipeline.load_pair()
    calib_rows, eval_rows, eval_samples = (4, 64, 2) if quick else (8, 96, 2)
    calibration, heldout = pipeline.split_heldout(calib_rows)
    heldout = heldout[:eval_rows]
    prompt = calibration[:1, :32]
    gen_steps, gen_length = (16, 32) if quick else (32, 48)

    phases = tqdm(total=7, desc="demo", unit="phase")
    for kind in ("dlm", "ar"):
        pipeline.record_generation(
            pair, kind, stores_dir / f"{kind}-generation", prompt, steps=gen_steps, gen_length=gen_length
        )
    phases.update()
    calib = {}
    for kind in ("dlm", "ar"):
        calib[kind] = pipeline.record_calibration(
            pair,
            kind,
            stores_dir / f"{kind}-calibration",
            calibration,
            steps=10 if quick else 50,
            sample_interval=5 if quick else 10,
            hessians=False,  # no SparseGPT here
        )
    phases.update()

    pipeline.plot_pairs(stores_dir, figures)
    metrics = pd.DataFrame(
        [
            {
                "store": f"{kind}-{name}",
                **{
                    k: v
                    for k, v in trajectory.summary(attnprobe.open(stores_dir / f"{kind}-{name}")).items()
                    if k
                    in (
                        "n_steps",
                        "temporal_variance",
                        "mean_jaccard",
                        "top1_share",
                        "entropy",
                        "mean_n_sinks",
                    )
                },
            }
            for name in ("generation", "calibration")
            for kind in ("dlm", "ar")
        ]
    )
    metrics.to_csv(out / "sink_metrics.csv", index=False)
    phases.update()

    dense_nll = prune.evaluate(
        pair.dlm, heldout, mask_token_id=pair.mask_token_id, num_samples=eval_samples, progress=False
    )
    rows = [
        {
            "method": "dense",
            "sparsity": 0.0,
            "pattern": "-",
            "nll": dense_nll.nll,
            "stderr": dense_nll.stderr,
            "prune_seconds": 0.0,
            "achieved_sparsity": 0.0,
        }
    ]
    phases.update()
    rows += pipeline.prune_and_evaluate(
        pair.dlm,
        calib["dlm"],
        heldout,
        sparsity=0.5,
        pattern="unstructured",
        variants=VARIANTS,
        mask_token_id=pair.mask_token_id,
        eval_samples=eval_samples,
        masks_dir=masks_dir,
    )
    phases.update()
    command_line(out / "cli", quick=quick)
    phases.update()
    task = task_table(masks_dir, quick=quick)
    phases.update()
    phases.close()
    task.to_csv(out / "task.csv", index=False)
    table = pd.DataFrame(rows)
    table.to_csv(out / "pruning.csv", index=False)
    (out / "pruning.txt").write_text(table.to_string(index=False) + "\n")
    print("\nSink metrics (mass summed over layers and heads):")
    print(metrics.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nHeld-out masked-diffusion NLL (nats/token, {len(heldout)} windows) of the DLM pruned at 50%:")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(
        f"\nlm-eval task {task_eval.TASK} (4-way, chance 0.25; {int(task['items'][0])} items, "
        f"{int(task['mc_num'][0])} Monte-Carlo draws per choice for the DLM):"
    )
    print(task.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nEverything is in {out} ({time.perf_counter() - start:.0f} s).")
    return {"metrics": metrics, "pruning": table, "task": task}


def attnprobe_command() -> list[str]:
    """The installed console script (``python -m prune.cli`` where the install put it elsewhere)."""
    script = Path(sys.executable).parent / "attnprobe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "prune.cli"]


def command_line(out: Path, *, quick: bool) -> None:
    """``attnprobe prune`` and ``attnprobe report`` on the shipped DLM, printed as they run."""
    calibration = pipeline.HERE / "data" / "calibration.safetensors"
    windows = (
        ["--windows", "4", "--steps", "4", "--sample-interval", "2"]
        if quick
        else ["--windows", "8", "--sample-interval", "10"]
    )
    commands = [
        [
            "prune",
            pipeline.MODELS / "tiny-dlm",
            "--calibration",
            calibration,
            "--method",
            "wanda",
            "--sink-aware",
            "--sparsity",
            "0.5",
            "--output",
            out,
            *windows,
            "--quiet",
        ],
        ["report", out],
    ]
    for command in commands:
        print("\n$ attnprobe " + " ".join(str(part) for part in command), flush=True)
        subprocess.run([*attnprobe_command(), *map(str, command)], check=True)


def task_table(masks_dir: Path, *, quick: bool):
    """Task accuracy ± standard error of the dense and pruned DLM (from the saved masks) and the AR twin."""
    import pandas as pd

    limit, mc_num = (12, 2) if quick else (40, 2)
    runs = [
        ("diffusion LM, dense", "tiny-dlm", None),
        ("diffusion LM, wanda 50%", "tiny-dlm", masks_dir / "wanda-unstructured-0.50.safetensors"),
        (
            "diffusion LM, wanda sink-aware 50%",
            "tiny-dlm",
            masks_dir / "wanda-sink-aware-unstructured-0.50.safetensors",
        ),
        ("autoregressive twin, dense", "tiny-ar", None),
    ]
    rows = []
    for label, name, masks in runs:
        score = task_eval.task_accuracy(pipeline.MODELS / name, masks=masks, mc_num=mc_num, limit=limit)
        rows.append({"model": label, **score, "mc_num": mc_num if name == "tiny-dlm" else 1})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="a cut-down run (seconds), as the tests use")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run(args.out, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
