"""Measure the shipped tiny models on the held-out windows and write their model card.

Every number in ``examples/models/README.md`` comes from this script: held-out losses are computed
here (with the same functions ``train_tiny.py`` uses for checkpoint selection), training facts are read
from each model's ``training.json`` and ``metrics.csv``. The measurements are also written to
``examples/models/eval.json``, which ``tests/examples/test_shipped_models.py`` checks against.

Usage::

    python examples/write_model_card.py
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_tokenizer import ByteTokenizer  # noqa: E402
from train_tiny import EVAL_SEED, EVAL_TS, masked_ce, next_token_ce  # noqa: E402

logger = logging.getLogger("write_model_card")
_HERE = Path(__file__).resolve().parent
# Midpoints of 10 equal bins of t: quadrature of the masked-diffusion bound over t in (0, 1].
_BOUND_TS = tuple((k + 0.5) / 10 for k in range(10))


def unigram_baselines(train_path: Path, heldout: torch.Tensor) -> dict[str, float]:
    """Entropy of the training byte distribution and its cross-entropy on the held-out bytes."""
    data = torch.frombuffer(bytearray(train_path.read_bytes()), dtype=torch.uint8).long()
    counts = torch.bincount(data, minlength=256).double()
    # Add-one smoothing only matters for bytes never seen in training (none in practice).
    p = (counts + 1) / (counts.sum() + 256)
    entropy = float(-(p * p.log()).sum())
    targets = heldout[:, 1:].reshape(-1)
    return {"unigram_entropy_train_nats": entropy, "unigram_ce_heldout_nats": float(-p.log()[targets].mean())}


@torch.no_grad()
def diffusion_bound(model: torch.nn.Module, ids: torch.Tensor, mask_token_id: int) -> float:
    """Masked-diffusion upper bound on the held-out NLL, nats per token.

    NLL <= integral over t of E[sum of masked CE] / (t * L) dt, with L the maskable positions; the
    expected number of masked tokens is t * L, so the integrand is the masked CE per token at level t
    (its ratio estimate is used). Midpoint rule over 10 levels, one mask draw per row and level.
    """
    values = [
        masked_ce(model, ids, t, mask_token_id=mask_token_id, seed=EVAL_SEED + 1 + k)[0]
        for k, t in enumerate(tqdm(_BOUND_TS, desc="bound", leave=False))
    ]
    return sum(values) / len(values)


def measure(model_dir: Path, heldout: torch.Tensor) -> dict:
    """Held-out losses of one model plus its training facts."""
    tokenizer = ByteTokenizer.load(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    training = json.loads((model_dir / "training.json").read_text())
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    out = {
        "kind": training["kind"],
        "parameters": training["parameters"],
        "is_causal": bool(getattr(model.config, "is_causal", True)),
        "mask_token_id": getattr(model.config, "mask_token_id", None),
        "steps": training["steps"],
        "tokens_seen": training["tokens_seen"],
        "wall_minutes": training["wall_minutes"],
        "best_step": training["best"]["step"],
        "best_elapsed_minutes": round(training["best"]["elapsed_s"] / 60, 2),
        "directory_bytes": size,
        "config": {
            k: getattr(model.config, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
                "max_position_embeddings",
            )
        },
        "train_args": training["args"],
    }
    if training["kind"] == "dlm":
        for t in EVAL_TS:
            mean, se = masked_ce(model, heldout, t, mask_token_id=tokenizer.mask_token_id)
            out[f"masked_ce_t{t}"] = {"mean": mean, "se": se, "seed": EVAL_SEED}
        out["nll_bound_nats"] = diffusion_bound(model, heldout, tokenizer.mask_token_id)
    else:
        mean, se = next_token_ce(model, heldout)
        out["next_token_ce"] = {"mean": mean, "se": se}
    return out


_SAMPLE_PROMPTS = ("In the beginning God created", "The Python interpreter", "hacker n. ")


def dlm_samples(model_dir: Path) -> list[tuple[str, str]] | None:
    """Greedy LLaDA-style continuations (64 bytes, 64 steps, blocks of 16) of a few prompts.

    Returns None when ``attnprobe`` cannot be imported, so the card can still be written.
    """
    try:
        from attnprobe.denoising.sampler import generate
    except ImportError as err:
        logger.warning("skipping samples: attnprobe.denoising.sampler does not import (%s)", err)
        return None
    tokenizer = ByteTokenizer.load(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for prompt in _SAMPLE_PROMPTS:
        ids = tokenizer.encode_tensor(prompt)
        gen = generate(
            model, ids, mask_token_id=tokenizer.mask_token_id, steps=64, gen_length=64, block_length=16
        )
        out.append((prompt, tokenizer.decode(gen[0, ids.shape[1] :])))
    return out


def plot_curves(model_dirs: dict[str, Path], path: Path) -> None:
    """Training loss and selection loss against wall-clock minutes, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(model_dirs), figsize=(5.5 * len(model_dirs), 3.8), squeeze=False)
    for ax, (name, model_dir) in zip(axes[0], model_dirs.items()):
        with open(model_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        minutes = [float(r["elapsed_s"]) / 60 for r in rows]
        keys = [k for k in rows[0] if k.startswith("ce")]
        for key in ["train_loss", *keys]:
            pts = [(m, float(r[key])) for m, r in zip(minutes, rows) if r[key] not in ("", "None")]
            ax.plot(
                *zip(*pts),
                label="selection CE" if key == "ce" else key.replace("ce_t", "selection CE t="),
                marker=".",
                markersize=3,
            )
        ax.set(title=name, xlabel="wall-clock minutes", ylabel="nats per predicted token", ylim=(0.5, 6))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: dict) -> str:
    return f"{x['mean']:.3f} ± {x['se']:.3f}"


