"""Build the offline English corpus of the shipped tiny models and its held-out token ids.

Sources (Debian packages, so the corpus can be rebuilt without network access beyond a Debian mirror):

* ``bible-kjv-text``: the King James Bible (public domain), dumped with ``bible -m 4096``.
* ``python3.11-doc`` (or ``python3-doc``): the reStructuredText sources of the Python documentation
  (PSF License Version 2).
* ``jargon-text``: the Jargon File (public domain).

Install them with ``apt-get install -y bible-kjv-text python3-doc jargon-text``.

Each source is cut into contiguous chunks of ``--chunk-bytes``; a chunk goes to validation when the
SHA-256 of ``"<source>:<chunk index>"`` falls below ``--valid-fraction``. The split therefore depends
only on the source text and the two options, never on a random seed. Raw text is written under
``examples/data/raw/`` (git-ignored); ``examples/data/heldout.safetensors`` holds evenly spaced
validation windows of 128 tokens (BOS followed by 127 bytes), small enough to ship.

Usage::

    python examples/prepare_corpus.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_tokenizer import ByteTokenizer  # noqa: E402

logger = logging.getLogger("prepare_corpus")

_HERE = Path(__file__).resolve().parent
_PYDOC_DIRS = [Path("/usr/share/doc/python3.11/html/_sources"), Path("/usr/share/doc/python3/html/_sources")]
_JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
_VERSE_NUMBER = re.compile(r"^\s*\d+\s+")


def read_kjv() -> str:
    """Dump the King James Bible with the ``bible`` program and reflow it into plain paragraphs.

    Verse numbers are dropped and each verse becomes one line, so the model learns prose rather than
    the program's fixed-width layout.
    """
    if shutil.which("bible") is None:
        raise FileNotFoundError("the `bible` program is missing; run `apt-get install -y bible-kjv-text`.")
    raw = subprocess.run(
        ["bible", "-m", "4096", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    lines: list[str] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        if line.startswith("  ") and _VERSE_NUMBER.match(line):
            lines.append(_VERSE_NUMBER.sub("", line).strip())
        elif line.startswith(" ") or not lines or not lines[-1]:
            lines.append(line.strip())
        elif re.match(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$", line.strip()):
            # A chapter heading such as "Genesis 1": keep it on its own line after a blank line.
            lines.extend(["", line.strip()])
        else:
            # Continuation of a verse wrapped at 80 columns.
            lines[-1] = f"{lines[-1]} {line.strip()}"
    return "\n".join(lines).strip() + "\n"


def read_python_docs() -> str:
    """Concatenate the reStructuredText sources of the Python documentation in sorted path order."""
    for root in _PYDOC_DIRS:
        if root.is_dir():
            files = sorted(root.rglob("*.txt"))
            if files:
                return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    raise FileNotFoundError(
        f"no Python documentation sources under {[str(d) for d in _PYDOC_DIRS]}; "
        "run `apt-get install -y python3-doc`."
    )


def read_jargon() -> str:
    """Read the Jargon File text."""
    if not _JARGON.exists():
        raise FileNotFoundError(f"{_JARGON} is missing; run `apt-get install -y jargon-text`.")
    with gzip.open(_JARGON, "rt", encoding="latin-1") as f:
        return f.read()


SOURCES = {"kjv": read_kjv, "python-docs": read_python_docs, "jargon": read_jargon}


def is_validation(source: str, index: int, fraction: float) -> bool:
    """Deterministic split decision for chunk ``index`` of ``source``."""
    digest = hashlib.sha256(f"{source}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_source(name: str, data: bytes, chunk_bytes: int, fraction: float) -> tuple[bytes, bytes]:
    """Split one source into (train, validation) bytes by hashed contiguous chunks."""
    train, valid = bytearray(), bytearray()
    for index, start in enumerate(range(0, len(data), chunk_bytes)):
        chunk = data[start : start + chunk_bytes]
        (valid if is_validation(name, index, fraction) else train).extend(chunk)
    return bytes(train), bytes(valid)


def heldout_windows(valid: bytes, rows: int, seq_len: int, tokenizer: ByteTokenizer) -> torch.Tensor:
    """Evenly spaced windows of ``seq_len - 1`` validation bytes, each prefixed by BOS."""
    span = seq_len - 1
    if len(valid) < rows * span:
        raise ValueError(
            f"validation text has {len(valid)} bytes, fewer than {rows} x {span}; "
            "raise --valid-fraction or lower --heldout-rows."
        )
    starts = torch.linspace(0, len(valid) - span, rows).long().tolist()
    out = torch.empty(rows, seq_len, dtype=torch.long)
    out[:, 0] = tokenizer.bos_token_id
    for r, s in enumerate(starts):
        out[r, 1:] = torch.frombuffer(bytearray(valid[s : s + span]), dtype=torch.uint8).long()
    return out


def main(argv: list[str] | None = None) -> None:
    """Build ``examples/data/raw/{train,valid}.txt``, ``heldout.safetensors`` and ``stats.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=_HERE / "data")
    parser.add_argument("--chunk-bytes", type=int, default=16384)
    parser.add_argument("--valid-fraction", type=float, default=0.03)
    parser.add_argument("--heldout-rows", type=int, default=960, help="960 x 128 int64 = 0.94 MiB")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    tokenizer = ByteTokenizer()
    raw_dir = args.out / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    train_all, valid_all, stats = bytearray(), bytearray(), {}
    for name, reader in SOURCES.items():
        data = reader().encode("utf-8")
        train, valid = split_source(name, data, args.chunk_bytes, args.valid_fraction)
        (raw_dir / f"{name}.txt").write_bytes(data)
        stats[name] = {"bytes": len(data), "train_bytes": len(train), "valid_bytes": len(valid)}
        logger.info("%s: %d bytes (%d train, %d validation)", name, len(data), len(train), len(valid))
        train_all.extend(train)
        valid_all.extend(valid)
    (raw_dir / "train.txt").write_bytes(train_all)
    (raw_dir / "valid.txt").write_bytes(valid_all)

    heldout = heldout_windows(bytes(valid_all), args.heldout_rows, args.seq_len, tokenizer)
    save_file({"input_ids": heldout.contiguous()}, str(args.out / "heldout.safetensors"))

    # Unigram entropy of the training bytes: the loss of a model that ignores all context.
    counts = torch.bincount(torch.frombuffer(bytearray(train_all), dtype=torch.uint8).long(), minlength=256)
    p = counts[counts > 0].double() / counts.sum()
    unigram = float(-(p * p.log()).sum())
    summary = {
        "sources": stats,
        "train_bytes": len(train_all),
        "valid_bytes": len(valid_all),
        "chunk_bytes": args.chunk_bytes,
        "valid_fraction": args.valid_fraction,
        "heldout_shape": list(heldout.shape),
        "unigram_entropy_nats": unigram,
    }
    (args.out / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("held-out %s; unigram entropy of training bytes %.4f nats", tuple(heldout.shape), unigram)


if __name__ == "__main__":
    main()
