import math
import warnings

import pytest
import torch

from prune.methods.masks import check_mask, select_unstructured
from prune.methods.sparsegpt import hessian_from_inputs, sparsegpt_prune
from prune.methods.wanda import magnitude_scores
from tests.assertions import assert_layer_error_close, assert_masks_agree


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs driven by a few latent factors plus noise, so columns are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 8, generator=g)
    mixing = torch.randn(8, features, generator=g)
    scale = torch.rand(features, generator=g) * 2 + 0.1
    return (latent @ mixing + 0.3 * torch.randn(tokens, features, generator=g)) * scale


def plain_obs(weight, hessian, sparsity, blocksize, n=0, m=0, percdamp=0.01):
    """Slow textbook OBS, float64, one column at a time, eager updates, explicit inverses.

    For column j, F = columns j.., Finv = inv(H[F, F]). The published score is
    w^2 / [Finv]_00 and the update W[:, F] -= (w - q) / [Finv]_00 * Finv[0, :]. Masks are chosen
    per block (unstructured) or every m columns (N:M), as in arXiv 2301.00774's code.
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    cols = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    finv00 = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for j in range(cols):
        if n == 0 and j % blocksize == 0:
            j2 = min(j + blocksize, cols)
            score = (w[:, j:j2] ** 2 / finv00[j:j2]).flatten()
            k = int(score.numel() * sparsity)
            chosen = torch.sort(score, stable=True).indices[:k]
            block = torch.zeros(score.numel(), dtype=torch.bool)
            block[chosen] = True
            pruned[:, j:j2] = block.reshape(w.shape[0], j2 - j)
        if n and j % m == 0:
            score = w[:, j : j + m] ** 2 / finv00[j : j + m]
            for r in range(w.shape[0]):
                pruned[r, j + torch.sort(score[r], stable=True).indices[:n]] = True
        finv = torch.linalg.inv(h[j:, j:])
        q = torch.where(pruned[:, j], 0.0, w[:, j])
        w[:, j:] -= torch.outer((w[:, j] - q) / finv[0, 0], finv[0, :])
        w[:, j] = q
    return w, ~pruned


def assert_matches(new: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 result vs float64 reference: ~1e-6 relative, i.e. float32 rounding times cond(H)."""
    diff = new.double() - ref
    assert torch.linalg.norm(diff) / torch.linalg.norm(ref) < 1e-5
    assert diff.abs().max() < 1e-4


def assert_like_reference(weight, h, new, keep, ref, ref_keep) -> None:
    """float32 vs float64: the masks agree but for near-ties (a tie may fall either way on another
    CPU, and the row's later updates follow it), the layer error is within 1% of the reference's,
    and where the masks agree entirely the weights match to float32 rounding."""
    assert_masks_agree(keep, ref_keep, at_least=0.995)
    assert_layer_error_close(weight, new, ref, h)
    if torch.equal(keep, ref_keep):
        assert_matches(new, ref)


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 64, generator=g)
    x = correlated_inputs(200, 64)
    return weight, x, hessian_from_inputs(x.unsqueeze(0))


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7])
def test_matches_plain_obs_unstructured(layer, sparsity):
    weight, _, h = layer
    new, keep = sparsegpt_prune(weight, h, sparsity, blocksize=16)
    ref, ref_keep = plain_obs(weight, h, sparsity, blocksize=16)
    assert_like_reference(weight, h, new, keep, ref, ref_keep)


@pytest.mark.parametrize(("n", "m", "blocksize"), [(2, 4, 16), (4, 8, 16), (1, 4, 8)])
def test_matches_plain_obs_n_m(layer, n, m, blocksize):
    weight, _, h = layer
    new, keep = sparsegpt_prune(weight, h, n / m, prune_n=n, prune_m=m, blocksize=blocksize)
    ref, ref_keep = plain_obs(weight, h, n / m, blocksize=blocksize, n=n, m=m)
    assert_like_reference(weight, h, new, keep, ref, ref_keep)
    check_mask(keep, f"{n}:{m}", n / m)
    assert (new[~keep] == 0).all()


def test_none_n_m_means_unstructured(layer):
    weight, _, h = layer
    a, ka = sparsegpt_prune(weight, h, 0.5, prune_n=None, prune_m=None, blocksize=16)
    b, kb = sparsegpt_prune(weight, h, 0.5, blocksize=16)
    assert torch.equal(ka, kb) and torch.equal(a, b)


def test_block_counts_and_exact_zeros(layer):
    weight, _, h = layer
    new, keep = sparsegpt_prune(weight, h, 0.5, blocksize=16)
    for i1 in range(0, 64, 16):
        assert (~keep[:, i1 : i1 + 16]).sum() == int(16 * 16 * 0.5)
    assert (new[~keep] == 0).all()
    assert (new[keep] != 0).all()
    check_mask(keep, "unstructured", 0.5, per_row=False)


