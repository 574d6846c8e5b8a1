"""prune.evaluate: golden values from fake models of known cross-entropy and a hand-written AR loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from prune.evaluation.evaluate import EvalResult, evaluate
from tests import models

V = 16
MASK = V - 1


class FakeLM(nn.Module):
    """Returns logits with ``margin[i]`` on ``target[i]`` and 0 elsewhere, whatever the input.

    So the cross-entropy at position i is known in closed form: ``log(e^margin[i] + V - 1) - margin[i]``.
    It records every input row, whether it ran in eval mode, and whether gradients were enabled.
    """

    def __init__(self, target: torch.Tensor, margin: torch.Tensor, *, raw: bool = False, shift: bool = False):
        super().__init__()
        self.target, self.margin, self.raw, self.shift = target, margin, raw, shift
        self.dummy = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, input_ids: torch.Tensor):
        self.seen.append(input_ids.clone())
        self.modes.append((self.training, torch.is_grad_enabled()))
        b, length = input_ids.shape
        logits = torch.zeros(b, length, V)
        logits[:, torch.arange(length), self.target] = self.margin
        if self.shift:  # Dream-style: position i - 1 carries the prediction for token i
            logits = torch.cat([logits[:, 1:], logits[:, :1]], dim=1)
        logits = logits + 0 * self.dummy
        return logits if self.raw else type("Out", (), {"logits": logits})()


def _ce(margin: torch.Tensor) -> torch.Tensor:
    return torch.log(margin.double().exp() + V - 1) - margin.double()


def _target(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V - 1, (length,), generator=torch.Generator().manual_seed(seed))


def test_llada_uniform_logits_is_log_vocab_exactly():
    # uniform logits: every masked token costs log V, and the llada draw is the mean CE of the masked
    # tokens, so every draw (not just the expectation) equals log V
    target = _target(12)
    model = FakeLM(target, torch.zeros(12))
    ids = target.expand(3, 12)
    result = evaluate(
        model, ids, mask_token_id=MASK, estimator="llada", num_samples=5, prompt_length=4, progress=False
    )
    assert isinstance(result, EvalResult)
    assert result.per_sample == pytest.approx([math.log(V)] * 3, abs=1e-6)
    assert result.nll == pytest.approx(math.log(V), abs=1e-6)
    assert result.stderr == pytest.approx(0.0, abs=1e-6)
    assert (result.num_tokens, result.num_samples, result.estimator) == (3 * 8, 5, "llada")


def test_llada_matches_formula_on_recorded_masks():
    """Independent computation from the masks the model saw: Σ_masked CE / (k / L) / L per draw."""
    length, prompt = 10, 3
    answer = length - prompt
    target = _target(length)
    margin = torch.linspace(-2.0, 3.0, length)
    ce = _ce(margin)
    model = FakeLM(target, margin)
    ids = target.expand(2, length)
    result = evaluate(
        model,
        ids,
        mask_token_id=MASK,
        estimator="llada",
        num_samples=answer,
        prompt_length=prompt,
        batch_size=4,
        progress=False,
    )
    rows = torch.cat(model.seen)  # (2 * answer, L), in order: sequence 0's draws, then sequence 1's
    assert rows.shape == (2 * answer, length)
    masked = rows == MASK
    assert not masked[:, :prompt].any()
    k = masked.sum(1)
    # with as many draws as answer tokens, the stratified k are exactly a permutation of 1..answer
    for seq in range(2):
        assert sorted(k[seq * answer : (seq + 1) * answer].tolist()) == list(range(1, answer + 1))
    draws = (masked.double() * ce).sum(1) / (k.double() / answer) / answer
    expected = draws.view(2, answer).mean(1)
    torch.testing.assert_close(result.per_sample, expected, rtol=1e-6, atol=1e-9)
    assert result.nll == pytest.approx(float(expected.mean()), rel=1e-6)
    assert result.stderr == pytest.approx(float(expected.std() / math.sqrt(2)), rel=1e-6)


def test_mdlm_is_linear_in_the_cross_entropy():
    # same seed → same t and masks; with a constant per-token CE c the estimate is c · mean(m / (t L)),
    # so two constant-CE models give estimates in the exact ratio of their CEs
    target = _target(9)
    ids = target.expand(4, 9)
    kwargs = dict(mask_token_id=MASK, estimator="mdlm", num_samples=8, seed=3, progress=False)
    uniform = evaluate(FakeLM(target, torch.zeros(9)), ids, **kwargs)
    sharp = evaluate(FakeLM(target, torch.full((9,), 2.0)), ids, **kwargs)
    ratio = float(_ce(torch.tensor(2.0)) / math.log(V))
    torch.testing.assert_close(sharp.per_sample, uniform.per_sample * ratio, rtol=1e-6, atol=1e-9)


def test_mdlm_is_unbiased():
    # E[Σ_masked CE_i / t] = Σ_i CE_i for every t, so the estimate averages to the mean CE per token
    length = 16
    target = _target(length)
    margin = torch.linspace(-1.0, 4.0, length)
    ids = target.expand(8, length)
    result = evaluate(
        FakeLM(target, margin),
        ids,
        mask_token_id=MASK,
        estimator="mdlm",
        num_samples=256,
        batch_size=64,
        progress=False,
    )
    expected = float(_ce(margin).mean())
    assert abs(result.nll - expected) < 4 * result.stderr
    assert result.stderr < 0.05 * expected


def test_mdlm_skips_draws_that_mask_nothing_and_respects_the_prompt():
    length, prompt, draws = 6, 2, 64
    target = _target(length)
    model = FakeLM(target, torch.zeros(length))
    result = evaluate(
        model,
        target.expand(2, length),
        mask_token_id=MASK,
        estimator="mdlm",
        num_samples=draws,
        prompt_length=prompt,
        progress=False,
    )
    rows = torch.cat(model.seen)
    masked = rows == MASK
    assert not masked[:, :prompt].any()
    assert masked.any(1).all()  # every forward had something to score
    assert rows.shape[0] < 2 * draws  # low-t draws that masked nothing were skipped (they score 0)
    assert math.isfinite(result.nll) and result.num_tokens == 2 * (length - prompt)


def test_shift_logits_for_dream_style_models():
    length = 8
    target = _target(length)
    margin = torch.full((length,), 6.0)
    ids = target.expand(2, length)
    kwargs = dict(mask_token_id=MASK, estimator="llada", num_samples=7, progress=False)
    shifted = FakeLM(target, margin, shift=True)
    good = evaluate(shifted, ids, shift_logits=True, **kwargs)
    assert good.nll == pytest.approx(float(_ce(margin[0])), rel=1e-6)
    assert not (torch.cat(shifted.seen)[:, 0] == MASK).any()  # position 0 has no prediction
    assert good.num_tokens == 2 * (length - 1)
    wrong = evaluate(FakeLM(target, margin, shift=True), ids, **kwargs)
    assert wrong.nll > good.nll + 1.0


def test_raw_tensor_output_eval_mode_no_grad_and_mode_restored():
    target = _target(5)
    model = FakeLM(target, torch.zeros(5), raw=True)
    model.train()
    evaluate(model, target.expand(2, 5), mask_token_id=MASK, estimator="llada", num_samples=3, progress=False)
    assert model.modes and all(mode == (False, False) for mode in model.modes)
    assert model.training


def test_seed_determinism_and_batch_size_independence():
    model = models.tiny_llada()
    ids = torch.randint(0, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    for estimator in ("mdlm", "llada"):
        a = evaluate(model, ids, num_samples=6, seed=1, estimator=estimator, progress=False)
        b = evaluate(model, ids, num_samples=6, seed=1, estimator=estimator, batch_size=5, progress=False)
        c = evaluate(model, ids, num_samples=6, seed=2, estimator=estimator, progress=False)
        torch.testing.assert_close(a.per_sample, b.per_sample, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(a.per_sample, c.per_sample)


def _hand_ar(model: nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Next-token NLL by running every prefix on its own: position j is predicted from ids[:j] alone."""
    out = []
    with torch.no_grad():
        for row in ids:
            total = 0.0
            for j in range(start, ids.shape[1]):
                logits = model(input_ids=row[None, :j]).logits[0, -1].double()
                total -= torch.log_softmax(logits, -1)[row[j]].item()
            out.append(total / (ids.shape[1] - start))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("build", [models.llama_causal, models.gpt2_causal])
