"""The docstring examples of ``attnprobe`` and ``prune`` run (``--doctest-modules``) on the shipped tiny
diffusion LM, offline, inside a temporary working directory, so paths like ``runs/gen`` are scratch.

Names every example may use: ``model`` (``examples/models/tiny-dlm``, loaded afresh for each example,
so an example may prune it), ``ids`` (two calibration windows of 32 tokens), ``prompt`` (one 8-token
prompt), ``moe_model`` (a tiny transformers Qwen3-MoE), ``attnprobe``, ``prune`` and ``torch``. Two
stores lie in the working directory: ``runs/gen`` (a 4-step generation, attention mass only) and
``runs/calib`` (a calibration trajectory of ``ids`` with linear statistics and Hessians). Examples
that need what a test machine lacks (a hub checkpoint, a GPU, a process group) keep
``# doctest: +SKIP`` and say why in the text above them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_DLM = Path(__file__).resolve().parent / "examples" / "models" / "tiny-dlm"


def _tiny_dlm():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_DLM, local_files_only=True).eval()


@pytest.fixture(scope="session")
def _doctest_inputs(tmp_path_factory):
    """Inputs and the two stores, made once per session (the examples copy the stores)."""
    import torch

    import attnprobe
    from tests.moe_models import qwen3_moe

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 32), generator=generator)
    prompt = torch.randint(0, 256, (1, 8), generator=generator)
    model, root = _tiny_dlm(), tmp_path_factory.mktemp("doctest-stores")
    mask = model.config.mask_token_id
    with attnprobe.record(model, root / "gen", linear_stats=False):
        attnprobe.generate(model, prompt, mask_token_id=mask, gen_length=8, steps=4)
    with attnprobe.record(model, root / "calib", hessians=True):
        attnprobe.calibrate(model, ids, mask_token_id=mask, steps=2, sample_interval=1, progress=False)
    return {"ids": ids, "prompt": prompt, "moe_model": qwen3_moe(), "stores": root}


@pytest.fixture(autouse=True)
def _doctest_names(request, monkeypatch, tmp_path):
    if type(request.node).__name__ != "DoctestItem":
        return
    import torch

    import attnprobe
    import prune

    inputs = request.getfixturevalue("_doctest_inputs")
    monkeypatch.chdir(tmp_path)
    for name in ("gen", "calib"):
        shutil.copytree(inputs["stores"] / name, tmp_path / "runs" / name)
    names = request.getfixturevalue("doctest_namespace")
    names.update(attnprobe=attnprobe, prune=prune, torch=torch, model=_tiny_dlm())
    names.update({k: v for k, v in inputs.items() if k != "stores"})
