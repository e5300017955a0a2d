import pytest
import torch

from posterior_diff import RectifiedFlow, VESchedule, VPSchedule, time_grid


@pytest.mark.parametrize("kind", ["log-snr", "uniform", "karras"])
@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule(), RectifiedFlow()], ids=["vp", "ve", "rf"])
def test_grids_decrease_from_t_max_to_the_noise_floor(kind, schedule):
    times = time_grid(schedule, 30, kind, s_min=2e-3)
    assert times.shape == (30,) and bool((times[1:] < times[:-1]).all())
    assert float(times[0]) == schedule.t_max  # set, not computed
    assert float(schedule.ratio(times[-1])) == pytest.approx(2e-3, rel=1e-6)  # a float64 round trip


def test_log_snr_grid_is_denser_near_zero_than_uniform():
    schedule = VPSchedule()
    log_snr, uniform = time_grid(schedule, 50, "log-snr"), time_grid(schedule, 50, "uniform")
    assert int((log_snr < 0.1).sum()) > 3 * int((uniform < 0.1).sum())
    steps = schedule.log_snr(log_snr).diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-6)  # equal log-SNR steps, to float64 rounding


@pytest.mark.parametrize("steps, kind, message", [(0, "log-snr", "steps"), (10, "cosine", "grid")])
def test_bad_grid_arguments(steps, kind, message):
    with pytest.raises(ValueError, match=message):
        time_grid(VPSchedule(), steps, kind)


@pytest.mark.parametrize("kind", ["log-snr", "uniform", "karras"])
@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule(), RectifiedFlow()], ids=["vp", "ve", "flow"])
def test_a_grid_can_start_at_a_given_noise_ratio(kind, schedule):
    times = time_grid(schedule, 12, kind, s_max=0.3)
    ratios = schedule.ratio(times)  # float64 round trips through time_for_ratio
    assert torch.isclose(ratios[0], torch.tensor(0.3, dtype=ratios.dtype), rtol=1e-9)
    assert torch.all(times[1:] < times[:-1]) and torch.isclose(ratios[-1], torch.tensor(2e-3, dtype=ratios.dtype), rtol=1e-6)
    with pytest.raises(ValueError, match="s_max"):
        time_grid(schedule, 12, kind, s_max=1e9)
