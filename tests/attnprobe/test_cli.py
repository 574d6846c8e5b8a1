"""The ``attnprobe`` command line and ``plot_sinks``: figures, tables, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnprobe
from attnprobe.cli import main
from tests import models

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]


def _record_trajectory(model, path: Path, steps: int = 6, seq: int = 24) -> Path:
    """A denoising-like trajectory: all masked at first, then a few more tokens revealed each step."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, models.MASK_TOKEN_ID, (2, seq), generator=g)
    order = torch.randperm(seq, generator=g)
    with attnprobe.record(model, path):
        for step in range(steps):
            ids = torch.full_like(target, models.MASK_TOKEN_ID)
            revealed = order[: step * seq // steps]
            ids[:, revealed] = target[:, revealed]
            with torch.no_grad():
                model(input_ids=ids)
    return path


@pytest.fixture(scope="module")
def dlm_store(tmp_path_factory) -> Path:
    return _record_trajectory(models.llama_bidirectional(), tmp_path_factory.mktemp("dlm") / "store")


@pytest.fixture(scope="module")
def ar_store(tmp_path_factory) -> Path:
    return _record_trajectory(models.llama_causal(), tmp_path_factory.mktemp("ar") / "store")


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def _assert_one_line_error(capsys, code: int, *needles: str) -> str:
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnprobe: error: "), err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


# -- plot-sinks --------------------------------------------------------------------------------------


def test_plot_sinks_writes_png(dlm_store, tmp_path, capsys):
    png = tmp_path / "figs" / "sinks.png"
    assert main(["plot-sinks", str(dlm_store), "-o", str(png)]) == 0
    _assert_png(png)
    assert capsys.readouterr().out.strip() == str(png)


def test_plot_sinks_compare_with_labels(dlm_store, ar_store, tmp_path):
    png = tmp_path / "compare.png"
    argv = ["plot-sinks", str(dlm_store), "--compare", str(ar_store), "-o", str(png)]
    code = main([*argv, "--labels", "DLM", "AR", "--batch", "1", "--sink-std", "1.5", "-q"])
    assert code == 0
    _assert_png(png)


def test_plot_sinks_label_count_mismatch(dlm_store, ar_store, tmp_path, capsys):
    argv = ["plot-sinks", str(dlm_store), "--compare", str(ar_store), "-o", str(tmp_path / "x.png")]
    code = main([*argv, "--labels", "only-one"])
    _assert_one_line_error(capsys, code, "--labels got 1 label(s) for 2 store(s)")
    assert not (tmp_path / "x.png").exists()


def test_plot_sinks_batch_out_of_range(dlm_store, tmp_path, capsys):
    code = main(["plot-sinks", str(dlm_store), "-o", str(tmp_path / "x.png"), "--batch", "5"])
    _assert_one_line_error(capsys, code, "no sample 5")


class _StandIn:
    """The reading API plot_sinks uses, with a sink at a chosen key and a length that can change."""

    def __init__(self, lengths: list[int], sink_at: list[int]):
        self.layers = ["l0", "l1"]
        self.num_steps = len(lengths)
        self.options: dict = {}
        self._mass = []
        for keys, sink in zip(lengths, sink_at):
            m = torch.ones(2, 1, 2, keys)  # (layers, batch, heads, keys)
            m[..., sink] = 20.0
            self._mass.append(m)

    def attention_mass(self, step):
        return self._mass[step]

    def valid(self, step):
        return torch.ones(1, self._mass[step].shape[-1], dtype=torch.bool)

    def step_meta(self, step):
        return {"step": step}


def test_plot_sinks_marks_sinks_and_pads_varying_lengths(tmp_path):
    from attnprobe.analysis.plot import _gather, plot_sinks

    store = _StandIn(lengths=[10, 10, 12], sink_at=[0, 3, 11])
    column = _gather(store, "x", batch=0, sink_std=2.0, progress=False)
    assert column.share.shape == (3, 12)
    assert torch.isnan(torch.from_numpy(column.share[0, 10:])).all()  # padded
    assert list(zip(column.sink_steps, column.sink_keys)) == [(0, 0), (1, 3), (2, 11)]
    assert column.dominant_keys == [0, 3, 11]
    assert column.notes == ["keys vary 10-12: padded"]
    out = plot_sinks([store], ["stand-in"], tmp_path / "p.png", progress=False)
    _assert_png(out)
    with pytest.raises(ValueError, match="1 label"):
        plot_sinks([store, store], ["one"], tmp_path / "q.png")


# -- summary -----------------------------------------------------------------------------------------


def test_summary_table(dlm_store, capsys):
    assert main(["summary", str(dlm_store)]) == 0
    out = capsys.readouterr().out
    for name in ("temporal_variance", "mean_jaccard", "top1_share", "entropy", "n_trajectories"):
        assert name in out
    assert "model.layers.0.self_attn" in out and "model.layers.1.self_attn" in out


def test_summary_json_and_csv(dlm_store, capsys):
    assert main(["summary", str(dlm_store), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)  # strict JSON: NaN is written as null
    assert document["summary"]["n_steps"] == 6
    assert [row["layer"] for row in document["layers"]] == [0, 1]
    assert main(["summary", str(dlm_store), "--format", "csv", "--sink-std", "1.0"]) == 0
    layers, totals = capsys.readouterr().out.split("\n\n")
    assert layers.splitlines()[0].startswith("layer,name,temporal_variance")
    assert "temporal_variance" in totals.splitlines()[0] and len(totals.splitlines()) == 2


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["summary", "plot-sinks"])
def test_missing_store_is_one_line_exit_2(command, tmp_path, capsys):
    missing = tmp_path / "nope"
    argv = [command, str(missing)] + (["-o", str(tmp_path / "x.png")] if command == "plot-sinks" else [])
    _assert_one_line_error(capsys, main(argv), str(missing), "does not exist")


def test_directory_without_manifest_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _assert_one_line_error(capsys, main(["summary", str(tmp_path / "empty")]))
    assert str(tmp_path / "empty") in line


def test_compare_store_missing(dlm_store, tmp_path, capsys):
    argv = ["plot-sinks", str(dlm_store), "--compare", str(tmp_path / "gone"), "-o", str(tmp_path / "x.png")]
    _assert_one_line_error(capsys, main(argv), "gone")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["summary", "s", "--format", "xml"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# -- the entry point ---------------------------------------------------------------------------------


def _python(*args: str) -> subprocess.CompletedProcess:
    # The package may not be installed (the tests run from a checkout): put the checkout on the path.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def test_module_entry_point(dlm_store, tmp_path):
    done = _python("-m", "attnprobe.cli", "summary", str(dlm_store))
    assert done.returncode == 0, done.stderr
    assert "temporal_variance" in done.stdout
    done = _python("-m", "attnprobe.cli", "summary", str(tmp_path / "nope"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("attnprobe: error:") and "Traceback" not in done.stderr


def test_import_is_light():
    code = "import sys, attnprobe.cli, attnprobe.plot; print('matplotlib' in sys.modules)"
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
