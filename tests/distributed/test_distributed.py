"""Data-parallel calibration and pruning: two gloo processes on the CPU against one process.

The spawned ranks (tests/distributed/_workers.py) record one sharded store and prune it; this
process records the same windows alone and prunes the same way. The sharded store must read as the
single store does, step for step, and the pruned models must agree.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import attnprobe
from attnprobe import distributed
from attnprobe.denoising.calibrate import window_seed
from prune.engine.distributed import assign_owners
from tests.distributed import _workers

WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two ranks record and prune a sharded store; one process does the same on the same windows."""
    tmp = tmp_path_factory.mktemp("ddp")
    procs = mp.start_processes(
        _workers.parity, args=(WORLD, str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    net = _workers.model()  # meanwhile, the one-process reference
    single = _workers.calibrate_into(net, tmp / "single")
    reference = _workers.prune_cases(net, single)
    for proc in procs.processes:
        proc.join(300)
    for proc in procs.processes:  # a rank stuck waiting for a failed peer
        if proc.is_alive():
            proc.kill()
            proc.join()
    # rank 1 dies on purpose in the second part (the killed-rank test); anything else is a failure
    exitcodes = [p.exitcode for p in procs.processes]
    for rank in range(WORLD):
        if not (tmp / f"rank{rank}.pt").exists():
            pytest.fail(f"rank {rank} exited with {exitcodes[rank]} before saving its results")
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return {
        "tmp": tmp,
        "sharded": attnprobe.open(tmp / "sharded"),
        "single": attnprobe.open(tmp / "single"),
        "ranks": ranks,
        "reference": reference,
        "exitcodes": exitcodes,
        "model": net,
    }


# -- pure helpers (no process group) -------------------------------------------------------------


def test_shard_range_partitions_in_order():
    assert [list(distributed.shard_range(7, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(distributed.shard_range(1, r, 2)) for r in range(2)] == [[0], []]
    assert distributed.world_size() == 1 and distributed.rank() == 0  # no group in this process


def test_window_seed_is_splitmix64():
    # SplitMix64 from state 0 (Steele et al. 2014; the reference outputs of java.util.SplittableRandom).
    assert window_seed(0, 0) == 0xE220A8397B1DCDAF >> 1
    assert window_seed(0, 1) == 0x6E789E6AA1B965F4 >> 1
    assert window_seed(1, 0) != window_seed(0, 0)


def test_noise_is_per_window_whatever_the_batch(tmp_path):
    net = _workers.model()
    ids = _workers.windows()
    noised = []
    for batch in (1, 4):
        options = {**_workers.CALIBRATION, "batch_size": batch}
        with attnprobe.record(net, tmp_path / f"b{batch}", linear_stats=False) as store:
            attnprobe.calibrate(net, ids, progress=False, **options)
        per_window = {}
        for step in range(store.num_steps):
            meta = store.step_meta(step)
            for row, window in enumerate(meta["sequences"]):
                per_window[(window, meta["t"])] = store.input_ids(step)[row]
        noised.append(per_window)
    assert noised[0].keys() == noised[1].keys()
    assert all(torch.equal(noised[0][k], noised[1][k]) for k in noised[0])


def test_owners_balance_cost_deterministically():
    owners = assign_owners({"big": 100, "a": 30, "b": 30, "c": 30, "d": 10}, 2)
    assert owners == {"big": 0, "a": 1, "b": 1, "c": 1, "d": 1}  # loads 100 and 30+30+30+10


# -- two ranks -------------------------------------------------------------------------------------


def test_sharded_store_reads_as_the_single_one(runs):
    sharded, single = runs["sharded"], runs["single"]
    assert isinstance(sharded, attnprobe.ShardedStore) and sharded.world_size == WORLD
    assert [s["num_steps"] for s in sharded.shards] == [6, 6]
    assert sharded.layers == single.layers and len(single.layers) == 2
    assert sharded.fingerprint == single.fingerprint and sharded.options == single.options
    assert sharded.num_steps == single.num_steps == _workers.WINDOWS * 2
    assert [seen["seen"]["num_steps"] for seen in runs["ranks"]] == [12, 12]  # whole store on every rank
    for step in range(single.num_steps):
        a, b = sharded.step_meta(step), single.step_meta(step)
        assert (a["sequences"], a["t"], a["step"]) == (b["sequences"], b["t"], b["step"])
        assert a["rank"] == (0 if step < 6 else 1)
        assert torch.equal(sharded.input_ids(step), single.input_ids(step))
        torch.testing.assert_close(sharded.attention_mass(step), single.attention_mass(step))
        stats_a, stats_b = sharded.linear_stats(step), single.linear_stats(step)
        assert stats_a.keys() == stats_b.keys()
        for group in stats_b:
            torch.testing.assert_close(stats_a[group]["wsumsq"], stats_b[group]["wsumsq"])
    h_a, h_b = sharded.hessians(), single.hessians()
    for group in h_b:
        assert int(h_a[group]["nsamples"]) == int(h_b[group]["nsamples"]) == _workers.WINDOWS * 2
        torch.testing.assert_close(h_a[group]["weighted"], h_b[group]["weighted"], rtol=1e-5, atol=1e-4)
    table = sharded.to_pandas(aggregate="key")
    assert list(table.columns) == ["step", "rank", "batch", "key", "mass"]
    assert table.groupby("rank").step.unique().map(sorted).tolist() == [list(range(6)), list(range(6, 12))]


@pytest.mark.parametrize("case", ["wanda", "wanda_sink", "wanda_seq", "wanda_sink_seq"])
def test_wanda_masks_match_one_process(runs, case):
    reference = runs["reference"][case]["masks"]
    rank0, rank1 = (r["results"][case]["masks"] for r in runs["ranks"])
    assert rank0.keys() == reference.keys()
    agree = total = 0
    for name, mask in reference.items():
        assert torch.equal(rank0[name], rank1[name])  # every rank ends with the same model
        agree += int((rank0[name] == mask).sum())
        total += mask.numel()
    assert agree / total >= 0.9999


@pytest.mark.parametrize("case", ["wanda_sensitivity_refine", "wanda_seq_sensitivity_refine"])
def test_allocation_and_refinement_agree_across_ranks(runs, case):
    rank0, rank1 = (r["results"][case]["masks"] for r in runs["ranks"])
    reference = runs["reference"][case]["masks"]
    assert rank0.keys() == reference.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # every rank ends with the same model
    zeros = sum(int((~m).sum()) for m in rank0.values()) / sum(m.numel() for m in rank0.values())
    assert abs(zeros - 0.5) <= 0.005
    sparsities = {n: float((~m).float().mean()) for n, m in rank0.items()}
    assert max(sparsities.values()) - min(sparsities.values()) > 0.01  # the allocation is not uniform


@pytest.mark.parametrize("case", ["sparsegpt", "sparsegpt_sink", "sparsegpt_seq"])
def test_sparsegpt_layer_error_matches_one_process(runs, case):
    dense = dict(runs["model"].named_modules())
    hessians = runs["single"].hessians()
    groups = runs["single"].linear_groups(0)
    key = "weighted" if "sink" in case else "plain"
    rank0, rank1 = (r["results"][case]["weights"] for r in runs["ranks"])
    reference = runs["reference"][case]["weights"]
    for group, names in groups.items():
        h = hessians[group][key].double()
        for name in names:
            assert torch.equal(rank0[name], rank1[name])
            w = dense[name].weight.detach().double()

            def error(pruned, w=w, h=h):  # ||(W − Ŵ) X||² = tr(ΔW H ΔWᵀ), H = Σ x xᵀ
                delta = w - pruned.double()
                return float(torch.einsum("oi,ij,oj->", delta, h, delta))

            assert error(rank0[name]) <= 1.001 * error(reference[name]) + 1e-9, name


def test_every_rank_raises_what_one_rank_got_wrong(runs):
    errors = [r["seen"]["errors"] for r in runs["ranks"]]
    for rank_errors in errors:
        assert "the ranks disagree on calibrate()" in rank_errors["calibrate"]
        assert rank_errors["unchanged"]  # no weight changed on any rank
    assert errors[1]["apply"].startswith("ValueError: statistics for model.layers.1.mlp.down_proj")
    assert errors[0]["apply"].startswith("RuntimeError: prune.apply failed on rank 1 (ValueError")


def test_group_appends_a_session_of_shards(runs):
    grown = attnprobe.open(runs["tmp"] / "grown")
    assert [(s["dir"], s["num_steps"]) for s in grown.shards] == [
        ("rank-00000", 1),
        ("rank-00001", 1),
        ("append-001-rank-00000", 1),
        ("append-001-rank-00001", 1),
    ]
    assert [grown.rank_of(step) for step in range(4)] == [0, 1, 0, 1]
    assert torch.equal(grown.input_ids(3), _workers.windows()[1:2])
    assert grown.step_meta(3)["session"] == 1


def test_shards_of_different_models_are_refused(runs, tmp_path):
    copy = tmp_path / "grown"
    shutil.copytree(runs["tmp"] / "grown", copy)
    manifest = copy / "rank-00001" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["fingerprint"]["model_class"] = "SomethingElse"
    manifest.write_text(json.dumps(data))
    with pytest.raises(attnprobe.StoreError, match="disagree on fingerprint field 'model_class'"):
        attnprobe.open(copy).fingerprint


def test_killed_rank_leaves_a_readable_store_that_appends(runs):
    assert runs["exitcodes"] == [0, 17]
    tmp_path = runs["tmp"]
    store = attnprobe.open(tmp_path / "killed")
    # rank 0: 3 windows x 2 levels; rank 1 died in its third forward, after two complete steps.
    assert [s["num_steps"] for s in store.shards] == [6, 2]
    assert store.num_steps == 8
    assert all(store.attention_mass(step).isfinite().all() for step in range(store.num_steps))
    assert store.step_meta(7)["sequences"] == [3] and store.rank_of(7) == 1
    # One process appends a session of its own after the existing shards.
    net = _workers.model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with attnprobe.record(net, tmp_path / "killed", append=True, hessians=True) as appended:
            net(input_ids=_workers.windows()[:1])
    assert appended.num_steps == 9 and store.num_steps == 9
    assert store.shards[-1]["dir"] == "append-001-rank-00000" and store.rank_of(8) == 0
    assert store.step_meta(8)["session"] == 1
