"""restore_batch: several measurements in shared sampler runs, each one as restore would restore it.

The yardstick is restore itself: with a list of generators, item i of a batch must equal
restore on measurement i with generator[i], whatever else shares the batch. The equality is
exact in exact arithmetic; in floating point the batched linear algebra rounds slightly
differently for different batch sizes, and a Tweedie conjugate gradient stopped at cg_tol=1e-3
can magnify that round-off up to its own tolerance. So the Tweedie comparisons solve to 1e-10
(TIGHT_CG), where no such magnification is left, and the CG-free covariances run as they are.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CountingPrior, tiny_unet
from operators import Denoising, Inpainting, SuperResolution, StackedOperator, random_mask, stack_operators
from posterior_diff import GaussianPrior, restore, restore_batch
from posterior_diff.evaluation.problems import squared_exponential_covariance
from posterior_diff.restore import plan_runs
from posterior_diff.sampling.samplers import NoiseSource

DOUBLE = torch.float64
TIGHT_CG = dict(cg_tol=1e-10, cg_noise_tol=0.0, cg_max_iter=200)
# float64 round-off (1e-16 relative) differs with the batch size; a CG solved to a 1e-10 relative
# residual passes on at most ~1e-10 of a step's correction, over 4-5 steps: far under GAUSSIAN_ATOL.
GAUSSIAN_ATOL = 1e-8
COUNT = 3


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def generators(count: int = COUNT, first_seed: int = 100) -> list[torch.Generator]:
    return [seeded(first_seed + i) for i in range(count)]


# A smooth Gaussian prior on 8 x 8 images (the exactness study's, float64).
PRIOR = GaussianPrior(torch.zeros(1, 8, 8, dtype=DOUBLE),
                      squared_exponential_covariance(8, 2.0) + 1e-6 * torch.eye(64, dtype=DOUBLE))


@pytest.fixture
def prior():
    return PRIOR


@pytest.fixture(scope="module")
def masks():
    return [random_mask((1, 8, 8), 0.5, generator=seeded(seed)).to(DOUBLE) for seed in range(COUNT)]


def measure(prior, operators, seed=0):
    """One measurement per operator, of different prior draws."""
    truths = prior.sample(len(operators), seeded(seed))
    return [operator.measure(truth[None], seeded(seed + 1 + i))[0]
            for i, (operator, truth) in enumerate(zip(operators, truths))]


def assert_same(batch, singles, atol):
    """Samples, mean and std of each batch item equal restore's to `atol` (absolute, as rounding is)."""
    assert len(batch) == len(singles)
    for item, single in zip(batch, singles):
        assert item.samples.shape == single.samples.shape
        torch.testing.assert_close(item.samples, single.samples, atol=atol, rtol=0)
        torch.testing.assert_close(item.mean, single.mean, atol=atol, rtol=0)
        torch.testing.assert_close(item.std, single.std, atol=atol, rtol=0)


def restore_each(measurements, operators, model, **settings):
    """restore on every measurement with its own operator and generator (generators(): seeds 100, 101, ...)."""
    return [restore(y, operator, model, generator=generator, **settings)
            for y, operator, generator in zip(measurements, operators, generators(len(measurements)))]


# -- item i equals restore on item i --------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["tweedie", "isotropic", "diagonal", "projection"])
def test_a_shared_operator_batch_equals_restore_item_by_item(prior, covariance):
    operator = SuperResolution(2, sigma_y=0.05)
    ys = measure(prior, [operator] * COUNT)
    settings = dict(num_samples=3, steps=5, covariance=covariance, **(TIGHT_CG if covariance == "tweedie" else {}))
    batch = restore_batch(ys, operator, prior, generator=generators(), **settings)
    assert_same(batch, restore_each(ys, [operator] * COUNT, prior, **settings), atol=GAUSSIAN_ATOL)
    assert all(item.nfe == 5 for item in batch)  # one shared run of 9 rows, 5 network calls


