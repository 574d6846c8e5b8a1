"""The shipped pair's tokenizers load with ``AutoTokenizer`` offline and give the training ids."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODELS = EXAMPLES / "models"
sys.path.insert(0, str(EXAMPLES))

from tiny_tokenizer import ByteTokenizer  # noqa: E402

PAIR = ("tiny-dlm", "tiny-ar")


@pytest.fixture(scope="module")
def heldout() -> torch.Tensor:
    return load_file(str(EXAMPLES / "data" / "heldout.safetensors"))["input_ids"]


def _utf8_windows(heldout: torch.Tensor) -> list[tuple[str, list[int]]]:
    """(text, training ids) of every held-out window, trimmed to whole UTF-8 characters.

    Windows are cut from the byte stream, so a few start or end inside a multi-byte character; the
    training ids of such a window are BOS + its bytes, and the text is the longest decodable middle.
    """
    out = []
    for row in heldout.tolist():
        data = bytes(row[1:])
        for lo in range(4):
            for hi in range(len(data), len(data) - 4, -1):
                try:
                    text = data[lo:hi].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                out.append((text, [row[0], *data[lo:hi]]))
                break
            else:
                continue
            break
    return out


@pytest.mark.parametrize("name", PAIR)
def test_autotokenizer_loads_with_training_special_ids(name):
    tok = AutoTokenizer.from_pretrained(MODELS / name, local_files_only=True)
    config = json.loads((MODELS / name / "config.json").read_text())
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (256, 257, 258)
    assert tok.mask_token_id == 259 and tok.convert_ids_to_tokens(259) == "<mask>"
    assert len(tok) == config["vocab_size"] == 264
    assert tok.model_max_length == config["max_position_embeddings"]
    if name == "tiny-dlm":  # the config keeps the mask id the model was trained with
        assert AutoConfig.from_pretrained(MODELS / name).mask_token_id == 259


@pytest.mark.parametrize("name", PAIR)
def test_every_byte_is_its_own_id(name):
    tok = AutoTokenizer.from_pretrained(MODELS / name, local_files_only=True)
    # Independent of the tokenizer: text made of every ASCII byte, plus 2-, 3- and 4-byte characters.
    text = "".join(chr(b) for b in range(128)) + "é ß € 日本 😀"
    expected = [257, *text.encode("utf-8")]
    assert tok(text).input_ids == expected
    assert tok(text, add_special_tokens=False).input_ids == expected[1:]
    assert tok.decode(expected, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", PAIR)
def test_special_names_in_text_stay_bytes(name):
    tok = AutoTokenizer.from_pretrained(MODELS / name, local_files_only=True)
    text = "a <mask> b <bos>"
    assert tok(text).input_ids == [257, *text.encode("utf-8")]


def test_heldout_windows_round_trip_to_training_ids(heldout):
    tok = AutoTokenizer.from_pretrained(MODELS / "tiny-dlm", local_files_only=True)
    windows = _utf8_windows(heldout)
    assert len(windows) >= 0.95 * len(heldout)
    texts = [text for text, _ in windows]
    encoded = tok(texts).input_ids
    assert encoded == [ids for _, ids in windows]
    assert tok.batch_decode(encoded, skip_special_tokens=True) == texts
    # Most windows are whole UTF-8 already: there the ids are the shipped row itself.
    whole = sum(len(ids) == heldout.shape[1] for _, ids in windows)
    assert whole >= 0.9 * len(heldout)


def test_byte_tokenizer_reads_the_saved_files_and_agrees(tmp_path):
    shipped = ByteTokenizer.load(MODELS / "tiny-dlm")
    assert shipped == ByteTokenizer.load(MODELS / "tiny-ar") == ByteTokenizer()
    ByteTokenizer().save(tmp_path, model_max_length=128)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the shipped files are what save() writes
        assert (tmp_path / name).read_text() == (MODELS / "tiny-dlm" / name).read_text()
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "In the beginning was the byte: é."
    assert hf(text).input_ids == shipped.encode(text)


def test_load_rejects_a_foreign_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    with pytest.raises(ValueError, match="byte-level"):
        ByteTokenizer.load(tmp_path)
