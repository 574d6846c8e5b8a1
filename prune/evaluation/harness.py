"""lm-evaluation-harness model for masked-diffusion LMs and their autoregressive twins: ``attnprobe``.

Importing this module registers :class:`AttnprobeLM` with lm-eval (0.4.x) as ``"attnprobe"``; lm-eval
has no plugin mechanism, so its own ``lm_eval`` command cannot see it. ``attnprobe eval`` is lm-eval's
command line with it registered (:mod:`prune.cli.eval_command`), from the repository root::

    attnprobe eval examples/models/tiny-dlm --model_args mc_num=32 \\
        --include_path examples/tasks --tasks attnprobe_continuation

(``python -m prune.evaluation.harness --model attnprobe --model_args pretrained=...`` is the same with exactly
``lm_eval``'s arguments)

or from Python: ``import prune.evaluation.harness`` then ``lm_eval.simple_evaluate(model="attnprobe", ...)``.

Scoring. A model is a *diffusion* model when its config says ``is_causal=False`` or names a
``mask_token_id``; otherwise it is autoregressive and gets exact log-likelihoods.

- ``loglikelihood`` (diffusion): LLaDA's Monte-Carlo estimator (arXiv 2502.09992, eq. 6). The context is
  never masked; per draw, k of the continuation's L tokens are masked (k uniform in 1..L, the positions
  uniform), and the draw scores ``(L / k) · Σ_masked CE``; ``mc_num`` draws are averaged and negated.
  The k of the draws are stratified over 1..L, as in ``prune.evaluate(estimator="llada")``, whose
  draws these are: the result is exactly ``-L`` times that function's per-sequence value. Every request
  takes its draws from a fresh generator seeded with ``seed`` (common random numbers), so the choices
  of a multiple-choice question of equal length are compared under the same masks, and results do not
  depend on batching or order. Draws of all requests of one length are batched, ``batch_size`` rows a
  forward, and made as the batches consume them: memory holds one batch and one request's draws
  (O(batch · length + mc_num · length)), not every request's.
- ``loglikelihood_rolling`` (diffusion): the masked-diffusion NLL bound of the text, the same estimator
  with only BOS (and, past the context window, the preceding tokens) as context.
- ``generate_until`` (diffusion): :func:`attnprobe.generate` (LLaDA-style low-confidence remasking),
  output cut at EOS and at the first stop sequence.
- Autoregressive: exact next-token log-likelihoods (``is_greedy`` = every token is the argmax); greedy
  generation without a KV cache.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "prune.evaluation.harness needs lm-evaluation-harness 0.4.x: pip install 'attnprobe[eval]' "
        "(or 'lm-eval<0.5')."
    ) from err

import attnprobe
from prune.evaluation.draws import diffusion_draws, forward_logits, masked_ce
from prune.evaluation.generation import Generation
from prune.hub import DTYPES, load_pretrained

logger = logging.getLogger(__name__)


def _batch_size(value: Any) -> int:
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and value.strip().isdigit():
        size = int(value)
    elif isinstance(value, str) and value.startswith("auto"):
        logger.warning("batch_size=%r: automatic batch size is not supported; using 16", value)
        size = 16
    else:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}.")
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}.")
    return size


@register_model("attnprobe")
class AttnprobeLM(Generation, LM):
    """lm-eval model: masked-diffusion LMs scored with LLaDA's estimator, causal LMs exactly.

    Args (all also accepted as ``model_args`` strings):
        pretrained: model directory or hub name, or an ``nn.Module`` (then pass ``tokenizer``).
        tokenizer: tokenizer path or object; defaults to ``pretrained``'s directory.
        mc_num: Monte-Carlo draws per request (diffusion models).
        batch_size: rows per forward pass.
        seed: seed of every request's draws.
        masks: a file written by :func:`prune.save_masks`; applied to the loaded model (a pruned model
            evaluated from its dense checkpoint and its masks).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's).
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available.
        trust_remote_code: passed to ``from_pretrained`` (LLaDA, Dream).
        mask_token_id: overrides the config's / tokenizer's mask id.
        max_length: context window; default the config's ``max_position_embeddings``.
        gen_steps: denoising steps for ``generate_until`` (default: one per generated token).
        block_length: semi-autoregressive block length for ``generate_until`` (default: one block).
        max_gen_toks: default generation length when a task does not set one.
        shift_logits: the model's logits at i - 1 predict token i (Dream).
        greedy_check: diffusion ``is_greedy`` by decoding the continuation with :func:`attnprobe.generate`
            (L extra forwards per request); otherwise reported as False.

    Example (not run as a doctest: a full lm-eval evaluation takes minutes; tests/prune/test_harness.py
    runs it on a slice):
        >>> import lm_eval, prune.evaluation.harness                                          # doctest: +SKIP
        >>> lm_eval.simple_evaluate(  # doctest: +SKIP
        ...     model="attnprobe", model_args="pretrained=examples/models/tiny-dlm",
        ...     tasks=["attnprobe_continuation"],
        ...     task_manager=lm_eval.tasks.TaskManager(include_path="examples/tasks"))
    """

    def __init__(
        self,
        pretrained: str | nn.Module,
        tokenizer: Any = None,
        mc_num: int = 128,
        batch_size: int | str = 16,
        seed: int = 1234,
        masks: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        trust_remote_code: bool = False,
        mask_token_id: int | None = None,
        max_length: int | None = None,
        gen_steps: int | None = None,
        block_length: int | None = None,
        max_gen_toks: int = 64,
        shift_logits: bool = False,
        greedy_check: bool = False,
        max_batch_size: int | None = None,  # passed by lm-eval; automatic batch sizes are not used
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        if dtype not in (*DTYPES, "auto"):
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join([*DTYPES, 'auto'])}.")
        if int(mc_num) < 1:
            raise ValueError(f"mc_num must be ≥ 1, got {mc_num}.")
        if isinstance(pretrained, nn.Module):
            model = pretrained
            if tokenizer is None:
                raise ValueError("pretrained is a module: pass tokenizer= (an object or a path) too.")
        else:
            model = load_pretrained(str(pretrained), DTYPES.get(dtype), bool(trust_remote_code))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device).eval()
        if masks is not None:
            from prune.export.mask_files import load_masks

            load_masks(self.model, masks)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            source = tokenizer if tokenizer is not None else pretrained
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(trust_remote_code))
        self.tokenizer = tokenizer
        config = getattr(self.model, "config", None)
        config_mask = getattr(config, "mask_token_id", None)
        self.diffusion = getattr(config, "is_causal", None) is False or (
            config_mask is not None and getattr(config, "is_causal", None) is not True
        )
        self.mask_token_id = mask_token_id if mask_token_id is not None else config_mask
        if self.mask_token_id is None and self.diffusion:
            self.mask_token_id = getattr(tokenizer, "mask_token_id", None)
            if self.mask_token_id is None:
                raise ValueError(
                    "diffusion model without a mask token: pass model_args mask_token_id=... (126336 for "
                    "LLaDA, 151666 for Dream)."
                )
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        if self.bos_token_id is None:
            self.bos_token_id = getattr(config, "bos_token_id", None)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.max_length = int(max_length or self._config_length(config))
        self.mc_num, self.seed = int(mc_num), int(seed)
        self.batch_size = _batch_size(batch_size)
        self.gen_steps, self.block_length = gen_steps, block_length
        self.max_gen_toks, self.shift_logits = int(max_gen_toks), bool(shift_logits)
        self.greedy_check = bool(greedy_check)
        self._device = next(self.model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> AttnprobeLM:
        """Build from ``model_args`` (``"pretrained=PATH,mc_num=32"``); lm-eval's own ``--batch_size``
        and ``--device`` fill in what ``model_args`` leaves out (model_args win)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> AttnprobeLM:
        """Like :meth:`create_from_arg_string`, from a dict."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @staticmethod
    def _config_length(config: Any) -> int:
        for key in ("max_position_embeddings", "max_sequence_length", "n_positions"):
            if isinstance(getattr(config, key, None), int):
                return getattr(config, key)
        return 2048

    # ----------------------------------------------------------------------------------------------
    # Tokens
    # ----------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text else []

    def _prefix(self) -> list[int]:
        return [self.bos_token_id] if self.bos_token_id is not None else []

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """BOS + context ids and continuation ids, split as lm-eval's HF model does (trailing spaces of
        the context move to the continuation; the whole string is encoded once)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        head = len(self._encode(context))
        return self._prefix() + whole[:head], whole[head:]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Drop context tokens after the BOS (oldest first) so context + continuation fit the window."""
        if not continuation:
            raise ValueError("an empty continuation has no log-likelihood; check the task's targets.")
        if len(continuation) >= self.max_length:
            raise ValueError(
                f"continuation of {len(continuation)} tokens does not fit the model's "
                f"{self.max_length}-token window; pass model_args max_length=... or use shorter targets."
            )
        excess = len(context) + len(continuation) - self.max_length
        if excess > 0:
            keep = len(self._prefix())
            context = context[:keep] + context[keep + excess :]
        return context, continuation

    # ----------------------------------------------------------------------------------------------
    # Scoring token sequences
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of every (context ids, continuation ids) pair."""
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, (context, continuation) in enumerate(pairs):
            by_length[len(context) + len(continuation)].append(index)
        out: list[tuple[float, bool]] = [(math.nan, False)] * len(pairs)
        draws = self.mc_num if self.diffusion else 1
        bar = tqdm(total=len(pairs) * draws, desc=desc, unit="row", disable=len(pairs) < 8)
        for indices in by_length.values():
            if self.diffusion:
                for index, value in zip(indices, self._diffusion_group([pairs[i] for i in indices], bar)):
                    out[index] = value
            else:
                for index, value in zip(indices, self._ar_group([pairs[i] for i in indices], bar)):
                    out[index] = value
        bar.close()
        return out

    def _diffusion_group(
        self, pairs: list[tuple[list[int], list[int]]], bar: tqdm
    ) -> list[tuple[float, bool]]:
        """LLaDA estimator for requests of one total length; their draws share forward batches.

        Draws are made request by request as the batches consume them, so memory holds one batch and
        one request's draws, whatever the number of requests (the batches are the same as if every
        draw were made first).
        """
        scored = [len(c) + len(t) - self._start(c) for c, t in pairs]  # L: the maskable tokens
        totals = torch.zeros(len(pairs), dtype=torch.float64)
        rows = self._draw_rows(pairs)
        while chunk := list(itertools.islice(rows, self.batch_size)):
            owners = torch.tensor([row[0] for row in chunk])
            noisy = torch.stack([row[1] for row in chunk]).to(self._device)
            masked = torch.stack([row[2] for row in chunk]).to(self._device)
            target = torch.tensor([sum(pairs[o], []) for o in owners.tolist()], device=self._device)
            ce = masked_ce(self.model, noisy, target, masked, self.shift_logits).cpu()  # (B,) Σ CE
            weight = torch.tensor([row[3] for row in chunk], dtype=torch.float64)
            totals.index_add_(0, owners, ce * weight)
            bar.update(len(chunk))
            del chunk, noisy, masked, target
        out = []
        for owner, (context, continuation) in enumerate(pairs):
            # Σ_d (1/k_d) Σ CE / D is the bound per token; times L it is the continuation's NLL bound.
            nll = float(totals[owner]) / self.mc_num * scored[owner]
            greedy = self._greedy(context, continuation) if self.greedy_check else False
            out.append((-nll, greedy))
        return out

    def _start(self, context: list[int]) -> int:
        """First maskable position: after the context (Dream: never position 0, which has no logit)."""
        return max(len(context), 1) if self.shift_logits else len(context)

    def _draw_rows(
        self, pairs: list[tuple[list[int], list[int]]]
    ) -> Iterator[tuple[int, Tensor, Tensor, float]]:
        """``(request, noisy ids (N,), masked (N,), weight 1/k)`` per draw, request after request.

        Every request's ``mc_num`` draws come from a fresh generator seeded with ``seed``; they are made
        when the first of them is needed.
        """
        for owner, (context, continuation) in enumerate(pairs):
            ids = torch.tensor(context + continuation, dtype=torch.long)
            gen = torch.Generator().manual_seed(self.seed)
            noisy, masked, weight = diffusion_draws(
                ids,
                estimator="llada",
                mask_token_id=int(self.mask_token_id),
                start=self._start(context),
                num_samples=self.mc_num,
                gen=gen,
            )  # (D, N), (D, N), (D,) with weight 1 / k
            for d in range(self.mc_num):
                yield owner, noisy[d], masked[d], float(weight[d])

    def _greedy(self, context: list[int], continuation: list[int]) -> bool:
        """Whether the sampler, one token per step, decodes exactly ``continuation`` after ``context``."""
        prompt = torch.tensor([context], dtype=torch.long, device=self._device)
        length = len(continuation)
        ids = attnprobe.generate(
            self.model, prompt, mask_token_id=int(self.mask_token_id), steps=length, gen_length=length
        )
        return ids[0, len(context) :].tolist() == continuation

    def _ar_group(self, pairs: list[tuple[list[int], list[int]]], bar: tqdm) -> list[tuple[float, bool]]:
        """Exact log-likelihood of causal models for requests of one total length."""
        out = []
        for first in range(0, len(pairs), self.batch_size):
            chunk = pairs[first : first + self.batch_size]
            ids = torch.tensor([c + t for c, t in chunk], dtype=torch.long, device=self._device)
            logits = forward_logits(self.model, ids).float()  # (B, N, V)
            for row, (context, continuation) in enumerate(chunk):
                start = len(context)
                if start == 0:
                    raise ValueError("an autoregressive model needs at least one context token (BOS).")
                pred = logits[row, start - 1 : -1].log_softmax(-1)  # position i - 1 predicts token i
                target = ids[row, start:]
                logprob = float(pred.gather(-1, target[:, None]).sum())
                out.append((logprob, bool((pred.argmax(-1) == target).all())))
            bar.update(len(chunk))
        return out

    # ----------------------------------------------------------------------------------------------
    # lm-eval's three request types
    # ----------------------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request; see the module docstring."""
        pairs = [self._fit(*self._pair(*request.args)) for request in requests]
        results = self._score(pairs, "loglikelihood")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood (diffusion: the negated NLL bound) of each whole text, in model-sized windows."""
        if self.bos_token_id is None:
            raise ValueError("loglikelihood_rolling needs a BOS token to condition the first window on.")
        pairs, owners = [], []
        for owner, request in enumerate(requests):
            ids = self._encode(request.args[0])
            # Disjoint windows of at most max_length tokens including their context (lm-eval's rule).
            windows = get_rolling_token_windows(ids, self.bos_token_id, self.max_length - 1, 1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(pairs, "loglikelihood_rolling")):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals


def main(argv: list[str] | None = None) -> int:
    """``lm_eval``'s command line with the ``attnprobe`` model registered (same arguments)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
