"""Mixture-of-experts under data parallelism: two gloo ranks (sharded store, per-expert statistics
all-reduced in the block-wise engine) give the masks of one process, and write them into every
rank's model (apply reads its weights back)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests import moe_models
from tests.assertions import MASK_AGREEMENT
from tests.distributed import _moe_workers

# Plainly and under the moving device (tests/conftest.py): the spawned ranks inherit the environment.
pytestmark = pytest.mark.moving_device


@pytest.mark.slow  # spawns two processes: about 20 s on 2 cores
def test_two_ranks_prune_every_expert_like_one_process(tmp_path):
    procs = mp.start_processes(
        _moe_workers.ranks, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    single = _moe_workers.prune_cases(moe_models.qwen3_moe(), tmp_path / "single")
    procs.join(300)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for case, expected in single.items():
        for masks in ranks:
            assert any(".experts.down_proj." in name for name in masks[case])
            assert masks[case].keys() == expected.keys(), case
            # per-rank sums all-reduced vs one process's sums: near-ties aside (tests/assertions.py)
            agree = sum(int((masks[case][n] == m).sum()) for n, m in expected.items())
            assert agree / sum(m.numel() for m in expected.values()) >= MASK_AGREEMENT, case
        for name, mask in ranks[0][case].items():  # every rank ends with the same model
            assert torch.equal(mask, ranks[1][case][name]), (case, name)
