"""The W2 rounding of the generation units, as ``gen.integer.round_w2`` defines it.

A generated sum ``x`` becomes a PE weight ``sat_w(round_shift(x, s))``: add
``2**(s-1)`` (:func:`round_half`; nothing for ``s == 0``), shift right arithmetically
by ``s``, saturate to ``w_bits`` (:func:`saturate`). :class:`WeightRounder` is the
three steps in one combinational component; the lane unit (``hw.gen_lanes``) uses
the same functions with registers between the steps.
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from gen.contract import int_range

__all__ = ["WeightRounder", "round_half", "shift_saturate", "saturate"]


def round_half(shift, width: int):
    """``2**(shift-1)`` (0 for ``shift == 0``) as a ``width``-bit unsigned value."""
    return ((Const(1, width + 1) << shift) >> 1)[:width]


def saturate(y, w_bits: int):
    """Signed ``y`` clamped to ``w_bits``: it fits iff every bit from ``w_bits - 1`` up
    equals the sign, a reduction rather than two magnitude comparisons."""
    y = y.as_signed()
    top = y[w_bits - 1:]
    if len(top) <= 1:
        return y
    fits = (top == 0) | (top == (1 << len(top)) - 1)
    lo, hi = int_range(w_bits)
    return Mux(fits, y[:w_bits].as_signed(), Mux(y[-1], lo, hi))


def shift_saturate(x, shift, w_bits: int):
    """Arithmetic shift right of signed ``x`` by ``shift``, saturated to ``w_bits``."""
    return saturate(x.as_signed() >> shift, w_bits)


class WeightRounder(wiring.Component):
    """Combinational ``sat_w(round_shift(x, shift))``, the W2 rounding of ``gen.integer``.

    Parameters
    ----------
    in_bits:
        Signed width of ``x``.
    w_bits:
        Signed width of the result.
    shift_bits:
        Width of the ``shift`` input; shifts beyond ``in_bits + 1`` give the
        same result as ``in_bits + 1`` (0).
    held_shift:
        ``shift`` is a layer constant: the clamped shift and the rounding constant
        are registered, so ``y`` follows a new ``shift`` one cycle later (and the
        path from ``x`` to ``y`` has no decoder in front of the adder).

    Members
    -------
    x: In(signed(in_bits))
    shift: In(unsigned(shift_bits))
    y: Out(signed(w_bits))
    """

    def __init__(self, in_bits: int, w_bits: int, shift_bits: int, *, held_shift: bool = False):
        self.in_bits, self.w_bits = in_bits, w_bits
        self.held_shift = held_shift
        super().__init__({
            "x": In(signed(in_bits)),
            "shift": In(unsigned(shift_bits)),
            "y": Out(signed(w_bits)),
        })

    def elaborate(self, platform):
        m = Module()
        lim = self.in_bits + 1
        s = Signal(range(lim + 1))
        half = Signal(self.in_bits + 1)
        dom = m.d.sync if self.held_shift else m.d.comb
        clamped = Mux(self.shift > lim, lim, self.shift)
        dom += [s.eq(clamped), half.eq(round_half(clamped, self.in_bits + 1))]
        t = Signal(signed(self.in_bits + 2))
        m.d.comb += t.eq(self.x + half)
        m.d.comb += self.y.eq(shift_saturate(t, s, self.w_bits))
        return m