def test_single_block_default_blocksize_and_uneven_last_block(layer):
    weight, _, h = layer
    new, keep = sparsegpt_prune(weight, h, 0.5)  # blocksize 128 > 64 columns: one block
    ref, ref_keep = plain_obs(weight, h, 0.5, blocksize=128)
    assert_like_reference(weight, h, new, keep, ref, ref_keep)
    new, keep = sparsegpt_prune(weight, h, 0.5, blocksize=24)  # blocks of 24, 24, 16
    ref, ref_keep = plain_obs(weight, h, 0.5, blocksize=24)
    assert_like_reference(weight, h, new, keep, ref, ref_keep)


def test_beats_magnitude_pruning_on_correlated_inputs(layer):
    weight, x, h = layer
    dense = x @ weight.T
    new, _ = sparsegpt_prune(weight, h, 0.5, blocksize=16)
    magnitude = weight * select_unstructured(magnitude_scores(weight), 0.5)
    err_sparsegpt = torch.linalg.norm(dense - x @ new.T)
    err_magnitude = torch.linalg.norm(dense - x @ magnitude.T)
    assert err_sparsegpt < 0.5 * err_magnitude


def test_reconstruction_beats_its_own_mask_without_update(layer):
    weight, x, h = layer
    new, keep = sparsegpt_prune(weight, h, 0.5, blocksize=16)
    dense = x @ weight.T
    assert torch.linalg.norm(dense - x @ new.T) < torch.linalg.norm(dense - x @ (weight * keep).T)


def test_dead_columns_are_zeroed(layer):
    weight, x, _ = layer
    x = x.clone()
    x[:, [3, 40]] = 0.0
    h = hessian_from_inputs(x)
    assert h[3, 3] == 0 and h[40, 40] == 0
    new, keep = sparsegpt_prune(weight, h, 0.5, blocksize=16)
    assert (new[:, [3, 40]] == 0).all()
    assert torch.isfinite(new).all()
    ref, ref_keep = plain_obs(weight, h, 0.5, blocksize=16)
    assert_like_reference(weight, h, new, keep, ref, ref_keep)


def test_sparsity_zero_returns_weight_unchanged(layer):
    weight, _, h = layer
    new, keep = sparsegpt_prune(weight, h, 0.0, blocksize=16)
    assert keep.all()
    assert torch.equal(new, weight)


def test_sparsity_one_prunes_everything(layer):
    weight, _, h = layer
    new, keep = sparsegpt_prune(weight, h, 1.0, blocksize=16)
    assert not keep.any()
    assert (new == 0).all()


def test_hessian_scale_does_not_matter(layer):
    weight, _, h = layer
    a, ka = sparsegpt_prune(weight, h, 0.5, blocksize=16)
    b, kb = sparsegpt_prune(weight, 7.3 * h, 0.5, blocksize=16)
    assert_masks_agree(ka, kb, at_least=0.995)  # scaled sums round differently: near-ties aside
    assert_layer_error_close(weight, a, b, h)
    if torch.equal(ka, kb):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_returns_input_dtype_and_leaves_inputs_alone(layer, dtype):
    weight, _, h = layer
    w = weight.to(dtype)
    w0, h0 = w.clone(), h.clone()
    new, keep = sparsegpt_prune(w, h.to(dtype), 0.5, blocksize=16)
    assert new.dtype == dtype and keep.dtype == torch.bool
    assert (new[~keep] == 0).all()
    assert torch.equal(w, w0) and torch.equal(h, h0)
    full, _ = sparsegpt_prune(w.float(), h.to(dtype).float(), 0.5, blocksize=16)
    assert torch.equal(new, full.to(dtype))


def test_fixed_mask_only_reconstructs(layer):
    weight, _, h = layer
    keep = select_unstructured(magnitude_scores(weight), 0.5)
    new, out_keep = sparsegpt_prune(weight, h, 0.5, blocksize=16, mask=keep)
    assert torch.equal(out_keep, keep)
    assert (new[~keep] == 0).all()
    # Same columns-in-order OBS as the plain loop with that mask.
    w = weight.double().clone()
    hd = h.double() + 0.01 * h.diagonal().mean().double() * torch.eye(64, dtype=torch.float64)
    for j in range(64):
        finv = torch.linalg.inv(hd[j:, j:])
        q = torch.where(keep[:, j], w[:, j], 0.0)
        w[:, j:] -= torch.outer((w[:, j] - q) / finv[0, 0], finv[0, :])
        w[:, j] = q
    assert_matches(new, w)


def test_cholesky_failure_retries_with_more_damping_and_warns():
    # Eigenvalues 2.05 and -0.05: not PD with damping 0.01 * mean(diag) = 0.01, PD with 0.1.
    h = torch.tensor([[1.0, 1.05], [1.05, 1.0]])
    with pytest.warns(UserWarning, match=r"Cholesky of the 2x2 Hessian failed with percdamp=0.01.*0.1"):
        new, keep = sparsegpt_prune(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), h, 0.5, blocksize=2)
    assert torch.isfinite(new).all()
    assert (~keep).sum() == 2


