import pytest
import torch
from torch import nn

from posterior_diff import DiscreteSchedule, GaussianPrior, ModuleDenoiser, RectifiedFlow, VESchedule, VPSchedule
from posterior_diff.denoisers import epsilon_from_x0, score_from_x0, v_from_x0

DOUBLE = torch.float64


class OraclePrediction(nn.Module):
    """A 'network' that returns the exact eps / v / x0 / score of a Gaussian prior."""

    def __init__(self, prior, prediction, time_to_t=lambda time: time):
        super().__init__()
        self.prior, self.prediction, self.time_to_t = prior, prediction, time_to_t

    def forward(self, x, time):
        t = self.time_to_t(time)
        alpha = self.prior.schedule.alpha(t)[:, None]
        sigma = self.prior.schedule.sigma(t)[:, None]
        x0 = self.prior(x, t)
        convert = {"epsilon": epsilon_from_x0, "v_prediction": v_from_x0, "score": score_from_x0, "sample": lambda x, x0, a, s: x0}
        return convert[self.prediction](x, x0, alpha, sigma)


def make_prior(schedule):
    generator = torch.Generator().manual_seed(3)
    root = torch.randn(4, 4, generator=generator, dtype=DOUBLE)
    return GaussianPrior(torch.randn(4, generator=generator, dtype=DOUBLE), root @ root.T + 0.1 * torch.eye(4, dtype=DOUBLE), schedule)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "score"])
@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule(), RectifiedFlow()], ids=["vp", "ve", "rf"])
def test_every_prediction_type_converts_exactly(prediction, schedule):
    prior = make_prior(schedule)
    wrapped = ModuleDenoiser(OraclePrediction(prior, prediction), schedule, prediction)
    x = torch.randn(6, 4, dtype=DOUBLE)
    t = torch.linspace(0.05, 0.95, 6, dtype=DOUBLE)
    # float64 conversions there and back, amplified by 1 / alpha (<= 100) and 1 / sigma^2 (the
    # score): measured 8e-15 and 2e-12
    assert torch.allclose(wrapped(x, t), prior(x, t), atol=1e-9)
    assert torch.allclose(wrapped.score(x, t), prior.score(x, t), atol=1e-7)


def test_discrete_schedule_feeds_training_timesteps_to_the_module():
    schedule = DiscreteSchedule(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DOUBLE), 0))
    prior = make_prior(schedule)
    seen = []

    def time_to_t(timestep):
        seen.append(timestep.clone())
        return (timestep + 1) / 1000

    wrapped = ModuleDenoiser(OraclePrediction(prior, "epsilon", time_to_t), schedule)
    x = torch.randn(2, 4, dtype=DOUBLE)
    t = torch.tensor([0.25, 0.8], dtype=DOUBLE)
    assert torch.allclose(wrapped(x, t), prior(x, t), atol=1e-9)  # float64 rounding, as above
    assert torch.allclose(seen[0], torch.tensor([249.0, 799.0], dtype=DOUBLE))  # 1000 t - 1 in float64
    assert seen[0].is_floating_point()  # a float timestep, never silently truncated


def test_module_outputs_with_a_sample_attribute_are_unwrapped():
    class Output:
        def __init__(self, sample):
            self.sample = sample

    wrapped = ModuleDenoiser(lambda x, t: Output(torch.zeros_like(x)), VPSchedule(), "epsilon")
    x = torch.randn(3, 2)
    alpha = VPSchedule().alpha(torch.tensor(0.5))
    assert torch.allclose(wrapped(x, 0.5), x / alpha)  # the same float32 division


def test_unknown_prediction_type_is_an_error():
    with pytest.raises(ValueError, match="prediction"):
        ModuleDenoiser(nn.Identity(), VPSchedule(), "noise")


def test_time_must_match_the_batch():
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        make_prior(VPSchedule())(torch.zeros(3, 4, dtype=DOUBLE), torch.zeros(2, dtype=DOUBLE))
