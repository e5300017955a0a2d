import pytest
import torch

from operators import Blur, Denoising, Inpainting, SuperResolution, box_kernel, gaussian_kernel
from posterior_diff.tasks import BOX_FRACTION, MISSING_FRACTION, TASKS, get_task

SHAPE = (3, 64, 64)


def test_every_task_builds_its_forward_model_with_its_noise_level():
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(SHAPE)
    kinds = {"sr2": SuperResolution, "sr4": SuperResolution, "sr4-bicubic": SuperResolution, "inpaint": Inpainting,
             "box": Inpainting, "random": Inpainting, "denoise": Denoising, "deblur": Blur, "deblur-motion": Blur}
    assert set(TASKS) == set(kinds)
    for name, task in TASKS.items():
        operator = task.operator(SHAPE, mask=mask if task.mask == "given" else None, generator=generator)
        assert isinstance(operator, kinds[name]) and operator.sigma_y == task.sigma_y  # passed through as is
        assert operator.y_shape(SHAPE) == tuple(operator.A(torch.zeros(1, *SHAPE)).shape[1:])
    assert TASKS["sr4"].operator(SHAPE).factor == 4 and TASKS["sr4-bicubic"].operator(SHAPE).kernel == "bicubic"
    assert TASKS["denoise"].operator(SHAPE, sigma_y=0.3).sigma_y == 0.3


def test_the_simulated_masks_have_their_sizes():
    hole = 1 - TASKS["box"].operator(SHAPE).mask
    side = round(BOX_FRACTION * SHAPE[-1])
    assert float(hole.sum()) == SHAPE[0] * side * side  # a count: exact in float32 below 2^24
    rows, columns = hole[0].sum(1).nonzero(), hole[0].sum(0).nonzero()
    assert int(rows.min()) == (SHAPE[1] - side) // 2 and int(columns.min()) == (SHAPE[2] - side) // 2  # centred
    missing = 1 - TASKS["random"].operator(SHAPE, generator=torch.Generator().manual_seed(1)).mask
    # random_mask removes exactly round(fraction * n) pixels: off by at most half a pixel's share
    assert abs(float(missing.mean()) - MISSING_FRACTION) <= 0.5 / (SHAPE[1] * SHAPE[2])
    assert TASKS["box"].draws_mask and TASKS["random"].draws_mask and not TASKS["inpaint"].draws_mask


def test_masks_go_where_they_belong():
    with pytest.raises(ValueError, match="needs a mask"):
        TASKS["inpaint"].operator(SHAPE)
    with pytest.raises(ValueError, match="only used by the inpaint task"):
        TASKS["sr4"].operator(SHAPE, mask=torch.ones(SHAPE))
    with pytest.raises(ValueError, match="unknown task 'sr3'"):
        get_task("sr3")


def test_the_deblurring_tasks_take_their_kernel_or_the_callers():
    assert torch.equal(TASKS["deblur"].operator(SHAPE).kernel, gaussian_kernel(2.0))  # same computation
    assert TASKS["deblur-motion"].operator(SHAPE).kernel_size == 15
    assert torch.equal(TASKS["deblur"].operator(SHAPE, kernel=box_kernel(3)).kernel, box_kernel(3))
    with pytest.raises(ValueError, match="only used by the deblurring tasks"):
        TASKS["sr4"].operator(SHAPE, kernel=box_kernel(3))
    with pytest.raises(ValueError, match="smaller than the 17x17 blur kernel"):  # at construction, before any work
        TASKS["deblur"].operator((3, 16, 16))
