"""Measure the paper's findings on the shipped pair and write ``docs/RESULTS.md`` from the numbers.

Nothing in RESULTS.md is typed by hand: every figure and table below comes from this script's run.

    python examples/write_results.py [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import tempfile
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

ROOT = Path(__file__).resolve().parents[1]
UNSTRUCTURED_SETTINGS = [(0.5, "unstructured"), (0.6, "unstructured"), (0.7, "unstructured"), (0.5, "2:4")]
VARIANTS = (
    pipeline.UNSTRUCTURED_VARIANTS[:3] + pipeline.UNSTABLE_VARIANTS + pipeline.UNSTRUCTURED_VARIANTS[3:]
)
STRUCTURED_RATIOS = [0.3, 0.5]
TASK_MARKERS = ("<!-- lm-eval task: start -->", "<!-- lm-eval task: end -->")


def _fmt(values: list[float], digits: int = 4) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _movement(store) -> dict[str, float]:
    """How the dominant sink moves: share of steps on the first token, mean jump between steps."""
    table = trajectory.step_table(store)
    on_first = float((table["dominant_index"] == 0).mean())
    jumps = []
    for _, group in table.groupby(["segment", "batch"]):
        positions = group.sort_values("step")["dominant_position"].tolist()
        jumps += [abs(b - a) for a, b in zip(positions, positions[1:])]
    distinct = table.groupby(["segment", "batch"])["dominant_index"].nunique().mean()
    return {
        "on_first_token": on_first,
        "mean_jump": statistics.fmean(jumps) if jumps else math.nan,
        "distinct_dominant": float(distinct),
    }


def sink_properties(pair: pipeline.Pair, work: Path, figures: Path, quick: bool) -> str:
    calibration, _ = pipeline.split_heldout(8 if quick else 32)
    prompts = calibration[:4, :32]
    steps, gen_length = (16, 32) if quick else (64, 64)
    rows = []
    for kind, label in (("dlm", "diffusion LM"), ("ar", "autoregressive twin")):
        pipeline.record_generation(
            pair, kind, work / f"{kind}-generation", prompts, steps=steps, gen_length=gen_length
        )
        pipeline.record_calibration(
            pair,
            kind,
            work / f"{kind}-calibration",
            calibration[:8],
            hessians=False,
            steps=10 if quick else 50,
            sample_interval=5,
        )
        for name in ("generation", "calibration"):
            store = attnprobe.open(work / f"{kind}-{name}")
            summary = trajectory.summary(store)
            move = _movement(store)
            rows.append(
                [
                    label,
                    name,
                    summary["n_steps"],
                    f"{summary['top1_share']:.4f}",
                    f"{summary['topk_share']:.4f}",
                    f"{summary['entropy']:.4f}",
                    f"{summary['temporal_variance']:.4f}",
                    f"{summary['mean_jaccard']:.3f}",
                    f"{move['on_first_token']:.2f}",
                    f"{move['mean_jump']:.3f}",
                    f"{move['distinct_dominant']:.1f}",
                ]
            )
    pipeline.plot_pairs(work, figures)
    header = [
        "model",
        "trajectory",
        "steps",
        "top-1 share",
        "top-5% share",
        "entropy",
        "temporal variance",
        "Jaccard (consecutive)",
        "dominant on first token",
        "mean jump",
        "distinct dominant positions",
    ]
    return _md_table(header, rows)


def calibration_store(pair: pipeline.Pair, seed: int, rows: int, path: Path, quick: bool):
    ids = pipeline.load_ids("calibration")
    start = seed * rows % max(ids.shape[0] - rows, 1)
    return pipeline.record_calibration(
        pair, "dlm", path, ids[start : start + rows], seed=seed, steps=10 if quick else 50, sample_interval=5
    )


def unstructured_tables(pair, stores, heldout, eval_samples) -> tuple[str, float]:
    dense = prune.evaluate(
        pair.dlm, heldout, mask_token_id=pair.mask_token_id, num_samples=eval_samples, progress=False
    )
    header = ["method"] + [f"{p} @ {s:.0%}" if p == "unstructured" else p for s, p in UNSTRUCTURED_SETTINGS]
    results: dict[tuple[str, float, str], list[float]] = {}
    jobs = [
        (s, p, v, seed) for s, p in UNSTRUCTURED_SETTINGS for v in VARIANTS for seed in range(len(stores))
    ]
    for sparsity, pattern, variant, seed in tqdm(jobs, desc="unstructured"):
        if variant[1] == "magnitude" and seed > 0:
            continue  # magnitude does not use calibration data
        row = pipeline.prune_and_evaluate(
            pair.dlm,
            stores[seed],
            heldout,
            sparsity=sparsity,
            pattern=pattern,
            variants=[variant],
            mask_token_id=pair.mask_token_id,
            eval_samples=eval_samples,
        )[0]
        results.setdefault((variant[0], sparsity, pattern), []).append(row["nll"])
    rows = [[v[0]] + [_fmt(results[(v[0], s, p)]) for s, p in UNSTRUCTURED_SETTINGS] for v in VARIANTS]
    return _md_table(header, rows), dense.nll


def _step_latency_ms(model, batch: int = 8, length: int = 128, repeats: int = 15) -> float:
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(input_ids=ids)
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def structured_table(pair, stores, heldout, eval_samples) -> str:
    dense_params = sum(p.numel() for p in pair.dlm.parameters())
    dense_ms = _step_latency_ms(pair.dlm)
    rows = [
        [
            "dense",
            "-",
            f"{dense_params:,}",
            f"{dense_ms:.1f}",
            _fmt(
                [
                    prune.evaluate(
                        pair.dlm,
                        heldout,
                        mask_token_id=pair.mask_token_id,
                        num_samples=eval_samples,
                        progress=False,
                    ).nll
                ]
            ),
        ]
    ]
    for ratio in STRUCTURED_RATIOS:
        for sink_aware in (False, True):
            nlls, params, latency = [], 0, []
            for store in stores:
                model = copy.deepcopy(pair.dlm)
                prune.apply(model, store, ratio, pattern="structured", sink_aware=sink_aware, progress=False)
                nlls.append(
                    prune.evaluate(
                        model,
                        heldout,
                        mask_token_id=pair.mask_token_id,
                        num_samples=eval_samples,
                        progress=False,
                    ).nll
                )
                params = sum(p.numel() for p in model.parameters())
                latency.append(_step_latency_ms(model))
            rows.append(
                [
                    "sink-aware" if sink_aware else "baseline (Wanda-sp)",
                    f"{ratio}",
                    f"{params:,}",
                    f"{statistics.median(latency):.1f}",
                    _fmt(nlls),
                ]
            )
    return _md_table(["method", "ratio", "parameters", "step latency (ms)", "held-out NLL"], rows)


def task_table(pair: pipeline.Pair, store, quick: bool) -> tuple[str, dict]:
    """lm-eval accuracy (± standard error over items) of the dense, Wanda- and sink-aware-Wanda-pruned
    DLM (50%, calibration seed 0) and of the AR twin on ``attnprobe_continuation``."""
    limit, mc_num = (12, 2) if quick else (None, 16)
    runs = [("diffusion LM", "dense", pair.dlm)]
    for label, method, sink_aware, policy in pipeline.UNSTRUCTURED_VARIANTS[1:3]:  # wanda, sink-aware
        model = copy.deepcopy(pair.dlm)
        prune.apply(
            model, store, 0.5, method=method, sink_aware=sink_aware, sink_policy=policy, progress=False
        )
        runs.append(("diffusion LM", f"{label} 50%", model))
    runs.append(("autoregressive twin", "dense", pair.ar))
    rows = []
    for kind, label, model in tqdm(runs, desc="lm-eval task"):
        tokenizer = pipeline.MODELS / ("tiny-dlm" if kind == "diffusion LM" else "tiny-ar")
        score = task_eval.task_accuracy(model, tokenizer=tokenizer, mc_num=mc_num, limit=limit)
        rows.append([kind, label, f"{score['acc']:.3f} ± {score['acc_stderr']:.3f}"])
    table = _md_table(["model", "pruning", "accuracy ± s.e."], rows)
    return table, {"items": score["items"], "mc_num": mc_num}


def _task_section(table: str, info: dict, minutes: float | None = None) -> str:
    when = (
        f" This section was measured on its own by `python examples/write_results.py --only-task` "
        f"({minutes:.1f} minutes)."
        if minutes is not None
        else ""
    )
    return TASK_TEMPLATE.format(table=table, when=when, **info)


def _splice_task(path: Path, section: str) -> None:
    """Replace (or insert before the closing section) the lm-eval section of an existing RESULTS.md."""
    pipeline.splice_section(path, section, TASK_MARKERS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="calibration seeds")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument(
        "--only-task",
        action="store_true",
        help="measure only section 4 (lm-eval task) and splice it into --out",
    )
    parser.add_argument(
        "--only-allocation",
        action="store_true",
        help="measure one seed of section 5 (allocation and refinement) into <--allocation-log>.<seed>.jsonl",
    )
    parser.add_argument("--allocation-seed", type=int, default=0, help="the seed --only-allocation measures")
    parser.add_argument(
        "--allocation-task", action="store_true", help="section 5's lm-eval rows (after all seeds)"
    )
    parser.add_argument("--render-allocation", action="store_true", help="render section 5 from the logs")
    parser.add_argument("--allocation-log", type=Path, default=ROOT / "out" / "allocation.jsonl")
    parser.add_argument(
        "--only-serving",
        action="store_true",
        help="measure only section 6 (blocks, FLAP; examples/serving_results.py) and splice it into --out",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.only_allocation or args.render_allocation or args.allocation_task:
        import allocation_results

        logs = [args.allocation_log.with_suffix(f".{seed}.jsonl") for seed in range(args.seeds)]
        task_log = args.allocation_log.with_suffix(".task.jsonl")
        if args.only_allocation:  # one seed per process (--allocation-seed), so seeds can run side by side
            log = logs[args.allocation_seed]
            log.parent.mkdir(parents=True, exist_ok=True)
            log.unlink(missing_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                allocation_results.measure(
                    pipeline.load_pair(), Path(tmp), log, args.allocation_seed, args.quick, calibration_store
                )
        elif args.allocation_task:
            task_log.unlink(missing_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                allocation_results.task(
                    pipeline.load_pair(), Path(tmp), logs, task_log, args.quick, calibration_store
                )
        else:
            allocation_results.splice(args.out, allocation_results.render(logs, task_log))
            print(f"wrote section 5 of {args.out}")
        print(f"done in {(time.perf_counter() - start) / 60:.1f} min")
        return 0
    if args.only_serving:
        import serving_results

        with tempfile.TemporaryDirectory() as tmp:
            section = serving_results.serving_section(
                pipeline.load_pair(), Path(tmp), seeds=args.seeds, quick=args.quick
            )
        serving_results.splice(args.out, section)
        print(f"wrote section 6 of {args.out} in {(time.perf_counter() - start) / 60:.1f} min")
        return 0
    if args.only_task:
        pair = pipeline.load_pair()
        with tempfile.TemporaryDirectory() as tmp:
            store = calibration_store(pair, 0, 4 if args.quick else 32, Path(tmp) / "calib-0", args.quick)
            table, info = task_table(pair, store, args.quick)
        minutes = (time.perf_counter() - start) / 60
        _splice_task(args.out, _task_section(table, info, minutes))
        print(f"wrote section 4 of {args.out} in {minutes:.1f} min")
        return 0
    figures = args.out.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    pair = pipeline.load_pair()
    calib_rows, eval_rows, eval_samples = (4, 32, 2) if args.quick else (32, 480, 8)
    heldout = pipeline.load_ids("heldout")[:eval_rows]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        properties = sink_properties(pair, work, figures, args.quick)
        stores = [
            calibration_store(pair, seed, calib_rows, work / f"calib-{seed}", args.quick)
            for seed in range(args.seeds)
        ]
        unstructured, dense_nll = unstructured_tables(pair, stores, heldout, eval_samples)
        structured = structured_table(pair, stores, heldout, eval_samples)
        task, task_info = task_table(pair, stores[0], args.quick)
    minutes = (time.perf_counter() - start) / 60
    config = pair.dlm.config
    text = RESULTS_TEMPLATE.format(
        properties=properties,
        unstructured=unstructured,
        structured=structured,
        task=_task_section(task, task_info),
        dense_nll=dense_nll,
        seeds=args.seeds,
        calib_rows=calib_rows,
        eval_rows=eval_rows,
        eval_samples=eval_samples,
        figures=figures.relative_to(args.out.parent),
        minutes=minutes,
        machine=platform.machine(),
        threads=torch.get_num_threads(),
        quick=" (quick settings: not for reading)" if args.quick else "",
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        length=heldout.shape[1],
        mass_units=config.num_hidden_layers * config.num_attention_heads,
    )
    args.out.write_text(text)
    print(f"wrote {args.out} in {minutes:.1f} min")
    return 0


RESULTS_TEMPLATE = """# Results on the shipped small pair{quick}

