"""Tests of ``attnprobe.denoising.sampler.generate`` on a tiny random bidirectional Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from attnprobe.denoising.sampler import generate, transfer_schedule
from tests import models

VOCAB = 48
MASK = 47


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """A random 2-layer bidirectional Llama (the shared test stand-in) with a 48-token vocabulary."""
    return models.llama_bidirectional(vocab_size=VOCAB, mask_token_id=MASK, max_position_embeddings=64)


class Recorder:
    """Wraps a model and keeps a copy of every input it is called with."""

    def __init__(self, model: torch.nn.Module, *, tensor_output: bool = False) -> None:
        self.model, self.tensor_output, self.inputs = model, tensor_output, []

    def __call__(self, ids: torch.Tensor, **kwargs):
        self.inputs.append(ids.clone())
        out = self.model(input_ids=ids, **kwargs)
        return out.logits if self.tensor_output else out


def _prompt(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fills_every_mask_and_keeps_prompt(model, remasking, temperature):
    prompt = _prompt()
    out = generate(
        model,
        prompt,
        mask_token_id=MASK,
        steps=8,
        gen_length=16,
        block_length=8,
        temperature=temperature,
        remasking=remasking,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (2, 21) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    assert not (out == MASK).any()
    assert ((out >= 0) & (out < VOCAB)).all()


def test_schedule_spreads_remainder_over_first_steps():
    got = transfer_schedule(torch.tensor([10, 4, 0]), 4)
    assert got.tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0]]


def test_steps_reveal_scheduled_counts_block_by_block(model):
    rec = Recorder(model)
    prompt = _prompt(batch=1, length=3)
    out = generate(rec, prompt, mask_token_id=MASK, steps=6, gen_length=10, block_length=5)
    assert len(rec.inputs) == 6  # one forward per step
    masked = [int((x == MASK).sum()) for x in rec.inputs] + [int((out == MASK).sum())]
    # 5 masks per block over 3 steps: reveal 2, 2, 1 in the first block, then the same in the second.
    assert masked == [10, 8, 6, 5, 3, 1, 0]
    # While the first block is decoded, the second block stays fully masked.
    for x in rec.inputs[:3]:
        assert (x[0, 8:] == MASK).all()
    # Revealed positions are never changed afterwards.
    for before, after in zip(rec.inputs, rec.inputs[1:] + [out]):
        fixed = before != MASK
        assert torch.equal(before[fixed], after[fixed])


def test_deterministic_with_seeded_generator(model):
    prompt = _prompt()
    kwargs = dict(mask_token_id=MASK, steps=8, gen_length=8, temperature=1.0, remasking="random")
    a = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kwargs)
    c = generate(model, prompt, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_greedy_matches_argmax_when_one_step_per_token(model):
    # With as many steps as tokens and low-confidence remasking, the first revealed token is the
    # argmax at the most confident masked position of the fully masked answer.
    prompt = _prompt(batch=1)
    rec = Recorder(model)
    out = generate(rec, prompt, mask_token_id=MASK, steps=4, gen_length=4)
    probs = model(input_ids=rec.inputs[0]).logits.double()
    probs[..., MASK] = float("-inf")
    probs = probs.softmax(-1)
    conf, tok = probs[0, 5:].max(-1)
    first = int(conf.argmax())
    assert int(out[0, 5 + first]) == int(tok[first])
    assert int((rec.inputs[1] != MASK).sum()) == 6


def test_accepts_tensor_logits_and_prompt_attention_mask(model):
    prompt = _prompt()
    attn = torch.ones_like(prompt)
    attn[0, 0] = 0  # left padding on the first row
    rec = Recorder(model, tensor_output=True)
    out = generate(rec, prompt, mask_token_id=MASK, steps=4, gen_length=4, attention_mask=attn)
    assert not (out == MASK).any()


def test_masks_inside_prompt_are_left_alone(model):
    prompt = _prompt(batch=1)
    prompt[0, 2] = MASK
    out = generate(model, prompt, mask_token_id=MASK, steps=4, gen_length=4)
    assert torch.equal(out[:, :5], prompt)
    assert not (out[:, 5:] == MASK).any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(gen_length=10, block_length=4), "not divisible by block_length"),
        (dict(steps=6, gen_length=16, block_length=4), "not divisible by the number of blocks"),
        (dict(remasking="top_k"), "unknown remasking"),
        (dict(temperature=-1.0), "temperature"),
        (dict(steps=0), "must be positive"),
    ],
)
def test_bad_arguments_raise(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, _prompt(), mask_token_id=MASK, **kwargs)


def test_bad_prompt_shape_raises(model):
    with pytest.raises(ValueError, match="shape"):
        generate(model, _prompt()[0], mask_token_id=MASK)
