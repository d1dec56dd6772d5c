"""The registered multiplier: two-cycle product in simulation, MULT18X18D on ECP5."""

import random

import pytest
from amaranth.back import rtlil
from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.sim import Simulator

from hw.board import board_platform
from hw.dsp import registered_multiply, registered_multiply_add


def _operand(rng, shape):
    """An extreme or a random value of ``shape``."""
    lo = -(1 << (shape.width - 1)) if shape.signed else 0
    hi = (1 << (shape.width - 1)) - 1 if shape.signed else (1 << shape.width) - 1
    return rng.choice([lo, hi, 0, -1 if shape.signed else 1, rng.randint(lo, hi)])


def _check_two_cycles(m, inputs, out, want, seed, n):
    """Random and extreme values on ``inputs`` every cycle; ``out`` equals ``want`` of
    the values set two cycles before."""
    rng = random.Random(seed)

    async def bench(ctx):
        history = []
        for _ in range(n):
            vals = [_operand(rng, sig.shape()) for sig in inputs]
            for sig, v in zip(inputs, vals):
                ctx.set(sig, v)
            history.append(want(*vals))
            await ctx.tick()
            if len(history) >= 2:
                assert ctx.get(out) == history[-2], vals

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("sa,sb", [(signed(8), signed(8)), (unsigned(17), signed(16)),
                                   (signed(7), signed(13))])
def test_product_two_cycles_after_the_operands(sa, sb):
    m = Module()
    a, b = Signal(sa), Signal(sb)
    p = registered_multiply(m, a, b, "p")
    assert len(p) == sa.width + sb.width
    _check_two_cycles(m, [a, b], p, lambda va, vb: va * vb, 1, 200)


@pytest.mark.parametrize("sa,sb,sc", [(unsigned(15), signed(10), signed(31)),
                                      (signed(8), signed(8), unsigned(12)),
                                      (unsigned(6), unsigned(5), unsigned(3))])
def test_multiply_add_two_cycles_after_the_operands(sa, sb, sc):
    m = Module()
    a, b, c = Signal(sa), Signal(sb), Signal(sc)
    p = registered_multiply_add(m, a, b, c, "p")
    _check_two_cycles(m, [a, b, c], p, lambda va, vb, vc: va * vb + vc, 2, 300)


def test_ecp5_platform_gets_a_registered_mult18x18d():
    m = Module()
    a, b = Signal(signed(8)), Signal(signed(8))
    p = registered_multiply(m, a, b, "p", board_platform("ulx3s-85f"))
    out = Signal.like(p)
    m.d.comb += out.eq(p)
    text = rtlil.convert(m, ports=[a, b, out], platform=board_platform("ulx3s-85f"))
    assert "MULT18X18D" in text
    for reg in ("REG_INPUTA_CLK", "REG_INPUTB_CLK", "REG_OUTPUT_CLK"):
        assert f"parameter \\{reg} \"CLK0\"" in text
    # Too wide for one block: the generic registered product instead.
    m2 = Module()
    a2, b2 = Signal(signed(20)), Signal(signed(8))
    q = registered_multiply(m2, a2, b2, "q", board_platform("ulx3s-85f"))
    out2 = Signal.like(q)
    m2.d.comb += out2.eq(q)
    assert "MULT18X18D" not in rtlil.convert(m2, ports=[a2, b2, out2])
