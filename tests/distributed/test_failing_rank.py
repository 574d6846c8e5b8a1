"""A rank that raises in block-wise mode makes every rank raise, with its error, at the next collective.

Without the collective error check the healthy rank would wait in the next block's statistics
all-reduce until the process group's timeout (30 minutes by default). The ranks here are joined with a
bound far below that; a rank still alive then is the hang this test exists to catch.
"""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from tests.distributed import _failing_workers

WORLD = 2


def test_a_rank_failing_mid_forward_makes_every_rank_raise_its_error(tmp_path):
    _failing_workers.record(tmp_path / "store")
    procs = mp.start_processes(
        _failing_workers.ranks, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    for proc in procs.processes:
        proc.join(240)
    hung = [rank for rank, proc in enumerate(procs.processes) if proc.is_alive()]
    for proc in procs.processes:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if hung:
        pytest.fail(f"rank(s) {hung} still waiting long after rank 1 failed")
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    for case, call in _failing_workers.FAILING_CALLS.items():
        failing, healthy = seen[1][case], seen[0][case]
        assert failing["raised"] == "ValueError"
        assert failing["message"] == f"planted failure in call {call} on rank 1"
        assert healthy["raised"] == "RuntimeError"
        assert "failed on rank 1" in healthy["message"], case
        assert f"planted failure in call {call} on rank 1" in healthy["message"], case
        assert failing["unchanged"] and healthy["unchanged"], case  # every rank rolled back
        assert failing["cache_left"] == healthy["cache_left"] == [], case
