"""attention_mass against an explicit float64 computation of the full probability matrix."""

from __future__ import annotations

import math

import pytest
import torch

from attnprobe.recording.mass import attention_mass

RTOL = 1e-5


def eager_mass(query, key, attn_mask=None, *, is_causal=False, scale=None, query_valid=None):
    """Full (batch, heads, queries, keys) softmax in float64, summed over queries."""
    q, k = query.double(), key.double()
    q_heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(q_heads // kv_heads, dim=1)  # query head h -> key head h // group
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale  # (batch, heads, queries, keys)
    n_q, n_k = scores.shape[-2:]
    allowed = torch.ones(scores.shape, dtype=torch.bool)
    if is_causal:
        allowed &= torch.ones(n_q, n_k, dtype=torch.bool).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed &= attn_mask
        else:
            scores = scores + attn_mask.double()
            allowed &= attn_mask > float("-inf")
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    if query_valid is not None:
        probs = probs * query_valid[:, None, :, None]
    return probs.sum(-2)


def assert_close(actual, expected):
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected).abs().max()
    assert err <= RTOL * expected.abs().max().clamp(min=1.0), f"max abs error {err}"


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 7, 16, generator=g) * 2
    key = torch.randn(2, 4, 7, 16, generator=g) * 2
    return query, key


def test_no_mask(qk):
    query, key = qk
    mass = attention_mass(query, key)
    assert_close(mass, eager_mass(query, key))
    # every query row sums to one, so the mass sums to the number of queries
    torch.testing.assert_close(mass.sum(-1), torch.full((2, 4), 7.0))


def test_explicit_scale(qk):
    query, key = qk
    assert_close(attention_mass(query, key, scale=0.3), eager_mass(query, key, scale=0.3))


def test_bool_padding_mask(qk):
    query, key = qk
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False  # the last two keys of sample 1 are padding
    mass = attention_mass(query, key, mask)
    assert_close(mass, eager_mass(query, key, mask))
    assert (mass[1, :, 5:] == 0).all()


def test_additive_mask(qk):
    query, key = qk
    g = torch.Generator().manual_seed(1)
    mask = torch.randn(2, 4, 7, 7, generator=g)
    mask[0, :, :, 3] = float("-inf")
    assert_close(attention_mass(query, key, mask), eager_mass(query, key, mask))


