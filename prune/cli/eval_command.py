"""``attnprobe eval MODEL_OR_DIR --tasks ... [lm-eval arguments]``: lm-eval's CLI with ``attnprobe``.

lm-eval 0.4.13 discovers no models from other packages, so this command imports
:mod:`prune.evaluation.harness` (which registers the model ``attnprobe``) and then runs lm-eval's own command
line
(``lm-eval run``) with ``--model attnprobe`` and ``pretrained=MODEL_OR_DIR`` put in front of the
``--model_args`` you give (``masks=...``, ``mc_num=...``, ``batch_size=...``). Every other argument is
lm-eval's. ``MODEL_OR_DIR`` is a hub id, a checkpoint directory, or the ``--output`` directory of
``attnprobe prune`` (its ``model/`` checkpoint is scored, and the JSON goes to ``DIR/eval`` unless
``--output_path`` says otherwise). lm-eval prints its table and writes its JSON under ``--output_path``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

USAGE = "attnprobe eval MODEL_OR_DIR --tasks TASKS [--model_args K=V,...] [lm-eval run arguments]"
DESCRIPTION = __doc__.split("\n\n", 1)[1]


def add_parser(commands: Any) -> None:
    # Parsing is lm-eval's (prune.cli.main routes "eval" straight to run()); this entry is for the
    # command list in `attnprobe --help`.
    commands.add_parser(
        "eval",
        help="lm-eval with the attnprobe model: score a (pruned) model on lm-eval tasks",
        description=DESCRIPTION,
        usage=USAGE,
        add_help=False,
    )


def _help() -> str:
    from lm_eval.__main__ import HarnessCLI

    lm_eval_help = HarnessCLI()._subparsers.choices["run"].format_help()
    return f"usage: {USAGE}\n\n{DESCRIPTION}\nlm-eval's arguments (`lm-eval run`):\n\n{lm_eval_help}"


def _split_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from ``argv``; return the value and the rest."""
    rest, value, index = [], None, 0
    while index < len(argv):
        item = argv[index]
        if item == name and index + 1 < len(argv):
            value, index = argv[index + 1], index + 2
            continue
        if item.startswith(name + "="):
            value = item.split("=", 1)[1]
        else:
            rest.append(item)
        index += 1
    return value, rest


def lm_eval_arguments(model: str, argv: list[str]) -> list[str]:
    """lm-eval's ``run`` arguments for scoring ``model`` with the ``attnprobe`` model.

    Example:
        >>> lm_eval_arguments("ckpt", ["--tasks", "t", "--model_args", "mc_num=8"])
        ['--model', 'attnprobe', '--model_args', 'pretrained=ckpt,mc_num=8', '--tasks', 't']
    """
    chosen, argv = _split_option(argv, "--model")
    if chosen not in (None, "attnprobe"):
        raise ValueError(f"attnprobe eval runs the model 'attnprobe'; drop --model {chosen}")
    model_args, argv = _split_option(argv, "--model_args")
    if model_args and any(part.strip().startswith("pretrained=") for part in model_args.split(",")):
        raise ValueError("give the model as MODEL_OR_DIR, not as pretrained= in --model_args")
    directory = Path(model)
    if (directory / "model" / "config.json").is_file() and (directory / "report.csv").is_file():
        if "--output_path" not in argv and not any(a.startswith("--output_path=") for a in argv):
            argv = [*argv, "--output_path", str(directory / "eval")]
        model = str(directory / "model")  # an `attnprobe prune` output directory
    merged = f"pretrained={model}" + (f",{model_args}" if model_args else "")
    return ["--model", "attnprobe", "--model_args", merged, *argv]


def run(argv: list[str]) -> int:
    """Run lm-eval on ``argv`` = ``[MODEL_OR_DIR, lm-eval arguments...]``."""
    try:
        import prune.evaluation.harness  # registers the lm-eval model "attnprobe"
    except ImportError as err:
        print(f"attnprobe: error: {err}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0].startswith("-"):
        print(_help())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        arguments = lm_eval_arguments(argv[0], argv[1:])
    except ValueError as err:
        print(f"attnprobe: error: {err}", file=sys.stderr)
        return 2
    print("lm-eval run " + " ".join(arguments), file=sys.stderr)
    return prune.evaluation.harness.main(["run", *arguments])
