"""Train the shipped tiny byte-level pair: a masked-diffusion LM (DLM) and its autoregressive twin (AR).

Both are a transformers ``LlamaForCausalLM`` of the same size. The DLM sets ``is_causal=False`` in its
config (bidirectional attention in transformers 5.x) and ``mask_token_id``, and is trained with the
LLaDA/MDLM masked-diffusion objective: per sequence a noise level t, stratified across the batch
(``t_i = (i + u_i) / B``), every token but the BOS at position 0 masked independently with probability
t, cross-entropy on the masked tokens only. The plain masked mean is used instead of the 1/t-weighted
ELBO because the 1/t weights made training stall at the unigram level (docs in shared NOTES). The AR
twin is causal and trained with next-token cross-entropy.

Training runs for a wall-clock budget with a time-based cosine learning-rate decay. Every
``--eval-every`` seconds the model is scored on *selection* windows of the validation text (disjoint
from the shipped held-out windows, so the reported held-out numbers are not used to pick the
checkpoint); the best checkpoint is saved with ``save_pretrained`` together with ``tokenizer.json``,
``metrics.csv`` (the loss curves) and ``training.json``.

Usage::

    python examples/prepare_corpus.py
    nohup python examples/train_tiny.py --kind dlm --minutes 45 --out examples/models/tiny-dlm \
        > examples/models/tiny-dlm.log 2>&1 &
    nohup python examples/train_tiny.py --kind ar --minutes 25 --out examples/models/tiny-ar \
        > examples/models/tiny-ar.log 2>&1 &
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_tokenizer import ByteTokenizer  # noqa: E402

logger = logging.getLogger("train_tiny")

_HERE = Path(__file__).resolve().parent
EVAL_TS = (0.1, 0.5, 0.9)
EVAL_SEED = 1234


def build_config(kind: str, tokenizer: ByteTokenizer, args: argparse.Namespace) -> LlamaConfig:
    """The Llama config shared by both models; only causality (and the mask id) differ."""
    return LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        is_causal=kind == "ar",
        mask_token_id=tokenizer.mask_token_id if kind == "dlm" else None,
        attn_implementation="sdpa",
    )


def load_bytes(path: Path) -> Tensor:
    """Read a raw text file as a uint8 tensor."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python examples/prepare_corpus.py` first.")
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def sample_batch(data: Tensor, batch: int, seq_len: int, bos: int, generator: torch.Generator) -> Tensor:
    """Random windows of ``seq_len - 1`` bytes, each prefixed by BOS, as int64 ``(batch, seq_len)``."""
    starts = torch.randint(0, len(data) - seq_len, (batch,), generator=generator)
    offsets = torch.arange(seq_len - 1)
    out = torch.empty(batch, seq_len, dtype=torch.long)
    out[:, 0] = bos
    out[:, 1:] = data[starts[:, None] + offsets].long()
    return out


def selection_windows(valid: Tensor, heldout_rows: int, seq_len: int, bos: int, rows: int) -> Tensor:
    """Validation windows placed midway between the shipped held-out windows, so their bytes are disjoint.

    ``prepare_corpus.heldout_windows`` starts its windows at ``linspace(0, n - span, heldout_rows)``;
    windows starting half a spacing later do not overlap them while the spacing is at least two spans.
    """
    span = seq_len - 1
    spacing = (len(valid) - span) / (heldout_rows - 1)
    if spacing < 2 * span:
        raise ValueError(
            f"held-out windows are {spacing:.0f} bytes apart, too close for disjoint selection windows; "
            "rebuild the corpus with fewer --heldout-rows or a larger --valid-fraction."
        )
    picks = torch.linspace(0, heldout_rows - 2, rows).long()
    starts = (picks.double() * spacing + spacing / 2).long()
    out = torch.empty(rows, seq_len, dtype=torch.long)
    out[:, 0] = bos
    out[:, 1:] = valid[starts[:, None] + torch.arange(span)].long()
    return out


