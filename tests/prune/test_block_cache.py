"""Block inputs cached on disk (``offload_device="disk"``): the same results as in memory, bounded memory.

Reading a step back from its safetensors file gives the bytes that were written, and the engine runs the
same arithmetic on them, so masks, weights and recorded mass must be *exactly* those of the in-memory
cache (the in-memory engine itself is checked against the quadratic procedure in test_blockwise.py).
"""

from __future__ import annotations

import copy
import importlib
import threading

import pytest
import torch

import attnprobe
import prune
from prune.engine import block_cache
from prune.engine.blockwise import CalibrationStep, capture_inputs, find_blocks
from tests import models

MASK = models.MASK_TOKEN_ID
CALIBRATION = dict(steps=4, sample_interval=2, seed=3, batch_size=2)


def _windows(padded: bool):
    ids = torch.randint(3, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    padding = torch.ones(3, 12, dtype=torch.long)
    padding[2, 8:] = 0  # the third window (alone in the second batch) is 8 tokens long
    return ids, padding if padded else None


def _store(model, path, padded: bool):
    ids, mask = _windows(padded)
    with attnprobe.record(model, path, mask_token_id=MASK, linear_stats=False) as store:
        attnprobe.calibrate(
            model, ids, mask_token_id=MASK, attention_mask=mask, progress=False, **CALIBRATION
        )
    return store


CASES = [
    ("llama", lambda: models.llama_bidirectional(num_hidden_layers=3)),
    ("llada", lambda: models.tiny_llada(n_layers=3)),
]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch, build", CASES, ids=[c[0] for c in CASES])
def test_disk_cache_prunes_exactly_as_the_memory_cache(tmp_path, arch, build, method, padded):
    model = models.sharpen(build(), 5.0)
    store = _store(model, tmp_path / "s", padded)
    if padded:
        assert any(not bool(store.valid(step).all()) for step in range(store.num_steps))
    options = dict(method=method, sink_aware=True, sequential=True, blocksize=8, progress=False)
    in_memory, on_disk = copy.deepcopy(model), copy.deepcopy(model)
    expected = prune.apply(in_memory, store, 0.5, **options)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    got = prune.apply(on_disk, store, 0.5, offload_device="disk", cache_dir=cache_dir, **options)
    assert list(cache_dir.iterdir()) == []  # the temporary directory is gone
    assert set(got.masks) == set(expected.masks)
    for name, mask in expected.masks.items():
        assert torch.equal(got.masks[name], mask), name
    for (name, a), b in zip(in_memory.named_parameters(), on_disk.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_record_blockwise_on_disk_writes_the_same_store(tmp_path, padded):
    model = models.sharpen(models.tiny_llada(n_layers=3), 5.0)
    ids, mask = _windows(padded)
    common = dict(mask_token_id=MASK, attention_mask=mask, progress=False, **CALIBRATION)
    ram = prune.record_blockwise(model, ids, tmp_path / "ram", **common)
    disk = prune.record_blockwise(model, ids, tmp_path / "disk", offload_device="disk", **common)
    assert disk.num_steps == ram.num_steps == 4
    for step in range(ram.num_steps):
        assert torch.equal(disk.attention_mass(step), ram.attention_mass(step))
        assert torch.equal(disk.valid(step), ram.valid(step))


def _captured(model, padded: bool, cache):
    ids, mask = _windows(padded)
    valid = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    steps = [CalibrationStep(ids[i : i + 1], valid[i : i + 1]) for i in range(3)]
    first = find_blocks(model, [])[0]
    with torch.no_grad():
        return capture_inputs(model, first, steps, device=None, cache=cache)


def test_arguments_equal_in_every_step_are_kept_once(tmp_path):
    model = models.llama_bidirectional(num_hidden_layers=2)
    ram = _captured(model, False, block_cache.open_cache("cpu"))
    entries = list(ram)
    cos = [entry.kwargs["position_embeddings"][0] for entry in entries]
    assert all(c is cos[0] for c in cos)  # one tensor object, not one per step
    assert all(entry.hidden is not entries[0].hidden for entry in entries[1:])
    with block_cache.open_cache("disk", tmp_path) as disk:
        _captured(model, False, disk)
        files = sorted(p.name for p in disk.path.iterdir())
        # one hidden-state file per step and no per-step argument file: rotary tables are shared
        assert files == [f"hidden-{i:06d}.safetensors" for i in range(3)]
        assert disk.shared_nbytes() == ram.shared_nbytes() > 0
    assert list(tmp_path.iterdir()) == []


def test_padding_masks_differ_per_step_and_round_trip(tmp_path):
    model = models.llama_bidirectional(num_hidden_layers=2)
    ram = list(_captured(model, True, block_cache.open_cache("cpu")))
    with block_cache.open_cache("disk", tmp_path) as disk:
        _captured(model, True, disk)
        for a, b in zip(ram, disk):
            assert torch.equal(a.hidden, b.hidden) and a.slot == b.slot
            for key, value in a.kwargs.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, b.kwargs[key]), key
                elif isinstance(value, tuple):
                    assert all(torch.equal(x, y) for x, y in zip(value, b.kwargs[key])), key
                else:
                    assert value == b.kwargs[key], key


def test_next_step_is_loaded_in_the_background(tmp_path, monkeypatch):
    model = models.llama_bidirectional(num_hidden_layers=2)
    with block_cache.open_cache("disk", tmp_path) as disk:
        _captured(model, False, disk)
        threads, submitted = [], []
        real_read, real_submit = disk._read, disk._loader.submit

        def read(index):
            threads.append(threading.current_thread().name)
            return real_read(index)

        def submit(fn, index):
            submitted.append(index)
            return real_submit(fn, index)

        monkeypatch.setattr(disk, "_read", read)
        monkeypatch.setattr(disk._loader, "submit", submit)
        for index, _ in enumerate(disk):
            # while the caller holds step i, step i + 1 is already on its way
            assert submitted[-1] == min(index + 1, len(disk) - 1)
        assert submitted == [0, 1, 2] and all(name.startswith("prune-prefetch") for name in threads)


def test_failure_removes_the_cache_and_restores_the_weights(tmp_path, monkeypatch):
    apply_mod = importlib.import_module("prune.engine.planning")  # where one linear is planned
    model = models.tiny_llada(n_layers=3)
    store = _store(model, tmp_path / "s", False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    real = apply_mod.plan_linear

    def failing(name, *args, **kwargs):
        if ".blocks.2." in name:
            raise RuntimeError("planted failure")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(apply_mod, "plan_linear", failing)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    with pytest.raises(RuntimeError, match="planted"):
        prune.apply(
            model, store, 0.5, sequential=True, offload_device="disk", cache_dir=cache_dir, progress=False
        )
    assert list(cache_dir.iterdir()) == []
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_bad_offload_values_are_refused_with_the_fix(tmp_path):
    model = models.tiny_llada(n_layers=2)
    store = _store(model, tmp_path / "s", False)
    with pytest.raises(ValueError, match="neither a torch device.*'disk'"):
        prune.apply(model, store, 0.5, sequential=True, offload_device="dsk", progress=False)
    with pytest.raises(ValueError, match="not an existing directory"):
        prune.apply(model, store, 0.5, sequential=True, offload_device="disk", cache_dir=tmp_path / "no")
    with pytest.raises(ValueError, match="pass offload_device='disk'"):
        prune.apply(model, store, 0.5, sequential=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Pass sequential=True"):
        prune.apply(model, store, 0.5, offload_device="disk", progress=False)
    with pytest.raises(ValueError, match="pass offload_device='disk'"):
        prune.record_blockwise(model, _windows(False)[0], mask_token_id=MASK, cache_dir=tmp_path)
