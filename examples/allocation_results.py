"""Section 5 of docs/RESULTS.md: layer allocation and mask refinement on the shipped pair.

Run by ``python examples/write_results.py --only-allocation``. Every measured row is appended to a
JSON-lines log as soon as it exists (so an interrupted run keeps what it measured), and the section is
rendered from that log; ``--render-only`` renders an existing log again.

Order (most informative first): the diffusion LM at 70% (the whole grid), the final rows at 70%
re-measured on more held-out draws, the grid at 60%, its final rows, the AR twin at 70% (plain, the
control), then lm-eval accuracy of the baseline and the best configuration at 70%.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

import pipeline
import prune
from prune.statistics import SinkSettings
from prune.store_checks import hessians_from_store

ALLOCATIONS = ("uniform", "owl", "sensitivity")
METHODS = ("wanda", "sparsegpt")
MARKERS = ("<!-- allocation: start -->", "<!-- allocation: end -->")


def layer_errors(dense: torch.nn.Module, pruned: torch.nn.Module, grams: dict) -> float:
    """Mean over pruned linears of ‖(W − Ŵ)X‖² / ‖WX‖², written out here from XᵀX (not prune's code)."""
    dense_mods, pruned_mods = dict(dense.named_modules()), dict(pruned.named_modules())
    values = []
    for name, gram in grams.items():
        w = dense_mods[name].weight.detach().double()
        d = w - pruned_mods[name].weight.detach().double()
        g = gram.double()
        values.append(float(torch.einsum("oi,ij,oj->", d, g, d) / torch.einsum("oi,ij,oj->", w, g, w)))
    return statistics.fmean(values)


class Grid:
    """Prunes, measures and logs one configuration at a time."""

    def __init__(self, pair, log: Path, heldout: dict, quick: bool) -> None:
        self.pair, self.log, self.heldout, self.quick = pair, log, heldout, quick
        self.sensitivity: dict[tuple, dict] = {}  # solved allocations, reused with refine on

    def model(self, kind: str):
        return self.pair.dlm if kind == "dlm" else self.pair.ar

    def run(self, kind, store, seed, sparsity, method, sink, allocation, refine, draws="grid", keep=False):
        dense = self.model(kind)
        model = copy.deepcopy(dense)
        key = (kind, seed, sparsity, method, sink)
        chosen = self.sensitivity.get(key, "sensitivity") if allocation == "sensitivity" else allocation
        start = time.perf_counter()
        result = prune.apply(
            model, store, sparsity, method=method, sink_aware=sink, allocation=chosen, refine=refine,
            progress=False,
        )
        seconds = time.perf_counter() - start
        if allocation == "sensitivity" and chosen == "sensitivity":
            self.sensitivity[key] = result.settings["layer_sparsity"]
        rows, samples = self.heldout[kind][draws]
        ids = pipeline.load_ids("heldout")[:rows]
        nll = prune.evaluate(
            model, ids, mask_token_id=self.pair.mask_token_id if kind == "dlm" else None,
            num_samples=samples, progress=False,
        ).nll
        grams = hessians_from_store(store, False, SinkSettings())
        masks = result.masks
        zeros = sum(int((~m).sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        row = {
            "kind": kind, "seed": seed, "sparsity": sparsity, "method": method, "sink": sink,
            "allocation": allocation, "refine": refine, "draws": draws, "nll": nll,
            "error": layer_errors(dense, model, {n: grams[n] for n in masks if n in grams}),
            "report_error": float(result.report["error"].mean()),
            "global_sparsity": zeros / total,
            "layer_sparsity": [float(s) for s in result.report["sparsity"]],
            "seconds": seconds,
        }
        with self.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "layer_sparsity"}), flush=True)
        return (row, model) if keep else row


# Configurations (method, sink_aware, allocation, refine) beyond the 70% grid, fixed before the run
# (from a quick run) so that every seed's process measures the same ones.
FINAL_70 = [
    ("wanda", False, "uniform", False),
    ("wanda", False, "uniform", True),
    ("wanda", False, "sensitivity", True),
    ("sparsegpt", False, "uniform", False),
    ("sparsegpt", False, "owl", True),
    ("sparsegpt", False, "sensitivity", True),
]
AT_60 = [
    ("wanda", False, "uniform", False),
    ("wanda", False, "uniform", True),
    ("sparsegpt", False, "uniform", False),
    ("sparsegpt", False, "sensitivity", True),
]
AR_70 = [
    ("wanda", False, "uniform", False),
    ("wanda", False, "owl", False),
    ("wanda", False, "sensitivity", False),
    ("wanda", False, "uniform", True),
    ("sparsegpt", False, "uniform", False),
    ("sparsegpt", False, "sensitivity", True),
]


