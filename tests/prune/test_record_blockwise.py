"""prune.record_blockwise: the block-wise dense pass writes the store attnprobe.record + calibrate write.

The golden store comes from the ordinary recorder (whole-model forwards under ``attnprobe.record``,
itself checked against eager attention in tests/attnprobe); the block-wise pass shares none of its
driving code (capture, block-by-block propagation, spooling, step assembly).
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
import prune
from tests import models
from tests.assertions import assert_masks_agree

# every test here runs plainly and under the moving device (tests/conftest.py)
pytestmark = pytest.mark.moving_device

MASK = models.MASK_TOKEN_ID
CALIBRATION = dict(steps=4, sample_interval=2, seed=3, batch_size=2)


def _windows():
    ids = torch.randint(3, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    padding = torch.ones(3, 12, dtype=torch.long)
    padding[2, 8:] = 0  # the third window (alone in the second batch) is 8 tokens long
    return ids, padding


CASES = [
    ("llama", lambda: models.llama_bidirectional(num_hidden_layers=3)),
    ("llada", lambda: models.tiny_llada(n_layers=3)),
    ("llada-bf16", lambda: models.tiny_llada(n_layers=3).to(torch.bfloat16)),
]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("arch, build", CASES, ids=[c[0] for c in CASES])
def test_blockwise_store_equals_the_recorded_one(tmp_path, arch, build, padded):
    model = models.sharpen(build(), 5.0)
    ids, padding = _windows()
    mask = padding if padded else None
    with attnprobe.record(model, tmp_path / "ref", mask_token_id=MASK, linear_stats=False) as ref:
        attnprobe.calibrate(
            model, ids, mask_token_id=MASK, attention_mask=mask, progress=False, **CALIBRATION
        )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = prune.record_blockwise(
        model, ids, tmp_path / "blk", mask_token_id=MASK, attention_mask=mask, progress=False, **CALIBRATION
    )
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # the dense pass changes no weight
    got = attnprobe.open(got.path)
    assert got.num_steps == ref.num_steps == 2 * 2
    assert got.layers == ref.layers
    assert got.fingerprint["heads"] == ref.fingerprint["heads"]
    for step in range(ref.num_steps):
        assert torch.equal(got.input_ids(step), ref.input_ids(step))
        assert torch.equal(got.valid(step), ref.valid(step))
        meta, ref_meta = got.step_meta(step), ref.step_meta(step)
        for key in ("t", "p_mask", "sequences", "mask_ratio", "num_forwards", "step"):
            assert meta[key] == ref_meta[key], key
        torch.testing.assert_close(got.attention_mass(step), ref.attention_mass(step), rtol=1e-5, atol=1e-5)
    if padded:
        last = got.attention_mass(ref.num_steps - 1)  # (layers, batch, heads, keys) of the padded window
        assert last[..., 8:].abs().max() == 0 and last[..., :8].sum() > 0
    # No spool left behind next to the store.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blk", "ref"]

    for method in ("wanda", "sparsegpt"):
        results = [
            prune.apply(
                copy.deepcopy(model),
                store,
                0.5,
                method=method,
                sink_aware=True,
                sequential=True,
                blocksize=16,
                progress=False,
            )
            for store in (ref, got)
        ]
        assert set(results[0].masks) == set(results[1].masks)
        for name, m in results[0].masks.items():  # the stores agree to rounding: near-ties aside
            assert_masks_agree(results[1].masks[name], m, f"{method} {name}")


def test_blockwise_pass_onloads_from_another_device(tmp_path):
    # device= takes the onloading path (here to the CPU itself: no GPU in the tests), store in a temp dir.
    model = models.tiny_llada(n_layers=2)
    ids, padding = _windows()
    with attnprobe.record(model, tmp_path / "ref", mask_token_id=MASK, linear_stats=False) as ref:
        attnprobe.calibrate(
            model, ids, mask_token_id=MASK, attention_mask=padding, progress=False, **CALIBRATION
        )
    got = prune.record_blockwise(
        model,
        ids,
        None,
        mask_token_id=MASK,
        attention_mask=padding,
        device="cpu",
        progress=False,
        **CALIBRATION,
    )
    for step in range(ref.num_steps):
        torch.testing.assert_close(got.attention_mass(step), ref.attention_mass(step), rtol=1e-5, atol=1e-5)


def test_existing_store_is_refused_before_any_block_runs(tmp_path):
    model = models.tiny_llada(n_layers=2)
    ids, _ = _windows()
    prune.record_blockwise(model, ids, tmp_path / "s", mask_token_id=MASK, progress=False, **CALIBRATION)
    with pytest.raises(ValueError, match="overwrite=True"):
        prune.record_blockwise(model, ids, tmp_path / "s", mask_token_id=MASK, progress=False, **CALIBRATION)


def test_eager_attention_is_refused_with_the_fix(tmp_path):
    model = models.use_eager_attention(models.llama_bidirectional(num_hidden_layers=2))
    ids, _ = _windows()
    with pytest.raises(RuntimeError, match="attn_implementation='sdpa'"):
        prune.record_blockwise(model, ids, tmp_path / "s", mask_token_id=MASK, progress=False, **CALIBRATION)
