import pytest
import torch

from prune.methods.masks import (
    achieved_sparsity,
    check_mask,
    parse_pattern,
    select_mask,
    select_n_m,
    select_unstructured,
)

# ---------------------------------------------------------------- parse_pattern


@pytest.mark.parametrize(
    ("pattern", "sparsity", "expected"),
    [
        ("unstructured", 0.5, ("unstructured", None, None)),
        ("Unstructured", 0.0, ("unstructured", None, None)),
        ("2:4", 0.5, ("n:m", 2, 4)),
        ("4:8", 0.5, ("n:m", 4, 8)),
        (" 1:4 ", 0.25, ("n:m", 1, 4)),
        ("1:3", 1 / 3, ("n:m", 1, 3)),
    ],
)
def test_parse_pattern_valid(pattern, sparsity, expected):
    assert parse_pattern(pattern, sparsity) == expected


@pytest.mark.parametrize("pattern", ["structured", "2-4", "2:", ":4", "a:b", "2:4:8", ""])
def test_parse_pattern_unknown_lists_valid_forms(pattern):
    with pytest.raises(ValueError, match=r"unknown sparsity pattern.*unstructured.*N:M"):
        parse_pattern(pattern, 0.5)


def test_parse_pattern_non_string():
    with pytest.raises(ValueError, match="pattern must be a string"):
        parse_pattern(24, 0.5)


def test_parse_pattern_sparsity_mismatch_names_both_numbers_and_fix():
    with pytest.raises(ValueError, match=r"sparsity 0\.6 does not match pattern 2:4.*sparsity=0\.5"):
        parse_pattern("2:4", 0.6)
    with pytest.raises(ValueError, match=r"pattern 1:3.*sparsity=0\.333333"):
        parse_pattern("1:3", 0.33)


@pytest.mark.parametrize("pattern", ["4:4", "0:4", "5:4"])
def test_parse_pattern_n_must_be_below_m(pattern):
    with pytest.raises(ValueError, match="0 < N < M"):
        parse_pattern(pattern, 0.5)


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, float("nan"), float("inf"), "0.5", None, True])
def test_parse_pattern_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        parse_pattern("unstructured", sparsity)


# ---------------------------------------------------------------- unstructured


def test_unstructured_golden_wanda_example():
    # Scores |W| * norm for W = [1, 2, 3, 4], norms [100, 10, 1, 0.1] are [100, 20, 3, 0.4].
    keep = select_unstructured(torch.tensor([[100.0, 20.0, 3.0, 0.4]]), 0.5)
    assert keep.tolist() == [[True, True, False, False]]
    assert keep.dtype == torch.bool


def test_unstructured_exact_count_per_row():
    torch.manual_seed(0)
    scores = torch.rand(37, 50)
    for sparsity in [0.0, 0.1, 0.25, 0.5, 0.77, 1.0]:
        keep = select_unstructured(scores, sparsity)
        k = int(50 * sparsity)
        assert ((~keep).sum(dim=1) == k).all()
        # Pruned entries are the k smallest of each row.
        if 0 < k < 50:
            assert (
                scores[~keep].reshape(37, k).max(dim=1).values
                <= scores[keep].reshape(37, 50 - k).min(dim=1).values
            ).all()


def test_unstructured_count_uses_int_truncation():
    keep = select_unstructured(torch.rand(3, 10), 0.29)  # 2.9 -> 2
    assert ((~keep).sum(dim=1) == 2).all()


def test_unstructured_stable_ties_prune_lower_index_first():
    keep = select_unstructured(torch.ones(2, 4), 0.5)
    assert keep.tolist() == [[False, False, True, True]] * 2
    keep = select_unstructured(torch.tensor([[2.0, 1.0, 2.0, 1.0, 2.0, 1.0]]), 0.5)
    assert keep.tolist() == [[True, False, True, False, True, False]]
    keep = select_unstructured(torch.tensor([[3.0, 1.0, 1.0, 1.0]]), 0.5)
    assert keep.tolist() == [[True, False, False, True]]


def test_unstructured_ties_match_stable_sort_on_random_integers():
    torch.manual_seed(1)
    scores = torch.randint(0, 4, (20, 64)).float()  # many ties
    keep = select_unstructured(scores, 0.5)
    order = torch.sort(scores, dim=1, stable=True).indices
    expected = torch.ones_like(keep)
    for r in range(20):
        expected[r, order[r, :32]] = False
    assert torch.equal(keep, expected)


