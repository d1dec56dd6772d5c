"""Post-processing: requantization of accumulators and the global-average-pool sum.

:class:`Requantizer` (full speed, 8 cycles) and :class:`CompactRequantizer`
(compact builds, 4 cycles; :func:`requantizer_class` picks one from the config)
implement point 5 of :mod:`gen.integer` on ``lanes`` channels per cycle::

    y = round_shift(acc * M[c] + bias[c] + res * m_res, shift)   # add 2^(s-1), >>> s
    y = max(y, 0) if relu
    y = clamp(y, -2^(a_bits-1), 2^(a_bits-1) - 1)

Every intermediate is kept at its full width (no truncation anywhere), so the
result equals the int64 golden model whenever the constants fit the config.
The residual is multiplied by ``m_res`` and added before the single rounding.

:class:`PoolAccumulator` sums ``rows`` channels over every pixel of a feature
map (point 6: a global average pool is the requant of that sum with the pool
multiplier, no bias, no ReLU in the golden model's usual use).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from gen.contract import int_range

from .dsp import registered_multiply, registered_multiply_add

__all__ = ["Requantizer", "CompactRequantizer", "requantizer_class", "PoolAccumulator"]


class _RequantizerBase(wiring.Component):
    """What both requantizers share: the signature, the valid/lanes/tag pipeline, the
    rounding constant, the split of the accumulator and the clamp. A subclass sets
    :attr:`latency` and builds one lane in :meth:`_lane`."""

    latency: int

    def __init__(self, config: AcceleratorConfig, lanes: int, tag_shape=unsigned(1)):
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"{type(self).__name__} lanes must be a positive integer, got {lanes!r}")
        self.config = config
        self.lanes = lanes
        self.tag_shape = Shape.cast(tag_shape) if not isinstance(tag_shape, data.Layout) else tag_shape
        super().__init__({
            "i_valid": In(1),
            "i_lanes": In(lanes),
            "i_acc": In(data.ArrayLayout(signed(config.acc_bits), lanes)),
            "i_mult": In(data.ArrayLayout(signed(config.m_bits), lanes)),
            "i_bias": In(data.ArrayLayout(signed(config.bias_bits), lanes)),
            "i_res": In(data.ArrayLayout(signed(config.a_bits), lanes)),
            "i_tag": In(tag_shape),
            "shift": In(range(config.shift_max + 1)),
            "relu": In(1),
            "has_res": In(1),
            "m_res": In(signed(config.m_bits)),
            "o_valid": Out(1),
            "o_lanes": Out(lanes),
            "o_y": Out(data.ArrayLayout(signed(config.a_bits), lanes)),
            "o_tag": Out(tag_shape),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        cfg = self.config
        m = Module()

        valid = [Signal(name=f"valid_{i}") for i in range(self.latency)]
        lanes = [Signal(self.lanes, name=f"lanes_{i}") for i in range(self.latency)]
        tags = [Signal(self.tag_shape, name=f"tag_{i}") for i in range(self.latency)]
        m.d.sync += [valid[0].eq(self.i_valid), lanes[0].eq(self.i_lanes), tags[0].eq(self.i_tag)]
        for i in range(1, self.latency):
            m.d.sync += [valid[i].eq(valid[i - 1]), lanes[i].eq(lanes[i - 1]), tags[i].eq(tags[i - 1])]
        m.d.comb += [self.o_valid.eq(valid[-1]), self.o_lanes.eq(lanes[-1]), self.o_tag.eq(tags[-1]),
                     self.busy.eq(Cat(*valid).any())]

        # 1 << (shift - 1) for shift > 0, else 0: the round-half-up constant. The shift is
        # a layer constant, so registering it costs no cycle of any result.
        rnd = Signal(cfg.post_bits + 1)
        m.d.sync += rnd.eq((Const(1, cfg.post_bits + 2) << self.shift) >> 1)
        for g in range(self.lanes):
            self._lane(m, g, rnd, platform)
        return m

    def _lane(self, m, g, rnd, platform):
        raise NotImplementedError

    def _clamp(self, shifted):
        """Clamp and ReLU from the bits: the value fits a_bits when every bit from
        a_bits - 1 up equals the sign. ReLU only picks the negative side's result, so
        the layer's flag (one register for all lanes) is the last gate."""
        a_bits = self.config.a_bits
        lo, hi = int_range(a_bits)
        sign = shifted[-1]
        top = shifted[a_bits - 1:-1]
        low = shifted[:a_bits]
        pos = Mux(top.any(), hi, low)
        neg = Mux(self.relu, 0, Mux(top.all(), low, lo))
        return Mux(sign, neg, pos)

    def _split_acc(self, acc, lo_max):
        """``(lo_bits, acc_lo, acc_hi)``: the low ``lo_bits`` (at most ``lo_max``,
        unsigned, or all of ``acc`` if it fits) and the high bits of ``acc``, which is
        ``(acc_hi << lo_bits) + acc_lo``."""
        acc_bits = self.config.acc_bits
        lo_bits = min(acc_bits, lo_max)
        acc_hi = acc[lo_bits:].as_signed() if acc_bits > lo_bits else Const(0, signed(1))
        acc_lo = acc[:lo_bits] if acc_bits > lo_bits else acc
        return lo_bits, acc_lo, acc_hi


