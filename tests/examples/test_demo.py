"""The demo's pipeline end to end on a cut-down setting, on the shipped models, offline."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import attnprobe
import prune

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import demo  # noqa: E402
import pipeline  # noqa: E402


def test_demo_quick_runs_end_to_end(tmp_path):
    tables = demo.run(tmp_path, quick=True)
    pruning = tables["pruning"]
    assert list(pruning["method"]) == ["dense"] + [v[0] for v in demo.VARIANTS]
    assert all(math.isfinite(v) for v in pruning["nll"])
    assert (pruning["achieved_sparsity"][1:] - 0.5).abs().max() < 1e-6
    for name in ("sinks-generation.png", "sinks-calibration.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for kind in ("dlm", "ar"):
        for name in ("generation", "calibration"):
            assert attnprobe.open(tmp_path / "stores" / f"{kind}-{name}").num_steps > 0
    masks = sorted((tmp_path / "masks").glob("*.safetensors"))
    assert len(masks) == len(demo.VARIANTS)
    fresh = pipeline.load_pair().dlm
    header = prune.load_masks(fresh, masks[0])
    assert header["settings"]["sparsity"] == 0.5
    assert (tmp_path / "pruning.csv").is_file() and (tmp_path / "sink_metrics.csv").is_file()
    task = tables["task"]  # lm-eval task accuracy: dense, wanda, sink-aware wanda DLM, AR twin
    assert len(task) == 4 and (tmp_path / "task.csv").is_file()
    assert task["acc"].between(0, 1).all() and (task["acc_stderr"] > 0).all()
    assert (task["items"] == 12).all()
    cli = tmp_path / "cli"  # attnprobe prune and attnprobe report ran on the shipped DLM
    assert (cli / "report.png").read_bytes()[:4] == b"\x89PNG" and (cli / "model" / "config.json").is_file()
    assert prune.Recipe.load(cli / "recipe.yaml").sink_aware