@pytest.mark.parametrize("covariance", ["tweedie", "isotropic", "diagonal", "projection"])
def test_per_item_operators_batch_equals_restore_item_by_item(prior, masks, covariance):
    operators = [Inpainting(mask, sigma_y=0.1) for mask in masks]
    ys = measure(prior, operators)
    settings = dict(num_samples=3, steps=5, covariance=covariance, **(TIGHT_CG if covariance == "tweedie" else {}))
    batch = restore_batch(ys, operators, prior, generator=generators(), **settings)
    assert_same(batch, restore_each(ys, operators, prior, **settings), atol=GAUSSIAN_ATOL)
    # the masks matter: each item sees its own measurement through its own mask
    assert not torch.allclose(batch[0].mean, batch[1].mean)


@pytest.mark.parametrize("per_item_operators", [False, True])
def test_particle_mode_equals_restore_item_by_item(prior, masks, per_item_operators):
    operators = [Inpainting(mask, sigma_y=0.1) for mask in masks] if per_item_operators else [Denoising(0.2)] * COUNT
    ys = measure(prior, operators)
    settings = dict(num_samples=4, steps=5, particles=6)
    shared_or_list = operators if per_item_operators else operators[0]
    batch = restore_batch(ys, shared_or_list, prior, generator=generators(), **settings)
    singles = restore_each(ys, operators, prior, **settings)
    assert_same(batch, singles, atol=1e-10)  # particle mode runs item by item: the same float64 computation
    for item, single in zip(batch, singles):
        assert item.ess == pytest.approx(single.ess) and item.resampled == single.resampled
        assert item.log_evidence == pytest.approx(single.log_evidence) and item.nfe == single.nfe


@pytest.mark.parametrize("mean_level", [0.0, 1.0])
@pytest.mark.parametrize("batch_size", [None, 1, 2, 3, 5])
def test_an_item_does_not_depend_on_its_batch_mates_or_the_packing(prior, masks, batch_size, mean_level):
    """Item 1 of [y0, y1, y2], of [y2, y1] and alone is restore(y1, batch_size) with its generator,
    however batch_size packs the pieces of 4 samples into runs: its samples, and its mean whether it
    is the samples' own or the trajectory's (guided means summed over the runs its pieces took part in)."""
    operators = [Inpainting(mask, sigma_y=0.1) for mask in masks]
    ys = measure(prior, operators)
    settings = dict(num_samples=4, steps=4, batch_size=batch_size, mean_level=mean_level, **TIGHT_CG)
    reference = restore(ys[1], operators[1], prior, generator=seeded(7), **settings)
    assert reference.settings.mean_step == (None if mean_level == 0 else 2)  # a middle step of the 4
    three = restore_batch(ys, operators, prior, generator=[seeded(5), seeded(7), seeded(6)], **settings)[1]
    reordered = restore_batch([ys[2], ys[1]], [operators[2], operators[1]], prior, generator=[seeded(9), seeded(7)],
                              **settings)[1]
    alone = restore_batch([ys[1]], [operators[1]], prior, generator=[seeded(7)], **settings)[0]
    assert_same([three, reordered, alone], [reference] * 3, atol=GAUSSIAN_ATOL)
    assert three.nfe == reference.nfe  # as many runs took part as restore makes for it


def test_a_batch_tensor_equals_a_list_and_one_generator_is_reproducible(prior):
    operator = SuperResolution(2, sigma_y=0.05)
    ys = measure(prior, [operator] * COUNT)
    settings = dict(num_samples=2, steps=4, covariance="isotropic", batch_size=4)
    first = restore_batch(ys, operator, prior, generator=seeded(3), **settings)
    again = restore_batch(torch.stack(ys), operator, prior, generator=seeded(3), **settings)
    assert all(torch.equal(a.samples, b.samples) for a, b in zip(first, again))
    # restore is the batch of one, with the same generator
    single = restore(ys[0], operator, prior, generator=seeded(3), **settings)
    batch_of_one = restore_batch([ys[0]], operator, prior, generator=seeded(3), **settings)[0]
    assert torch.equal(batch_of_one.samples, single.samples)


