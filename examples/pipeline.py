"""The steps the demo and the results script share: load the shipped pair, record, prune, evaluate.

Everything reads files shipped in the repository (``examples/models``, ``examples/data``), so it runs
offline on a fresh machine.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

import attnprobe
import prune

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
DATA = HERE / "data"

# (label, method, sink_aware, sink_policy)
UNSTRUCTURED_VARIANTS = [
    ("magnitude", "magnitude", False, "all"),
    ("wanda", "wanda", False, "all"),
    ("wanda sink-aware", "wanda", True, "all"),
    ("sparsegpt", "sparsegpt", False, "all"),
    ("sparsegpt sink-aware", "sparsegpt", True, "all"),
]
UNSTABLE_VARIANTS = [("wanda sink-aware unstable", "wanda", True, "unstable")]


@dataclass
class Pair:
    """The shipped diffusion LM, its autoregressive twin and the tokenizer's special ids."""

    dlm: nn.Module
    ar: nn.Module
    mask_token_id: int
    bos_token_id: int


def load_pair(models: Path = MODELS) -> Pair:
    """Load both shipped models offline, in float32 eval mode with SDPA attention."""
    loaded = []
    for name in ("tiny-dlm", "tiny-ar"):
        path = models / name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no model; train one with examples/train_tiny.py")
        loaded.append(AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval())
    dlm, ar = loaded
    return Pair(dlm=dlm, ar=ar, mask_token_id=dlm.config.mask_token_id, bos_token_id=dlm.config.bos_token_id)


def load_ids(name: str) -> Tensor:
    """Token ids shipped under ``examples/data/<name>.safetensors`` (key ``input_ids``)."""
    return load_file(str(DATA / f"{name}.safetensors"))["input_ids"]


def split_heldout(calibration_rows: int) -> tuple[Tensor, Tensor]:
    """Calibration windows (from the training split) and evaluation windows (held out)."""
    return load_ids("calibration")[:calibration_rows], load_ids("heldout")


@torch.no_grad()
def ar_generate(model: nn.Module, prompt: Tensor, new_tokens: int, pad_token_id: int) -> Tensor:
    """Greedy autoregressive generation, one full forward per new token (= one step).

    The sequence lives on a fixed canvas of ``prompt + new_tokens`` positions, the positions not yet
    generated padded and masked out, so every step has the same length and the steps of the
    trajectory can be compared position by position (as the diffusion LM's can).
    """
    batch, start = prompt.shape
    ids = torch.full((batch, start + new_tokens), pad_token_id, dtype=prompt.dtype)
    ids[:, :start] = prompt
    mask = torch.zeros_like(ids)
    mask[:, :start] = 1
    for position in range(start, start + new_tokens):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, position - 1]
        ids[:, position] = logits.argmax(-1)
        mask[:, position] = 1
    return ids


def record_generation(
    pair: Pair,
    kind: str,
    path: Path,
    prompt: Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int | None = None,
) -> Tensor:
    """Record a generation trajectory of the DLM (LLaDA sampler) or the AR twin (greedy)."""
    model = pair.dlm if kind == "dlm" else pair.ar
    # A generation is recorded for plots: attention alone (linear_stats=False), no input statistics.
    with attnprobe.record(model, path, mask_token_id=pair.mask_token_id, linear_stats=False, overwrite=True):
        if kind == "dlm":
            out = attnprobe.generate(
                model,
                prompt,
                mask_token_id=pair.mask_token_id,
                steps=steps,
                gen_length=gen_length,
                block_length=block_length,
            )
        else:
            out = ar_generate(model, prompt, steps, model.config.pad_token_id)
    return out


def record_calibration(
    pair: Pair,
    kind: str,
    path: Path,
    ids: Tensor,
    *,
    seed: int = 0,
    steps: int = 50,
    sample_interval: int = 5,
    hessians: bool = True,
) -> attnprobe.TrajectoryStore:
    """Record a calibration trajectory: forward noising for the DLM, clean text for the AR twin."""
    model = pair.dlm if kind == "dlm" else pair.ar
    with attnprobe.record(
        model, path, mask_token_id=pair.mask_token_id, linear_stats=True, hessians=hessians, overwrite=True
    ) as store:
        if kind == "dlm":
            attnprobe.calibrate(
                model,
                ids,
                mask_token_id=pair.mask_token_id,
                steps=steps,
                sample_interval=sample_interval,
                seed=seed,
                keep=[0],
                progress=False,
            )
        else:
            for row in range(ids.shape[0]):
                with store.step(sequences=[row]):
                    model(input_ids=ids[row : row + 1])
    return store


def plot_pairs(stores_dir: Path, figures: Path) -> list[Path]:
    """Draw DLM and AR side by side for the stores ``<kind>-generation`` and ``<kind>-calibration``."""
    from attnprobe.analysis.plot import plot_sinks

    drawn = []
    for name in ("generation", "calibration"):
        stores = [attnprobe.open(stores_dir / f"{kind}-{name}") for kind in ("dlm", "ar")]
        labels = [f"diffusion LM ({name})", f"autoregressive twin ({name})"]
        drawn.append(plot_sinks(stores, labels, figures / f"sinks-{name}.png", progress=False))
    return drawn


def prune_and_evaluate(
    dense: nn.Module,
    store,
    heldout: Tensor,
    *,
    sparsity: float,
    pattern: str,
    variants: list[tuple[str, str, bool, str]],
    mask_token_id: int,
    eval_samples: int,
    masks_dir: Path | None = None,
    seed: int = 0,
) -> list[dict]:
    """Prune a fresh copy of ``dense`` with each variant and measure its held-out NLL."""
    rows = []
    for label, method, sink_aware, policy in variants:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        result = prune.apply(
            model,
            store,
            sparsity,
            method=method,
            sink_aware=sink_aware,
            pattern=pattern,
            sink_policy=policy,
            progress=False,
        )
        seconds = time.perf_counter() - start
        nll = prune.evaluate(
            model, heldout, mask_token_id=mask_token_id, num_samples=eval_samples, seed=seed, progress=False
        )
        if masks_dir is not None:
            name = f"{label.replace(' ', '-')}-{pattern.replace(':', 'of')}-{sparsity:.2f}.safetensors"
            prune.save_masks(
                result.masks,
                masks_dir / name,
                settings=result.settings,
                model=model,
                weights=result.weights or None,
            )
        rows.append(
            {
                "method": label,
                "sparsity": sparsity if pattern != "2:4" else 0.5,
                "pattern": pattern,
                "nll": nll.nll,
                "stderr": nll.stderr,
                "prune_seconds": seconds,
                "achieved_sparsity": float(result.report["sparsity"].mean()),
            }
        )
    return rows


CLOSING_SECTION = "## Where a small byte-level pair"


def splice_section(
    path: Path, section: str, markers: tuple[str, str], before: str | None = CLOSING_SECTION
) -> None:
    """Replace the text between ``markers`` in an existing RESULTS.md with ``section``; where the markers
    are missing, insert it before the heading ``before`` (or append it when that is None or absent)."""
    text = path.read_text() if path.exists() else ""
    start, end = markers
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    elif before is not None and before in text:
        text = text.replace(before, section + "\n\n" + before)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
