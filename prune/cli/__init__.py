"""The ``attnprobe`` command: ``plot-sinks`` and ``summary`` (:mod:`attnprobe.cli`) plus ``prune``,
``eval`` and ``report``.

The installed console script is :func:`main` here. ``attnprobe`` never imports ``prune`` (the
dependency runs one way, docs/DESIGN.md), so the store commands stay in :mod:`attnprobe.cli`, which
takes extra subcommands as an argument, and this package adds the pruning ones: ``python -m
attnprobe.cli`` is the store tools alone, ``attnprobe`` (this) is everything. Each command lives in
its own module and imports torch, transformers and lm-eval only when it runs, so ``--help`` is quick.
"""

from __future__ import annotations

import sys
from typing import Any

from attnprobe import cli_main


def add_commands(commands: Any) -> None:
    """Add ``prune``, ``eval`` and ``report`` to the ``attnprobe`` subparsers action."""
    from prune.cli import eval_command, prune_command, report_command

    prune_command.add_parser(commands)
    eval_command.add_parser(commands)
    report_command.add_parser(commands)


def main(argv: list[str] | None = None) -> int:
    """Run ``attnprobe`` with every command (the installed console script).

    Example (not run as a doctest: it records and prunes for minutes; tests/prune/test_commands.py runs
    every command through the installed script):
        >>> main(["prune", "examples/models/tiny-dlm", "--calibration", "train.txt",
        ...       "--output", "out/tiny"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:  # lm-eval parses its own arguments (and its --help)
        from prune.cli import eval_command

        return eval_command.run(argv[1:])
    return cli_main(argv, extra_commands=add_commands)


if __name__ == "__main__":
    raise SystemExit(main())
