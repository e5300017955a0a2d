import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from operators import (Blur, Denoising, Inpainting, LinearOperator, MatrixOperator, SuperResolution, box_mask, gaussian_kernel,
                       random_mask)

DOUBLE = torch.float64


def adjointness_gap(operator, x):
    """|<A x, y> - <x, A^T y>| on the scale of the sums' rounding, ||A x|| ||y|| + ||x|| ||A^T y||
    (Cauchy-Schwarz), not of |<A x, y>|, which cancellation can make arbitrarily small. In float64
    on these sizes (<= 768 terms) that is ~1e-16 (measured at most 2e-16 over 20000 random cases);
    a wrong adjoint gives about its relative error / sqrt(size): a 0.1% slip already ~1e-4."""
    y = torch.randn_like(operator.A(x))
    image, back = operator.A(x), operator.A_adjoint(y)
    lhs, rhs = (image * y).sum(), (x * back).sum()
    return float((lhs - rhs).abs() / (image.norm() * y.norm() + x.norm() * back.norm() + 1e-300))


image_shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), shape=image_shapes, factor=st.integers(1, 4), kernel=st.sampled_from(["average", "bicubic"]), seed=st.integers(0, 2**16))
def test_super_resolution_is_adjoint(batch, shape, factor, kernel, seed):
    channels, h, w = shape
    x = torch.randn(batch, channels, h * factor, w * factor, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed))
    assert adjointness_gap(SuperResolution(factor, 0.1, kernel), x) < 1e-10


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), fraction=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_inpainting_and_denoising_are_adjoint(batch, shape, fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, dtype=DOUBLE, generator=generator)
    mask = random_mask(shape, fraction, generator=generator).to(DOUBLE)
    assert adjointness_gap(Inpainting(mask, 0.1), x) < 1e-10
    assert adjointness_gap(Denoising(0.1), x) < 1e-10


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), m=st.integers(1, 6), d=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_matrix_operator_is_adjoint(batch, m, d, seed):
    generator = torch.Generator().manual_seed(seed)
    operator = MatrixOperator(torch.randn(m, d, dtype=DOUBLE, generator=generator), 0.1)
    assert adjointness_gap(operator, torch.randn(batch, d, dtype=DOUBLE, generator=generator)) < 1e-10


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 3), height=st.integers(0, 4), width=st.integers(0, 4),
       radius=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_blur_is_adjoint(batch, channels, height, width, radius, seed):
    """Images from the kernel's size up to 4 pixels larger; kernels of random positive entries (no symmetry)."""
    generator = torch.Generator().manual_seed(seed)
    size = 2 * radius + 1
    kernel = torch.rand(size, size, dtype=DOUBLE, generator=generator) + 0.01
    x = torch.randn(batch, channels, size + height, size + width, dtype=DOUBLE, generator=generator)
    assert adjointness_gap(Blur(kernel / kernel.sum(), 0.1), x) < 1e-10


def all_operators():
    generator = torch.Generator().manual_seed(0)
    return {
        "denoising": (Denoising(0.3), (2, 8, 8)),
        "inpainting": (Inpainting(random_mask((2, 8, 8), 0.6, generator=generator).to(DOUBLE), 0.1), (2, 8, 8)),
        "sr-average": (SuperResolution(2, 0.05), (2, 8, 8)),
        "sr-bicubic": (SuperResolution(2, 0.05, "bicubic"), (2, 8, 8)),
        "matrix": (MatrixOperator(torch.randn(5, 7, dtype=DOUBLE, generator=generator), 0.2), (7,)),
        "blur": (Blur(gaussian_kernel(1.0, size=5, dtype=DOUBLE), 0.1), (2, 8, 8)),
    }


