"""The trajectory store: exact round trip, atomic steps, lazy reads, refusals and errors naming files."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnprobe
from attnprobe.store import StoreError, TrajectoryStore, open_store
from attnprobe.store import files as store_files_mod
from attnprobe.store import reader as store_mod
from attnprobe.store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
FINGERPRINT = {
    "model_class": "TinyForTest",
    "layers": LAYERS,
    "heads": {name: [2, 1, 4] for name in LAYERS},
    "linears": {"model.layers.0.self_attn.q_proj": [8, 8]},
}
OPTIONS = {"linear_stats": True, "hessians": False, "sink_std": 2.0, "sink_alpha": 5.0}


def _step_tensors(seed: int, batch: int = 2, heads: int = 2, keys: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(batch, keys, dtype=torch.bool)
    valid[1, -1] = False
    return {
        "mass/0": torch.rand(batch, heads, keys, generator=g),
        "mass/1": torch.rand(batch, heads, keys, generator=g),
        "input_ids": torch.randint(0, 100, (batch, keys), generator=g),
        "valid": valid,
        "cand_index": torch.tensor([[0, 1], [1, 3]]),
        "stats/q/sumsq": torch.rand(batch, 8, generator=g),
        "stats/q/wsumsq": torch.rand(batch, 8, generator=g),
        "stats/q/cand_rows": torch.rand(2, 8, generator=g),
    }


def _write(path: Path | None, steps: int = 3, **kwargs) -> StoreWriter:
    writer = StoreWriter.create(path, fingerprint=FINGERPRINT, options=OPTIONS, **kwargs)
    for i in range(steps):
        writer.write_step(_step_tensors(i), {"t": 1 - i / 10}, {"q": ["q_proj", "k_proj"]})
    return writer


# -- round trip ----------------------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path):
    tensors = _step_tensors(0)
    tensors["mass/0"] = tensors["mass/0"].to(torch.float64)[:, :, :]  # another dtype survives as is
    writer = StoreWriter.create(tmp_path / "s", fingerprint=FINGERPRINT, options=OPTIONS)
    assert writer.write_step(tensors, {"t": 0.25, "num_forwards": 2}, {"q": ["a", "b"]}) == 0
    hessians = {"q/plain": torch.rand(8, 8), "q/weighted": torch.rand(8, 8), "q/nsamples": torch.tensor(4)}
    writer.write_hessians(hessians)

    store = attnprobe.open(tmp_path / "s")
    assert isinstance(store, TrajectoryStore)
    assert store.num_steps == len(store) == 1 and list(store) == [0]
    assert store.fingerprint == FINGERPRINT and store.options == OPTIONS
    assert store.layers == LAYERS and store.schema_version == 1
    assert store.step_meta(0) == {"t": 0.25, "num_forwards": 2, "mask_ratio": None, "step": 0}
    assert store.linear_groups(0) == {"q": ["a", "b"]}
    mass0 = store.layer_mass(0, 0)
    assert mass0.dtype == torch.float64 and torch.equal(mass0, tensors["mass/0"])
    assert torch.equal(store.layer_mass(0, LAYERS[1]), tensors["mass/1"])
    for name, read in (
        ("input_ids", store.input_ids(0)),
        ("valid", store.valid(0)),
        ("cand_index", store.candidates(0)),
    ):
        assert read.dtype == tensors[name].dtype and torch.equal(read, tensors[name]), name
    stats = store.linear_stats(0)
    assert set(stats) == {"q"} and set(stats["q"]) == {"sumsq", "wsumsq", "cand_rows"}
    for field, value in stats["q"].items():
        assert torch.equal(value, tensors[f"stats/q/{field}"])
    read_h = store.hessians()
    assert set(read_h["q"]) == {"plain", "weighted", "nsamples"}
    for field, value in read_h["q"].items():
        assert value.dtype == hessians[f"q/{field}"].dtype and torch.equal(value, hessians[f"q/{field}"])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == "attnprobe-trajectory-store" and manifest["schema_version"] == 1
    assert {"created", "attnprobe_version"} <= manifest.keys()


def test_attention_mass_stacks_layers(tmp_path):
    store = _write(tmp_path / "s").store
    mass = store.attention_mass(1)
    expected = _step_tensors(1)
    assert mass.shape == (2, 2, 2, 5) and mass.dtype == torch.float32
    assert torch.equal(mass[0], expected["mass/0"]) and torch.equal(mass[1], expected["mass/1"])


def test_writer_moves_views_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(24.0).reshape(2, 3, 4)
    writer = StoreWriter.create(tmp_path / "s", fingerprint={"layers": ["a", "b"]}, options={})
    writer.write_step({"mass/0": base.transpose(1, 2), "mass/1": base[:, :1]}, {}, {})
    assert torch.equal(writer.store.layer_mass(0, 0), base.transpose(1, 2))
    assert torch.equal(writer.store.layer_mass(0, 1), base[:, :1])


def test_defaults_for_absent_tensors(tmp_path):
    writer = StoreWriter.create(tmp_path / "s", fingerprint={"layers": ["a"]}, options={})
    writer.write_step({"mass/0": torch.rand(3, 2, 7)}, {}, {})
    store = writer.store
    assert store.input_ids(0) is None
    assert store.valid(0).dtype == torch.bool and store.valid(0).shape == (3, 7) and store.valid(0).all()
    assert store.candidates(0).shape == (0, 2)
    assert store.linear_stats(0) == {} and store.linear_groups(0) == {}
    assert store.hessians() is None


def test_metadata_must_be_json(tmp_path):
    writer = StoreWriter.create(tmp_path / "s", fingerprint={}, options={})
    writer.write_step({"mass/0": torch.rand(1, 1, 2)}, {"t": torch.tensor(0.5)}, {})  # 0-dim: a number
    assert writer.store.step_meta(0)["t"] == 0.5
    with pytest.raises(ValueError, match="step metadata must be JSON-serialisable"):
        writer.write_step({"mass/0": torch.rand(1, 1, 2)}, {"model": object()}, {})
    assert writer.store.num_steps == 1


def test_reader_sees_steps_while_writing(tmp_path):
    writer = StoreWriter.create(tmp_path / "s", fingerprint={"layers": []}, options={})
    other = open_store(tmp_path / "s")  # a second reader, as another process would have
    assert writer.store.num_steps == 0 and other.layers == []
    writer.write_step({"mass/0": torch.rand(1, 1, 2)}, {}, {})
    writer.update_fingerprint(layers=["a"])
    assert writer.store.num_steps == other.num_steps == 1
    assert writer.store.layers == other.layers == ["a"]
    assert other.attention_mass(0).shape == (1, 1, 1, 2)


# -- create: refusals, overwrite, append ---------------------------------------------------------------


def test_existing_store_refused_without_flags(tmp_path):
    _write(tmp_path / "s", steps=2)
    with pytest.raises(ValueError, match=r"already holds an attnprobe store \(2 steps\).*overwrite=True"):
        StoreWriter.create(tmp_path / "s", fingerprint=FINGERPRINT, options=OPTIONS)
    with pytest.raises(ValueError, match="exclude each other"):
        StoreWriter.create(tmp_path / "s", fingerprint={}, options={}, overwrite=True, append=True)
    assert open_store(tmp_path / "s").num_steps == 2


def test_overwrite_replaces_the_store_and_keeps_other_files(tmp_path):
    _write(tmp_path / "s", steps=3).write_hessians({"q/plain": torch.eye(2)})
    (tmp_path / "s" / "notes.txt").write_text("mine")
    writer = _write(tmp_path / "s", steps=1, overwrite=True)
    assert writer.store.num_steps == 1 and writer.store.hessians() is None
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "s" / "steps").iterdir()) == ["000000.safetensors"]


def test_append_continues_numbering(tmp_path):
    _write(tmp_path / "s", steps=2)
    unknown_yet = {**FINGERPRINT, "layers": [], "heads": {}}  # what record() knows before its first step
    writer = StoreWriter.create(tmp_path / "s", fingerprint=unknown_yet, options=OPTIONS, append=True)
    assert writer.write_step(_step_tensors(7), {"t": 0.0}, {}) == 2
    store = open_store(tmp_path / "s")
    assert store.num_steps == 3 and store.layers == LAYERS
    assert store.step_meta(2)["step"] == 2
    assert torch.equal(store.layer_mass(2, 0), _step_tensors(7)["mass/0"])


def test_append_refuses_another_model_naming_the_keys(tmp_path):
    _write(tmp_path / "s", steps=1)
    other = {**FINGERPRINT, "model_class": "Other", "linears": {}}
    with pytest.raises(ValueError, match=r"fingerprint differs in \['model_class'\]"):
        StoreWriter.create(tmp_path / "s", fingerprint=other, options=OPTIONS, append=True)
    with pytest.raises(ValueError, match=r"options differs in \['sink_std'\]"):
        StoreWriter.create(
            tmp_path / "s", fingerprint=FINGERPRINT, options={**OPTIONS, "sink_std": 3.0}, append=True
        )


def test_append_to_new_path_creates_the_store(tmp_path):
    writer = _write(tmp_path / "new" / "s", steps=1, append=True)
    assert writer.store.num_steps == 1


def test_non_store_directory_is_never_touched(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    for flags in ({}, {"overwrite": True}, {"append": True}):
        with pytest.raises(ValueError, match="not an attnprobe store.*never"):
            StoreWriter.create(target, fingerprint={}, options={}, **flags)
    assert (target / "thesis.tex").read_text() == "precious" and len(list(target.iterdir())) == 1
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match="it is a file"):
        StoreWriter.create(file, fingerprint={}, options={})


def test_foreign_manifest_is_not_overwritten(tmp_path):
    target = tmp_path / "web"
    target.mkdir()
    (target / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(StoreError, match="not an attnprobe manifest.*delete .* yourself"):
        StoreWriter.create(target, fingerprint={}, options={}, overwrite=True)
    assert (target / "manifest.json").read_text() == '{"name": "my web app"}'


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _write(tmp_path / "empty", steps=1).store.num_steps == 1


# -- temporary stores ----------------------------------------------------------------------------------


def test_temporary_store_lives_as_long_as_its_object():
    writer = _write(None, steps=1)
    store = writer.store
    path = store.path
    del writer
    gc.collect()
    assert path.is_dir() and open_store(path).num_steps == 1  # the store object still holds it
    assert "temporary" in repr(store)
    del store
    gc.collect()
    assert not path.exists()


def test_closing_a_temporary_store_deletes_it(tmp_path):
    with _write(None, steps=1).store as store:
        path = store.path
        assert path.is_dir()
    assert not path.exists()
    kept = _write(tmp_path / "s", steps=1).store
    kept.close()  # a store at a user path is never deleted
    assert (tmp_path / "s" / "steps" / "000000.safetensors").is_file()


def test_closed_writer_refuses_writes(tmp_path):
    writer = _write(tmp_path / "s", steps=1)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_step({"mass/0": torch.rand(1, 1, 2)}, {}, {})
    assert writer.store.num_steps == 1


# -- crashes -------------------------------------------------------------------------------------------


def test_leftover_temp_file_and_partial_write_are_ignored(tmp_path):
    _write(tmp_path / "s", steps=2)
    steps = tmp_path / "s" / "steps"
    complete = (steps / "000001.safetensors").read_bytes()
    (steps / ".000002.safetensors.abc123.tmp").write_bytes(complete[: len(complete) // 2])  # killed mid-write
    (tmp_path / "s" / ".manifest.json.xyz.tmp").write_text('{"trunc')
    store = open_store(tmp_path / "s")
    assert store.num_steps == 2
    assert torch.equal(store.layer_mass(1, 0), _step_tensors(1)["mass/0"])
    with pytest.raises(IndexError, match=r"steps 0\.\.1"):
        store.attention_mass(2)
    # the next writer cleans up and numbers on from the last complete step
    writer = StoreWriter.create(tmp_path / "s", fingerprint=FINGERPRINT, options=OPTIONS, append=True)
    assert not list(steps.glob(".*.tmp")) and not list((tmp_path / "s").glob(".*.tmp"))
    assert writer.write_step(_step_tensors(2), {}, {}) == 2


def test_failed_write_leaves_no_step(tmp_path, monkeypatch):
    writer = _write(tmp_path / "s", steps=1)

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_files_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.write_step(_step_tensors(1), {}, {})
    monkeypatch.undo()
    assert writer.store.num_steps == 1 and os.listdir(tmp_path / "s" / "steps") == ["000000.safetensors"]
    assert writer.write_step(_step_tensors(1), {}, {}) == 1


def test_process_killed_between_write_and_rename(tmp_path):
    # A real hard kill (os._exit: no finally, no cleanup) after step 2's data reached its temp file.
    script = textwrap.dedent(f"""
        import os, torch
        from attnprobe.store.writer import StoreWriter
        writer = StoreWriter.create({str(tmp_path / "s")!r}, fingerprint={{}}, options={{}})
        for i in range(2):
            writer.write_step({{"mass/0": torch.full((1, 1, 3), float(i))}}, {{}}, {{}})
        os.replace = lambda src, dst: os._exit(9)
        writer.write_step({{"mass/0": torch.zeros(1, 1, 3)}}, {{}}, {{}})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert done.returncode == 9, done.stderr.decode()
    assert len(list((tmp_path / "s" / "steps").glob(".*.tmp"))) == 1  # the orphan is there...
    store = open_store(tmp_path / "s")
    assert store.num_steps == 2  # ...and ignored
    assert torch.equal(store.layer_mass(1, 0), torch.full((1, 1, 3), 1.0))


