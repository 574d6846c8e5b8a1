"""Section 5 of docs/RESULTS.md: pruning that serves faster (whole blocks, structured with FLAP).

Measured by ``python examples/write_results.py --only-serving`` and spliced between the section's
markers; every number comes from that run. Models that come out identical (the same blocks removed
from different calibration seeds) are evaluated once and their numbers reused, which is exact since
the evaluation's draws are fixed.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import pipeline
import task_eval
import torch

import attnprobe
import prune

MARKERS = ("<!-- serving: start -->", "<!-- serving: end -->")
BLOCK_RATIO = 0.25
STRUCTURED = [  # (label, score, bias_compensation, structured_mode)
    ("Wanda-sp", "wanda-sp", False, "uniform"),
    ("FLAP", "flap", False, "uniform"),
    ("FLAP + compensation", "flap", True, "uniform"),
    ("FLAP, global", "flap", False, "global"),
]


def _fmt(values: list[float], digits: int = 4) -> str:
    if any(v is None for v in values):
        return "null"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def step_latency_ms(
    dense, model, batch: int = 8, length: int = 128, repeats: int = 12
) -> tuple[float, float]:
    """Median forward time of one (batch, length) step of ``model`` and of ``dense``, interleaved.

    The two are timed in alternation so that load from other processes hits both alike; the ratio of
    the medians is what the tables report.
    """
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        dense(input_ids=ids)
        model(input_ids=ids)
        for _ in range(repeats):
            for which, m in enumerate((dense, model)):
                start = time.perf_counter()
                m(input_ids=ids)
                times[which].append(time.perf_counter() - start)
    return statistics.median(times[1]) * 1e3, statistics.median(times[0]) * 1e3


def _shapes(model) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


class Evaluator:
    """NLL, lm-eval accuracy and step latency of a model, cached by a key that identifies it."""

    def __init__(self, pair, heldout, eval_samples: int, task_items: int | None, mc_num: int) -> None:
        self.pair, self.heldout, self.eval_samples = pair, heldout, eval_samples
        self.task_items, self.mc_num = task_items, mc_num
        self.cache: dict[tuple, dict] = {}
        self.latency: dict[tuple, tuple[float, float]] = {}  # shapes -> (ms, dense ms): speed follows shape

    def measure(self, key: tuple, model, kind: str, task: bool) -> dict:
        found = self.cache.get(key)
        if found is not None and (found["acc"] is not None or not task):
            return found
        found = found or {
            "nll": prune.evaluate(
                model,
                self.heldout,
                mask_token_id=self.pair.mask_token_id if kind == "dlm" else None,
                num_samples=self.eval_samples,
                progress=False,
            ).nll,
            "params": sum(p.numel() for p in model.parameters()),
            "acc": None,
        }
        shapes = _shapes(model)
        if shapes not in self.latency:
            dense = self.pair.dlm if kind == "dlm" else self.pair.ar
            self.latency[shapes] = step_latency_ms(dense, model)
        found["ms"], found["dense_ms"] = self.latency[shapes]
        if task:
            tokenizer = pipeline.MODELS / ("tiny-dlm" if kind == "dlm" else "tiny-ar")
            score = task_eval.task_accuracy(
                model, tokenizer=tokenizer, mc_num=self.mc_num, limit=self.task_items
            )
            found["acc"] = score["acc"]
        self.cache[key] = found
        return found


def _stores(pair, seeds: int, rows: int, steps: int, work: Path):
    ids = pipeline.load_ids("calibration")
    out = []
    for seed in range(seeds):
        start = seed * rows % max(ids.shape[0] - rows, 1)
        window = ids[start : start + rows]
        traj = pipeline.record_calibration(
            pair,
            "dlm",
            work / f"traj-{seed}",
            window,
            seed=seed,
            steps=steps,
            sample_interval=5,
            hessians=False,
        )
        with attnprobe.record(pair.dlm, work / f"clean-{seed}", mask_token_id=pair.mask_token_id) as clean:
            with torch.no_grad():
                pair.dlm(input_ids=window)  # one clean forward: ShortGPT's (autoregressive-style) setting
        ar = pipeline.record_calibration(pair, "ar", work / f"ar-{seed}", window, hessians=False)
        out.append({"traj": traj, "clean": clean, "ar": ar})
    return out


def _blocks_rows(pair, stores, ev: Evaluator) -> list[list[str]]:
    variants = [  # label, kind, store key, score, sink_aware
        ("trajectory BI", "dlm", "traj", "bi", False),
        ("trajectory BI, sink-aware", "dlm", "traj", "bi", True),
        ("clean-input BI (AR-style baseline)", "dlm", "clean", "bi-clean", False),
        ("AR twin: BI (control)", "ar", "ar", "bi", False),
    ]
    rows = []
    for kind, dense in (("dlm", pair.dlm), ("ar", pair.ar)):
        m = ev.measure((kind, "dense"), dense, kind, task=True)
        label = "dense" if kind == "dlm" else "AR twin: dense (control)"
        rows.append(
            [
                label,
                "-",
                "-",
                f"{m['params']:,}",
                f"{m['ms']:.1f}",
                "1.00",
                _fmt([m["nll"]]),
                _fmt([m["acc"]], 3),
            ]
        )
    for label, kind, key, score, sink_aware in variants:
        dense = pair.dlm if kind == "dlm" else pair.ar
        got, removed_sets, bis = [], [], []
        for seed_stores in stores:
            model = copy.deepcopy(dense)
            result = prune.apply(
                model, seed_stores[key], BLOCK_RATIO, pattern="blocks", score=score, sink_aware=sink_aware
            )
            removed = tuple(result.plan.removed)
            removed_sets.append(",".join(r.rsplit(".", 1)[1] for r in removed))
            bis.append(" ".join(f"{s:.3f}" for s in result.plan.scores))
            got.append(ev.measure((kind, "blocks", removed), model, kind, task=True))
        rows.append(
            [
                label,
                " / ".join(removed_sets),
                " / ".join(bis),
                f"{got[0]['params']:,}",
                f"{statistics.median(g['ms'] for g in got):.1f}",
                f"{statistics.median(g['ms'] / g['dense_ms'] for g in got):.2f}",
                _fmt([g["nll"] for g in got]),
                _fmt([g["acc"] for g in got], 3),
            ]
        )
    return rows


def _structured_rows(pair, stores, ev: Evaluator, ratios: list[float]) -> list[list[str]]:
    rows = []
    for kind, key, dense in (("dlm", "traj", pair.dlm), ("ar", "ar", pair.ar)):
        for ratio in ratios if kind == "dlm" else ratios[:1]:
            for label, score, compensate, mode in STRUCTURED if kind == "dlm" else STRUCTURED[:2]:
                got = []
                for seed, seed_stores in enumerate(stores):
                    model = copy.deepcopy(dense)
                    prune.apply(
                        model,
                        seed_stores[key],
                        ratio,
                        pattern="structured",
                        score=score,
                        bias_compensation=compensate,
                        structured_mode=mode,
                        progress=False,
                    )
                    task = seed == 0 and ratio == ratios[0] and mode == "uniform" and kind == "dlm"
                    got.append(ev.measure((kind, label, ratio, seed), model, kind, task=task))
                ms = statistics.median(g["ms"] for g in got)
                ratio_ms = statistics.median(g["ms"] / g["dense_ms"] for g in got)
                rows.append(
                    [
                        label if kind == "dlm" else f"AR twin: {label} (control)",
                        f"{ratio}",
                        f"{got[0]['params']:,}",
                        f"{ms:.1f}",
                        f"{ratio_ms:.2f}",
                        _fmt([g["nll"] for g in got]),
                        _fmt([got[0]["acc"]], 3),
                    ]
                )
    return rows


def serving_section(pair, work: Path, *, seeds: int = 3, quick: bool = False) -> str:
    """Measure and format section 6."""
    start = time.perf_counter()
    # Budget: the whole section in about 30 minutes on 2 shared CPU cores, hence fewer held-out windows,
    # draws and task items than sections 2-4 (the same for every row, so rows compare with each other).
    rows, steps, eval_rows, eval_samples = (4, 10, 32, 2) if quick else (32, 50, 240, 4)
    task_items, mc_num = (12, 2) if quick else (60, 4)
    heldout = pipeline.load_ids("heldout")[:eval_rows]
    ev = Evaluator(pair, heldout, eval_samples, task_items, mc_num)
    stores = _stores(pair, seeds, rows, steps, work)
    blocks = _blocks_rows(pair, stores, ev)
    structured = _structured_rows(pair, stores, ev, [0.3, 0.5])
    minutes = (time.perf_counter() - start) / 60
    return TEMPLATE.format(
        blocks=_table(
            [
                "blocks removed by",
                "removed (per seed)",
                "BI of blocks 0-3 (per seed)",
                "parameters",
                "step latency (ms)",
                "× dense",
                "held-out NLL",
                "lm-eval acc",
            ],
            blocks,
        ),
        structured=_table(
            [
                "score",
                "ratio",
                "parameters",
                "step latency (ms)",
                "× dense",
                "held-out NLL",
                "lm-eval acc (seed 0)",
            ],
            structured,
        ),
        seeds=seeds,
        rows=rows,
        eval_rows=eval_rows,
        eval_samples=eval_samples,
        task_items=task_items,
        mc_num=mc_num,
        minutes=minutes,
        threads=torch.get_num_threads(),
        quick=" (quick settings: not for reading)" if quick else "",
    )


def splice(path: Path, section: str) -> None:
    """Replace the section between the markers, or append it."""
    pipeline.splice_section(path, section, MARKERS, before=None)


TEMPLATE = """<!-- serving: start -->
## 6. Pruning that serves faster: whole blocks, structured FLAP{quick}

