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

import pipeline
import torch

import prune
from prune.engine.statistics import SinkSettings
from prune.engine.store_checks import hessians_from_store

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
            model,
            store,
            sparsity,
            method=method,
            sink_aware=sink,
            allocation=chosen,
            refine=refine,
            progress=False,
        )
        seconds = time.perf_counter() - start
        if allocation == "sensitivity" and chosen == "sensitivity":
            self.sensitivity[key] = result.settings["layer_sparsity"]
        rows, samples = self.heldout[kind][draws]
        ids = pipeline.load_ids("heldout")[:rows]
        nll = prune.evaluate(
            model,
            ids,
            mask_token_id=self.pair.mask_token_id if kind == "dlm" else None,
            num_samples=samples,
            progress=False,
        ).nll
        grams = hessians_from_store(store, False, SinkSettings())
        masks = result.masks
        zeros = sum(int((~m).sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        row = {
            "kind": kind,
            "seed": seed,
            "sparsity": sparsity,
            "method": method,
            "sink": sink,
            "allocation": allocation,
            "refine": refine,
            "draws": draws,
            "nll": nll,
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
    return [
        json.loads(line) for f in logs if f.exists() for line in f.read_text().splitlines() if line.strip()
    ]


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
            model,
            tokenizer=pipeline.MODELS / "tiny-dlm",
            mc_num=2 if quick else 4,
            limit=12 if quick else None,
        )
        row = {
            "task": list(config),
            "acc": score["acc"],
            "stderr": score["acc_stderr"],
            "items": score["items"],
        }
        with out_log.open("a") as f:
            f.write(json.dumps(row) + "\n")


LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")  # report order within a tiny-dlm block


def _ms(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _label(config: tuple) -> str:
    method, sink, allocation, refine = config
    return f"{method}{' sink-aware' if sink else ''} | {allocation} | {'on' if refine else 'off'}"


def _paired(rows: list[dict], base: list[dict], key: str = "nll") -> list[float]:
    """Per-seed differences to the baseline measured with the same calibration seed."""
    by_seed = {r["seed"]: r[key] for r in base}
    return [r[key] - by_seed[r["seed"]] for r in rows if r["seed"] in by_seed]


def _table(rows: list[dict], kind: str, sparsity: float, draws: str) -> tuple[str, dict]:
    groups = _group(rows, kind, sparsity, draws)
    base = groups.get(("wanda", False, "uniform", False), [])
    lines = [
        "| method | allocation | refine | held-out NLL | Δ NLL vs uniform Wanda (paired) | mean layer error "
        "| global sparsity | seeds | prune s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config, group in groups.items():
        method, allocation, refine = _label(config).split(" | ")
        delta = _paired(group, base) if config != ("wanda", False, "uniform", False) else []
        sparsities = [r["global_sparsity"] for r in group]
        lines.append(
            f"| {method} | {allocation} | {refine} | {_ms([r['nll'] for r in group])} | "
            f"{_ms(delta) if delta else '-'} | {_ms([r['error'] for r in group], 4)} | "
            f"{min(sparsities):.4f}–{max(sparsities):.4f} | {len(group)} | "
            f"{statistics.fmean(r['seconds'] for r in group):.0f} |"
        )
    return "\n".join(lines), groups


def _layer_table(rows: list[dict], kind: str, method: str) -> str:
    """Per-linear sparsity (seed 0, 70%) of OWL and sensitivity, one column per block."""
    chosen = [
        r
        for r in rows
        if r.get("kind") == kind
        and r["seed"] == 0
        and r["sparsity"] == 0.7
        and r["method"] == method
        and not r["sink"]
        and not r["refine"]
        and r["allocation"] in ("owl", "sensitivity")
        and r["draws"] == "grid"
    ]
    if not chosen:
        return ""
    blocks = len(chosen[0]["layer_sparsity"]) // len(LINEAR_NAMES)
    lines = [
        "| allocation | linear | " + " | ".join(f"block {b}" for b in range(blocks)) + " |",
        "|---|---|" + "---|" * blocks,
    ]
    for r in chosen:
        values = r["layer_sparsity"]
        for i, name in enumerate(LINEAR_NAMES):
            cells = [f"{values[b * len(LINEAR_NAMES) + i]:.3f}" for b in range(blocks)]
            lines.append(f"| {r['allocation']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(logs: list[Path], task_log: Path) -> str:
    """Section 5 of RESULTS.md from the logs of every seed (and of the lm-eval rows)."""
    rows = _rows(logs)
    tasks = [r for r in _rows([task_log]) if "task" in r]
    seeds = sorted({r["seed"] for r in rows})
    parts = [MARKERS[0], SECTION_HEAD.format(seeds=len(seeds))]
    for title, kind, sparsity, draws in (
        ("Diffusion LM, 70%, grid (64 windows × 2 draws)", "dlm", 0.7, "grid"),
        ("Diffusion LM, 70%, final rows (128 windows × 4 draws)", "dlm", 0.7, "full"),
        ("Diffusion LM, 60% (128 windows × 4 draws)", "dlm", 0.6, "full"),
        ("Autoregressive twin, 70% (exact AR NLL, 160 windows)", "ar", 0.7, "grid"),
    ):
        table, groups = _table(rows, kind, sparsity, draws)
        if groups:
            parts += [f"### {title}", table]
    for kind, label in (("dlm", "diffusion LM"), ("ar", "autoregressive twin")):
        layer_table = _layer_table(rows, kind, "wanda")
        if layer_table:
            parts += [f"### Per-linear sparsity chosen for the {label} (Wanda, 70%, seed 0)", layer_table]
    if tasks:
        lines = [
            "| method | allocation | refine | accuracy ± s.e. | items |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {_label(tuple(t['task']))} | {t['acc']:.3f} ± {t['stderr']:.3f} | {t['items']} |"
            for t in tasks
        ]
        parts += [
            "### lm-eval continuation accuracy (70%, calibration seed 0, 4 Monte-Carlo draws per choice)",
            "\n".join(lines),
        ]
    parts += ["### What comes out", _summary(rows)]
    parts.append(MARKERS[1])
    return "\n\n".join(parts)


def _block_means(rows: list[dict], kind: str, allocation: str) -> str:
    """Mean sparsity per block of Wanda's allocation at 70%, averaged over the seeds."""
    chosen = [
        r["layer_sparsity"]
        for r in rows
        if r.get("kind") == kind
        and r["sparsity"] == 0.7
        and r["method"] == "wanda"
        and not r["sink"]
        and not r["refine"]
        and r["allocation"] == allocation
        and r["draws"] == "grid"
    ]
    if not chosen:
        return "-"
    n = len(LINEAR_NAMES)
    blocks = len(chosen[0]) // n
    # every linear type has its own size; weight by it (q, k, v, o: 1; gate, up, down: 512 / 192)
    sizes = [1, 1, 1, 1, 8 / 3, 8 / 3, 8 / 3]
    means = []
    for b in range(blocks):
        values = [statistics.fmean(c[b * n + i] for c in chosen) for i in range(n)]
        means.append(sum(v * w for v, w in zip(values, sizes)) / sum(sizes))
    return ", ".join(f"{m:.3f}" for m in means)


def _summary(rows: list[dict]) -> str:
    lines = []
    full60 = _group(rows, "dlm", 0.6, "full")
    base60, ref60 = (
        full60.get(("wanda", False, "uniform", False)),
        full60.get(("wanda", False, "uniform", True)),
    )
    if base60 and ref60:
        by_seed = {r["seed"]: r for r in base60}
        ratios = [1 - r["error"] / by_seed[r["seed"]]["error"] for r in ref60]
        lines.append(
            f"- 60%, `refine=True` after Wanda: mean layer error {_ms([r['error'] for r in base60], 4)} → "
            f"{_ms([r['error'] for r in ref60], 4)}, i.e. {_ms([100 * x for x in ratios], 1)}% lower "
            f"(script's own computation); held-out NLL Δ {_ms(_paired(ref60, base60))} (paired)."
        )
    full70 = _group(rows, "dlm", 0.7, "full")
    base70 = full70.get(("wanda", False, "uniform", False))
    if base70:
        spread = statistics.stdev(r["nll"] for r in base70) if len(base70) > 1 else float("nan")
        for config, group in sorted(full70.items(), key=lambda kv: statistics.fmean(r["nll"] for r in kv[1])):
            if config == ("wanda", False, "uniform", False):
                continue
            delta = _paired(group, base70)
            lines.append(
                f"- 70%, {_label(config)}: NLL Δ vs uniform Wanda {_ms(delta)} = "
                f"{abs(statistics.fmean(delta)) / spread:.0f} × the baseline's seed std ({spread:.4f})."
            )
    gpt70 = full70.get(("sparsegpt", False, "uniform", False))
    for config, group in full70.items():
        if gpt70 and config[0] == "sparsegpt" and config != ("sparsegpt", False, "uniform", False):
            lines.append(
                f"- 70%, {_label(config)}: NLL Δ vs uniform SparseGPT {_ms(_paired(group, gpt70))} (paired)."
            )
    for kind, label in (("dlm", "diffusion LM"), ("ar", "AR twin")):
        for allocation in ("owl", "sensitivity"):
            lines.append(
                f"- {label}, Wanda 70%, `{allocation}`: mean sparsity per block (0 → 3, weighted by size) "
                f"{_block_means(rows, kind, allocation)}."
            )
    return "\n".join(lines)


SECTION_HEAD = """## 5. Layer allocation and mask refinement

Written by `python examples/write_results.py --only-allocation --allocation-seed S` (one process per
seed S = 0, 1, 2), `--allocation-task` and `--render-allocation`; every number comes from those runs'
logs. One-shot pruning from calibration stores of 16 windows × 10 noise levels per seed ({seeds}
seeds: different windows and masking draws), unstructured. Allocation: `allocation=` of
`prune.apply` (`owl`: M = 5, λ = 0.08; `sensitivity`: ±0.1 around the target); refinement:
`refine=True` (SparseSwaps-style 1-swaps, 30 iterations, 16 candidates per side). *Held-out NLL*:
the masked-diffusion bound in nats per byte (the exact AR NLL for the twin), mean ± standard
deviation over the seeds. *Δ NLL (paired)*: per seed, the configuration minus uniform Wanda from the
same store, mean ± std over the seeds. *Mean layer error*: the mean over the 28 pruned linears of
‖(W − Ŵ)X‖² / ‖WX‖², computed by the script itself from the store's plain Gram matrices (not from
`result.report`). *Global sparsity*: zeros over all pruned weights, min–max over the seeds (uniform
Wanda's per-row `int(in · s)` stays slightly below the target; computed allocations meet it).
Grid rows use fewer held-out draws than the final rows, and the tables use different held-out
subsets: compare rows within a table.

Scope, cut to fit a ~20-minute run on 2 shared CPU cores: the 70% grid covers Wanda (plain and
sink-aware) and plain SparseGPT, each {{uniform, owl, sensitivity}} × refinement {{off, on}}; sink-aware
SparseGPT, the rest of the 60% grid, and 50% / 2:4 were not run. The final rows and the 60% and AR
rows were fixed before the run (from a smaller trial run), not chosen from these results."""


def splice(path: Path, section: str) -> None:
    """Replace (or insert) the allocation section of an existing RESULTS.md."""
    pipeline.splice_section(path, section, MARKERS)