def _samples_section(samples: list | None) -> list[str]:
    if not samples:
        return []
    lines = [
        "## Samples",
        "",
        "Greedy generation of `tiny-dlm` with `attnprobe.denoising.sampler.generate` (64 bytes, 64 steps, "
        "blocks of 16, low-confidence remasking). A model this small, decoded greedily, falls back on "
        "frequent words and spaces: the samples show that the sampler runs, not that the model writes well.",
        "",
    ]
    for prompt, text in samples:
        lines += [f"- {json.dumps(prompt)} → {json.dumps(text, ensure_ascii=False)}"]
    return [*lines, ""]


def render(results: dict, stats: dict) -> str:
    """The model card in Markdown."""
    dlm, ar = results["tiny-dlm"], results["tiny-ar"]
    cfg = dlm["config"]
    src = stats["sources"]
    lines = [
        "# The shipped tiny pair: `tiny-dlm` and `tiny-ar`",
        "",
        "Two byte-level `LlamaForCausalLM` models of identical size, trained on one CPU thread each by",
        "`examples/train_tiny.py` for the examples and tests of attnprobe. `tiny-dlm` is a masked-diffusion",
        "LM (`is_causal=False`, bidirectional attention; `mask_token_id` in its config); `tiny-ar` is its",
        "causal twin trained on next-token prediction. They are demonstration models, not useful LMs.",
        "Every number below is measured by `examples/write_model_card.py` (also in `eval.json`).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("examples/models/tiny-dlm")  # offline',
        "```",
        "",
        "## Data",
        "",
        f"{stats['train_bytes']:,} training bytes and {stats['valid_bytes']:,} validation bytes of English "
        "prose and technical text (see `examples/data/LICENSE.md`):",
        f"King James Bible {src['kjv']['bytes']:,} bytes, Python 3.11 documentation sources "
        f"{src['python-docs']['bytes']:,} bytes, Jargon File {src['jargon']['bytes']:,} bytes. Split by "
        f"hashed contiguous {stats['chunk_bytes'] // 1024} KiB chunks ({stats['valid_fraction']:.0%} held "
        "out). Tokenizer: UTF-8 bytes 0-255, specials pad 256, BOS 257, EOS 258, mask 259, vocabulary "
        f"{cfg['vocab_size']} (Hugging Face `tokenizer.json` + `tokenizer_config.json`: "
        "`AutoTokenizer.from_pretrained(model_dir)`).",
        "Every sequence is BOS followed by 127 bytes.",
        "",
        "## Models and training",
        "",
        "| | tiny-dlm | tiny-ar |",
        "|---|---|---|",
        f"| parameters | {dlm['parameters']:,} | {ar['parameters']:,} |",
        f"| hidden / MLP / layers / heads | {cfg['hidden_size']} / {cfg['intermediate_size']} / "
        f"{cfg['num_hidden_layers']} / {cfg['num_attention_heads']} | same |",
        f"| sequence length | {cfg['max_position_embeddings']} | {ar['config']['max_position_embeddings']} |",
        f"| attention | bidirectional (`is_causal={dlm['is_causal']}`) "
        f"| causal (`is_causal={ar['is_causal']}`) |",
        "| objective | masked diffusion, t stratified over the batch, plain masked CE | next-token CE |",
        f"| batch × length | {dlm['train_args']['batch']} × {dlm['train_args']['seq_len']} | "
        f"{ar['train_args']['batch']} × {ar['train_args']['seq_len']} |",
        f"| peak lr (AdamW, warm-up, cosine in wall time) | {dlm['train_args']['lr']} "
        f"| {ar['train_args']['lr']} |",
        f"| wall-clock training (1 CPU thread) | {dlm['wall_minutes']} min | {ar['wall_minutes']} min |",
        f"| optimizer steps | {dlm['steps']:,} | {ar['steps']:,} |",
        f"| tokens seen | {dlm['tokens_seen']:,} | {ar['tokens_seen']:,} |",
        f"| best checkpoint (selection windows) "
        f"| step {dlm['best_step']:,} ({dlm['best_elapsed_minutes']} min) "
        f"| step {ar['best_step']:,} ({ar['best_elapsed_minutes']} min) |",
        f"| directory size | {dlm['directory_bytes'] / 2**20:.2f} MiB "
        f"| {ar['directory_bytes'] / 2**20:.2f} MiB |",
        "",
        "The checkpoint is chosen on validation windows disjoint from the held-out windows below.",
        "",
        "## Held-out results",
        "",
        f"On `examples/data/heldout.safetensors` ({results['heldout_rows']} windows; nats per predicted "
        "token; ± one standard error over rows, which also covers the Monte-Carlo masks; masks drawn with "
        f"seed {EVAL_SEED}, BOS never masked):",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for t in EVAL_TS:
        lines.append(f"| tiny-dlm masked CE, t = {t} | {_fmt(dlm[f'masked_ce_t{t}'])} |")
    lines += [
        f"| tiny-dlm diffusion bound on NLL (∫ masked CE dt, 10 levels) | {dlm['nll_bound_nats']:.3f} |",
        f"| tiny-ar next-token CE (= NLL) | {_fmt(ar['next_token_ce'])} |",
        f"| unigram entropy of the training bytes | {results['unigram_entropy_train_nats']:.3f} |",
        f"| unigram cross-entropy on held-out bytes | {results['unigram_ce_heldout_nats']:.3f} |",
        "",
        "The unigram cross-entropy is what a model ignoring all context scores with the training byte "
        "frequencies; the DLM's masked CE at t = 0.5 is "
        f"{results['unigram_ce_heldout_nats'] - dlm['masked_ce_t0.5']['mean']:.2f} nats below it, the AR "
        f"model's next-token CE {results['unigram_ce_heldout_nats'] - ar['next_token_ce']['mean']:.2f} nats.",
        "",
        "## Loss curves",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "`train_loss` is an exponential moving average of the training loss (the DLM's is at stratified t);",
        "the other curves are the selection-window losses used to keep the best checkpoint.",
        "",
        *_samples_section(results.get("samples")),
        "## Re-running",
        "",
        "```",
        "apt-get install -y bible-kjv-text python3-doc jargon-text",
        "python examples/prepare_corpus.py",
        f"python examples/train_tiny.py --kind dlm --minutes {dlm['train_args']['minutes']:g} "
        "--out examples/models/tiny-dlm",
        f"python examples/train_tiny.py --kind ar --minutes {ar['train_args']['minutes']:g} "
        "--out examples/models/tiny-ar",
        "python examples/write_model_card.py",
        "```",
        "",
        "Training is budgeted in wall-clock time, so the step count (and the result) depends on the machine.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure both models, plot their curves and write ``README.md`` and ``eval.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=_HERE / "models")
    parser.add_argument("--data", type=Path, default=_HERE / "data")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    heldout = load_file(str(args.data / "heldout.safetensors"))["input_ids"]
    stats = json.loads((args.data / "stats.json").read_text())
    dirs = {name: args.models / name for name in ("tiny-dlm", "tiny-ar")}
    results: dict = {"heldout_rows": heldout.shape[0]}
    results.update(unigram_baselines(args.data / "raw" / "train.txt", heldout))
    for name, model_dir in dirs.items():
        logger.info("measuring %s", name)
        results[name] = measure(model_dir, heldout)
    results["samples"] = dlm_samples(dirs["tiny-dlm"])
    (args.models / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_curves(dirs, args.models / "loss_curves.png")
    (args.models / "README.md").write_text(render(results, stats))
    logger.info("wrote %s", args.models / "README.md")


if __name__ == "__main__":
    main()