_PORTS_DOC = """
    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig` (``a_bits``, ``m_bits``,
        ``acc_bits``, ``bias_bits``, ``shift_max``, ``residual``).
    lanes:
        Channels processed per cycle, >= 1.
    tag_shape:
        Shape of a value carried alongside each input (e.g. its write address).

    Ports
    -----
    i_valid, i_lanes, i_acc, i_mult, i_bias, i_res, i_tag:
        One input per cycle; ``i_lanes`` marks the lanes holding real channels.
    shift, relu, has_res, m_res:
        Layer constants, held stable from one cycle before the first input until
        the last result.
    o_valid, o_lanes, o_y, o_tag:
        The results :attr:`latency` cycles later.
    busy:
        High while any input is in flight.

    Raises
    ------
    ValueError
        If ``lanes`` is not a positive integer.
    """


class Requantizer(_RequantizerBase):
    """``lanes`` parallel requant pipelines with a fixed latency of 8 cycles and no stalls,
    for a fast clock: every stage ends in a register. The inputs are registered first
    (the engine selects them from block RAM read registers across the die from the
    multipliers), then the multipliers' operands, partial products, products,
    product + bias + rounding constant, + residual product, shift, clamp.
    """ + _PORTS_DOC

    latency = 8

    def _lane(self, m, g, rnd, platform):
        cfg = self.config
        acc = Signal(signed(cfg.acc_bits), name=f"acc_{g}")
        mult = Signal(signed(cfg.m_bits), name=f"mult_{g}")
        bias_in = Signal(signed(cfg.bias_bits), name=f"bias_in_{g}")
        res_in = Signal(signed(cfg.a_bits), name=f"res_in_{g}")
        m.d.sync += [acc.eq(self.i_acc[g]), mult.eq(self.i_mult[g]), bias_in.eq(self.i_bias[g]),
                     res_in.eq(self.i_res[g])]
        bias0 = Signal(signed(cfg.bias_bits), name=f"bias0_{g}")
        res = Signal(signed(cfg.a_bits), name=f"res_{g}")
        # The residual lands in a fabric register before its product (its source
        # is a buffer select far from the DSP blocks).
        m.d.sync += [bias0.eq(bias_in), res.eq(Mux(self.has_res, res_in, 0))]
        # acc * M as two products of at most 18 x 18 bits, one DSP block each, summed
        # in the next stage: a wider product would chain DSPs and an adder in one cycle.
        # Each product registers its operands (first stage) and itself (second).
        wide = signed(cfg.post_bits + 3)
        bias1 = Signal(wide, name=f"bias1_{g}")
        lo_bits, acc_lo, acc_hi = self._split_acc(acc, 17)
        p_lo = registered_multiply(m, acc_lo, mult, f"prod_lo_{g}", platform)
        p_hi = registered_multiply(m, acc_hi, mult, f"prod_hi_{g}", platform)
        rprod1 = (registered_multiply(m, res, self.m_res, f"rprod1_{g}", platform)
                  if cfg.residual else Const(0))
        # The rounding constant joins the bias early (it is a layer constant), so
        # that every later stage adds two values: product + bias, then + residual
        # product, both from registers (the DSP outputs land in registers first).
        m.d.sync += bias1.eq(bias0 + rnd)
        prod = Signal(signed(cfg.acc_bits + cfg.m_bits), name=f"prod_{g}")
        rprod = Signal(signed(cfg.a_bits + cfg.m_bits), name=f"rprod_{g}")
        bias = Signal(wide, name=f"bias_{g}")
        m.d.sync += [prod.eq((p_hi << lo_bits) + p_lo), bias.eq(bias1), rprod.eq(rprod1)]
        total = Signal(wide, name=f"total_{g}")
        m.d.sync += total.eq(prod + bias)
        rounded = Signal(wide, name=f"rounded_{g}")
        m.d.sync += rounded.eq(total + rprod)
        shifted = Signal(signed(cfg.post_bits + 3), name=f"shifted_{g}")
        m.d.sync += shifted.eq(rounded >> self.shift)
        m.d.sync += self.o_y[g].eq(self._clamp(shifted))


