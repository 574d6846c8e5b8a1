"""Ship calibration windows from the training split: ``examples/data/calibration.safetensors``.

Pruning calibrates on training text and is evaluated on held-out text, so the two never overlap.
Windows of 127 training bytes, evenly spaced over ``examples/data/raw/train.txt`` (written by
``prepare_corpus.py``), each prefixed by BOS; key ``input_ids``, int64 (rows, 128).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_tokenizer import ByteTokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    train = (HERE / "data" / "raw" / "train.txt").read_bytes()
    span = args.seq_len - 1
    starts = torch.linspace(0, len(train) - span, args.rows).long().tolist()
    ids = torch.empty(args.rows, args.seq_len, dtype=torch.long)
    ids[:, 0] = ByteTokenizer().bos_token_id
    for row, start in enumerate(starts):
        ids[row, 1:] = torch.frombuffer(bytearray(train[start : start + span]), dtype=torch.uint8).long()
    save_file({"input_ids": ids}, str(HERE / "data" / "calibration.safetensors"))


if __name__ == "__main__":
    main()
