"""The moving device (prune.engine.moving_device): onloading that copies and poisons on the CPU."""

from __future__ import annotations

import torch
from torch import nn

from prune.engine.moving_device import ENV_VAR, enabled
from prune.engine.onload import moving_device, onloaded, streamed


def _block():
    block = nn.Linear(3, 2)
    block.register_buffer("steps", torch.arange(3))
    with torch.no_grad():
        block.weight.copy_(torch.arange(6.0).reshape(2, 3))
    return block


def test_switched_by_the_environment_and_the_context_manager(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert not enabled()
    monkeypatch.setenv(ENV_VAR, "1")
    assert enabled()
    with moving_device(False):
        assert not enabled()
    monkeypatch.setenv(ENV_VAR, "0")
    assert not enabled()
    with moving_device():
        assert enabled()
    assert not enabled()


def test_onload_copies_poisons_the_host_and_writes_back():
    block = _block()
    host, host_buffer = block.weight.data, block.steps
    with moving_device():
        with onloaded(block, "cpu"):
            assert block.weight.data.data_ptr() != host.data_ptr()  # fresh storage
            assert torch.isnan(host).all()  # a stale view reads NaN
            assert block.steps is not host_buffer and torch.equal(block.steps, torch.arange(3))
            with torch.no_grad():
                block.weight[0, 0] = 0.0
        assert block.weight.data.data_ptr() == host.data_ptr()  # the original storage, written back
    assert block.weight.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert block.steps is host_buffer


def test_without_write_back_the_host_gets_its_own_values_back():
    block = _block()
    with moving_device():
        with onloaded(block, "cpu", write_back=False):
            with torch.no_grad():
                block.weight.zero_()
    assert block.weight.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_device_none_moves_too_and_a_failure_still_restores():
    block = _block()
    host = block.weight.data
    try:
        with moving_device():
            with onloaded(block, None):
                assert torch.isnan(host).all()
                raise KeyError("boom")
    except KeyError:
        pass
    assert block.weight.data.data_ptr() == host.data_ptr()
    assert block.weight.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_a_stale_view_taken_before_the_onload_misses_the_write():
    """What the moving device exists to show: a view of host storage taken early is not the weight."""
    block = _block()
    stale = block.weight.detach()[0]  # taken before the onload
    with moving_device():
        with onloaded(block, "cpu"):
            assert torch.isnan(stale).all()
            stale.zero_()  # lands in the poisoned host copy
    assert block.weight[0].tolist() == [0.0, 1.0, 2.0]  # overwritten by the write-back


def test_streamed_forwards_see_no_nan_and_leave_the_weights():
    model = nn.Sequential(nn.Linear(3, 3), nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)]))
    blocks = list(model[1])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    x = torch.ones(2, 3)
    expected = blocks[1](blocks[0](model[0](x)))
    with moving_device(), streamed(model, blocks, "cpu"):
        h = model[0](x)
        for block in blocks:
            h = block(h)
    assert torch.equal(h, expected)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