Written by `python examples/write_results.py --seeds {seeds}` ({minutes:.1f} minutes on {threads} CPU
threads, {machine}); every number below comes from that run. Models: `examples/models/tiny-dlm` (masked
diffusion, bidirectional) and `examples/models/tiny-ar` (its causal twin), byte-level, {layers} layers,
{heads} heads, sequence length {length} (model card: `examples/models/README.md`).

## 1. Attention sinks: diffusion LM vs autoregressive twin

Generation: 4 prompts of 32 tokens from the calibration split, the DLM with the LLaDA-style sampler
(low-confidence remasking), the AR twin greedy on a fixed canvas (one forward per token). Calibration:
8 windows, forward noising at 10 levels (DLM) or clean text (AR, one step per window, so no temporal
metrics). Mass summed over layers and heads; formulas in `docs/METRICS.md`.

{properties}

- *top-1 / top-5% share*: share of a step's attention mass on its top key / top 5% of keys (spatial
  concentration; higher = more concentrated). *entropy*: normalised entropy of the mass over keys.
- *temporal variance*: variance over steps of the dominant sink's relative position, per trajectory.
- *Jaccard*: overlap of the sink sets of consecutive steps. *dominant on first token*: share of steps
  whose heaviest key is position 0 (BOS). *mean jump*: mean |Δ position| of the dominant key between
  consecutive steps. *distinct dominant positions*: per trajectory.