def grid_70() -> list[tuple]:
    """The 70% grid: every allocation × refinement for Wanda (plain, sink-aware) and plain SparseGPT."""
    out = []
    for method, sinks in (("wanda", (False, True)), ("sparsegpt", (False,))):
        for sink in sinks:
            for allocation in ALLOCATIONS:
                for refine in (False, True):
                    out.append((method, sink, allocation, refine))
    return out


def _rows(log: Path | list[Path]) -> list[dict]:
    logs = log if isinstance(log, list) else [log]
    return [json.loads(line) for f in logs if f.exists() for line in f.read_text().splitlines() if line.strip()]


def _config(row) -> tuple:
    return (row["method"], row["sink"], row["allocation"], row["refine"])


def _group(rows, kind, sparsity, draws) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("kind") == kind and r["sparsity"] == sparsity and r["draws"] == draws:
            out.setdefault(_config(r), []).append(r)
    return out


def measure(pair, work: Path, log: Path, seed: int, quick: bool, calibration_store) -> None:
    """One calibration seed's share of the plan, appended to ``log``."""
    heldout = {
        "dlm": {"grid": (16, 1) if quick else (64, 2), "full": (32, 2) if quick else (128, 4)},
        "ar": {"grid": (16, 1) if quick else (160, 1)},
    }
    grid = Grid(pair, log, heldout, quick)
    rows = 4 if quick else 16
    store = calibration_store(pair, seed, rows, work / f"alloc-dlm-{seed}", quick)
    for config in grid_70():
        grid.run("dlm", store, seed, 0.7, *config)
    for config in FINAL_70:
        grid.run("dlm", store, seed, 0.7, *config, draws="full")
    for config in AT_60:
        grid.run("dlm", store, seed, 0.6, *config, draws="full")
    ids = pipeline.load_ids("calibration")
    start = seed * rows % max(ids.shape[0] - rows, 1)
    ar_store = pipeline.record_calibration(pair, "ar", work / f"alloc-ar-{seed}", ids[start : start + rows])
    for config in AR_70:
        grid.run("ar", ar_store, seed, 0.7, *config)


def task(pair, work: Path, logs: list[Path], out_log: Path, quick: bool, calibration_store) -> None:
    """lm-eval continuation accuracy of the 70% baseline and the best configuration (seed 0)."""
    import task_eval

    full = _group(_rows(logs), "dlm", 0.7, "full")
    best = min(full, key=lambda c: statistics.fmean(r["nll"] for r in full[c]))
    grid = Grid(pair, out_log, {"dlm": {"task": (16, 1)}}, quick)
    store = calibration_store(pair, 0, 4 if quick else 16, work / "alloc-task", quick)
    for config in [("wanda", False, "uniform", False), best]:
        _, model = grid.run("dlm", store, 0, 0.7, *config, draws="task", keep=True)
        score = task_eval.task_accuracy(
            model, tokenizer=pipeline.MODELS / "tiny-dlm", mc_num=2 if quick else 4, limit=12 if quick else None
        )
        row = {"task": list(config), "acc": score["acc"], "stderr": score["acc_stderr"], "items": score["items"]}
        with out_log.open("a") as f:
            f.write(json.dumps(row) + "\n")


def render(logs: list[Path], task_log: Path) -> str:  # filled in below
    return MARKERS[0] + "\n" + "\n".join(json.dumps(r) for r in _rows(logs + [task_log])) + "\n" + MARKERS[1]


def splice(path: Path, section: str) -> None:
    """Replace (or append) the allocation section of an existing RESULTS.md."""
    text = path.read_text()
    start, end = MARKERS
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        anchor = "## Where a small byte-level pair"
        text = text.replace(anchor, section + "\n\n" + anchor) if anchor in text else text + "\n" + section
    path.write_text(text)