# -- errors that name the file -------------------------------------------------------------------------


def test_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match=r"empty is not an attnprobe store \(no manifest.json\).*\.record"):
        attnprobe.open(tmp_path / "empty")
    with pytest.raises(StoreError, match="does not exist"):
        attnprobe.open(tmp_path / "missing")
    assert issubclass(StoreError, ValueError)


def test_corrupt_manifest_names_the_file(tmp_path):
    _write(tmp_path / "s", steps=1)
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text('{"schema_version": 1,')
    with pytest.raises(StoreError, match=r"manifest\.json is not valid JSON") as err:
        open_store(tmp_path / "s")
    assert str(manifest) in str(err.value)


def test_unsupported_schema_version(tmp_path):
    _write(tmp_path / "s", steps=1)
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "schema_version": 99}))
    with pytest.raises(StoreError, match=r"schema_version 99; this attnprobe reads schema version\(s\) 1"):
        open_store(tmp_path / "s")


def test_gap_in_steps_names_the_missing_file(tmp_path):
    _write(tmp_path / "s", steps=4)
    (tmp_path / "s" / "steps" / "000001.safetensors").unlink()
    with pytest.raises(StoreError, match=r"000001\.safetensors is missing.*contiguous") as err:
        open_store(tmp_path / "s")
    assert str(tmp_path / "s" / "steps" / "000001.safetensors") in str(err.value)