@pytest.mark.parametrize("name", list(all_operators()))
def test_solve_agrees_with_conjugate_gradient_and_dense_algebra(name):
    operator, x_shape = all_operators()[name]
    generator = torch.Generator().manual_seed(1)
    u = operator.A(torch.randn(3, *x_shape, dtype=DOUBLE, generator=generator))
    r = torch.tensor([0.0, 0.3, 4.0], dtype=DOUBLE)
    # tol only reaches the bicubic operator's solve, which has no closed form and is a CG itself
    closed = operator.solve(u, r, tol=1e-12, max_iter=500)
    iterative = LinearOperator.solve_cg(operator, u, r, tol=1e-12, max_iter=500)
    scale = float(closed.abs().max())
    # CG stopped at a relative residual of 1e-12 on systems of condition <= 400: error <= 4e-10
    # relative (measured 4e-16)
    assert torch.allclose(closed, iterative, rtol=1e-5, atol=1e-6 * scale)
    # And both solve the dense system on the range of A (float64 residual, measured 5e-16).
    matrix = operator.to_matrix(x_shape)
    for i in range(3):
        system = operator.sigma_y**2 * torch.eye(matrix.shape[0], dtype=DOUBLE) + r[i] * matrix @ matrix.T
        assert torch.allclose(system @ closed[i].flatten(), u[i].flatten(), atol=1e-9 * float(u.abs().max()))


def test_matrix_solve_factors_once_and_follows_the_matrix():
    """The eigenbasis of M M^T is cached per dtype; an in-place change of M is seen, and a float32
    solve is the float64 one to float32 rounding (a relative 1e-5 on this well-conditioned 4 x 4
    system: condition 8, measured 2e-7)."""
    generator = torch.Generator().manual_seed(2)
    operator = MatrixOperator(torch.randn(4, 6, dtype=DOUBLE, generator=generator), 0.3)
    u = torch.randn(2, 4, dtype=DOUBLE, generator=generator)

    def dense_solve(r):
        m = operator.matrix
        return torch.linalg.solve(0.09 * torch.eye(4, dtype=DOUBLE) + r * m @ m.T, u.T).T

    # a scalar r and one r per sample, against the dense solve (float64 rounding of a small system;
    # elementwise relative, every entry >= 5% of the largest: measured 6e-15)
    torch.testing.assert_close(operator.solve(u, 0.7), dense_solve(0.7), rtol=1e-10, atol=0)
    per_sample = operator.solve(u, torch.tensor([0.7, 2.0], dtype=DOUBLE))
    torch.testing.assert_close(per_sample[1], dense_solve(2.0)[1], rtol=1e-10, atol=0)
    single = operator.solve(u.float(), 0.7)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), dense_solve(0.7), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        operator.matrix.mul_(2.0)  # a cached factorisation of the old matrix would now be wrong
    torch.testing.assert_close(operator.solve(u, 0.7), dense_solve(0.7), rtol=1e-10, atol=0)


def test_a_noiseless_rank_deficient_matrix_has_no_solve():
    operator = MatrixOperator(torch.ones(2, 3, dtype=DOUBLE), 0.0)  # M M^T has rank 1
    with pytest.raises(ValueError, match="singular"):
        operator.solve(torch.ones(1, 2, dtype=DOUBLE), 1.0)


def test_closed_form_flags():
    ops = all_operators()
    assert ops["denoising"][0].has_closed_form_solve and ops["sr-average"][0].has_closed_form_solve
    assert ops["inpainting"][0].has_closed_form_solve and ops["matrix"][0].has_closed_form_solve
    assert ops["blur"][0].has_closed_form_solve  # diagonal in the Fourier basis
    assert not ops["sr-bicubic"][0].has_closed_form_solve


def test_average_pooling_gram_is_scaled_identity():
    matrix = SuperResolution(3, 0.0).to_matrix((1, 6, 6))
    assert torch.allclose(matrix @ matrix.T, torch.eye(4, dtype=DOUBLE) / 9)  # float64 sums of nine 1/81


def test_bicubic_preserves_constants_and_smooth_images():
    operator = SuperResolution(4, 0.0, "bicubic")
    # float32: the kernel's weights sum to 1 up to rounding (measured 6e-8)
    assert torch.allclose(operator.A(torch.full((1, 1, 16, 16), 0.7)), torch.full((1, 1, 4, 4), 0.7), atol=1e-6)
    # A symmetric kernel maps a linear ramp to its value at each block centre (away from the
    # replicated borders, which the kernel's support of 2 coarse pixels reaches).
    ramp = torch.linspace(0, 1, 32, dtype=DOUBLE).expand(1, 1, 32, 32)
    low = operator.A(ramp)[0, 0, 4]
    centres = (ramp[0, 0, 0, 4 * torch.arange(8)] + ramp[0, 0, 0, 4 * torch.arange(8) + 3]) / 2
    assert torch.allclose(low[2:6], centres[2:6], atol=1e-12)  # exact in float64 arithmetic: rounding, 1e-16


