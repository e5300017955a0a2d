import math

import numpy as np
import pytest

from posterior_diff.checks import choice, number_in, positive_int


def test_positive_int_takes_integers_and_refuses_the_rest():
    assert positive_int(3, "steps") == 3 and positive_int(np.int64(2), "steps") == 2
    for bad in (0, -1, 2.5, True, "3", None):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            positive_int(bad, "steps")


def test_choice_names_the_options():
    assert choice("a", ("a", "b"), "mode") == "a"
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        choice("c", ("a", "b"), "mode")


def test_number_in_checks_type_and_range():
    assert number_in(0.5, "eta", 0, 1) == 0.5 and number_in(1, "eta", 0, 1) == 1.0  # returned as given: exact
    with pytest.raises(TypeError, match="eta must be a number"):
        number_in("x", "eta", 0, 1)
    with pytest.raises(TypeError, match="eta must be a number"):
        number_in(True, "eta", 0, 1)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            number_in(bad, "eta", 0, 1)
    with pytest.raises(ValueError, match=r"cg_tol must be in \(0, inf\]"):
        number_in(0.0, "cg_tol", 0.0, open_low=True)
