"""Smoke test of benchmarks.dense_operators: a --quick run (200 samples, 10 steps) writes a table of finite numbers.

azula is optional (the `benchmark` extra, not `test`): its rows are checked only where it is installed.
"""

import importlib.util
import math

import pytest

from benchmarks import dense_operators

TASKS = ("inpainting", "super-resolution", "denoising")
HEADER = ["task", "operator", "method", "class", "s", "s / dense", "mean/floor", "cov/floor"]


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory) -> list[list[str]]:
    out = tmp_path_factory.mktemp("dense_operators") / "dense_operators.md"
    text = dense_operators.main(["--quick", "--out", str(out)])
    assert out.read_text() == text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == HEADER
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def check_numbers(row: list[str]) -> None:
    numbers = [float(cell) for cell in row[4:]]
    assert all(math.isfinite(value) and value >= 0 for value in numbers), row
    assert numbers[0] > 0 and numbers[2] > 0 and numbers[3] > 0, row


def test_posterior_diff_rows_are_finite(quick_rows):
    ours = [row for row in quick_rows if row[2] == dense_operators.OURS]
    assert [(row[0], row[1]) for row in ours] == [(task, label) for task in TASKS
                                                  for label in ("structured", "dense matrix")]
    for row in ours:
        check_numbers(row)
        assert row[6] != "nan" and float(row[6]) < 5 and float(row[7]) < 5, row  # the Tweedie runs are near exact
    for task in TASKS:  # the dense matrix reproduces the structured operator's errors
        structured, dense = (row for row in ours if row[0] == task)
        assert structured[6:] == dense[6:]
        assert dense[5] == "1.00"


def test_azula_rows_are_finite(quick_rows):
    if importlib.util.find_spec("azula") is None:
        assert not [row for row in quick_rows if row[2].startswith("azula")]
        pytest.skip("azula is not installed (benchmark extra)")
    peers = [row for row in quick_rows if row[2].startswith("azula")]
    expected = [(task, "dense matrix", "azula MMPS (CG 10)") for task in TASKS]
    assert [(row[0], row[1], row[2]) for row in peers] == expected
    for row in peers:
        check_numbers(row)