def test_two_dim_mask_broadcasts(qk):
    query, key = qk
    mask = torch.rand(7, 7, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[:, 0] = True
    assert_close(attention_mass(query, key, mask), eager_mass(query, key, mask))


def test_causal(qk):
    query, key = qk
    mass = attention_mass(query, key, is_causal=True)
    assert_close(mass, eager_mass(query, key, is_causal=True))
    # key 0 is seen by every query, the last key only by the last query
    assert (mass[..., 0] >= mass[..., -1]).all()


def test_causal_queries_differ_from_keys():
    g = torch.Generator().manual_seed(3)
    query, key = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    # upper-left alignment: query i sees keys 0..i, so keys 3..8 get nothing
    mass = attention_mass(query, key, is_causal=True)
    assert_close(mass, eager_mass(query, key, is_causal=True))
    assert (mass[..., 3:] == 0).all()


def test_queries_differ_from_keys():
    g = torch.Generator().manual_seed(4)
    query, key = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    mask = torch.ones(2, 1, 5, 11, dtype=torch.bool)
    mask[0, :, :, 8:] = False
    mass = attention_mass(query, key, mask)
    assert mass.shape == (2, 3, 11)
    assert_close(mass, eager_mass(query, key, mask))


@pytest.mark.parametrize("enable_gqa", [True, False])
def test_grouped_query_attention(enable_gqa):
    g = torch.Generator().manual_seed(5)
    query, key = torch.randn(2, 6, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.ones(2, 6, 5, 5, dtype=torch.bool)
    mask[:, 3, :, 0] = False  # a head-specific mask exercises the head split (2 kv heads x 3)
    mass = attention_mass(query, key, mask, enable_gqa=enable_gqa, max_chunk_bytes=1)
    assert_close(mass, eager_mass(query, key, mask))
    repeated = attention_mass(query, key.repeat_interleave(3, dim=1), mask)
    torch.testing.assert_close(mass, repeated, rtol=RTOL, atol=1e-6)


def test_fully_masked_rows_add_nothing(qk):
    query, key = qk
    bool_mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    bool_mask[0, :, 2] = False  # query 2 of sample 0 may attend nowhere
    float_mask = torch.zeros(2, 1, 7, 7)
    float_mask[0, :, 2] = float("-inf")
    for mask in (bool_mask, float_mask):
        mass = attention_mass(query, key, mask)
        assert torch.isfinite(mass).all()
        assert_close(mass, eager_mass(query, key, mask))
        torch.testing.assert_close(mass.sum(-1), torch.tensor([[6.0] * 4, [7.0] * 4]))


def test_query_valid(qk):
    query, key = qk
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 4:] = False
    mass = attention_mass(query, key, query_valid=valid)
    assert_close(mass, eager_mass(query, key, query_valid=valid))
    torch.testing.assert_close(mass.sum(-1), torch.tensor([[7.0] * 4, [4.0] * 4]))
    # query_valid combines with a key padding mask
    mask = valid[:, None, None, :]
    assert_close(
        attention_mass(query, key, mask, query_valid=valid, max_chunk_bytes=1),
        eager_mass(query, key, mask, query_valid=valid),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(qk, dtype):
    query, key = (t.to(dtype) for t in qk)
    mask = torch.zeros(2, 1, 1, 7, dtype=dtype)
    mask[0, ..., -1] = torch.finfo(dtype).min
    mass = attention_mass(query, key, mask)
    assert mass.dtype == torch.float32
    # the reference sees the very same low-precision values, so float32 math must match it
    assert_close(mass, eager_mass(query, key, mask))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"is_causal": True}, {"query_valid": torch.tensor([[True] * 6 + [False]] * 2)}],
)
def test_tiny_chunks_match_one_chunk(qk, kwargs):
    query, key = qk
    mask = (
        None
        if kwargs.get("is_causal")
        else torch.rand(2, 4, 7, 7, generator=torch.Generator().manual_seed(6))
    )
    whole = attention_mass(query, key, mask, **kwargs)
    for chunk_bytes in (1, 2 * 4 * 7 * 4 * 3):  # one query row per chunk; three rows with a ragged end
        chunked = attention_mass(query, key, mask, max_chunk_bytes=chunk_bytes, **kwargs)
        torch.testing.assert_close(chunked, whole, rtol=RTOL, atol=1e-6)
    assert_close(whole, eager_mass(query, key, mask, **kwargs))


def test_inputs_left_untouched_and_no_grad(qk):
    query, key = (t.clone().requires_grad_() for t in qk)
    before = query.detach().clone()
    mass = attention_mass(query, key, scale=1.0)
    assert not mass.requires_grad
    assert torch.equal(query.detach(), before)


def test_empty_keys():
    mass = attention_mass(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4))
    assert mass.shape == (1, 2, 0)


@pytest.mark.parametrize(
    ("query", "key", "kwargs", "match"),
    [
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), {}, "4-D"),
        (torch.randn(1, 4, 3, 8), torch.randn(1, 3, 3, 8), {}, "multiple of key heads"),
        (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 4), {}, "head_dim"),
        (
            torch.randn(1, 2, 3, 8),
            torch.randn(1, 2, 3, 8),
            {"attn_mask": torch.ones(5, 3, dtype=torch.bool)},
            "queries",
        ),
        (
            torch.randn(1, 2, 3, 8),
            torch.randn(1, 2, 3, 8),
            {"attn_mask": torch.ones(3, 3, dtype=torch.bool), "is_causal": True},
            "not both",
        ),
        (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), {"query_valid": torch.ones(1, 3)}, "query_valid"),
    ],
)
def test_rejects_bad_arguments(query, key, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_mass(query, key, **kwargs)