Measured on its own by `python examples/write_results.py --only-serving` ({minutes:.1f} minutes on
{threads} CPU threads). Calibration: {seeds} seeds, {rows} windows each, forward noising at 10 levels
(the DLM's trajectory store), one clean forward of the same windows (the clean-input store), and the
same windows as clean text for the AR twin. Held-out NLL as in section 2 ({eval_rows} windows,
{eval_samples} draws; AR twin: exact AR NLL), mean ± std over seeds. lm-eval: `attnprobe_continuation`,
first {task_items} items, {mc_num} Monte-Carlo draws per choice for the DLM (fewer than section 4, so
compare within this section). Step latency: median forward of an (8, 128) batch, timed in
alternation with the dense model (× dense: the ratio of the medians; the machine was shared, so read
the ratio, not the milliseconds). Latency is measured once per set of weight shapes; the AR twin's rows
share the DLM's (same shapes). `null` = not measured.

### Block removal: 1 of 4 blocks (`pattern="blocks"`, ratio 0.25, first and last kept)

Block Influence `BI_b = 1 − mean cos(h_b, h_(b+1))` (docs/PRUNING.md): over every recorded denoising
step (trajectory), with sink weights (sink-aware), or over one clean forward (the AR-style baseline).
Models with the same removed block are identical; their numbers repeat.

{blocks}

### Structured: heads and MLP channels (`pattern="structured"`)

Wanda-sp (today's default), FLAP's fluctuation score, FLAP with bias compensation (plan-only
checkpoint: the bias is new), FLAP with global allocation (per-layer standardised scores; per-layer
widths, plan only). lm-eval accuracy for seed 0 at ratio 0.3 only.

{structured}
<!-- serving: end -->"""
