"""``attnprobe`` command line: figures and metric tables of recorded trajectory stores.

Examples::

    attnprobe plot-sinks runs/llada -o sinks.png --compare runs/llama --labels LLaDA LLaMA
    attnprobe summary runs/llada --format csv

A store that is missing or unreadable, or a request the store cannot satisfy, ends with one line
``attnprobe: error: ...`` on stderr and exit code 2, like an argparse usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROG = "attnprobe"
FORMATS = ("table", "csv", "json")


class _Failure(Exception):
    """A known failure, reported as one line on stderr with exit code 2."""


def _open(path: Path):
    """Open a store, turning every way it can be missing or broken into a :class:`_Failure`."""
    from attnprobe.store import StoreError, open_store

    if not path.exists():
        raise _Failure(f"no trajectory store at {path}: the path does not exist.")
    try:
        return open_store(path)
    except (StoreError, FileNotFoundError, ValueError) as err:
        message = str(err) or type(err).__name__
        if str(path) not in message:
            message = f"cannot read trajectory store {path}: {message}"
        raise _Failure(message) from None


def _plot_sinks(args: argparse.Namespace) -> int:
    paths = [args.store, *args.compare]
    labels = args.labels if args.labels is not None else [p.resolve().name or str(p) for p in paths]
    if len(labels) != len(paths):
        raise _Failure(
            f"--labels got {len(labels)} label(s) for {len(paths)} store(s) "
            f"({', '.join(map(str, paths))}); give one label per store."
        )
    stores = [_open(p) for p in paths]
    try:
        from attnprobe.analysis.plot import plot_sinks
    except ImportError as err:  # matplotlib is an optional extra
        raise _Failure(
            f"plot-sinks needs matplotlib ({err}); install it with pip install 'attnprobe[plot]'."
        ) from None
    try:
        out = plot_sinks(
            stores, labels, args.output, batch=args.batch, sink_std=args.sink_std, progress=not args.quiet
        )
    except ValueError as err:  # a store without steps, or without the requested sample
        raise _Failure(str(err)) from None
    except OSError as err:  # the PNG cannot be written (or a step file cannot be read)
        raise _Failure(f"plot-sinks failed: {err}") from None
    print(out)
    return 0


def _jsonable(value: Any) -> Any:
    """NaN becomes null (JSON has no NaN); numpy scalars become Python numbers."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _summary(args: argparse.Namespace) -> int:
    import pandas as pd

    from attnprobe.analysis import trajectory

    store = _open(args.store)
    try:
        layers = trajectory.layer_table(store)
        totals = trajectory.summary(store, sink_std=args.sink_std)
    except ValueError as err:
        raise _Failure(f"cannot compute metrics of {args.store}: {err}") from None
    skipped = totals.pop("skipped", [])

    if args.format == "json":
        document = {
            "store": str(args.store),
            "summary": {**totals, "skipped": skipped},
            "layers": layers.to_dict(orient="records"),
        }
        print(json.dumps(_jsonable(document), indent=2))
    elif args.format == "csv":
        # Two CSV blocks separated by a blank line: per-layer rows, then the one-row summary.
        sys.stdout.write(layers.to_csv(index=False))
        sys.stdout.write("\n")
        sys.stdout.write(pd.DataFrame([totals]).to_csv(index=False))
    else:
        values = [f"{v:.6g}" if isinstance(v, float) else str(v) for v in totals.values()]
        metrics = pd.DataFrame({"metric": list(totals), "value": values})
        print(f"store: {args.store}  ({totals['n_steps']} steps, {len(layers)} layers)")
        print("\nper-layer metrics")
        print(layers.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        print("\nsummary")
        print(metrics.to_string(index=False))
        if skipped:
            print("\nsteps not compared")
            for line in skipped:
                print(f"  {line}")
    return 0


def build_parser(
    extra_commands: Callable[[Any], None] | None = None,
) -> argparse.ArgumentParser:
    """The argument parser of the ``attnprobe`` command.

    Args:
        extra_commands: called with the subparsers action to add more commands. The installed
            ``attnprobe`` command is ``prune.cli.main``, which adds ``prune``, ``eval`` and ``report``
            this way, so that ``attnprobe`` never imports ``prune``.
    """
    description = "Inspect attention trajectory stores recorded with attnprobe.record()."
    if extra_commands is not None:
        description += " Prune models, score them with lm-eval and draw pruning reports."
    parser = argparse.ArgumentParser(prog=PROG, description=description)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plot = commands.add_parser(
        "plot-sinks",
        help="heat map of attention mass per step and key, with the sinks and how far they move",
        description="Draw, per store (one column each), the step x key attention mass with its sinks, "
        "the dominant sink position per step, and per-layer temporal variance, into a PNG.",
    )
    plot.add_argument("store", type=Path, metavar="STORE", help="trajectory store directory")
    plot.add_argument("-o", "--output", type=Path, required=True, metavar="PNG", help="PNG file to write")
    plot.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        metavar="OTHER",
        help="another store drawn in its own column (repeat for more)",
    )
    plot.add_argument(
        "--labels", nargs="+", metavar="LABEL", help="one title per store (default: directory names)"
    )
    plot.add_argument("--batch", type=int, default=0, metavar="N", help="sample to draw (default: 0)")
    plot.add_argument(
        "--sink-std",
        type=float,
        default=2.0,
        metavar="X",
        help="sink threshold: mass > mean + X * std (default: 2.0)",
    )
    plot.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    plot.set_defaults(handler=_plot_sinks)

    summary = commands.add_parser(
        "summary",
        help="per-layer and aggregated sink metrics of a store",
        description="Print the per-layer metric table and the aggregated trajectory summary "
        "(formulas in docs/METRICS.md).",
    )
    summary.add_argument("store", type=Path, metavar="STORE", help="trajectory store directory")
    summary.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    summary.add_argument(
        "--sink-std",
        type=float,
        default=None,
        metavar="X",
        help="sink threshold for the sink sets (default: the store's recorded sink_std, else 2.0)",
    )
    summary.set_defaults(handler=_summary)
    if extra_commands is not None:
        extra_commands(commands)
    return parser


def main(argv: list[str] | None = None, extra_commands: Callable[[Any], None] | None = None) -> int:
    """Run the ``attnprobe`` command line.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.
        extra_commands: more subcommands (see :func:`build_parser`).

    Returns:
        The exit code: 0 on success, 2 on a missing or unreadable store or another known failure
        (one line on stderr). Usage errors exit 2 through argparse.

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()) as printed:
        ...     code = main(["summary", "runs/gen", "--format", "csv"])
        >>> code, printed.getvalue().splitlines()[0].split(",")[:2]
        (0, ['layer', 'name'])
    """
    args = build_parser(extra_commands).parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except _Failure as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