def test_step_file_deleted_after_open(tmp_path):
    store = _write(tmp_path / "s", steps=2).store
    (tmp_path / "s" / "steps" / "000001.safetensors").unlink()
    with pytest.raises((StoreError, IndexError), match="000001|out of range"):
        store.attention_mass(1)


def test_truncated_step_file_names_the_file(tmp_path):
    store = _write(tmp_path / "s", steps=2).store
    file = tmp_path / "s" / "steps" / "000001.safetensors"
    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(StoreError, match="unreadable.*corrupt or truncated") as err:
        store.attention_mass(1)
    assert str(file) in str(err.value)
    assert store.attention_mass(0).shape == (2, 2, 2, 5)  # the other steps stay readable


def test_step_and_layer_ranges(tmp_path):
    store = _write(tmp_path / "s", steps=2).store
    for bad in (-1, 2, 10):
        with pytest.raises(IndexError, match=r"step .* out of range.*steps 0\.\.1"):
            store.step_meta(bad)
    with pytest.raises(IndexError, match=r"layers 0\.\.1"):
        store.layer_mass(0, 5)
    with pytest.raises(KeyError, match="is not a layer"):
        store.layer_mass(0, "model.nope")
    with pytest.raises(TypeError, match="step must be an int"):
        store.attention_mass("0")
    empty = StoreWriter.create(tmp_path / "e", fingerprint={}, options={}).store
    with pytest.raises(IndexError, match="no steps yet"):
        empty.attention_mass(0)