def test_unstructured_keeps_dtype_ordering_of_float64_scores():
    # Distinct in float64, equal after a float32 cast: must not be merged.
    scores = torch.tensor([[1.0 + 1e-12, 1.0]], dtype=torch.float64)
    assert select_unstructured(scores, 0.5).tolist() == [[True, False]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_unstructured_rejects_non_finite(bad):
    with pytest.raises(ValueError, match="NaN or Inf"):
        select_unstructured(torch.tensor([[1.0, bad]]), 0.5)


def test_unstructured_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"2-D.*\(4,\)"):
        select_unstructured(torch.rand(4), 0.5)


# ---------------------------------------------------------------- N:M


def test_2_4_golden():
    keep = select_n_m(torch.arange(1.0, 9.0).unsqueeze(0), 2, 4)
    weights = torch.arange(1.0, 9.0) * keep[0]
    assert weights.tolist() == [0, 0, 3, 4, 0, 0, 7, 8]


def test_4_8_golden():
    w = torch.tensor([[8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    keep = select_n_m(w, 4, 8)
    assert (w * keep).tolist() == [[8, 0, 7, 0, 6, 0, 5, 0], [0, 0, 0, 0, 5, 6, 7, 8]]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 4), (1, 2)])
def test_n_m_every_group_has_exactly_n_pruned(n, m):
    torch.manual_seed(2)
    scores = torch.randn(33, 64).abs()
    keep = select_n_m(scores, n, m)
    pruned = (~keep).reshape(33, 64 // m, m).sum(dim=2)
    assert (pruned == n).all()
    # Within a group the pruned scores are never above the kept ones.
    groups = scores.reshape(33, 64 // m, m)
    kg = keep.reshape(33, 64 // m, m)
    worst_kept = groups.masked_fill(~kg, float("inf")).min(dim=2).values
    best_pruned = groups.masked_fill(kg, float("-inf")).max(dim=2).values
    assert (best_pruned <= worst_kept).all()
    check_mask(keep, f"{n}:{m}", n / m)


def test_n_m_stable_ties():
    keep = select_n_m(torch.ones(1, 8), 2, 4)
    assert keep.int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]


def test_n_m_indivisible_in_features():
    with pytest.raises(ValueError, match=r"in_features=10 is not divisible by M=4"):
        select_n_m(torch.rand(2, 10), 2, 4)


def test_n_m_invalid_pattern():
    with pytest.raises(ValueError, match="0 < N < M"):
        select_n_m(torch.rand(2, 8), 4, 4)


# ---------------------------------------------------------------- select_mask, check_mask, achieved


def test_select_mask_dispatches():
    scores = torch.rand(5, 16)
    assert torch.equal(select_mask(scores, "unstructured", 0.3), select_unstructured(scores, 0.3))
    assert torch.equal(select_mask(scores, "2:4", 0.5), select_n_m(scores, 2, 4))
    with pytest.raises(ValueError, match="does not match pattern 2:4"):
        select_mask(scores, "2:4", 0.3)


def test_achieved_sparsity():
    assert achieved_sparsity(torch.tensor([[True, False, False, True]])) == 0.5
    assert achieved_sparsity(torch.ones(3, 3, dtype=torch.bool)) == 0.0
    assert achieved_sparsity(torch.zeros(0, 3, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError, match="bool tensor"):
        achieved_sparsity(torch.ones(2, 2))


def test_check_mask_unstructured_per_row_and_overall():
    keep = select_unstructured(torch.rand(6, 20), 0.5)
    check_mask(keep, "unstructured", 0.5)
    uneven = keep.clone()
    row0 = (~uneven[0]).nonzero()[0, 0]
    uneven[0, row0] = True  # row 0 now prunes 9
    with pytest.raises(ValueError, match=r"prunes 9 weights in row 0 instead of 10"):
        check_mask(uneven, "unstructured", 0.5)
    check_mask(uneven, "unstructured", 0.5, per_row=False)
    with pytest.raises(ValueError, match="differs from target"):
        check_mask(torch.ones(6, 20, dtype=torch.bool), "unstructured", 0.5, per_row=False)


def test_check_mask_n_m_violation_names_group():
    keep = select_n_m(torch.rand(3, 8), 2, 4)
    keep[1, 4:8] = True
    with pytest.raises(ValueError, match=r"row 1, columns 4\.\.7 prune 0 instead of 2"):
        check_mask(keep, "2:4", 0.5)
