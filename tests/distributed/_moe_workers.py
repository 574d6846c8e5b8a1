"""Process-group worker for the MoE distributed test (importable by spawned processes; not collected)."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch

import attnprobe
import prune
from prune.engine import block_experts
from tests import moe_models

CALIBRATION = dict(mask_token_id=moe_models.MASK_TOKEN_ID, steps=4, sample_interval=2, batch_size=1, seed=3)
CASES = {
    "wanda_sink": dict(method="wanda", sink_aware=True),
    "wanda_sink_seq": dict(method="wanda", sink_aware=True, sequential=True, device="cpu"),
    # expert Hessians in passes of one expert each (prune.engine.block_experts), all-reduced pass by pass
    "sparsegpt_seq_passes": dict(method="sparsegpt", sequential=True, device="cpu", blocksize=16),
}


def windows() -> torch.Tensor:
    return torch.randint(3, 60, (4, 24), generator=torch.Generator().manual_seed(5))


def prune_cases(net, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    with attnprobe.record(net, path, hessians=True) as store:
        attnprobe.calibrate(net, windows(), progress=False, **CALIBRATION)
    out = {}
    for case, options in CASES.items():
        budget = 1 if case.endswith("_passes") else block_experts.EXPERT_PASS_BYTES
        with _pass_bytes(budget):
            out[case] = prune.apply(copy.deepcopy(net), store, 0.5, progress=False, **options).masks
    return out


@contextmanager
def _pass_bytes(budget: int):
    saved, block_experts.EXPERT_PASS_BYTES = block_experts.EXPERT_PASS_BYTES, budget
    try:
        yield
    finally:
        block_experts.EXPERT_PASS_BYTES = saved


def ranks(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{Path(tmp) / 'rendezvous'}", rank=rank, world_size=world
    )
    try:
        masks = prune_cases(moe_models.qwen3_moe(), Path(tmp) / "sharded")
        torch.save(masks, Path(tmp) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