def test_layer_missing_at_a_step_is_a_key_error(tmp_path):
    writer = StoreWriter.create(tmp_path / "s", fingerprint={"layers": ["a", "b"]}, options={})
    writer.write_step({"mass/1": torch.rand(1, 2, 3)}, {}, {})
    with pytest.raises(KeyError, match="no attention mass"):
        writer.store.layer_mass(0, 0)
    with pytest.raises(KeyError, match=r"layer\(s\) \[0\].*layer_mass"):
        writer.store.attention_mass(0)
    assert writer.store.layer_mass(0, "b").shape == (1, 2, 3)


def test_layers_of_different_shapes_ask_for_layer_mass(tmp_path):
    writer = StoreWriter.create(tmp_path / "s", fingerprint={"layers": ["enc", "dec"]}, options={})
    writer.write_step({"mass/0": torch.rand(1, 2, 3), "mass/1": torch.rand(1, 2, 5)}, {}, {})
    with pytest.raises(ValueError, match=r"layer_mass\(step, layer\)"):
        writer.store.attention_mass(0)
    assert writer.store.layer_mass(0, "dec").shape == (1, 2, 5)


# -- laziness ------------------------------------------------------------------------------------------


def test_open_reads_no_step_file(tmp_path, monkeypatch):
    _write(tmp_path / "s", steps=40)
    opened: list[str] = []
    real = store_mod.safe_open

    def counting(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store_mod, "safe_open", counting)
    store = open_store(tmp_path / "s")
    assert store.num_steps == 40 and len(store) == 40 and store.layers == LAYERS
    repr(store)
    assert opened == []
    store.attention_mass(17)
    assert set(opened) == {"000017.safetensors"}
    opened.clear()
    store.step_meta(17), store.linear_groups(17)  # headers are cached
    assert opened == []


