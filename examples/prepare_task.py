"""Write the local lm-eval tasks of the shipped pair into ``examples/tasks/`` from the held-out windows.

``attnprobe_continuation`` (multiple choice, 4-way): the context is the first 96 bytes of a held-out
window (after BOS), the answer its last 31 bytes, the three distractors the last 31 bytes of other
held-out windows. Context + answer is exactly the window the models never trained on, 128 tokens with
BOS. Chance is 0.25. ``attnprobe_heldout`` (rolling log-likelihood) scores whole windows, so its
bits-per-byte is the held-out NLL that ``prune.evaluate`` measures.

Only windows whose three pieces are whole UTF-8 text are used (a window cut from the byte stream may
start or end inside a character). The choice of items and distractors is seeded, so the files are
reproducible::

    python examples/prepare_task.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
CONTEXT_BYTES, CONTINUATION_BYTES, CHOICES = 96, 31, 4


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def windows(heldout_path: Path) -> list[tuple[str, str]]:
    """(context, continuation) of every held-out window whose pieces are whole UTF-8 text."""
    rows = load_file(str(heldout_path))["input_ids"][:, 1:].tolist()  # drop BOS
    out = []
    for row in rows:
        if len(row) != CONTEXT_BYTES + CONTINUATION_BYTES or max(row) > 255:
            raise ValueError(f"held-out windows must be BOS + {CONTEXT_BYTES + CONTINUATION_BYTES} bytes")
        context, continuation = _text(bytes(row[:CONTEXT_BYTES])), _text(bytes(row[CONTEXT_BYTES:]))
        if context is not None and continuation is not None:
            out.append((context, continuation))
    return out


def continuation_items(pairs: list[tuple[str, str]], num_items: int, seed: int) -> list[dict]:
    """``num_items`` multiple-choice items; distractors are continuations of other windows."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(pairs)), num_items))
    items = []
    for index in chosen:
        context, answer = pairs[index]
        others = [i for i in range(len(pairs)) if pairs[i][1] != answer]
        choices = [pairs[i][1] for i in rng.sample(others, CHOICES - 1)]
        label = rng.randrange(CHOICES)
        choices.insert(label, answer)
        items.append({"id": index, "context": context, "choices": choices, "label": label})
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=Path, default=HERE / "data" / "heldout.safetensors")
    parser.add_argument("--out", type=Path, default=HERE / "tasks")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--rolling-items", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pairs = windows(args.heldout)
    args.out.mkdir(parents=True, exist_ok=True)
    items = continuation_items(pairs, args.items, args.seed)
    with open(args.out / "continuation.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    step = len(pairs) // args.rolling_items
    with open(args.out / "heldout.jsonl", "w") as f:
        for index in range(0, step * args.rolling_items, step):
            f.write(json.dumps({"id": index, "text": "".join(pairs[index])}, ensure_ascii=False) + "\n")
    print(f"{len(items)} items from {len(pairs)} whole-UTF-8 windows, {args.rolling_items} rolling texts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
