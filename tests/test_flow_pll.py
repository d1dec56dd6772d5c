"""The PLL parameter search (hw.flow.pll): settings within the datasheet limits."""

from __future__ import annotations

import pytest

from hw.flow.pll import PLLError, ecp5_pll, ice40_pll


@pytest.mark.parametrize("f_out", [25e6, 50e6, 62.5e6, 100e6, 125e6])
def test_ecp5_pll_within_limits(f_out):
    p = ecp5_pll(25e6, f_out)
    pfd = p.f_in / p.clki_div
    assert 3.125e6 <= pfd <= 400e6 and 400e6 <= p.f_out * p.clkop_div <= 800e6
    assert p.f_out == pytest.approx(pfd * p.clkfb_div)
    assert abs(p.f_out - f_out) <= 0.01 * f_out


@pytest.mark.parametrize("f_out", [16e6, 24e6, 30e6, 36e6, 48e6])
def test_ice40_pll_within_limits(f_out):
    p = ice40_pll(12e6, f_out)
    pfd = p.f_in / (p.divr + 1)
    vco = pfd * (p.divf + 1)
    assert 10e6 <= pfd <= 133e6 and 533e6 <= vco <= 1066e6
    assert p.f_out == pytest.approx(vco / 2 ** p.divq)
    assert abs(p.f_out - f_out) <= 0.01 * f_out


def test_pll_refuses_what_it_cannot_make():
    with pytest.raises(PLLError, match="cannot make 900 MHz from 12 MHz"):
        ice40_pll(12e6, 900e6)
