"""Process-group workers for the failing-rank test (importable by spawned processes; not collected).

Both ranks prune one store block-wise; rank 1 raises inside a block's forward. Each rank saves what it
raised, and whether its weights came back unchanged, then the group is torn down normally: every rank
raised at the same collective, so the group is still usable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import attnprobe
import prune
from tests import models

# Calls of layer 0's forward on rank 1 that raise: one in the statistics pass (3 steps per rank, calls
# 1-3), one in the pass that propagates the pruned block's outputs (calls 4-6).
FAILING_CALLS = {"statistics": 2, "propagation": 5}


def model():
    return models.llama_bidirectional(seed=0, num_hidden_layers=3)


def record(path: Path) -> None:
    """The store both ranks prune: 3 windows × 2 noise levels, one window per step (6 steps)."""
    net = model()
    ids = torch.randint(3, 60, (3, 16), generator=torch.Generator().manual_seed(0))
    with attnprobe.record(net, path, mask_token_id=models.MASK_TOKEN_ID, linear_stats=False):
        attnprobe.calibrate(
            net, ids, mask_token_id=models.MASK_TOKEN_ID, steps=4, sample_interval=2, progress=False
        )


def ranks(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{Path(tmp) / 'rendezvous'}", rank=rank, world_size=world
    )
    store = attnprobe.open(Path(tmp) / "store")
    seen = {}
    for case, failing_call in FAILING_CALLS.items():
        net = model()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        calls = []

        def fail(module, args, failing_call=failing_call):
            calls.append(1)
            if len(calls) == failing_call:
                raise ValueError(f"planted failure in call {failing_call} on rank {rank}")

        if rank == 1:
            net.model.layers[0].register_forward_pre_hook(fail)
        # the second case caches block inputs on disk: its directory must go on every rank too
        cache_dir = Path(tmp) / f"cache-{case}-rank{rank}"
        cache_dir.mkdir()
        offload = dict(offload_device="disk", cache_dir=cache_dir) if case == "propagation" else {}
        try:
            prune.apply(net, store, 0.5, method="wanda", sequential=True, progress=False, **offload)
            seen[case] = {"raised": None}
        except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
            seen[case] = {"raised": type(err).__name__, "message": str(err)}
        seen[case]["unchanged"] = all(torch.equal(p, before[n]) for n, p in net.named_parameters())
        seen[case]["cache_left"] = [path.name for path in cache_dir.iterdir()]
    torch.distributed.barrier()  # the group still works after both failures
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()
