"""record() as a context: the object it binds is the store, misuse says what happened, and a block
that raises, another thread or recordings closed out of order leave consistent state behind."""

from __future__ import annotations

import threading

import pytest
import torch

import attnprobe
import prune
from attnprobe.store.writer import StoreWriter
from tests import models


def _ids(batch=2, tokens=6, seed=0):
    return torch.randint(0, 60, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _function_modes() -> int:
    return torch._C._len_torch_function_stack()  # private, used only to check that nothing is left


def test_store_repr_and_reads_like_open_after_the_block(tmp_path):
    model = models.llama_bidirectional()
    with attnprobe.record(model, tmp_path / "s") as store:
        model(input_ids=_ids())
        assert "[recording]" in repr(store) and "steps=1" in repr(store)
        model(input_ids=_ids(seed=1))
    text = repr(store)
    assert str(tmp_path / "s") in text and "steps=2" in text and "layers=2" in text and "[closed]" in text
    assert "Recording object at" not in text
    opened = attnprobe.open(tmp_path / "s")
    assert len(store) == store.num_steps == opened.num_steps == 2 and list(store) == [0, 1]
    assert store.layers == opened.layers and store.fingerprint == opened.fingerprint
    for step in store:
        assert torch.equal(store.attention_mass(step), opened.attention_mass(step))
        assert store.linear_stats(step).keys() == opened.linear_stats(step).keys() != set()


def test_use_before_entering_names_the_fix():
    model = models.llama_bidirectional()
    rec = attnprobe.record(model)
    assert "not started" in repr(rec)
    for use in (lambda: rec.num_steps, lambda: rec.attention_mass(0), lambda: rec.store):
        with pytest.raises(RuntimeError, match=r"has not started.*with attnprobe\.record\(model\) as store"):
            use()
    with pytest.raises(RuntimeError, match="has not started"):
        with rec.step(t=0.5):
            pass
    with pytest.raises(RuntimeError, match="has not started"):
        rec.annotate(t=0.5)
    with pytest.raises(AttributeError):  # not the store's API: a plain AttributeError, hasattr works
        rec.no_such_attribute  # noqa: B018
    with pytest.raises(RuntimeError, match="after the block closes"):
        prune.apply(model, rec, 0.5, progress=False)
    with pytest.raises(RuntimeError, match="not open"):
        rec.__exit__(None, None, None)


def test_prune_inside_the_block_and_reentry_are_refused(tmp_path):
    model = models.llama_bidirectional()
    with attnprobe.record(model, tmp_path / "s") as store:
        model(input_ids=_ids())
        with pytest.raises(RuntimeError, match="still open"):
            prune.apply(model, store, 0.5, progress=False)
    with pytest.raises(RuntimeError, match="append=True"):
        store.__enter__()
    with pytest.raises(RuntimeError, match="after the record\\(\\) block closed"):
        store.annotate(t=1.0)


def test_forward_in_another_thread_fails_clearly_and_recording_goes_on(tmp_path):
    model = models.llama_bidirectional()
    errors: list[BaseException] = []

    def worker():
        try:
            model(input_ids=_ids(seed=3))
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            errors.append(err)

    with attnprobe.record(model, tmp_path / "s") as store:
        model(input_ids=_ids())
        thread = threading.Thread(target=worker, name="worker-1")
        thread.start()
        thread.join()
        model(input_ids=_ids(seed=1))
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    message = str(errors[0])
    assert "'worker-1'" in message and "thread that entered record()" in message
    assert "SDPA" not in message and "sdpa" not in message
    assert store.num_steps == 2  # the main thread's steps, none from the worker


def test_recordings_closed_out_of_order_keep_working(tmp_path):
    a, b = models.llama_bidirectional(seed=0), models.qwen2_gqa(seed=1)
    before = _function_modes()
    ra = attnprobe.record(a, tmp_path / "a", linear_stats=False)
    rb = attnprobe.record(b, tmp_path / "b", linear_stats=False)
    ra.__enter__()
    rb.__enter__()
    a(input_ids=_ids())
    ra.__exit__(None, None, None)  # out of order: b's recording is still open
    b(input_ids=_ids())  # used to fail with the misleading "switch to SDPA" error
    b(input_ids=_ids(seed=1))
    rb.__exit__(None, None, None)
    assert ra.num_steps == 1 and rb.num_steps == 2
    assert _function_modes() == before  # both modes popped once the later one closed
    # and in order, again, afterwards
    with attnprobe.record(a, tmp_path / "a2", linear_stats=False) as again:
        a(input_ids=_ids())
    assert again.num_steps == 1 and _function_modes() == before


def _layer_input_hessian(model, name, steps):
    """Σ x xᵀ of a linear's inputs over the given (ids) steps, float64, written out here."""
    module = dict(model.named_modules())[name]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    for ids in steps:
        model(input_ids=ids)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    return x.T @ x


def test_block_that_raises_leaves_hessians_of_the_written_steps_and_closes_the_writer(tmp_path, monkeypatch):
    model = models.llama_bidirectional()
    closed = []
    original_close = StoreWriter.close
    monkeypatch.setattr(StoreWriter, "close", lambda self: (closed.append(self), original_close(self)))
    original_write = StoreWriter.write_step

    def failing_write(self, tensors, meta, groups):
        if self._next == 2:
            raise OSError("disk full (simulated)")
        return original_write(self, tensors, meta, groups)

    monkeypatch.setattr(StoreWriter, "write_step", failing_write)
    written = [_ids(seed=0), _ids(seed=1)]
    with pytest.raises(OSError, match="disk full"):
        with attnprobe.record(model, tmp_path / "s", hessians=True) as store:
            for ids in written:
                model(input_ids=ids)
            # a forward that raises inside the model: its step is dropped
            handle = model.model.layers[1].register_forward_pre_hook(lambda m, a: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                model(input_ids=_ids(seed=5))
            handle.remove()
            model(input_ids=_ids(seed=6))  # reduced, but its file fails to write
    assert len(closed) == 1 and store.closed
    assert store.num_steps == 2
    hessians = store.hessians()
    group = "model.layers.0.self_attn.q_proj"
    assert int(hessians[group]["nsamples"]) == sum(ids.shape[0] for ids in written) == 4
    expected = _layer_input_hessian(model, group, written)
    torch.testing.assert_close(hessians[group]["plain"].double(), expected, rtol=1e-4, atol=1e-4)
    prune.apply(model, store, 0.5, method="sparsegpt", blocksize=16, progress=False)  # consistent: accepted


def test_hessians_that_do_not_cover_the_steps_are_refused(tmp_path):
    model = models.llama_bidirectional()
    with attnprobe.record(model, tmp_path / "s", hessians=True):
        model(input_ids=_ids())
        model(input_ids=_ids(seed=1))
    (tmp_path / "s" / "steps" / "000001.safetensors").unlink()  # a step lost after the Hessians
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"do not cover the store's steps.*4 samples summed, 2 in the steps"):
        prune.apply(model, tmp_path / "s", 0.5, method="sparsegpt", progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
