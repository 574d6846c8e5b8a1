"""The shipped tiny pair loads offline and still measures what its model card says.

The held-out losses are recomputed here independently of ``examples/train_tiny.py`` (plain masked mean
over the whole held-out set, masks from a different seed than the card's) and compared with
``examples/models/eval.json`` (written with the card by ``examples/write_model_card.py``) within
Monte-Carlo error.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODELS = EXAMPLES / "models"
sys.path.insert(0, str(EXAMPLES))
from tiny_tokenizer import ByteTokenizer  # noqa: E402

# Four standard errors of a difference of two estimates with the card's standard error each.
Z = 4.0


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((MODELS / "eval.json").read_text())


@pytest.fixture(scope="module")
def heldout() -> torch.Tensor:
    return load_file(str(EXAMPLES / "data" / "heldout.safetensors"))["input_ids"]


def _load(name: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(MODELS / name, local_files_only=True).eval()


def test_heldout_file_is_small_and_starts_with_bos(heldout):
    tok = ByteTokenizer()
    assert heldout.dtype == torch.int64 and heldout.shape[1] == 128
    assert (heldout[:, 0] == tok.bos_token_id).all()
    assert (heldout[:, 1:] < 256).all()
    assert (EXAMPLES / "data" / "heldout.safetensors").stat().st_size <= 1_000_000


def test_models_fit_the_size_budget():
    total = sum(f.stat().st_size for d in ("tiny-dlm", "tiny-ar") for f in (MODELS / d).iterdir())
    assert total <= 25 * 2**20


def test_configs_and_tokenizers():
    dlm, ar = _load("tiny-dlm"), _load("tiny-ar")
    tok = ByteTokenizer.load(MODELS / "tiny-dlm")
    assert ByteTokenizer.load(MODELS / "tiny-ar") == tok
    assert dlm.config.is_causal is False
    assert dlm.config.mask_token_id == tok.mask_token_id
    assert ar.config.is_causal is True
    assert dlm.config.vocab_size == ar.config.vocab_size == tok.vocab_size
    assert sum(p.numel() for p in dlm.parameters()) == sum(p.numel() for p in ar.parameters())
    text = "In the beginning was the byte: é."
    assert tok.decode(tok.encode(text, add_eos=True)) == text


def test_dlm_attention_is_bidirectional():
    dlm = _load("tiny-dlm")
    x = torch.full((1, 16), 65)
    y = x.clone()
    y[0, -1] = 66
    with torch.no_grad():
        assert not torch.allclose(dlm(input_ids=x).logits[0, 0], dlm(input_ids=y).logits[0, 0])


@torch.no_grad()
def test_dlm_masked_ce_matches_card_and_beats_unigram(card, heldout):
    tok = ByteTokenizer.load(MODELS / "tiny-dlm")
    dlm = _load("tiny-dlm")
    gen = torch.Generator().manual_seed(20240601)  # not the card's seed: a fresh Monte-Carlo draw
    mask = torch.rand(heldout.shape, generator=gen) < 0.5
    mask[:, 0] = False
    total, count = 0.0, 0
    for start in range(0, len(heldout), 240):
        x, m = heldout[start : start + 240], mask[start : start + 240]
        logits = dlm(input_ids=x.masked_fill(m, tok.mask_token_id)).logits
        total += float(F.cross_entropy(logits[m], x[m], reduction="sum"))
        count += int(m.sum())
    ce = total / count
    ref = card["tiny-dlm"]["masked_ce_t0.5"]
    assert abs(ce - ref["mean"]) <= Z * math.sqrt(2) * ref["se"], (ce, ref)
    # Clearly better than any context-free byte model.
    assert ce < card["unigram_ce_heldout_nats"] - 0.5
    assert ce < card["unigram_entropy_train_nats"] - 0.5


@torch.no_grad()
def test_ar_ce_matches_card(card, heldout):
    ar = _load("tiny-ar")
    logits = torch.cat([ar(input_ids=x).logits[:, :-1] for x in heldout.split(240)])
    ce = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), heldout[:, 1:].reshape(-1)))
    # No Monte-Carlo here: the only difference is float rounding.
    assert ce == pytest.approx(card["tiny-ar"]["next_token_ce"]["mean"], abs=1e-3)
    assert ce < card["unigram_ce_heldout_nats"] - 0.5
