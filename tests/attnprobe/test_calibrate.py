"""calibrate(): the public code's forward-noising schedule, one recorded step per (batch, level)."""

from __future__ import annotations

import pytest
import torch

import attnprobe
from attnprobe.denoising.calibrate import noise_levels
from tests import models

MASK = models.MASK_TOKEN_ID


def test_noise_levels_follow_the_reference_schedule():
    assert noise_levels(50, 5) == [k / 50 for k in (5, 10, 15, 20, 25, 30, 35, 40, 45, 50)]
    with pytest.raises(ValueError, match="sample_interval"):
        noise_levels(10, 0)


def test_one_step_per_batch_and_level_with_metadata(tmp_path):
    model = models.llama_bidirectional()
    ids = torch.randint(0, 60, (5, 64), generator=torch.Generator().manual_seed(0))
    with attnprobe.record(model, tmp_path / "s", mask_token_id=MASK) as store:
        count = attnprobe.calibrate(
            model,
            ids,
            mask_token_id=MASK,
            steps=10,
            sample_interval=5,
            batch_size=2,
            keep=[0, -1],
            progress=False,
        )
    assert count == store.num_steps == 3 * 2  # batches of 2, 2, 1 sequences x levels 0.5, 1.0
    metas = [store.step_meta(s) for s in range(store.num_steps)]
    assert [m["t"] for m in metas] == [0.5, 1.0] * 3
    assert [m["sequences"] for m in metas[::2]] == [[0, 1], [2, 3], [4]]
    eps = 1e-3
    for step, meta in enumerate(metas):
        assert meta["p_mask"] == pytest.approx((1 - eps) * meta["t"] + eps)
        noisy = store.input_ids(step)
        clean = ids[meta["sequences"]]
        masked = noisy == MASK
        assert torch.equal(noisy[~masked], clean[~masked])  # only mask tokens are written
        assert not masked[:, 0].any() and not masked[:, -1].any()  # keep= positions never masked
        assert meta["mask_ratio"] == pytest.approx(masked.float().mean().item())
    # at t = 1 nearly everything but the kept positions is masked
    assert store.step_meta(1)["mask_ratio"] > 0.9


def test_same_seed_same_trajectory(tmp_path):
    model = models.tiny_llada()
    ids = torch.randint(0, 60, (2, 16))
    runs = []
    for name in ("a", "b"):
        with attnprobe.record(model, tmp_path / name) as store:
            attnprobe.calibrate(
                model, ids, mask_token_id=MASK, steps=4, sample_interval=2, seed=7, progress=False
            )
        runs.append([store.input_ids(s) for s in range(store.num_steps)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_calibrate_needs_an_active_recording():
    with pytest.raises(RuntimeError, match="record"):
        attnprobe.calibrate(
            models.llama_bidirectional(), torch.zeros(1, 4, dtype=torch.long), mask_token_id=MASK
        )


def test_appended_session_adds_to_hessians(tmp_path):
    model = models.llama_bidirectional()
    ids = torch.randint(0, 60, (1, 8))
    with attnprobe.record(model, tmp_path / "s", hessians=True) as store:
        model(input_ids=ids)
    first = store.hessians()
    with attnprobe.record(model, tmp_path / "s", hessians=True, append=True) as store:
        model(input_ids=ids)
    both = store.hessians()
    for group, tensors in first.items():
        assert torch.allclose(both[group]["plain"], 2 * tensors["plain"])
        assert int(both[group]["nsamples"]) == 2
