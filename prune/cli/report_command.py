"""``attnprobe report DIR``: draw ``report.png`` of an ``attnprobe prune`` output directory.

The figure is :func:`prune.plot_report`'s: per layer the sparsity reached, the reconstruction error
where the run reported one, the mean sink weight per calibration step (from ``DIR/calibration``) and,
for mixture-of-experts models, the share of expert weights pruned. ``attnprobe prune`` draws it too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "report",
        help="draw report.png of an attnprobe prune output directory",
        description="Draw one figure of a pruning run from its output directory (report.csv, recipe.yaml, "
        "summary.json, calibration store): per layer sparsity, reconstruction error where known, mean sink "
        "weight per step, and the pruned share of MoE experts.",
    )
    parser.add_argument(
        "directory", type=Path, metavar="DIR", help="the --output directory of attnprobe prune"
    )
    parser.add_argument(
        "-o", "--output", type=Path, metavar="PNG", help="PNG file to write (default: DIR/report.png)"
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from prune.export.report_plot import plot_report

    output = args.output or args.directory / "report.png"
    try:
        plot_report(args.directory, output)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"attnprobe: error: {err}", file=sys.stderr)
        return 2
    print(output)
    return 0
