import pytest
import torch

from prune.methods.masks import select_mask, select_n_m, select_unstructured
from prune.methods.wanda import act_norm_from_sumsq, magnitude_scores, wanda_scaler_to_norm, wanda_scores


def test_golden_unstructured_half():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    scores = wanda_scores(w, torch.tensor([100.0, 10.0, 1.0, 0.1]))
    assert torch.allclose(scores, torch.tensor([[100.0, 20.0, 3.0, 0.4]]))
    keep = select_unstructured(scores, 0.5)
    assert keep.int().tolist() == [[1, 1, 0, 0]]
    assert (w * keep).tolist() == [[1.0, 2.0, 0.0, 0.0]]


def test_golden_2_4_uniform_norms():
    w = torch.arange(1.0, 9.0).unsqueeze(0)
    keep = select_n_m(wanda_scores(w, torch.ones(8)), 2, 4)
    assert (w * keep).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_golden_4_8_uniform_norms():
    w = torch.arange(1.0, 9.0).unsqueeze(0)
    keep = select_mask(wanda_scores(w, torch.ones(8)), "4:8", 0.5)
    assert (w * keep).tolist() == [[0, 0, 0, 0, 5, 6, 7, 8]]


def test_norms_change_the_decision_against_magnitude():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    by_magnitude = select_unstructured(magnitude_scores(w), 0.5)
    assert by_magnitude.int().tolist() == [[0, 0, 1, 1]]


def test_scores_are_float32_and_sign_free():
    w = torch.tensor([[-1.5, 2.0], [0.5, -4.0]], dtype=torch.float16)
    scores = wanda_scores(w, torch.tensor([2.0, 0.5], dtype=torch.bfloat16))
    assert scores.dtype == torch.float32
    assert scores.tolist() == [[3.0, 1.0], [1.0, 2.0]]
    mag = magnitude_scores(w)
    assert mag.dtype == torch.float32
    assert mag.tolist() == [[1.5, 2.0], [0.5, 4.0]]


def test_uniform_norms_equal_magnitude_mask():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    a = select_unstructured(wanda_scores(w, torch.full((32,), 3.0)), 0.5)
    b = select_unstructured(magnitude_scores(w), 0.5)
    assert torch.equal(a, b)


def test_inputs_not_modified():
    w = torch.randn(3, 4)
    n = torch.rand(4)
    w0, n0 = w.clone(), n.clone()
    wanda_scores(w, n)
    assert torch.equal(w, w0) and torch.equal(n, n0)


def test_act_norm_length_mismatch_names_both():
    with pytest.raises(ValueError, match=r"act_norm has shape \(5,\).*in_features=4"):
        wanda_scores(torch.randn(3, 4), torch.ones(5))
    with pytest.raises(ValueError, match=r"act_norm has shape \(1, 4\)"):
        wanda_scores(torch.randn(3, 4), torch.ones(1, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_rejected(bad):
    with pytest.raises(ValueError, match="act_norm contains NaN or Inf"):
        wanda_scores(torch.randn(3, 4), torch.tensor([1.0, bad, 1.0, 1.0]))
    with pytest.raises(ValueError, match="scaler contains NaN or Inf"):
        wanda_scaler_to_norm(torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="sumsq contains NaN or Inf"):
        act_norm_from_sumsq(torch.tensor([[1.0, bad]]))


def test_non_finite_weight_rejected():
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        wanda_scores(torch.tensor([[float("nan"), 1.0]]), torch.ones(2))
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        magnitude_scores(torch.tensor([[float("inf"), 1.0]]))


def test_negative_statistics_rejected():
    with pytest.raises(ValueError, match="negative"):
        wanda_scores(torch.randn(2, 2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="negative"):
        wanda_scaler_to_norm(torch.tensor([-1.0]))


def test_bad_weight_shape_and_dtype():
    with pytest.raises(ValueError, match=r"2-D.*\(4,\)"):
        wanda_scores(torch.randn(4), torch.ones(4))
    with pytest.raises(ValueError, match="floating-point"):
        wanda_scores(torch.ones(2, 2, dtype=torch.int64), torch.ones(2))
    with pytest.raises(ValueError, match="floating-point"):
        wanda_scores(torch.ones(2, 2), torch.ones(2, dtype=torch.int64))


def test_scaler_to_norm():
    out = wanda_scaler_to_norm(torch.tensor([4.0, 9.0, 0.0], dtype=torch.float16))
    assert out.dtype == torch.float32
    assert out.tolist() == [2.0, 3.0, 0.0]


def test_act_norm_from_sumsq_matches_direct_computation():
    torch.manual_seed(3)
    x = torch.randn(5, 7, 6)  # (samples, tokens, in)
    sumsq = (x**2).sum(dim=1)
    # Wanda: sqrt of the mean over sequences of sum_t x^2.
    expected_wanda = torch.sqrt(torch.stack([(xs**2).sum(0) for xs in x]).mean(0))
    assert torch.allclose(act_norm_from_sumsq(sumsq), expected_wanda)
    # Reference code: sum over samples of the per-sample L2 norm of each column.
    expected_ref = sum(torch.linalg.vector_norm(xs, dim=0) for xs in x)
    assert torch.allclose(act_norm_from_sumsq(sumsq, accumulate="reference"), expected_ref)


def test_act_norm_from_sumsq_errors():
    with pytest.raises(ValueError, match="unknown accumulate 'l1'"):
        act_norm_from_sumsq(torch.ones(2, 3), accumulate="l1")
    with pytest.raises(ValueError, match=r"\(samples, in_features\)"):
        act_norm_from_sumsq(torch.ones(3))
