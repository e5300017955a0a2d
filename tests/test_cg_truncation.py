"""A Tweedie solve stopped by the cap cg_max_iter says so (issue 27, part 4): `conjugate_gradient`
flags per sample whether its stopping rule was met, the guidance counts the solves the cap cut
short, and `restore` / `restore_batch` report them (`Restoration.cg_truncated`) and warn."""

import warnings

import pytest
import torch

from operators import Inpainting, conjugate_gradient, random_mask
from posterior_diff import CGTruncatedWarning, GaussianPrior, restore, restore_batch
from posterior_diff.defaults import IMAGE_DEFAULTS

deepinv = pytest.importorskip("deepinv")

from posterior_diff import from_deepinv_denoiser  # noqa: E402
from test_deepinv_prior import ExactGaussianDenoiser, image_prior  # noqa: E402

SIZE = 8  # (1, 8, 8) images, half of the pixels observed: y of 32 entries


def inpainting_problem(seed=0):
    """The issue's case, small: a deepinv-interface Gaussian prior in [0, 1] units, 50% inpainting."""
    mean, cov = image_prior(SIZE)
    generator = torch.Generator().manual_seed(seed)
    operator = Inpainting(random_mask((1, SIZE, SIZE), 0.5, generator=generator), sigma_y=0.01)
    y = operator.measure(GaussianPrior(mean, cov).sample(1, generator), generator)[0]
    return from_deepinv_denoiser(ExactGaussianDenoiser(mean, cov)), operator, y


def quick_restore(y, operator, model, **settings):
    settings.setdefault("covariance", "tweedie")
    return restore(y, operator, model, steps=10, num_samples=2, generator=torch.Generator().manual_seed(1), **settings)


def test_the_image_defaults_truncate_the_tweedie_solve_and_say_so():
    model, operator, y = inpainting_problem()
    with pytest.warns(CGTruncatedWarning, match=r"of \d+ Tweedie conjugate-gradient solves stopped at cg_max_iter=4 "
                                                r"before meeting their stopping rule") as record:
        result = quick_restore(y, operator, model)  # the defaults otherwise: an image model's cap of 4
    assert len(record) == 1 and record[0].filename == __file__  # once per call, pointing at the caller
    assert "pass a larger cg_max_iter" in str(record[0].message)
    assert result.settings.guidance.cg_max_iter == IMAGE_DEFAULTS.cg_max_iter == 4  # the cap used is recorded
    # 10 steps: 9 guided Tweedie solves (the closing estimate is Jacobian-free); most hit the cap
    assert 0 < result.cg_truncated <= 9
    assert f"{result.cg_truncated} of 9 " in str(record[0].message)


def test_a_generous_cap_lets_every_solve_meet_its_rule_silently():
    model, operator, y = inpainting_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = quick_restore(y, operator, model, cg_max_iter=200)
    assert result.cg_truncated == 0 and result.settings.guidance.cg_max_iter == 200


def test_a_covariance_without_cg_reports_no_truncation():
    model, operator, y = inpainting_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = quick_restore(y, operator, model, covariance="isotropic")
    assert result.cg_truncated == 0


def test_a_default_call_or_a_chosen_cap_counts_truncation_without_warning():
    """The warning is for a covariance asked for and cut short by a cap nobody chose: a call taking
    both from the defaults, or one setting the cap itself, only counts the truncated solves."""
    model, operator, y = inpainting_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = restore(y, operator, model, steps=10, num_samples=2, generator=torch.Generator().manual_seed(1))
        chosen = quick_restore(y, operator, model, cg_max_iter=4)
    assert default.settings.guidance.covariance == "tweedie" and default.cg_truncated > 0
    assert chosen.cg_truncated == default.cg_truncated  # the same run: the cap was the default's


def test_restore_batch_warns_once_and_each_item_carries_its_runs_count():
    model, operator, y = inpainting_problem()
    _, _, other = inpainting_problem(seed=3)
    with pytest.warns(CGTruncatedWarning) as record:
        results = restore_batch([y, other], operator, model, num_samples=2, steps=10, covariance="tweedie",
                                generator=torch.Generator().manual_seed(1))
    assert len(record) == 1 and record[0].filename == __file__
    # one shared run: both items took part in the same solves, as they share its vjps
    assert results[0].cg_truncated == results[1].cg_truncated > 0
    assert results[0].vjps == results[1].vjps
    assert f"{results[0].cg_truncated} of 9 " in str(record[0].message)


def test_restore_batch_warns_once_when_its_measurements_run_in_groups(monkeypatch):
    """Measurements with estimated sigma_y run in groups of one noise level (`Problem.noise_groups`),
    one sampler run each: the call still warns once, counting every group's solves."""
    import importlib

    restore_module = importlib.import_module("posterior_diff.restore")  # the module (the package binds the function)

    model, operator, y = inpainting_problem()
    _, _, other = inpainting_problem(seed=3)
    monkeypatch.setattr(restore_module.Problem, "noise_groups", lambda self: [(0,), (1,)])
    with pytest.warns(CGTruncatedWarning) as record:
        results = restore_batch([y, other], operator, model, num_samples=2, steps=10, covariance="tweedie",
                                generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert len(record) == 1 and record[0].filename == __file__
    assert f"{results[0].cg_truncated + results[1].cg_truncated} of 18 " in str(record[0].message)


def test_converged_flags_follow_the_stopping_rule():
    """Two samples of a diagonal SPD system: the first (M = 2 I) is solved in one product, the
    second (16 distinct eigenvalues over four decades) not within a cap of 3."""
    d = 16
    diagonals = torch.stack([torch.full((d,), 2.0), torch.logspace(-2, 2, d)]).double()
    b = torch.ones(2, d, dtype=torch.float64)

    def matvec(v):
        return diagonals * v

    tol = 1e-6
    _, info = conjugate_gradient(matvec, b, tol=tol, max_iter=3)
    assert info.iterations == 3
    assert info.converged.tolist() == [True, False]
    assert torch.equal(info.converged, info.relative_residual <= tol)  # atol = 0: the relative rule alone
    # an absolute tolerance above the second sample's residual norm meets the rule there too
    norm = float(info.relative_residual[1]) * float(b[1].norm())
    _, loose = conjugate_gradient(matvec, b, tol=tol, atol=2 * norm, max_iter=3)
    assert loose.converged.tolist() == [True, True] and float(loose.relative_residual[1]) > tol
    # uncapped, both meet the relative rule
    _, full = conjugate_gradient(matvec, b, tol=tol, max_iter=100)
    assert full.converged.all() and bool((full.relative_residual <= tol).all())