def diffusion_mask(ids: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
    """Mask each token with probability ``t`` of its row; position 0 (BOS) is never masked."""
    mask = torch.rand(ids.shape, generator=generator) < t[:, None]
    mask[:, 0] = False
    return mask


def stratified_t(batch: int, generator: torch.Generator, eps: float = 1e-3) -> Tensor:
    """One noise level per row, stratified over (0, 1]: row i gets a uniform draw in [i/B, (i+1)/B)."""
    t = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    return t.clamp(min=eps)


def dlm_loss(model: torch.nn.Module, ids: Tensor, mask_token_id: int, generator: torch.Generator) -> Tensor:
    """Plain masked cross-entropy (mean over masked tokens) at stratified noise levels."""
    mask = diffusion_mask(ids, stratified_t(ids.shape[0], generator), generator)
    noisy = ids.masked_fill(mask, mask_token_id)
    logits = model(input_ids=noisy).logits
    return F.cross_entropy(logits[mask].float(), ids[mask])


def ar_loss(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """Next-token cross-entropy over positions 1..L-1."""
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _ratio_mean_and_se(row_sums: Tensor, row_counts: Tensor) -> tuple[float, float]:
    """Mean loss per token and its standard error, with rows as the independent units.

    Tokens of one row share context and one mask draw, so they are not independent; the ratio
    estimator's delta-method variance over rows accounts for that.
    """
    row_sums, row_counts = row_sums.double(), row_counts.double()
    mean = row_sums.sum() / row_counts.sum()
    n = len(row_sums)
    resid = row_sums - mean * row_counts
    se = (resid.pow(2).sum() / (n * (n - 1))).sqrt() / row_counts.mean()
    return float(mean), float(se)


@torch.no_grad()
def masked_ce(
    model: torch.nn.Module,
    ids: Tensor,
    t: float,
    *,
    mask_token_id: int,
    seed: int = EVAL_SEED,
    batch_size: int = 128,
) -> tuple[float, float]:
    """Held-out masked cross-entropy (nats per masked token) at a fixed noise level.

    Args:
        model: A mask predictor returning ``.logits`` of shape (B, L, V).
        ids: Clean token ids (N, L); position 0 is never masked.
        t: Mask probability of every other position.
        mask_token_id: Id written into masked positions.
        seed: Seed of the mask draws, so repeated evaluations see the same masks.
        batch_size: Rows per forward.

    Returns:
        ``(mean, standard_error)``; the error covers the Monte-Carlo masks and the sampled rows.
    """
    generator = torch.Generator().manual_seed(seed)
    mask = diffusion_mask(ids, torch.full((ids.shape[0],), t), generator)
    sums, counts = [], []
    for start in range(0, ids.shape[0], batch_size):
        x, m = ids[start : start + batch_size], mask[start : start + batch_size]
        logits = model(input_ids=x.masked_fill(m, mask_token_id)).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
        sums.append((nll * m).sum(1))
        counts.append(m.sum(1))
    return _ratio_mean_and_se(torch.cat(sums), torch.cat(counts))


@torch.no_grad()
def next_token_ce(model: torch.nn.Module, ids: Tensor, *, batch_size: int = 128) -> tuple[float, float]:
    """Held-out next-token cross-entropy (nats per token) and its standard error over rows."""
    sums = []
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start : start + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        sums.append(F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(1))
    row_sums = torch.cat(sums)
    return _ratio_mean_and_se(row_sums, torch.full_like(row_sums, ids.shape[1] - 1))


def evaluate(model: torch.nn.Module, kind: str, ids: Tensor, mask_token_id: int) -> dict[str, float]:
    """Selection metrics: masked CE at each of ``EVAL_TS`` and their mean (DLM), or next-token CE (AR)."""
    model.eval()
    if kind == "dlm":
        out = {f"ce_t{t}": masked_ce(model, ids, t, mask_token_id=mask_token_id)[0] for t in EVAL_TS}
        out["score"] = sum(out.values()) / len(EVAL_TS)
    else:
        out = {"ce": next_token_ce(model, ids)[0]}
        out["score"] = out["ce"]
    model.train()
    return out


def lr_at(progress: float, step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over ``--warmup`` steps, then cosine decay in wall-clock progress to ``--min-lr``."""
    warm = min(1.0, (step + 1) / args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return warm * (args.min_lr + (args.lr - args.min_lr) * cosine)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="Train the tiny byte-level DLM or its AR twin.")
    p.add_argument("--kind", choices=["dlm", "ar"], required=True)
    p.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    p.add_argument("--out", type=Path, required=True, help="model directory (save_pretrained)")
    p.add_argument("--data", type=Path, default=_HERE / "data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-every", type=float, default=90.0, help="seconds between selection evals")
    p.add_argument("--eval-rows", type=int, default=256)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, keep the best checkpoint on the selection windows, write curves and a summary."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = ByteTokenizer()

    train = load_bytes(args.data / "raw" / "train.txt")
    valid = load_bytes(args.data / "raw" / "valid.txt")
    stats = json.loads((args.data / "stats.json").read_text())
    heldout_rows = stats["heldout_shape"][0]
    select = selection_windows(valid, heldout_rows, args.seq_len, tokenizer.bos_token_id, args.eval_rows)

    config = build_config(args.kind, tokenizer, args)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%s model: %d parameters, %d training bytes", args.kind, n_params, len(train))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    csv_file = open(args.out / "metrics.csv", "w", newline="")
    eval_keys = [f"ce_t{t}" for t in EVAL_TS] if args.kind == "dlm" else ["ce"]
    writer = csv.DictWriter(csv_file, ["step", "elapsed_s", "lr", "train_loss", *eval_keys, "score"])
    writer.writeheader()

    budget = args.minutes * 60
    start = last_eval = time.monotonic()
    step, running, best = 0, None, {"score": float("inf")}
    bar = tqdm(total=int(budget), unit="s", desc=f"train {args.kind}", mininterval=30)
    model.train()
    while True:
        elapsed = time.monotonic() - start
        done = elapsed >= budget
        if done or step == 0 or time.monotonic() - last_eval >= args.eval_every:
            metrics = evaluate(model, args.kind, select, tokenizer.mask_token_id)
            last_eval = time.monotonic()
            row = {"step": step, "elapsed_s": round(elapsed, 1), "lr": lr_at(elapsed / budget, step, args)}
            row.update(train_loss=running, **metrics)
            writer.writerow(row)
            csv_file.flush()
            if metrics["score"] < best["score"]:
                best = {**metrics, "step": step, "elapsed_s": round(elapsed, 1)}
                model.save_pretrained(args.out)
                tokenizer.save(args.out)
            logger.info(
                "step %d %.0fs train %.4f select %s (best %.4f @ %d)",
                step,
                elapsed,
                running or float("nan"),
                {k: round(v, 4) for k, v in metrics.items()},
                best["score"],
                best["step"],
            )
        if done:
            break
        lr = lr_at(elapsed / budget, step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = sample_batch(train, args.batch, args.seq_len, tokenizer.bos_token_id, gen)
        if args.kind == "dlm":
            loss = dlm_loss(model, ids, tokenizer.mask_token_id, gen)
        else:
            loss = ar_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.n = min(int(time.monotonic() - start), int(budget))
        if step % 50 == 0:
            bar.refresh()
    bar.close()
    csv_file.close()

    summary = {
        "kind": args.kind,
        "parameters": n_params,
        "steps": step,
        "tokens_seen": step * args.batch * args.seq_len,
        "train_bytes": len(train),
        "wall_minutes": round((time.monotonic() - start) / 60, 2),
        "best": best,
        "selection_rows": args.eval_rows,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("done: %d steps, best score %.4f at step %d", step, best["score"], best["step"])


if __name__ == "__main__":
    main()
