import numpy as np
import pytest
import torch
from PIL import Image

from operators import Inpainting, SuperResolution, box_mask
from posterior_diff.images import (
    from_model_range,
    match_channels,
    measurement_to_model_units,
    read_image,
    to_image_tensor,
    to_model_range,
    write_image,
)


def test_unit_round_trip_and_noise_level():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(from_model_range(to_model_range(x)), x)  # float32 2x - 1 and back: 1 ulp
    operator = SuperResolution(2, sigma_y=0.05)
    y01 = operator.A(x)[0]
    y_model, model_operator = measurement_to_model_units(y01, operator)
    assert model_operator.sigma_y == pytest.approx(0.1) and operator.sigma_y == 0.05  # caller's operator kept
    # the same numbers by linearity, rounded apart in float32 on values <= 1: ~1e-7
    assert torch.allclose(y_model, operator.A(to_model_range(x))[0], atol=1e-6)


def test_inpainting_measurement_keeps_its_holes_at_zero():
    mask = box_mask((1, 8, 8), 2, 2, 3, 3)
    operator = Inpainting(mask, 0.02)
    x = torch.rand(1, 1, 8, 8)
    y_model, _ = measurement_to_model_units(operator.A(x)[0], operator)
    assert torch.allclose(y_model, operator.A(to_model_range(x))[0], atol=1e-6)  # float32 rounding, as above
    assert bool((y_model[mask == 0] == 0).all())  # masked to 0 exactly


def test_numpy_pil_and_tensor_inputs_agree():
    array = (np.random.default_rng(0).random((5, 7, 3)) * 255).astype(np.uint8)
    from_numpy = to_image_tensor(array)
    from_pil = to_image_tensor(Image.fromarray(array))
    from_float = to_image_tensor(array.astype(np.float64) / 255)
    assert from_numpy.shape == (3, 5, 7)
    # the same k / 255 in float32, except the float64 path rounds twice: 1 ulp
    assert torch.allclose(from_numpy, from_pil) and torch.allclose(from_numpy, from_float)
    assert to_image_tensor(array[:, :, 0]).shape == (1, 5, 7)


@pytest.mark.parametrize("bad, error", [(np.zeros((2, 3, 5)), ValueError), ("x.png", TypeError), (torch.zeros(4, 4), ValueError)])
def test_bad_images_are_clear_errors(bad, error):
    with pytest.raises(error, match="image"):
        to_image_tensor(bad)


def test_channels_and_file_round_trip(tmp_path):
    grey = torch.rand(1, 6, 6)  # repeated into 3 channels: a copy, exact
    assert torch.equal(match_channels(grey, 3)[2], grey[0]) and match_channels(grey, 3).shape == (3, 6, 6)
    path = tmp_path / "image.png"
    image = torch.rand(3, 6, 6)
    write_image(image, path)
    assert torch.allclose(read_image(path), image, atol=1 / 255)  # 8-bit quantisation: within one level
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        read_image(tmp_path / "broken.png")


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0), (-0.5, 2.0)])
def test_measurements_convert_exactly_to_any_declared_data_range(data_range):
    """y_model = A x_model + w sigma_y n for x_model = low + w x, whatever (low, high) the model declares."""
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for operator in (SuperResolution(2, sigma_y=0.05), Inpainting(box_mask((3, 8, 8), 2, 2, 3, 3), 0.02)):
        y_model, model_operator = measurement_to_model_units(operator.A(x)[0], operator, data_range)
        # float32 on values <= 2 scaled by w <= 2.5: rounding ~5e-7
        assert torch.allclose(y_model, operator.A(to_model_range(x, data_range))[0], atol=1e-6)
        assert model_operator.sigma_y == pytest.approx((data_range[1] - data_range[0]) * operator.sigma_y)
        assert torch.allclose(from_model_range(to_model_range(x, data_range), data_range), x, atol=1e-6)
