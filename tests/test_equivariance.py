"""posterior_diff.models.equivariance: a denoiser made equivariant to flips and quarter turns.

The network here is deliberately not equivariant (a fixed, position-dependent nonlinearity), so each
property below fails if an element or its inverse is wrong: the group's elements and inverses, exact
equivariance of the average over the whole group, one element per level otherwise (different ones on
successive levels of a sampler's grid), rows independent of their batch, the Jacobian the guidance
differentiates, non-square images, and the errors."""

import pytest
import torch

from posterior_diff import DeepinvPrior, GeometricVESchedule
from posterior_diff.models.equivariance import (SHAPE_KEEPING_GROUP, SQUARE_GROUP, DihedralAverage,
                                                dihedral_equivariant, elements_at, transform, untransform)


class Lopsided(torch.nn.Module):
    """A smooth denoiser-shaped network with a fixed spatial ramp: no flip or turn commutes with it."""

    def forward(self, x, sigma):
        height, width = x.shape[-2:]
        ramp = torch.linspace(0, 1, height, dtype=x.dtype)[:, None] + 2 * torch.linspace(0, 1, width, dtype=x.dtype)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.tanh(x * (1 + ramp)) / (1 + sigma) + 0.1 * x.roll(1, dims=-1)


def images(*shape, seed=0):
    return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_the_eight_elements_are_distinct_and_each_is_undone_by_its_inverse():
    x = images(1, 1, 4, 4)
    turned = [transform(x, element) for element in SQUARE_GROUP]
    assert len({tuple(image.flatten().tolist()) for image in turned}) == 8
    for element, image in zip(SQUARE_GROUP, turned):
        assert torch.equal(untransform(image, element), x)
    for element in SHAPE_KEEPING_GROUP:
        assert transform(images(1, 1, 3, 5), element).shape == (1, 1, 3, 5)


def test_the_average_over_the_whole_group_is_exactly_equivariant_and_one_element_is_not():
    x, sigma = images(2, 3, 6, 6), torch.tensor([0.1, 0.7], dtype=torch.float64)
    average, single = DihedralAverage(Lopsided(), 8), DihedralAverage(Lopsided(), 1)
    for element in SQUARE_GROUP[1:]:
        torch.testing.assert_close(average(transform(x, element), sigma), transform(average(x, sigma), element),
                                   rtol=1e-12, atol=1e-12)
    assert not torch.allclose(single(transform(x, 1), sigma), transform(single(x, sigma), 1))


def test_one_element_per_level_asks_the_network_on_the_turned_image():
    x, network = images(3, 1, 5, 5), Lopsided()
    sigma = torch.tensor([0.02, 0.3, 1.5], dtype=torch.float64)
    elements = elements_at(sigma, SQUARE_GROUP, 1)[0]
    expected = torch.cat([untransform(network(transform(x[[row]], int(element)), sigma[[row]]), int(element))
                          for row, element in enumerate(elements)])
    # float64 rounding: the network runs on a turned view here, on a contiguous batch there
    torch.testing.assert_close(DihedralAverage(network, 1)(x, sigma), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [20, 50, 100])
def test_successive_levels_of_a_geometric_grid_use_different_elements_and_all_of_them(steps):
    # the image defaults' grid on a variance-exploding axis: geometric from 80 to 0.002 ([0, 1] units)
    levels = torch.logspace(torch.log10(torch.tensor(80.0)), torch.log10(torch.tensor(0.002)), steps,
                            dtype=torch.float64)
    elements = elements_at(levels, SQUARE_GROUP, 1)[0].tolist()
    assert all(a != b for a, b in zip(elements, elements[1:]))
    assert set(elements) == set(SQUARE_GROUP)
    spread = elements_at(levels[:1], SQUARE_GROUP, 4)[:, 0].tolist()
    assert len(set(spread)) == 4 and len({element % 2 for element in spread}) == 1  # evenly around the group


def test_a_row_is_denoised_alike_alone_or_in_a_batch_of_other_levels():
    x, sigma = images(4, 3, 6, 6), torch.tensor([0.01, 0.05, 0.2, 1.0], dtype=torch.float64)
    for count in (1, 2, 8):
        batch = DihedralAverage(Lopsided(), count)(x, sigma)
        alone = torch.cat([DihedralAverage(Lopsided(), count)(x[[row]], sigma[[row]]) for row in range(4)])
        torch.testing.assert_close(batch, alone, rtol=1e-12, atol=1e-12)


def test_the_jacobian_is_the_average_of_the_turned_networks_own():
    x, sigma = images(1, 1, 3, 3), torch.tensor([0.4], dtype=torch.float64)
    network = Lopsided()
    jacobian = torch.autograd.functional.jacobian(lambda v: DihedralAverage(network, 8)(v, sigma), x)
    expected = sum(torch.autograd.functional.jacobian(
        lambda v, e=element: untransform(network(transform(v, e), sigma), e), x) for element in SQUARE_GROUP) / 8
    torch.testing.assert_close(jacobian, expected, rtol=1e-12, atol=1e-12)


def test_a_non_square_image_keeps_its_shape_and_is_averaged_over_the_four_elements_that_keep_it():
    x, sigma = images(2, 3, 4, 7), torch.tensor([0.1], dtype=torch.float64)
    average = DihedralAverage(Lopsided(), 8)
    out = average(x, sigma)
    assert out.shape == x.shape
    expected = sum(untransform(Lopsided()(transform(x, element), sigma), element) for element in SHAPE_KEEPING_GROUP) / 4
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_dihedral_equivariant_keeps_the_prior_and_names_bad_arguments():
    prior = DeepinvPrior(Lopsided(), GeometricVESchedule(0.002, 0.3), channels=1, sigma_range=(0.0, 0.3))
    equivariant = dihedral_equivariant(prior, 4)
    assert equivariant.sigma_range == (0.0, 0.3) and equivariant.channels == 1
    assert equivariant.schedule is prior.schedule and equivariant.denoiser.network is prior.denoiser
    assert equivariant.denoiser.elements_per_call == 4
    with pytest.raises(ValueError, match="elements_per_call"):
        dihedral_equivariant(prior, 3)
    with pytest.raises(ValueError, match="elements_per_call"):
        dihedral_equivariant(prior, 0)
    with pytest.raises(TypeError, match="DeepinvPrior"):
        dihedral_equivariant(prior.denoiser)
    with pytest.raises(ValueError, match="batch of images"):
        DihedralAverage(Lopsided())(torch.rand(4, 4), torch.tensor([0.1]))
