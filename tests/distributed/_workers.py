"""Process-group workers for the distributed tests (importable by spawned processes; not collected).

Each worker joins a gloo group through a file:// rendezvous in the test's temporary directory (no
ports), runs the public API exactly as a ``torchrun`` script would, and saves what it saw.
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import torch

import attnprobe
import prune
from tests import models

# The module, not the function `prune.apply` that shadows it on the package.
prune_apply = importlib.import_module("prune.engine.planning")

WINDOWS, TOKENS = 6, 32
CALIBRATION = dict(mask_token_id=models.MASK_TOKEN_ID, steps=4, sample_interval=2, batch_size=1, seed=3)
CASES = {
    "wanda": dict(method="wanda"),
    "wanda_sink": dict(method="wanda", sink_aware=True),
    "sparsegpt": dict(method="sparsegpt"),
    "sparsegpt_sink": dict(method="sparsegpt", sink_aware=True),
    # block-wise sequential: each rank runs its share of the steps, block statistics all-reduced
    "wanda_seq": dict(method="wanda", sequential=True),
    "wanda_sink_seq": dict(method="wanda", sink_aware=True, sequential=True),
    "sparsegpt_seq": dict(method="sparsegpt", sequential=True),
    # allocation and refinement (prune.methods.allocation, prune.methods.refine): one-shot and block-wise
    "wanda_sensitivity_refine": dict(method="wanda", allocation="sensitivity", refine=True),
    "wanda_seq_sensitivity_refine": dict(
        method="wanda", sequential=True, allocation="sensitivity", refine=True
    ),
}


def windows() -> torch.Tensor:
    return torch.randint(0, 60, (WINDOWS, TOKENS), generator=torch.Generator().manual_seed(11))


def model():
    return models.llama_bidirectional(seed=0)


def join(rank: int, world: int, tmp: str, rendezvous: str = "rendezvous") -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{Path(tmp) / rendezvous}", rank=rank, world_size=world
    )


def calibrate_into(net, path: Path, **record_options):
    with attnprobe.record(net, path, hessians=True, **record_options) as store:
        attnprobe.calibrate(net, windows(), progress=False, **CALIBRATION)
    return store


def prune_cases(net, store) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    out = {}
    for case, options in CASES.items():
        pruned = copy.deepcopy(net)
        result = prune.apply(pruned, store, 0.5, progress=False, **options)
        weights = {n: m.weight.detach().clone() for n, m in pruned.named_modules() if n in result.masks}
        out[case] = {"masks": result.masks, "weights": weights}
    return out


def parity(rank: int, world: int, tmp: str) -> None:
    """Record into a sharded store, prune every case, save masks and weights of this rank; then die."""
    join(rank, world, tmp)
    net = model()
    store = calibrate_into(net, Path(tmp) / "sharded")
    seen = {"num_steps": store.num_steps, "type": type(store.store).__name__}
    results = prune_cases(net, store)
    seen["errors"] = failures(net, store, Path(tmp), rank)
    # Two sessions of one forward per rank: the second appends a session of shards.
    for append in (False, True):
        with attnprobe.record(net, Path(tmp) / "grown", append=append, linear_stats=False):
            net(input_ids=windows()[rank : rank + 1])
    torch.save({"seen": seen, "results": results}, Path(tmp) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
    killed(rank, world, tmp)  # a second group in the same processes: no second start-up


def killed(rank: int, world: int, tmp: str) -> None:
    """Rank 1 dies (no cleanup, as with SIGKILL) in its third forward; rank 0 finishes its shard."""
    join(rank, world, tmp, "rendezvous-killed")
    net = model()
    if rank == 1:
        calls = []

        def die(module, args):
            calls.append(1)
            if len(calls) == 3:
                os._exit(17)

        net.register_forward_pre_hook(die)
    calibrate_into(net, Path(tmp) / "killed")
    # Not destroy_process_group(): it would wait for the dead peer.
    os._exit(0)


def failures(net, store, tmp: Path, rank: int) -> dict[str, str]:
    """Errors every rank must raise: different windows per rank; a linear failing on rank 1 only."""
    out = {}
    ids = windows()
    if rank == 1:
        ids[0, 0] += 1
    try:
        with attnprobe.record(net, tmp / "mismatch", linear_stats=False):
            attnprobe.calibrate(net, ids, progress=False, **CALIBRATION)
    except ValueError as err:
        out["calibrate"] = str(err)
    pruned = copy.deepcopy(net)
    before = {n: p.detach().clone() for n, p in pruned.named_parameters()}
    real = prune_apply.plan_linear

    def broken(name, *args):
        if rank == 1 and name.endswith("layers.1.mlp.down_proj"):
            raise ValueError(f"statistics for {name} contain NaN (injected)")
        return real(name, *args)

    prune_apply.plan_linear = broken
    try:
        prune.apply(pruned, store, 0.5, method="wanda", progress=False)
    except (ValueError, RuntimeError) as err:
        out["apply"] = f"{type(err).__name__}: {err}"
    finally:
        prune_apply.plan_linear = real
    out["unchanged"] = all(torch.equal(p, before[n]) for n, p in pruned.named_parameters())
    return out
