"""PLL settings for the board clocks: ECP5 ``EHXPLLL`` and iCE40 ``SB_PLL40_PAD``.

Both functions search the divider space for the output closest to the
requested frequency within the datasheet limits, and return the settings with
the frequency actually reached (pure computation: :mod:`hw.pll` makes the
primitive instances from them). Limits (Lattice FPGA-TN-02200 for ECP5,
iCE40 sysCLOCK PLL design guide for iCE40):

* ECP5: PFD ``f_in / CLKI_DIV`` in 3.125..400 MHz, VCO ``f_out * CLKOP_DIV`` in
  400..800 MHz, ``f_out = f_in * CLKFB_DIV / CLKI_DIV`` (feedback from CLKOP).
* iCE40: PFD ``f_in / (DIVR+1)`` in 10..133 MHz, VCO ``PFD * (DIVF+1)`` in
  533..1066 MHz, ``f_out = VCO / 2**DIVQ``; the loop filter range follows the PFD.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PLLError", "ECP5PLL", "ICE40PLL", "ecp5_pll", "ice40_pll"]


class PLLError(ValueError):
    """No PLL setting reaches the requested frequency within the tolerance."""


@dataclass(frozen=True)
class ECP5PLL:
    """ECP5 ``EHXPLLL`` dividers: ``f_out = f_in * clkfb_div / clki_div``, VCO
    ``f_out * clkop_div`` (feedback from CLKOP)."""

    f_in: float
    f_out: float
    clki_div: int
    clkfb_div: int
    clkop_div: int


@dataclass(frozen=True)
class ICE40PLL:
    """iCE40 ``SB_PLL40_PAD`` dividers: ``f_out = f_in / (divr + 1) * (divf + 1) / 2**divq``;
    ``filter_range`` is the loop filter setting for the PFD frequency."""

    f_in: float
    f_out: float
    divr: int
    divf: int
    divq: int
    filter_range: int


def _check(best, f_in, f_out, tolerance, family):
    if best is None or abs(best.f_out - f_out) > tolerance * f_out:
        reached = f"; closest {best.f_out / 1e6:.3f} MHz" if best else ""
        raise PLLError(f"{family} PLL cannot make {f_out / 1e6:g} MHz from {f_in / 1e6:g} MHz "
                       f"within {tolerance:.1%}{reached}")
    return best


def ecp5_pll(f_in: float, f_out: float, tolerance: float = 0.01) -> ECP5PLL:
    best = None
    for clki in range(1, 129):
        pfd = f_in / clki
        if not 3.125e6 <= pfd <= 400e6:
            continue
        for fb in range(1, 81):
            out = pfd * fb
            for op in range(1, 129):
                if 400e6 <= out * op <= 800e6:
                    if best is None or abs(out - f_out) < abs(best.f_out - f_out):
                        best = ECP5PLL(f_in, out, clki, fb, op)
                    break
    return _check(best, f_in, f_out, tolerance, "ECP5")


def ice40_pll(f_in: float, f_out: float, tolerance: float = 0.01) -> ICE40PLL:
    best = None
    for divr in range(16):
        pfd = f_in / (divr + 1)
        if not 10e6 <= pfd <= 133e6:
            continue
        for divf in range(128):
            vco = pfd * (divf + 1)
            if not 533e6 <= vco <= 1066e6:
                continue
            for divq in range(1, 7):
                out = vco / (1 << divq)
                if best is None or abs(out - f_out) < abs(best.f_out - f_out):
                    rng = next(i for i, lim in enumerate((17e6, 26e6, 44e6, 66e6, 101e6, 1e12), 1)
                               if pfd < lim)
                    best = ICE40PLL(f_in, out, divr, divf, divq, rng)
    return _check(best, f_in, f_out, tolerance, "iCE40")