@pytest.mark.parametrize("prompt_length", [0, 3])
def test_ar_matches_prefix_loop(build, prompt_length):
    model = build()
    ids = torch.randint(0, 60, (3, 9), generator=torch.Generator().manual_seed(5))
    result = evaluate(model, ids, prompt_length=prompt_length, batch_size=2, progress=False)
    assert result.estimator == "ar" and result.num_samples == 1
    start = max(prompt_length, 1)
    expected = _hand_ar(model, ids, start)
    torch.testing.assert_close(result.per_sample, expected, rtol=1e-5, atol=1e-6)
    assert result.num_tokens == 3 * (9 - start)


def test_default_estimator_and_mask_token_from_config():
    ids = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    assert evaluate(models.llama_causal(), ids, progress=False).estimator == "ar"
    assert evaluate(models.tiny_llada(), ids, num_samples=2, progress=False).estimator == "mdlm"
    seen = []
    model = models.llama_bidirectional()
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    try:
        result = evaluate(model, ids, num_samples=4, estimator="llada", progress=False)
    finally:
        handle.remove()
    assert result.estimator == "llada"
    assert all((rows == models.MASK_TOKEN_ID).any(1).all() for rows in seen)


def test_pruned_and_dense_both_finite():
    ids = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = models.tiny_llada()
    pruned = models.tiny_llada()
    for module in pruned.modules():
        if isinstance(module, nn.Linear):
            torch_prune.l1_unstructured(module, "weight", amount=0.5)
    kwargs = dict(num_samples=8, estimator="mdlm", progress=False)
    a, b = evaluate(dense, ids, **kwargs), evaluate(pruned, ids, **kwargs)
    assert math.isfinite(a.nll) and math.isfinite(b.nll) and math.isfinite(b.stderr)
    assert a.nll != b.nll