def test_measure_adds_noise_of_the_right_size_and_is_reproducible():
    operator = SuperResolution(2, 0.1)
    x = torch.zeros(1, 3, 64, 64, dtype=DOUBLE)
    y1 = operator.measure(x, torch.Generator().manual_seed(5))
    y2 = operator.measure(x, torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2) and y1.shape == (1, 3, 32, 32)  # same seed, same computation
    assert abs(float(y1.std()) - 0.1) < 0.01  # Monte Carlo: 3072 draws, standard error 0.0013


def test_inpainting_measures_only_observed_pixels():
    mask = box_mask((1, 8, 8), 2, 3, 4, 2)
    assert mask.sum() == 64 - 8 and bool((mask[0, 2:6, 3:5] == 0).all())
    y = Inpainting(mask, 0.5).measure(torch.ones(2, 1, 8, 8), torch.Generator().manual_seed(0))
    assert bool((y[:, mask == 0] == 0).all()) and bool((y[:, mask == 1] != 1).all())


def test_random_mask_removes_the_exact_fraction_of_pixels():
    mask = random_mask((3, 10, 10), 0.7, generator=torch.Generator().manual_seed(0))
    assert int((mask[0] == 0).sum()) == 70
    assert torch.equal(mask[0], mask[2])  # whole pixels, all channels together


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Denoising(-0.1), "sigma"),
        (lambda: SuperResolution(2, float("nan")), "sigma"),
        (lambda: SuperResolution(0, 0.1), "factor"),
        (lambda: SuperResolution(2, 0.1, kernel="lanczos"), "kernel"),
        (lambda: Inpainting(torch.full((4, 4), 0.5)), "mask"),
        (lambda: MatrixOperator(torch.ones(3)), "matrix"),
        (lambda: box_mask((8, 8), 6, 0, 4, 4), "box"),
        (lambda: random_mask((8, 8), 1.5), "missing_fraction"),
        (lambda: Blur(torch.ones(3, 3)), "kernel must sum to 1"),
    ],
)
def test_bad_construction_is_a_clear_error(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_shape_mismatches_are_clear_errors():
    with pytest.raises(ValueError, match="mask has shape"):
        Inpainting(torch.ones(1, 8, 8)).A(torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match="not a multiple of the factor 4"):
        SuperResolution(4).A(torch.zeros(1, 1, 10, 12))
    with pytest.raises(ValueError, match=r"x must have shape \(7,\)"):
        MatrixOperator(torch.ones(2, 7)).A(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="smaller than the 5x5 blur kernel"):
        Blur(torch.full((5, 5), 1 / 25)).A(torch.zeros(1, 1, 4, 8))


def test_operators_move_with_to():
    operator = Inpainting(torch.ones(1, 4, 4)).to(torch.float64)
    assert operator.mask.dtype == torch.float64


@pytest.mark.parametrize("operator", [Denoising("auto"), SuperResolution(2, "auto"),
                                      Inpainting(torch.ones(1, 4, 4), "auto")], ids=lambda op: type(op).__name__)
def test_an_operator_with_auto_sigma_y_refuses_direct_use(operator):
    """sigma_y="auto" is a value still to be estimated: every use that needs it says how to get it."""
    x = torch.rand(2, 1, 4, 4)
    y = operator.A(x)  # A itself needs no noise level
    assert operator.sigma_y_setting == "auto" and "sigma_y=auto" in repr(operator)
    for use in (lambda: operator.measure(x), lambda: operator.solve(y, 1.0), lambda: operator.log_det(1.0, y),
                lambda: operator.sigma_y):
        with pytest.raises(ValueError, match=r"sigma_y='auto'.*restore.*estimate_sigma_y\(y, operator\).*with_sigma_y"):
            use()
    pytest.importorskip("deepinv")
    with pytest.raises(ValueError, match="with_sigma_y"):
        operator.to_deepinv()
    estimated = operator.with_sigma_y(0.1)
    assert estimated.sigma_y == 0.1 and operator.sigma_y_setting == "auto"
    assert estimated.measure(x).shape == y.shape


def test_sigma_y_must_be_a_number_or_auto():
    with pytest.raises(TypeError, match='non-negative number or "auto"'):
        Denoising("Auto ")
    with pytest.raises(ValueError, match="share one sigma_y"):
        from operators import StackedOperator

        StackedOperator([Denoising("auto"), Denoising(0.1)], [1, 1])
