"""A multiplier with registered operands and a registered product (latency 2).

Simulation and generic synthesis see ``a_d * b_d`` between registers. On an
ECP5 platform (an ``amaranth-boards`` Lattice platform of family ``ecp5``) the
product is a ``MULT18X18D`` instance with its own input and output registers:
Yosys maps ``*`` to the DSP block but leaves the registers in the fabric, so the
path register -> DSP -> register would pay the block's combinational delay and
two fabric routes in one cycle. With the block's registers the multiply is a
full cycle inside the block.
"""

from __future__ import annotations

from amaranth.hdl import ClockSignal, Const, Instance, Module, Signal, Value, signed

__all__ = ["registered_multiply", "registered_multiply_add", "is_ecp5", "is_ice40"]

DSP_WIDTH = 18


def is_ecp5(platform) -> bool:
    """Whether ``platform`` targets the ECP5 family."""
    return platform is not None and getattr(platform, "family", None) == "ecp5"


def is_ice40(platform) -> bool:
    """Whether ``platform`` targets the iCE40 family (Amaranth's SiliconBlue platforms)."""
    return platform is not None and getattr(platform, "family", None) == "iCE40"


def registered_multiply(m: Module, a, b, name: str, platform=None) -> Signal:
    """``a * b`` two cycles later: operands sampled at the first edge, product at the second.

    ``a`` and ``b`` are signed or unsigned values; the result is signed if either is,
    with the exact product width.
    """
    a, b = Value.cast(a), Value.cast(b)
    is_signed = a.shape().signed or b.shape().signed
    width = len(a) + len(b)
    rl = is_ice40(platform)
    prod = Signal(signed(width) if is_signed else width, name=name, reset_less=rl)
    # Operands as 18-bit two's complement: an unsigned operand gains a zero sign bit.
    fits = all(len(x) + (0 if x.shape().signed else 1) <= DSP_WIDTH for x in (a, b))
    if is_ecp5(platform) and fits:
        a18 = Signal(signed(DSP_WIDTH), name=f"{name}_a18")
        b18 = Signal(signed(DSP_WIDTH), name=f"{name}_b18")
        p36 = Signal(2 * DSP_WIDTH, name=f"{name}_p36")
        m.d.comb += [a18.eq(a), b18.eq(b)]
        ports = {"i_SIGNEDA": Const(1), "i_SIGNEDB": Const(1), "i_SOURCEA": Const(0),
                 "i_SOURCEB": Const(0), "i_CLK0": ClockSignal(), "i_CE0": Const(1),
                 "i_RST0": Const(0)}
        for i in range(DSP_WIDTH):
            ports[f"i_A{i}"] = a18[i]
            ports[f"i_B{i}"] = b18[i]
            ports[f"i_C{i}"] = Const(0)
        for i in range(2 * DSP_WIDTH):
            ports[f"o_P{i}"] = p36[i]
        m.submodules[f"{name}_dsp"] = Instance(
            "MULT18X18D",
            p_REG_INPUTA_CLK="CLK0", p_REG_INPUTB_CLK="CLK0", p_REG_OUTPUT_CLK="CLK0",
            p_REG_PIPELINE_CLK="NONE", p_REG_INPUTC_CLK="NONE",
            p_GSR="DISABLED", p_RESETMODE="SYNC", **ports)
        m.d.comb += prod.eq(p36[:width])
        return prod
    a_d = Signal(a.shape(), name=f"{name}_a", reset_less=rl)
    b_d = Signal(b.shape(), name=f"{name}_b", reset_less=rl)
    m.d.sync += [a_d.eq(a), b_d.eq(b), prod.eq(a_d * b_d)]
    return prod


def _as_signed(m: Module, x: Value, name: str) -> Value:
    """``x`` as a signed value: itself if signed, else with a zero sign bit in front."""
    if x.shape().signed:
        return x
    x_s = Signal(signed(len(x) + 1), name=name)
    m.d.comb += x_s.eq(x)
    return x_s


def registered_multiply_add(m: Module, a, b, c, name: str, platform=None) -> Signal:
    """``a * b + c`` two cycles later: ``a``, ``b`` and ``c`` sampled at the first edge,
    the sum at the second (signed if any operand is, with the exact width).

    One multiply-add between registers (without reset on iCE40, like
    :func:`registered_multiply`): the sum's register replaces the product's. On iCE40,
    Yosys (``synth_ice40 -dsp``) maps it to one SB_MAC16 with its adder, its C operand
    register and its output register, when the sum fits the block's 32 bits.
    """
    a, b, c = Value.cast(a), Value.cast(b), Value.cast(c)
    is_signed = any(x.shape().signed for x in (a, b, c))
    width = max(len(a) + len(b), len(c) + (0 if c.shape().signed or not is_signed else 1)) + 1
    rl = is_ice40(platform)
    a_d = Signal(a.shape(), name=f"{name}_a", reset_less=rl)
    b_d = Signal(b.shape(), name=f"{name}_b", reset_less=rl)
    c_d = Signal(c.shape(), name=f"{name}_c", reset_less=rl)
    out = Signal(signed(width) if is_signed else width, name=name, reset_less=rl)
    # The multiplier's operands as Yosys' ice40_dsp reads them: both signed (an unsigned
    # one with a zero sign bit), so that the product has its natural width, the sum of
    # theirs, and enters the adder unextended. The pass leaves the adder and the
    # registers around it in the fabric for a product narrower than that (Amaranth's
    # exact width for mixed signs), and for one padded with sign bits to the sum's width
    # unless Yosys' wreduce happens to visit the cells in an order that strips them.
    a_m, b_m = (_as_signed(m, x, f"{name}_{n}s") if is_signed else x
                for x, n in ((a_d, "a"), (b_d, "b")))
    m.d.sync += [a_d.eq(a), b_d.eq(b), c_d.eq(c), out.eq(a_m * b_m + c_d)]
    return out
