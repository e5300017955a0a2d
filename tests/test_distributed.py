"""A dataset run under torchrun: two CPU processes (gloo) share the images out and write what one process writes."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from posterior_diff.apps.cli import main
from posterior_diff.apps.dataset import MANIFEST
from posterior_diff.images import read_image, write_image


def test_two_processes_write_the_same_files_as_one(tmp_path, pipeline_folder):
    names = [f"{index}.png" for index in range(5)]
    for index, name in enumerate(names):
        size = 8 if index < 3 else 6  # two sizes: each process batches its share by size
        (tmp_path / "in").mkdir(exist_ok=True)
        write_image(torch.rand(3, size, size, generator=torch.Generator().manual_seed(index)), tmp_path / "in" / name)
        (tmp_path / "truth").mkdir(exist_ok=True)
        write_image(torch.rand(3, 2 * size, 2 * size), tmp_path / "truth" / name)
    common = ["restore", str(tmp_path / "in"), "--task", "sr2", "--steps", "2", "--samples", "1", "--batch-size", "2",
              "--model", str(pipeline_folder), "--device", "cpu", "--reference", str(tmp_path / "truth")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "posterior_diff"]  # torch.distributed.run is torchrun
    # The timeout guards against a hang (two processes waiting on each other), not the speed of a loaded machine.
    result = subprocess.run([*launch, *common, "-o", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert main([*common, "-o", str(tmp_path / "one")]) == 0

    outputs = [*names, MANIFEST, "metrics.csv", "summary.txt"]
    assert sorted(os.listdir(tmp_path / "two")) == sorted(outputs)  # the per-process records merged and removed
    # Each image has its own seed, but the processes batch their shares differently from one process and
    # run at another thread count, so float32 round-off differs, and a Tweedie CG stopped at
    # cg_tol = 1e-3 may carry it to ~1e-3: a PNG pixel may round one 8-bit level apart. Another
    # image's seed, or a share restored twice or never, would move pixels by many levels.
    for name in names:
        difference = (read_image(tmp_path / "two" / name) - read_image(tmp_path / "one" / name)).abs().max()
        assert float(difference) <= 1 / 255 + 1e-6, name
    two, one = ([row for row in csv.DictReader((tmp_path / run / "metrics.csv").open())] for run in ("two", "one"))
    assert [row["name"] for row in two] == [row["name"] for row in one] == names
    for a, b in zip(two, one):  # one level on some pixels moves the scores by far less than a percent
        assert float(a["psnr"]) == pytest.approx(float(b["psnr"]), rel=1e-2)
        assert float(a["ssim"]) == pytest.approx(float(b["ssim"]), rel=1e-2, abs=1e-3)
    manifest = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert manifest["run"]["processes"] == 2 and manifest["counts"] == {"restored": 5, "existing": 0, "failed": 0}
    assert sorted({line["process"] for line in manifest["images"]}) == [0, 1]  # both did a share
    assert manifest["settings"] == json.loads((tmp_path / "one" / MANIFEST).read_text())["settings"]
