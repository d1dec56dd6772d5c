"""The PLL primitives (hw.pll): each instance carries the dividers of its settings."""

from __future__ import annotations

import pytest
from amaranth.hdl import Signal

from hw.flow.pll import ecp5_pll, ice40_pll
from hw.pll import ecp5_pll_instance, ice40_pll_instance


def _wired(inst, **ports):
    """Whether each named port of ``inst`` is the given signal, in the given direction."""
    return all(inst.ports[name][0] is sig and inst.ports[name][1] == d
               for name, (sig, d) in ports.items())


def test_ecp5_instance_takes_the_searched_dividers():
    p = ecp5_pll(25e6, 62.5e6)
    clk_in, clk_out, lock = Signal(), Signal(), Signal()
    inst = ecp5_pll_instance(p, clk_in, clk_out, lock)
    assert inst.type == "EHXPLLL"
    got = {k: inst.parameters[k] for k in ("CLKI_DIV", "CLKFB_DIV", "CLKOP_DIV", "CLKOP_CPHASE")}
    assert got == {"CLKI_DIV": p.clki_div, "CLKFB_DIV": p.clkfb_div, "CLKOP_DIV": p.clkop_div,
                   "CLKOP_CPHASE": p.clkop_div - 1}
    # The frequencies nextpnr reads from the attributes: the oscillator's, and the one reached.
    assert float(inst.attrs["FREQUENCY_PIN_CLKI"]) == 25
    assert float(inst.attrs["FREQUENCY_PIN_CLKOP"]) == pytest.approx(p.f_out / 1e6, abs=1e-3)
    # Feedback from CLKOP: the output clock drives both CLKOP and CLKFB.
    assert _wired(inst, CLKI=(clk_in, "i"), CLKFB=(clk_out, "i"), CLKOP=(clk_out, "o"),
                  LOCK=(lock, "o"))


def test_ice40_instance_takes_the_searched_dividers():
    p = ice40_pll(12e6, 30e6)
    pad, clk_out, lock = Signal(), Signal(), Signal()
    inst = ice40_pll_instance(p, pad, clk_out, lock)
    assert inst.type == "SB_PLL40_PAD"
    assert {k: inst.parameters[k] for k in ("DIVR", "DIVF", "DIVQ", "FILTER_RANGE")} == {
        "DIVR": p.divr, "DIVF": p.divf, "DIVQ": p.divq, "FILTER_RANGE": p.filter_range}
    assert _wired(inst, PACKAGEPIN=(pad, "i"), PLLOUTGLOBAL=(clk_out, "o"), LOCK=(lock, "o"))
