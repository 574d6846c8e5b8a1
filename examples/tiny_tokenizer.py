"""Byte-level tokenizer of the shipped tiny models, as a standard Hugging Face tokenizer.

Ids 0-255 are the raw UTF-8 bytes, followed by four specials (pad, BOS, EOS, mask) and reserved ids up
to the vocabulary size (a multiple of 8, so the embedding matrix has a friendly shape).

:class:`ByteTokenizer` is the pure-Python encoder the training scripts use. :meth:`ByteTokenizer.save`
writes the same tokenizer in the Hugging Face format, built with the ``tokenizers`` library: a
byte-level BPE without merges (one token per byte, GPT-2's byte-to-character alphabet), the specials
at their ids, BOS prepended by the post-processor, and ``split_special_tokens`` so text that happens
to contain ``"<mask>"`` is still encoded as its bytes, exactly as in training. Then
``AutoTokenizer.from_pretrained(model_dir)`` works offline, and so does every tool that loads the
tokenizer beside the model (lm-eval, llm-compressor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_NUM_BYTES = 256
_NAMES = ("<pad>", "<bos>", "<eos>", "<mask>")


def byte_alphabet() -> list[str]:
    """The character standing for each byte 0..255 in byte-level BPE vocabularies (GPT-2's mapping).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes take the code points 256, 257, ...
    in byte order, so no token is whitespace or a control character.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    chars, shifted = [], 0
    for byte in range(_NUM_BYTES):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(_NUM_BYTES + shifted))
            shifted += 1
    return chars


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

    def special_names(self) -> dict[int, str]:
        """Token strings of the specials and of the reserved ids up to ``vocab_size``."""
        names = dict(zip(self.special_ids, _NAMES))
        for i in range(_NUM_BYTES, self.vocab_size):
            names.setdefault(i, f"<reserved_{i}>")
        return names

    def build(self) -> Any:
        """The equivalent ``tokenizers.Tokenizer`` (byte-level BPE, no merges, BOS prepended)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

        vocab = {char: byte for byte, char in enumerate(byte_alphabet())}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        # No regex split, no prefix space: every byte of the text becomes exactly one token.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        names = self.special_names()
        # Added tokens take the next free ids, so add them in id order (256, 257, ...).
        tokenizer.add_special_tokens(
            [AddedToken(names[i], special=True, normalized=False) for i in sorted(names)]
        )
        for i, name in names.items():
            if tokenizer.token_to_id(name) != i:
                raise ValueError(f"special {name} landed at id {tokenizer.token_to_id(name)}, not {i}")
        bos = names[self.bos_token_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, self.bos_token_id)]
        )
        return tokenizer

    def save(self, directory: str | Path, *, model_max_length: int | None = None) -> Path:
        """Write the Hugging Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) into
        ``directory`` and return the ``tokenizer.json`` path.

        The config names ``PreTrainedTokenizerFast``, which every transformers version since 4.x
        loads with ``AutoTokenizer.from_pretrained(directory)``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self.build().save(str(path))
        names = self.special_names()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": names[self.bos_token_id],
            "eos_token": names[self.eos_token_id],
            "pad_token": names[self.pad_token_id],
            "mask_token": names[self.mask_token_id],
            "model_max_length": model_max_length or 1_000_000_000_000_000_019_884_624_838_656,
            # Byte-level training never saw specials spelt out in text: keep "<mask>" as 6 bytes.
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
            "padding_side": "right",
        }
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return path

    def to_transformers(self, *, model_max_length: int | None = None) -> Any:
        """The tokenizer as a transformers ``PreTrainedTokenizerFast`` (what ``AutoTokenizer`` loads)."""
        import tempfile

        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp, model_max_length=model_max_length)
            return AutoTokenizer.from_pretrained(tmp)

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        """Read the special ids back from a model directory (or its ``tokenizer.json``).

        Raises:
            FileNotFoundError: If the directory has no ``tokenizer.json``.
            ValueError: If the file is not a byte-level tokenizer written by :meth:`save`.
        """
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found; the model directory must hold the {TOKENIZER_FILE} written by "
                "ByteTokenizer().save(model_dir) (examples/train_tiny.py does)."
            )
        data = json.loads(path.read_text())
        vocab = (data.get("model") or {}).get("vocab") or {}
        if [vocab.get(char) for char in byte_alphabet()] != list(range(_NUM_BYTES)):
            raise ValueError(
                f"{path} is not a byte-level tokenizer with ids 0-255 for the bytes; re-save it with "
                "examples/tiny_tokenizer.py (ByteTokenizer().save(model_dir))."
            )
        added = {token["content"]: token["id"] for token in data.get("added_tokens", [])}
        missing = [name for name in _NAMES if name not in added]
        if missing:
            raise ValueError(
                f"{path} lacks the special tokens {missing}; re-save it with ByteTokenizer.save()."
            )
        pad, bos, eos, mask = (added[name] for name in _NAMES)
        size = max([*added.values(), _NUM_BYTES - 1]) + 1
        return cls(pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, mask_token_id=mask, vocab_size=size)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the Hugging Face tokenizer files of model directories (default: the shipped pair)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    models = Path(__file__).resolve().parent / "models"
    parser.add_argument("dirs", type=Path, nargs="*", default=[models / "tiny-dlm", models / "tiny-ar"])
    args = parser.parse_args(argv)
    for directory in args.dirs:
        config = json.loads((directory / "config.json").read_text())
        tokenizer = ByteTokenizer(
            pad_token_id=config["pad_token_id"],
            bos_token_id=config["bos_token_id"],
            eos_token_id=config["eos_token_id"],
            mask_token_id=config.get("mask_token_id") or ByteTokenizer.mask_token_id,
            vocab_size=config["vocab_size"],
        )
        print(tokenizer.save(directory, model_max_length=config.get("max_position_embeddings")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