def test_one_generator_draws_fresh_noise_for_every_item_a_list_per_item(prior):
    """The same measurement twice: a shared generator gives the two copies different samples,
    two generators seeded alike give them identical ones."""
    operator = Denoising(0.3)
    y = measure(prior, [operator])[0]
    settings = dict(num_samples=2, steps=4, covariance="isotropic")
    shared = restore_batch([y, y], operator, prior, generator=seeded(1), **settings)
    assert not torch.allclose(shared[0].samples, shared[1].samples)
    twins = restore_batch([y, y], operator, prior, generator=[seeded(1), seeded(1)], **settings)
    assert torch.equal(twins[0].samples, twins[1].samples)


def test_bookkeeping_of_shared_runs(prior, masks):
    operators = [Inpainting(mask, sigma_y=0.1) for mask in masks]
    ys = measure(prior, operators)
    batch = restore_batch(ys, operators, prior, num_samples=2, steps=3, batch_size=4, generator=generators())
    # pieces of 2 rows, packed 2 to a run: items 0 and 1 share a run, item 2 has its own
    assert [item.samples.shape for item in batch] == [(2, 1, 8, 8)] * 3
    assert [item.nfe for item in batch] == [3, 3, 3]
    assert batch[0].vjps == batch[1].vjps and batch[0].seconds == batch[1].seconds > 0
    assert batch[0].settings is batch[2].settings and batch[0].settings.batch_size == 4


def test_plan_runs_never_splits_a_piece_nor_exceeds_the_batch_size():
    runs = plan_runs(3, 4, 3, per_item=True)  # pieces 3 + 1 per item
    assert [[(s.item, s.rows) for s in run] for run in runs] == [[(0, 3)], [(1, 3)], [(2, 3)], [(0, 1), (1, 1), (2, 1)]]
    runs = plan_runs(3, 4, 3, per_item=False)  # one generator: rows end to end
    assert [[(s.item, s.rows) for s in run] for run in runs] == [[(0, 3)], [(0, 1), (1, 2)], [(1, 2), (2, 1)], [(2, 3)]]
    assert plan_runs(3, 2, None, per_item=True) == plan_runs(3, 2, None, per_item=False)  # one run of 6 rows


# -- an image model ---------------------------------------------------------------------------
def image_problem():
    """A tiny random UNet (the image path: [0, 1] units, per-item unit conversion, clamping), per-item
    masks, and as measurements a tensor, a numpy array and a PIL image."""
    from diffusers import DDPMScheduler

    from posterior_diff import denoiser_from_diffusers

    model = denoiser_from_diffusers(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))
    masks = [random_mask((3, 8, 8), 0.4, generator=seeded(seed)) for seed in range(COUNT)]
    operators = [Inpainting(mask, sigma_y=0.05) for mask in masks]
    images = torch.rand(COUNT, 3, 8, 8, generator=seeded(0))
    ys = [operator.measure(image[None], seeded(10 + i))[0].clamp(0, 1)
          for i, (operator, image) in enumerate(zip(operators, images))]
    measurements = [ys[0], ys[1].permute(1, 2, 0).numpy(),
                    Image.fromarray((ys[2].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))]
    return model, measurements, operators


# The batching is the point of the image tests, not the CG: the isotropic covariance has none, so
# nothing magnifies the float32 network's round-off, which differs by batch size (~1e-7 relative
# per convolution). Over 3 steps in [0, 1] units it stays far under IMAGE_ATOL; a shifted generator
# moves a sample by the sampler's noise, O(0.1) (test_a_shifted_generator_is_caught).
IMAGE_SETTINGS = dict(num_samples=2, steps=3, covariance="isotropic")
IMAGE_ATOL = 1e-5


def test_an_image_model_batch_with_per_item_masks_equals_restore():
    model, measurements, operators = image_problem()
    batch = restore_batch(measurements, operators, model, generator=generators(), **IMAGE_SETTINGS)
    assert_same(batch, restore_each(measurements, operators, model, **IMAGE_SETTINGS), atol=IMAGE_ATOL)
    assert all(float(item.samples.min()) >= 0 and float(item.samples.max()) <= 1 for item in batch)


