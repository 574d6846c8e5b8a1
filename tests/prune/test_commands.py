"""The installed ``attnprobe`` console script's prune, eval and report commands, offline, on the shipped
tiny DLM, each in a subprocess in a temporary directory."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prune.recipe import Calibration, Recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "models" / "tiny-dlm"
SCRIPT = Path(sys.executable).parent / "attnprobe"
SMALL = ["--windows", "4", "--seq-len", "64", "--steps", "4", "--sample-interval", "2", "--batch-size", "4"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="attnprobe console script not installed")


def attnprobe(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT, env=ENV, timeout=600
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calibration.txt"
    path.write_text((ROOT / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, text) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("run") / "OUT"
    done = attnprobe(
        "prune",
        TINY,
        "--calibration",
        text,
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--output",
        out,
        *SMALL,
    )
    return out, done


def _linears(model):
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def test_prune_writes_a_checkpoint_at_the_sparsity_with_its_recipe_and_report(pruned):
    from transformers import AutoModelForCausalLM

    out, done = pruned
    for phase in (
        "[1/4] loading the model",
        "[2/4] recording the calibration store",
        "[3/4] pruning",
        "[4/4] writing",
    ):
        assert phase in done.stderr
    model = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    assert all(float((m.weight == 0).float().mean()) == 0.5 for m in _linears(model))
    assert Recipe.load(out / "recipe.yaml") == Recipe(
        calibration=Calibration(windows=4, seq_len=64, steps=4, sample_interval=2, batch_size=4)
    )
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("masks.safetensors", "report.csv", "coverage.csv", "summary.json", "calibration.json"):
        assert (out / name).is_file(), name
    assert (out / "model" / "tokenizer.json").is_file() and (out / "model" / "recipe.yaml").is_file()


def test_the_recipe_file_alone_reproduces_the_masks_and_a_rerun_reuses_the_store(pruned, text, tmp_path):
    out, _ = pruned
    again = tmp_path / "again"
    attnprobe("prune", TINY, "--calibration", text, "--recipe", out / "recipe.yaml", "--output", again)
    first, second = load_file(str(out / "masks.safetensors")), load_file(str(again / "masks.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # the same run again: the store is reused (its files untouched), the masks the same
    stamps = {p: p.stat().st_mtime_ns for p in (again / "calibration").rglob("*") if p.is_file()}
    done = attnprobe(
        "prune", TINY, "--calibration", text, "--recipe", again / "recipe.yaml", "--output", again
    )
    assert "reusing" in done.stderr and "fingerprint" in done.stderr
    assert stamps == {p: p.stat().st_mtime_ns for p in (again / "calibration").rglob("*") if p.is_file()}
    third = load_file(str(again / "masks.safetensors"))
    assert all(torch.equal(first[k], third[k]) for k in first)
    # another calibration setting does not silently reuse it
    refused = attnprobe(
        "prune",
        TINY,
        "--calibration",
        text,
        "--recipe",
        again / "recipe.yaml",
        "--output",
        again,
        "--windows",
        "2",
        check=False,
    )
    assert refused.returncode == 2 and "--overwrite" in refused.stderr


def test_a_bad_recipe_key_is_refused_with_the_valid_keys(tmp_path, text):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: wanda\nsparsty: 0.5\n")
    done = attnprobe(
        "prune", TINY, "--calibration", text, "--recipe", bad, "--output", tmp_path / "o", check=False
    )
    assert done.returncode == 2 and "sparsty" in done.stderr
    assert all(key in done.stderr for key in Recipe.keys())
    assert not (tmp_path / "o" / "masks.safetensors").exists()


def test_dry_run_prints_the_memory_plan_without_weights(tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(TINY / "config.json", config_only / "config.json")  # no weights to load
    done = attnprobe(
        "prune",
        config_only,
        "--output",
        tmp_path / "o",
        "--dry-run",
        "--sequential",
        "--method",
        "sparsegpt",
        "--device",
        "cuda:0",
    )
    assert "device peak" in done.stdout and "host peak" in done.stdout and "4 blocks" in done.stdout
    assert not (tmp_path / "o" / "masks.safetensors").exists()


def test_report_redraws_the_figure(pruned, tmp_path):
    out, _ = pruned
    done = attnprobe("report", out, "-o", tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG" and "fig.png" in done.stdout


def test_eval_scores_the_pruned_output_on_the_local_task(pruned):
    out, _ = pruned
    done = attnprobe(
        "eval",
        out,
        "--include_path",
        "examples/tasks",
        "--tasks",
        "attnprobe_continuation",
        "--model_args",
        "mc_num=1,batch_size=16,device=cpu",
        "--limit",
        "4",
    )
    assert "attnprobe_continuation" in done.stdout and "acc" in done.stdout
    results = list((out / "eval").rglob("results*.json"))
    assert results, list((out / "eval").rglob("*"))
    scores = json.loads(results[0].read_text())["results"]["attnprobe_continuation"]
    assert 0 <= scores["acc,none"] <= 1
    assert "model" in scores or "alias" in scores


def test_help_lists_every_option():
    help_text = attnprobe("prune", "--help").stdout
    for cls in (Recipe, Calibration):
        for field in dataclasses.fields(cls):
            if field.metadata.get("cli", True):
                flag = "--" + field.name.replace("_", "-")
                assert flag in help_text, flag
                assert field.metadata["help"].split("(")[0].split()[0] in help_text, field.name
    for option in (
        "--calibration",
        "--output",
        "--recipe",
        "--dtype",
        "--trust-remote-code",
        "--dry-run",
        "--overwrite",
        "--no-checkpoint",
        "--no-plot",
        "--quiet",
    ):
        assert option in help_text, option
    top = attnprobe("--help").stdout
    assert all(command in top for command in ("plot-sinks", "summary", "prune", "eval", "report"))
    report = attnprobe("report", "--help").stdout
    assert "DIR" in report and "--output" in report
    evaluation = attnprobe("eval", "--help").stdout
    assert "MODEL_OR_DIR" in evaluation and "--tasks" in evaluation and "--model_args" in evaluation


def test_torchrun_prunes_data_parallel_and_rank_0_writes(pruned, text, tmp_path):
    out, _ = pruned
    ddp = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv += [str(SCRIPT)]
    argv += ["prune", str(TINY), "--calibration", str(text), "--output", str(ddp), "--quiet", *SMALL]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [p for p in (ddp / "calibration").iterdir() if p.is_dir()]
    assert len(shards) == 2, sorted(p.name for p in (ddp / "calibration").iterdir())  # one per rank
    assert done.stdout.count("everything is in") == 1  # rank 0 reports (and writes)
    one, two = load_file(str(out / "masks.safetensors")), load_file(str(ddp / "masks.safetensors"))
    assert one.keys() == two.keys()
    # Sums over the windows run in another order on two ranks: ties may fall the other way, rarely.
    same = sum(int((one[k] == two[k]).sum()) for k in one) / sum(one[k].numel() for k in one)
    assert same > 0.99
