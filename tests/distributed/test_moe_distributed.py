"""Mixture-of-experts under data parallelism: two gloo ranks (sharded store, per-expert statistics
all-reduced in the block-wise engine) give the masks of one process."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests import moe_models
from tests.distributed import _moe_workers


@pytest.mark.slow  # spawns two processes: about 20 s on 2 cores
def test_two_ranks_prune_every_expert_like_one_process(tmp_path):
    procs = mp.start_processes(_moe_workers.ranks, args=(2, str(tmp_path)), nprocs=2, join=False,
                               start_method="spawn")
    single = _moe_workers.prune_cases(moe_models.qwen3_moe(), tmp_path / "single")
    procs.join(300)
    for rank in range(2):
        masks = torch.load(tmp_path / f"rank{rank}.pt")
        for case, expected in single.items():
            assert any(".experts.down_proj." in name for name in masks[case])
            assert masks[case].keys() == expected.keys(), case
            for name, mask in expected.items():
                assert torch.equal(masks[case][name], mask), (rank, case, name)