def test_single_sequence_has_nan_stderr():
    result = evaluate(models.tiny_llada(), torch.arange(10)[None], num_samples=2, progress=False)
    assert math.isnan(result.stderr) and math.isfinite(result.nll)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: evaluate(m, torch.arange(8), progress=False), r"input_ids\[None\]"),
        (lambda m: evaluate(m, torch.rand(2, 8), progress=False), "integer"),
        (
            lambda m: evaluate(m, torch.zeros(2, 8, dtype=torch.long), prompt_length=8, progress=False),
            "prompt_length",
        ),
        (
            lambda m: evaluate(m, torch.zeros(2, 8, dtype=torch.long), estimator="elbo", progress=False),
            "mdlm",
        ),
        (
            lambda m: evaluate(m, torch.zeros(2, 8, dtype=torch.long), num_samples=0, progress=False),
            "num_samples",
        ),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(models.tiny_llada())


def test_diffusion_estimator_without_mask_token():
    with pytest.raises(ValueError, match="mask_token_id"):
        evaluate(models.llama_causal(), torch.zeros(2, 8, dtype=torch.long), estimator="mdlm", progress=False)


def test_mask_token_in_data_warns():
    ids = torch.full((2, 6), models.MASK_TOKEN_ID)
    with pytest.warns(UserWarning, match="already contain the mask token"):
        evaluate(models.tiny_llada(), ids, num_samples=2, progress=False)