![sinks during generation]({figures}/sinks-generation.png)

![sinks during calibration]({figures}/sinks-calibration.png)

## 2. Unstructured and 2:4 pruning of the diffusion LM

Held-out masked-diffusion NLL (nats per byte, lower is better; MDLM bound, {eval_samples} Monte-Carlo
draws of t per window, {eval_rows} held-out windows, the same draws for every method). Dense model:
**{dense_nll:.4f}**. Each cell: mean ± standard deviation over {seeds} calibration seeds (different
calibration windows and masking draws; {calib_rows} windows × 10 noise levels each). One-shot
(`sequential=False`), `accumulate="wanda"`, sink rule `sink_std=2`, `sink_alpha=5`;
*unstable* = `sink_policy="unstable"` (only sinks whose score varies across the steps of a window are
down-weighted). Magnitude uses no calibration data (one run).

{unstructured}

## 3. Structured pruning (heads and MLP channels removed)

`pattern="structured"`, uniform ratio per layer (fraction of heads and of MLP channels removed),
Wanda-sp scores (baseline) vs the same on sink-down-weighted activations (sink-aware). Step latency:
median forward time of a (8, 128) batch on this CPU. NLL as above, mean ± std over {seeds} seeds.

{structured}

{task}

## Where a small byte-level pair may differ from the paper's 8B models