# -- pandas --------------------------------------------------------------------------------------------


def test_to_pandas_long_table(tmp_path):
    store = _write(tmp_path / "s", steps=3).store
    df = store.to_pandas()
    assert list(df.columns) == ["step", "layer", "batch", "head", "key", "mass"]
    assert len(df) == 3 * 2 * 2 * 2 * 5
    row = df[(df.step == 2) & (df.layer == 1) & (df.batch == 1) & (df["head"] == 0) & (df.key == 3)]
    assert row.mass.item() == pytest.approx(store.layer_mass(2, 1)[1, 0, 3].item())
    assert df.mass.dtype == "float32" and df.step.dtype == "int64"

    some = store.to_pandas(steps=[1], layers=[LAYERS[1]])
    assert set(some.step) == {1} and set(some.layer) == {1} and len(some) == 2 * 2 * 5

    per_key = store.to_pandas(aggregate="key")
    assert list(per_key.columns) == ["step", "batch", "key", "mass"] and len(per_key) == 3 * 2 * 5
    expected = store.attention_mass(0).sum(dim=(0, 2))  # (batch, keys)
    got = per_key[per_key.step == 0].sort_values(["batch", "key"]).mass.to_numpy()
    assert torch.allclose(torch.tensor(got), expected.reshape(-1))

    per_layer = store.to_pandas(aggregate="layer")
    assert list(per_layer.columns) == ["step", "layer", "batch", "key", "mass"]
    assert len(per_layer) == 3 * 2 * 2 * 5
    with pytest.raises(ValueError, match="aggregate must be"):
        store.to_pandas(aggregate="heads")


def test_to_pandas_of_an_empty_store(tmp_path):
    df = StoreWriter.create(tmp_path / "s", fingerprint={}, options={}).store.to_pandas()
    assert list(df.columns) == ["step", "layer", "batch", "head", "key", "mass"] and df.empty


def test_repr(tmp_path):
    text = repr(_write(tmp_path / "s", steps=2).store)
    assert "steps=2" in text and "layers=2" in text and "TinyForTest" in text and "linear_stats=True" in text
