"""scripts/gpu_check.py: it refuses a machine without CUDA, and its timing code runs (here on the CPU)."""

import pytest
import torch

from conftest import load_script
from posterior_diff import COVARIANCES, default_model

@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script runs for real there")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(gpu_check, capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "gpu.md")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "gpu.md").exists()


def test_its_timing_table_covers_every_mode(gpu_check):
    args = gpu_check.parse_args(["--quick", "--samples", "1"])
    rows = gpu_check.time_modes(default_model(), 16, args, torch.device("cpu"))
    assert [row[0] for row in rows] == ["bare forward", *COVARIANCES]
    projection = rows[1 + COVARIANCES.index("projection")]
    assert projection[3] == "0.0"  # the Jacobian-free mode spends no VJP (a count, not a timing: exact)