def test_cholesky_gives_up_with_runtime_error():
    h = torch.tensor([[1.0, 100.0], [100.0, 1.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"2x2 Hessian of this \(3x2\) layer.*calibration data"):
            sparsegpt_prune(torch.ones(3, 2), h, 0.5, blocksize=2)
    assert len(caught) == 3


def test_zero_percdamp_retry_uses_floor():
    h = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # singular: fails without damping
    with pytest.warns(UserWarning, match="percdamp=0 .*retrying with percdamp=0.01"):
        new, _ = sparsegpt_prune(torch.ones(2, 2), h, 0.5, blocksize=2, percdamp=0.0)
    assert torch.isfinite(new).all()


def test_hessian_from_inputs_matches_published_running_mean():
    torch.manual_seed(4)
    batches = [torch.randn(b, 5, 6) for b in (1, 3, 2)]
    h = torch.zeros(6, 6)
    nsamples = 0
    for inp in batches:
        h *= nsamples / (nsamples + inp.shape[0])
        nsamples += inp.shape[0]
        flat = math.sqrt(2 / nsamples) * inp.reshape(-1, 6).T
        h += flat @ flat.T
    assert torch.allclose(hessian_from_inputs(torch.cat(batches)), h, atol=1e-5)


def test_hessian_from_inputs_row_weights():
    torch.manual_seed(5)
    x = torch.randn(2, 7, 3, dtype=torch.float16)
    rw = torch.rand(2, 7)
    xt = rw[:, :, None] * x.float()  # (batch, seq, in), rows scaled
    expected = 2 / 2 * sum(xt[b].T @ xt[b] for b in range(2))
    out = hessian_from_inputs(x, rw)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)
    one = hessian_from_inputs(x[0], rw[0])
    assert torch.allclose(one, 2 * xt[0].T @ xt[0], atol=1e-5)
    with pytest.raises(ValueError, match="row_weights has shape"):
        hessian_from_inputs(x, rw[0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        hessian_from_inputs(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="x must be a float tensor"):
        hessian_from_inputs(torch.ones(3))


# ---------------------------------------------------------------- errors


def test_shape_mismatch_names_both():
    expected = r"hessian has shape \(5, 5\) but the weight \(3, 4\) needs \(4, 4\)"
    with pytest.raises(ValueError, match=expected):
        sparsegpt_prune(torch.randn(3, 4), torch.eye(5), 0.5)
    with pytest.raises(ValueError, match="2-D float tensor"):
        sparsegpt_prune(torch.randn(4), torch.eye(4), 0.5)


def test_non_finite_inputs_rejected():
    h = torch.eye(4)
    h[1, 2] = float("nan")
    with pytest.raises(ValueError, match="hessian contains NaN or Inf"):
        sparsegpt_prune(torch.randn(3, 4), h, 0.5)
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        sparsegpt_prune(torch.tensor([[float("inf"), 1.0]]), torch.eye(2), 0.5)


def test_negative_hessian_diagonal_rejected():
    with pytest.raises(ValueError, match="negative diagonal"):
        sparsegpt_prune(torch.randn(3, 2), -torch.eye(2), 0.5)


def test_n_m_errors():
    w, h = torch.randn(3, 8), torch.eye(8)
    with pytest.raises(ValueError, match=r"sparsity 0\.3 does not match pattern 2:4"):
        sparsegpt_prune(w, h, 0.3, prune_n=2, prune_m=4)
    with pytest.raises(ValueError, match="blocksize=6 is not a multiple of M=4"):
        sparsegpt_prune(w, h, 0.5, prune_n=2, prune_m=4, blocksize=6)
    with pytest.raises(ValueError, match="in_features=6 is not divisible by M=4"):
        sparsegpt_prune(torch.randn(3, 6), torch.eye(6), 0.5, prune_n=2, prune_m=4)
    with pytest.raises(ValueError, match="0 < N < M"):
        sparsegpt_prune(w, h, 0.5, prune_n=2, prune_m=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blocksize": 0}, "blocksize must be a positive integer"),
        ({"percdamp": -0.1}, "percdamp must be a finite number"),
        ({"percdamp": float("nan")}, "percdamp must be a finite number"),
        ({"mask": torch.ones(3, 5, dtype=torch.bool)}, "mask must be a bool keep-mask"),
        ({"mask": torch.ones(3, 4)}, "mask must be a bool keep-mask"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune(torch.randn(3, 4), torch.eye(4), 0.5, **kwargs)


@pytest.mark.parametrize("sparsity", [-0.5, 1.5, float("nan")])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity must be"):
        sparsegpt_prune(torch.randn(3, 4), torch.eye(4), sparsity)
