import pytest
import torch

from operators import conjugate_gradient


def random_spd(batch, n, condition, generator):
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))
    values = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64)
    return q @ torch.diag_embed(values.expand(batch, n)) @ q.transpose(1, 2)


def test_cg_solves_each_sample_of_a_batch(generator):
    matrices = random_spd(4, 12, 100.0, generator)
    b = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    v, info = conjugate_gradient(lambda u: (matrices @ u[..., None])[..., 0], b, tol=1e-10, max_iter=100)
    # error <= ||M^-1|| ||residual|| <= 1 * 1e-10 ||b|| ~ 4e-10 (smallest eigenvalue 1); measured 1.5e-12
    assert torch.allclose(v, torch.linalg.solve(matrices, b), atol=1e-8)
    assert bool((info.relative_residual < 1e-10).all())  # the stopping rule
    assert info.iterations <= 16  # n = 12 in exact arithmetic, a few more in floating point


def test_cg_stops_at_the_tolerance_and_the_cap(generator):
    matrices = random_spd(2, 30, 1e4, generator)
    b = torch.randn(2, 30, generator=generator, dtype=torch.float64)
    matvec = lambda u: (matrices @ u[..., None])[..., 0]  # noqa: E731
    _, loose = conjugate_gradient(matvec, b, tol=1e-2, max_iter=200)
    _, tight = conjugate_gradient(matvec, b, tol=1e-9, max_iter=200)
    _, capped = conjugate_gradient(matvec, b, tol=1e-12, max_iter=3)
    assert loose.iterations < tight.iterations
    assert bool((loose.relative_residual <= 1e-2).all())  # the stopping rule
    assert capped.iterations == 3 and bool((capped.relative_residual > 1e-12).any())


def test_cg_preconditioner_and_zero_right_hand_side(generator):
    diagonal = torch.logspace(0, 4, 20, dtype=torch.float64).expand(3, 20)
    b = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    b[1] = 0
    v, info = conjugate_gradient(lambda u: diagonal * u, b, preconditioner=lambda u: u / diagonal, tol=1e-12)
    assert info.iterations <= 2  # an exact preconditioner converges at once
    assert torch.allclose(v, b / diagonal) and bool((v[1] == 0).all())  # one step, float64 rounding; 0 exactly


def test_cg_carries_the_image_of_its_solution_and_stops_at_an_absolute_residual(generator):
    """M = I + A G A^T with the products' G A^T u handed back: the accumulated image equals G A^T v
    of the solution, from a zero and from a non-zero starting guess, and atol stops earlier."""
    tall = torch.randn(3, 25, 8, generator=generator, dtype=torch.float64)
    gram = random_spd(3, 25, 10.0, generator)
    b = torch.randn(3, 8, generator=generator, dtype=torch.float64)

    def image_of(u):
        return (gram @ (tall @ u[..., None]))[..., 0]

    def product(u):
        image = image_of(u)
        return u + (tall.transpose(1, 2) @ image[..., None])[..., 0], image

    for guess in (None, torch.randn(3, 8, generator=generator, dtype=torch.float64)):
        v, info = conjugate_gradient(product, b, initial_guess=guess, tol=1e-10, max_iter=50, with_image=True)
        # the image's recurrence drifts from G A^T v by float64 rounding only (measured 2e-14)
        assert torch.allclose(info.image, image_of(v), atol=1e-9)
        assert torch.allclose(product(v)[0], b, atol=1e-8)  # residual <= 1e-10 ||b|| (stopping rule)
    _, relative = conjugate_gradient(lambda u: product(u)[0], b, tol=1e-10, max_iter=50)
    _, absolute = conjugate_gradient(lambda u: product(u)[0], b, tol=1e-10, atol=0.1, max_iter=50)
    assert absolute.iterations < relative.iterations
    assert bool((absolute.relative_residual * b.norm(dim=1) <= 0.1).all())  # the stopping rule, atol


def test_cg_on_a_nonsymmetric_matrix_returns_its_smallest_residual_not_a_diverged_iterate(generator):
    """A learned Jacobian makes M only nearly symmetric: p^T M p stays positive, yet plain CG's
    residual can grow by orders of magnitude. The solve hands back the iterate of smallest
    residual, with its image."""
    n = 40
    basis, _ = torch.linalg.qr(torch.randn(2, n, n, generator=generator, dtype=torch.float64))
    values = torch.linspace(1e-3, 10.0, n, dtype=torch.float64).expand(2, n)
    skew = torch.randn(2, n, n, generator=generator, dtype=torch.float64)
    # positive definite symmetric part, so the curvature test never fires; a large skew part
    matrices = basis @ torch.diag_embed(values) @ basis.transpose(1, 2) + (skew - skew.transpose(1, 2))
    b = torch.randn(2, n, generator=generator, dtype=torch.float64)

    def product(u):
        return (matrices @ u[..., None])[..., 0], 3.0 * u  # G = 3 I: the image must follow the iterate

    def relative_residual(v):
        return (b - product(v)[0]).norm(dim=1) / b.norm(dim=1)

    v, info = conjugate_gradient(product, b, tol=1e-12, max_iter=30, with_image=True)
    # the image and residual it reports are those of v, up to float64 rounding
    assert bool(torch.isfinite(v).all()) and torch.allclose(info.image, 3.0 * v)
    assert torch.allclose(info.relative_residual, relative_residual(v), rtol=1e-6)
    assert bool((relative_residual(v) <= 1 + 1e-12).all())  # never worse than the zero start (up to rounding)
    # the unguarded recurrence on these systems runs far above where it began
    x, r = torch.zeros_like(b), b.clone()
    d, largest = r.clone(), torch.zeros(2, dtype=torch.float64)
    for _ in range(30):
        md = product(d)[0]
        step = (r * r).sum(1, keepdim=True) / (d * md).sum(1, keepdim=True)
        x, r_new = x + step * d, r - step * md
        d, r = r_new + ((r_new * r_new).sum(1, keepdim=True) / (r * r).sum(1, keepdim=True)) * d, r_new
        largest = torch.maximum(largest, relative_residual(x))
    assert bool((largest > 10).all())  # 44-100 over 11 seeds: a property of these systems, not of one draw


def test_cg_rejects_bad_settings():
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(lambda u: u, torch.ones(1, 2), tol=0)
    with pytest.raises(ValueError, match="atol"):
        conjugate_gradient(lambda u: u, torch.ones(1, 2), atol=-1.0)
