"""The board PLL primitives: ECP5 ``EHXPLLL`` and iCE40 ``SB_PLL40_PAD`` instances.

The divider settings come from the parameter search of :mod:`hw.flow.pll`
(:func:`~hw.flow.pll.ecp5_pll`, :func:`~hw.flow.pll.ice40_pll`); these functions
turn them into the vendor primitive, with its output clock and lock signal.
"""

from __future__ import annotations

from amaranth.hdl import Instance

__all__ = ["ecp5_pll_instance", "ice40_pll_instance"]


def ecp5_pll_instance(pll, clk_in, clk_out, lock) -> Instance:
    """An ``EHXPLLL`` for the :class:`~hw.flow.pll.ECP5PLL` settings ``pll``: ``clk_in``
    (the buffered oscillator) in, ``clk_out`` (fed back from CLKOP) and ``lock`` out."""
    return Instance(
        "EHXPLLL",
        p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
        p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
        p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
        p_CLKI_DIV=pll.clki_div, p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=pll.clkop_div,
        p_CLKOP_CPHASE=pll.clkop_div - 1, p_CLKOP_FPHASE=0,
        p_FEEDBK_PATH="CLKOP", p_CLKFB_DIV=pll.clkfb_div,
        a_FREQUENCY_PIN_CLKI=f"{pll.f_in / 1e6:g}", a_FREQUENCY_PIN_CLKOP=f"{pll.f_out / 1e6:g}",
        a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
        a_MFG_GMCREF_SEL="2",
        i_RST=0, i_STDBY=0, i_CLKI=clk_in, i_CLKFB=clk_out, o_CLKOP=clk_out,
        i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
        i_PLLWAKESYNC=0, i_ENCLKOP=0, o_LOCK=lock)


def ice40_pll_instance(pll, pad, clk_out, lock) -> Instance:
    """An ``SB_PLL40_PAD`` for the :class:`~hw.flow.pll.ICE40PLL` settings ``pll``: the
    oscillator's package pin ``pad`` in, the global ``clk_out`` and ``lock`` out."""
    return Instance(
        "SB_PLL40_PAD", p_FEEDBACK_PATH="SIMPLE", p_DIVR=pll.divr, p_DIVF=pll.divf,
        p_DIVQ=pll.divq, p_FILTER_RANGE=pll.filter_range,
        i_PACKAGEPIN=pad, i_RESETB=1, i_BYPASS=0, o_PLLOUTGLOBAL=clk_out, o_LOCK=lock)
