"""The host-side integer helpers the kernel launchers plan with (fibec.kernels._launch)."""
import math

import pytest

from fibec.kernels._launch import cdiv, next_power_of_2


@pytest.mark.parametrize("b", [1, 2, 3, 64, 1000])
def test_cdiv_is_the_ceiling_of_the_quotient(b):
    for a in range(0, 3000, 7):
        assert cdiv(a, b) == math.ceil(a / b)


def test_next_power_of_2_is_the_smallest_power_not_below_n():
    assert [next_power_of_2(n) for n in (0, 1)] == [1, 1]
    for n in range(2, 5000):
        power = next_power_of_2(n)
        assert power >= n and power // 2 < n and power & (power - 1) == 0
    assert next_power_of_2(2**40 + 1) == 2**41