@pytest.mark.parametrize("kind", ["gaussian prior, tweedie", "image model"])
def test_a_shifted_generator_is_caught(masks, kind):
    """The batching tests can fail: give item 1 the generator seeded one further, and its samples,
    and only its, differ from restore's beyond the tolerance those tests use."""
    if kind == "image model":
        model, measurements, operators = image_problem()
        settings, atol = IMAGE_SETTINGS, IMAGE_ATOL
    else:
        model, operators = PRIOR, [Inpainting(mask, sigma_y=0.1) for mask in masks]
        measurements, settings, atol = measure(PRIOR, operators), dict(num_samples=3, steps=5, **TIGHT_CG), GAUSSIAN_ATOL
    shifted = generators()
    shifted[1] = seeded(100 + 1 + 1)
    batch = restore_batch(measurements, operators, model, generator=shifted, **settings)
    singles = restore_each(measurements, operators, model, **settings)
    assert_same([batch[0], batch[2]], [singles[0], singles[2]], atol=atol)
    with pytest.raises(AssertionError):
        assert_same([batch[1]], [singles[1]], atol=atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_cuda_generators_an_item_equals_restore(masks):
    operators = [Inpainting(mask, sigma_y=0.1) for mask in masks]
    ys = measure(PRIOR, operators)
    cuda_generators = lambda: [torch.Generator(device="cuda").manual_seed(seed) for seed in range(COUNT)]
    settings = dict(num_samples=3, steps=4, device="cuda", **TIGHT_CG)
    batch = restore_batch(ys, operators, PRIOR, generator=cuda_generators(), **settings)
    singles = [restore(y, operator, PRIOR, generator=generator, **settings)
               for y, operator, generator in zip(ys, operators, cuda_generators())]
    assert batch[0].samples.device.type == "cuda"
    assert_same(batch, singles, atol=1e-6)


# -- bad input ----------------------------------------------------------------------------------
SR = SuperResolution(2, sigma_y=0.05)
Y = SR.A(PRIOR.sample(1, seeded(0)))[0]
NAN = Y.clone()
NAN[0, 1, 1] = float("nan")
SHARED = seeded(0)

BAD_INPUTS = [
    (dict(measurements=[]), ValueError, r"measurements is empty"),
    (dict(measurements=torch.zeros(0, 1, 4, 4)), ValueError, r"measurements is empty"),
    (dict(measurements=torch.zeros(16)), ValueError, r"measurements as a tensor must have shape \(B"),
    (dict(measurements="y.png"), TypeError, r"measurements must be a list"),
    (dict(measurements=[Y, NAN]), ValueError, r"measurements\[1\] contains NaN"),
    (dict(measurements=[Y, "y.png"]), TypeError, r"measurements\[1\] must be"),
    (dict(measurements=[Y, torch.zeros(1, 8, 8)], operator=[SR, Inpainting(torch.ones(1, 8, 8), 0.05)]),
     ValueError, r"measurements\[1\] has shape \(1, 8, 8\) but measurements\[0\] has shape \(1, 4, 4\)"),
    (dict(measurements=[Y, torch.zeros(1, 2, 2)]), ValueError, r"measurements\[1\] implies images of shape"),
    (dict(operator=[SR]), ValueError, r"operator is a list of 1 operators for 2 measurements"),
    (dict(operator=[SR, SuperResolution(2, sigma_y=0.1)]), ValueError,
     r"operator\[1\] has sigma_y=0.1 but operator\[0\] has sigma_y=0.05: the measurements of one batch must share"),
    (dict(operator=[SR, "sr2"]), TypeError, r"operator\[1\] must be an operators.LinearOperator"),
    (dict(generator=[seeded(0)]), ValueError, r"generator is a list of 1 generators for 2 measurements"),
    (dict(generator=[seeded(0), 3]), TypeError, r"generator\[1\] must be a torch.Generator"),
    (dict(generator=0), TypeError, r"generator must be a torch.Generator, a list"),
    (dict(generator=[SHARED, SHARED]), ValueError, r"generator\[1\] is the same generator as generator\[0\]"),
    (dict(num_samples=0), ValueError, r"num_samples"),
    (dict(batch_size=0), ValueError, r"batch_size"),
    (dict(particles=4, eta=0.0), ValueError, r"particle mode"),
]


@pytest.mark.parametrize("change, error, message", BAD_INPUTS, ids=[message for _, _, message in BAD_INPUTS])
def test_bad_input_is_a_clear_error_naming_the_argument_before_any_work(change, error, message):
    CountingPrior.calls = 0
    model = CountingPrior(PRIOR.mean, PRIOR.cov, PRIOR.schedule)
    arguments = dict(measurements=[Y, Y], operator=SR, model=model, steps=3)
    arguments.update(change)
    with pytest.raises(error, match=message):
        restore_batch(arguments.pop("measurements"), arguments.pop("operator"), arguments.pop("model"), **arguments)
    assert CountingPrior.calls == 0


def test_the_counting_model_does_count():
    """The yardstick of the test above can fail: a valid batch reaches the denoiser."""
    CountingPrior.calls = 0
    restore_batch([Y, Y], SR, CountingPrior(PRIOR.mean, PRIOR.cov, PRIOR.schedule), steps=3, covariance="isotropic")
    assert CountingPrior.calls == 3  # one shared run of 3 steps


# -- the pieces: the stacked operator and the noise source ----------------------------------
def test_the_stacked_operator_applies_each_part_to_its_rows(masks):
    parts = [Inpainting(mask, sigma_y=0.1) for mask in masks]
    stacked = StackedOperator(parts, [2, 1, 3])
    x = torch.randn(6, 1, 8, 8, dtype=DOUBLE, generator=seeded(0))
    r = torch.rand(6, dtype=DOUBLE, generator=seeded(1))
    rows = [slice(0, 2), slice(2, 3), slice(3, 6)]
    assert stacked.x_shape((1, 8, 8)) == (1, 8, 8) and stacked.has_closed_form_solve
    torch.testing.assert_close(stacked.A(x), torch.cat([p.A(x[s]) for p, s in zip(parts, rows)]))
    torch.testing.assert_close(stacked.A_adjoint(x), torch.cat([p.A_adjoint(x[s]) for p, s in zip(parts, rows)]))
    torch.testing.assert_close(stacked.solve(x, r), torch.cat([p.solve(x[s], r[s]) for p, s in zip(parts, rows)]))
    torch.testing.assert_close(stacked.solve(x, 0.3), torch.cat([p.solve(x[s], 0.3) for p, s in zip(parts, rows)]))
    torch.testing.assert_close(stacked.log_det(r, x), torch.cat([p.log_det(r[s], x[s]) for p, s in zip(parts, rows)]))
    with pytest.raises(ValueError, match="must have 6 rows"):
        stacked.A(x[:5])
    # with_sigma_y: every part's noise level, their tensors shared, a part met twice copied once
    shared = StackedOperator([parts[0], parts[1], parts[0]], [1, 1, 1]).with_sigma_y(0.2)
    assert shared.sigma_y == 0.2 and all(part.sigma_y == 0.2 for part in shared.parts)
    assert shared.parts[0] is shared.parts[2] and shared.parts[0].mask is parts[0].mask and parts[0].sigma_y == 0.1


def test_stacking_merges_neighbours_and_refuses_mixed_noise_levels(masks):
    operator = Denoising(0.1)
    assert stack_operators([operator, operator], [2, 3]) is operator  # one operator needs no stacking
    stacked = stack_operators([operator, operator, Inpainting(masks[0], 0.1)], [2, 3, 1])
    assert isinstance(stacked, StackedOperator) and stacked.counts == (5, 1)
    with pytest.raises(ValueError, match="share one sigma_y"):
        StackedOperator([Denoising(0.1), Denoising(0.2)], [1, 1])
    with pytest.raises(ValueError, match="disagree"):
        StackedOperator([SuperResolution(2, 0.1), Denoising(0.1)], [1, 1]).y_shape((1, 8, 8))


def test_a_noise_source_draws_each_block_from_its_own_generator():
    source = NoiseSource(((seeded(1), 2), (seeded(2), 3)))
    draw = source.randn((5, 4), torch.device("cpu"), DOUBLE)
    torch.testing.assert_close(draw[:2], torch.randn(2, 4, generator=seeded(1), dtype=DOUBLE), atol=0, rtol=0)
    torch.testing.assert_close(draw[2:], torch.randn(3, 4, generator=seeded(2), dtype=DOUBLE), atol=0, rtol=0)
    with pytest.raises(ValueError, match="draws 5 rows"):
        source.randn((4, 4), torch.device("cpu"), DOUBLE)