- Attention mass is in units of layers × heads = {mass_units} here (≈ 1,000 for LLaDA 8B), so the sink rule's
  sigmoid (alpha 5) is a soft weight here rather than the hard 0/1 step it is at 8B; fewer tokens are
  fully zeroed.
- Sequences are 128 bytes, not 4,096 tokens; a byte-level model spends attention on spaces and
  punctuation that a BPE model never sees as separate tokens.
- The NLL differences between methods at 50% are small compared with the seed spread; read them as
  measurements of this pair, not as evidence for or against the paper's 8B results.
"""


TASK_TEMPLATE = """<!-- lm-eval task: start -->
## 4. lm-eval task: continuation of held-out windows

`attnprobe_continuation` (`examples/tasks/`, run through the lm-eval model `attnprobe` of
`prune/harness.py`): {items} items, each 96 bytes of a held-out window as context and four 31-byte
choices, its own continuation and those of three other held-out windows (chance 0.25). The DLM is
scored with LLaDA's Monte-Carlo estimator ({mc_num} draws per choice, the same draws for every choice
and model), the AR twin exactly. Pruned: 50% unstructured, one-shot, calibration seed 0 of section 2.
Standard errors are lm-eval's, over items (they include the Monte-Carlo noise).{when}

{table}
<!-- lm-eval task: end -->"""


if __name__ == "__main__":
    raise SystemExit(main())
