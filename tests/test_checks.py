"""The shared argument checks (fibec/_checks.py): one bound rule, one int check, one count rule."""
import math

import numpy as np
import pytest

from fibec._checks import check_int, check_number, fraction_count


@pytest.mark.parametrize("fraction, n, count", [
    (0.28, 25, 7),        # 7.000000000000001 in floating point
    (0.1, 30, 3),         # 3.0000000000000004
    (0.25, 10, 3), (0.3, 10, 3), (0.31, 10, 4),
    (1e-9, 10, 1),        # at least one
    (1.0, 12, 12), (0.75, 12, 9),
])
def test_fraction_count_is_ceil_of_the_product_rounded_to_six_places_at_least_one(fraction, n, count):
    assert fraction_count(fraction, n) == count


def test_check_int_takes_numpy_ints_and_names_the_argument():
    assert check_int("k", np.int64(3), low=1) == 3 and type(check_int("k", np.int64(3))) is int
    with pytest.raises(TypeError, match="k must be an int, got True"):
        check_int("k", True)
    with pytest.raises(TypeError, match="k must be an int, got 2.0"):
        check_int("k", 2.0)
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\], got 5"):
        check_int("k", 5, low=0, high=4)


@pytest.mark.parametrize("value, bounds, message", [
    (0.0, dict(low=0.0, low_open=True), "x must be > 0, got 0.0"),
    (1.0, dict(low=0.0, high=1.0, high_open=True), r"x must be in \[0, 1\), got 1.0"),
    (-1.0, dict(low=0.0), "x must be >= 0, got -1.0"),
    (math.inf, {}, "x must be finite"),
    (math.nan, dict(low=0.0), "x must be finite"),
])
def test_check_number_rejects_what_lies_outside_its_bounds(value, bounds, message):
    with pytest.raises(ValueError, match=message):
        check_number("x", value, **bounds)


def test_check_number_returns_a_float_and_refuses_bools_and_strings():
    assert check_number("x", 3, low=0.0) == 3.0 and type(check_number("x", 3)) is float
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match="x must be a number"):
            check_number("x", bad)

