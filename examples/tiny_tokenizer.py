"""Byte-level tokenizer of the shipped tiny models.

Ids 0-255 are the raw UTF-8 bytes, followed by four specials (pad, BOS, EOS, mask). The vocabulary is
padded to a multiple of 8 so the embedding matrix has a friendly shape. The tokenizer is saved next to
each model as ``tokenizer.json`` (a few integers, no merges) and loaded back from the model directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

TOKENIZER_FILE = "tokenizer.json"
_FORMAT = "attnprobe-byte-tokenizer"
_NUM_BYTES = 256


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes plus four special ids.

    Attributes:
        pad_token_id: Padding id.
        bos_token_id: Beginning-of-sequence id; every training and held-out row starts with it.
        eos_token_id: End-of-sequence id.
        mask_token_id: The masked-diffusion ``[MASK]`` id.
        vocab_size: Number of embedding rows (a multiple of 8, at least ``max special id + 1``).
    """

    pad_token_id: int = 256
    bos_token_id: int = 257
    eos_token_id: int = 258
    mask_token_id: int = 259
    vocab_size: int = 264

    def __post_init__(self) -> None:
        specials = [self.pad_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id]
        if len(set(specials)) != 4 or min(specials) < _NUM_BYTES:
            raise ValueError(
                f"special ids {specials} must be distinct and >= {_NUM_BYTES} (ids below are bytes); "
                "choose ids 256..259."
            )
        if self.vocab_size <= max(specials):
            raise ValueError(
                f"vocab_size {self.vocab_size} does not cover special id {max(specials)}; raise vocab_size."
            )

    @property
    def special_ids(self) -> list[int]:
        """The four special ids, in the order pad, BOS, EOS, mask."""
        return [self.pad_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id]

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Encode ``text`` as UTF-8 bytes, optionally framed by BOS/EOS.

        Args:
            text: The string to encode.
            add_bos: Prepend the BOS id.
            add_eos: Append the EOS id.

        Returns:
            A list of token ids.
        """
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: list[int] | Tensor, *, skip_special: bool = True) -> str:
        """Decode ids back to text; invalid UTF-8 sequences become U+FFFD.

        Args:
            ids: Token ids (a list or a 1-D tensor).
            skip_special: Drop special ids; otherwise they are rendered as ``<pad>``, ``<bos>``, ...

        Returns:
            The decoded string.
        """
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        names = {
            self.pad_token_id: "<pad>",
            self.bos_token_id: "<bos>",
            self.eos_token_id: "<eos>",
            self.mask_token_id: "<mask>",
        }
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if i < _NUM_BYTES:
                run.append(i)
                continue
            # Flush bytes before a special so multi-byte characters are decoded as a unit.
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special:
                out.append(names.get(i, f"<unused{i}>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode_tensor(self, text: str, *, add_bos: bool = True) -> Tensor:
        """Encode ``text`` as an int64 tensor of shape ``(1, length)``."""
        return torch.tensor([self.encode(text, add_bos=add_bos)], dtype=torch.long)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory`` and return its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": _FORMAT, **asdict(self)}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        """Load the tokenizer saved in a model directory (or from the JSON file itself).

        Raises:
            FileNotFoundError: If the directory has no ``tokenizer.json``.
            ValueError: If the file is not a byte tokenizer written by :meth:`save`.
        """
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found; the model directory must hold the {TOKENIZER_FILE} written by "
                "examples/train_tiny.py (ByteTokenizer().save(model_dir))."
            )
        data = json.loads(path.read_text())
        if data.pop("format", None) != _FORMAT:
            raise ValueError(f"{path} is not an {_FORMAT} file; re-save it with ByteTokenizer.save().")
        return cls(**data)