class CompactRequantizer(_RequantizerBase):
    """The requantizer of compact builds, for a slower clock: the same ports and
    results as :class:`Requantizer` with a latency of 4 cycles. A lane takes its
    operands straight into the multipliers' registers, and the products, their sum
    and the shift each take one stage fewer registers; the product is split for
    multipliers of 16 x 16 bits (the iCE40 SB_MAC16). The engine runs it with one
    lane.
    """ + _PORTS_DOC

    latency = 4

    def _lane(self, m, g, rnd, platform):
        """One lane in four stages: operands, products (the low one with the bias and
        the rounding constant added), their sum, shift and clamp."""
        cfg = self.config
        acc, mult = self.i_acc[g], self.i_mult[g]
        res = Mux(self.has_res, self.i_res[g], 0)
        # The low product and the bias with the rounding constant are summed in the
        # product's stage (acc_lo * M + (bias + rnd)): no bias pipeline registers.
        lo_bits, acc_lo, acc_hi = self._split_acc(acc, 15)
        # (rnd is at most 2^(shift_max - 1) = 2^(bias_bits - 1), which its low
        # post_bits - 1 bits hold: the sum fits bias_bits + 1 bits.)
        bias_rnd = (self.i_bias[g] + rnd[:cfg.post_bits - 1])[:cfg.bias_bits + 1].as_signed()
        t_lo = registered_multiply_add(m, acc_lo, mult, bias_rnd, f"prod_lo_{g}", platform)
        p_hi = registered_multiply(m, acc_hi, mult, f"prod_hi_{g}", platform)
        rprod = (registered_multiply(m, res, self.m_res, f"rprod_{g}", platform)
                 if cfg.residual else Const(0))
        wide = signed(cfg.post_bits + 3)
        rounded = Signal(wide, name=f"rounded_{g}")
        m.d.sync += rounded.eq((p_hi << lo_bits) + t_lo + rprod)
        m.d.sync += self.o_y[g].eq(self._clamp(rounded >> self.shift))


def requantizer_class(config: AcceleratorConfig) -> type:
    """The requantizer of ``config``: :class:`CompactRequantizer` where
    ``config.compact_requantizer``, else :class:`Requantizer`."""
    return CompactRequantizer if config.compact_requantizer else Requantizer


class PoolAccumulator(wiring.Component):
    """Per-channel sums over a feature map, ``rows`` channels at a time.

    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig` (``rows``, ``a_bits``,
        ``acc_bits``, which covers a whole ``max_h x max_w`` map).

    Ports
    -----
    i_valid, i_first, i_last, i_act:
        One pixel of ``rows`` channels per valid cycle; ``i_first`` restarts the
        sums, ``i_last`` marks the final pixel.
    o_sum:
        The running sums; complete the cycle after ``o_done``.
    o_done:
        Pulses the cycle after the final pixel was added.
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        super().__init__({
            "i_valid": In(1),
            "i_first": In(1),
            "i_last": In(1),
            "i_act": In(data.ArrayLayout(signed(config.a_bits), config.rows)),
            "o_sum": Out(data.ArrayLayout(signed(config.acc_bits), config.rows)),
            "o_done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.o_done.eq(self.i_valid & self.i_last)
        with m.If(self.i_valid):
            for r in range(self.config.rows):
                m.d.sync += self.o_sum[r].eq(Mux(self.i_first, 0, self.o_sum[r]) + self.i_act[r])
        return m
