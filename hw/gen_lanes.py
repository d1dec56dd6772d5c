"""The multiply lanes of the generation unit: level-1 and level-2 sums, rounded weights.

:class:`GenerationLanes` takes the tags that ``hw.gen_sequencer.TileSequencer``
issues and, two cycles later, the words the stores read for them, and computes:

* **level 1** (tag ``l1``): ``W1[o, c, t] = sum_j U[o, c, j] * B[o, j, t]``, the
  lanes working across the ``rows`` input channels of a W1 word; each finished sum
  is written back to the W1 store (``w1_wr``);
* **level 2** (tag ``l2``): ``W2[c, r] = sum_o V[co0+c, o] * W1[o, ci0+r, tap]``,
  each lane one weight of its lane group (``hw.gen_sequencer``), ``bo`` products;
* **bypass** (tag ``byp``, no level 2): ``W2 = W1``, one W1 word (a tile column).

Every weight is rounded exactly as ``gen.integer.round_w2`` (add ``2**(s-1)``,
arithmetic shift right by ``s = w_shift``, saturate to ``w_bits``).

``config.gen_lanes`` multipliers (``gen.config.lane_plan``), shared by level 1 and
level 2. With ``L <= cols`` lanes a level-2 group covers ``L`` columns of one tile
row; with more, ``cols`` columns of ``L // cols`` rows (at most ``rows``). Level 1
uses ``min(lanes, rows)`` of them.

Pipeline, in cycles after a tag (every register advances every cycle; no enables,
which keeps the lane datapath free of a high-fanout stall net): 2 the stores' read
data (registered in the block RAMs), 3 the operands decoded and routed into
registers by the multipliers (the block RAMs sit in rows across the die, too far
from the multipliers for the route, the decode and the operand select in one
cycle), 4 the multiplier's operand registers (inside the DSP block on ECP5), 5 the
product, 6 the accumulator (and the level-1 write request), 7 the round-half add,
8 the shift, 9 the saturated weight. The bypass: 3 W1 registered, 4 the round-half
add, 5 the shift, 6 the saturated weight.
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig, lane_plan
from hw.dsp import registered_multiply
from hw.gen_loader import store_depths, store_write_signature, w1_value_bits, word_shape
from hw.gen_sequencer import tag_layout, tag_signature
from hw.interfaces import descriptor_layout
from hw.gen_rounding import round_half, saturate
from hw.unpacker import decode_code

__all__ = ["GenerationLanes", "result_signature"]


def result_signature(config: AcceleratorConfig, count: int) -> stream.Signature:
    """``count`` rounded weights and the tag they were issued with (no backpressure)."""
    return stream.Signature(data.StructLayout({
        "w": data.ArrayLayout(signed(config.w_bits), count),
        "tag": tag_layout(config),
    }), always_ready=True)


def _pick(m, index, options, shape):
    """``options[index]`` (a select only if there is more than one)."""
    out = Signal(shape)
    if len(options) == 1:
        m.d.comb += out.eq(options[0])
        return out
    with m.Switch(index):
        for i, opt in enumerate(options):
            with m.Case(i):
                m.d.comb += out.eq(opt)
    return out


class GenerationLanes(wiring.Component):
    """The multiply-accumulate lanes, the bypass and the rounding (see the module doc).

    Timing: a tag on ``i_tag`` wants its store words on ``*_data`` two cycles later.
    A level-2 sum comes out on ``o_lanes`` nine cycles after its last tag, a bypass
    column on ``o_bypass`` six cycles after its tag, a level-1 sum on ``w1_wr`` six
    cycles after its last tag; ``o_lanes_next`` and
    ``o_bypass_next`` carry the tags of the results one cycle before they come out, so
    that their consumer can decode them into registers.

    Members
    -------
    i_tag: In(hw.gen_sequencer.tag_signature(config))
    w_shift: In(descriptor w_shift)
        The layer's rounding shift, held for the layer (registered here: it must be
        stable from the cycle before the layer's first tag).
    b_data, u_data, v_data, w1_data: In(store words)
        Read data of the stores.
    w1_wr: Out(hw.gen_loader.store_write_signature(...))
        The level-1 sums, written to W1.
    o_lanes: Out(result_signature(config, lanes))
        A level-2 lane group's weights (lane ``l`` is row ``l // Lc``, column
        ``l % Lc`` of the group).
    o_lanes_next: Out(hw.gen_sequencer.tag_signature(config))
    o_bypass: Out(result_signature(config, rows))
        A tile column's weights without level 2.
    o_bypass_next: Out(hw.gen_sequencer.tag_signature(config))
    pipe_empty: Out(1)
        No tag in flight past the issue stage.
    """

    def __init__(self, config: AcceleratorConfig):
        c = config
        R, C = c.rows, c.cols
        self.config = config
        self.plan = lane_plan(c)
        w1w = w1_value_bits(c)
        super().__init__({
            "i_tag": In(tag_signature(c)),
            "w_shift": In(descriptor_layout(c)["w_shift"].shape),
            "b_data": In(unsigned(c.qb)),
            "u_data": In(word_shape(unsigned(c.qu), R)),
            "v_data": In(word_shape(unsigned(c.qv), C)),
            "w1_data": In(word_shape(signed(w1w), R)),
            "w1_wr": Out(store_write_signature(signed(w1w), R, store_depths(c)["W1"])),
            "o_lanes": Out(result_signature(c, self.plan["lanes"])),
            "o_lanes_next": Out(tag_signature(c)),
            "o_bypass": Out(result_signature(c, R)),
            "o_bypass_next": Out(tag_signature(c)),
            "pipe_empty": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        form = cfg.decode
        plan = self.plan
        Lc, Lr, Pc, Pr = plan["Lc"], plan["Lr"], plan["Pc"], plan["Pr"]
        NL, L1L, P1 = plan["lanes"], plan["L1"], plan["P1"]
        w1w = w1_value_bits(cfg)
        a_w = max(cfg.u_value_bits, cfg.v_value_bits)
        acc_w = max(cfg.w2_bits, a_w + w1w)
        ctrl = tag_layout(cfg)

        # The rounding constants of the two paths, from the layer's shift clamped to
        # each path's width (registers: the shift is a layer constant).
        ws_acc = Signal(range(acc_w + 2))
        ws_byp = Signal(range(w1w + 2))
        half_acc = Signal(acc_w + 1)
        half_byp = Signal(w1w + 1)
        ws_a = Mux(self.w_shift > acc_w + 1, acc_w + 1, self.w_shift)
        ws_b = Mux(self.w_shift > w1w + 1, w1w + 1, self.w_shift)
        m.d.sync += [ws_acc.eq(ws_a), ws_byp.eq(ws_b), half_acc.eq(round_half(ws_a, acc_w + 1)),
                     half_byp.eq(round_half(ws_b, w1w + 1))]

        # The tags of the cycles 1 to 9 after the issue (sr with the read data, sm with
        # the operands, s7 with the weights), and whether they hold one.
        s0, v0 = self.i_tag.payload, self.i_tag.valid
        s1, sr, sm, s2, s3, s4, s5, s6, s7 = (
            Signal(ctrl, name=f"s{i}") for i in ("1", "r", "m", "2", "3", "4", "5", "6", "7"))
        v1, vr, vm, v2, v3, v4, v5, v6, v7 = (
            Signal(name=f"s{i}_valid") for i in ("1", "r", "m", "2", "3", "4", "5", "6", "7"))
        stages = [(s0, v0), (s1, v1), (sr, vr), (sm, vm), (s2, v2), (s3, v3), (s4, v4),
                  (s5, v5), (s6, v6), (s7, v7)]
        for (s, v), (s_next, v_next) in zip(stages, stages[1:]):
            m.d.sync += [s_next.eq(s), v_next.eq(v)]
        m.d.comb += self.pipe_empty.eq(~(v1 | vr | vm | v2 | v3 | v4 | v5 | v6 | v7))
        w1_q = Signal.like(self.w1_data, name="w1_q")
        m.d.sync += w1_q.eq(self.w1_data)

        # The lanes' operands, decoded and routed from the read registers.
        u_val = [decode_code(self.u_data[r], cfg.qu, form) for r in range(R)]
        v_val = [decode_code(self.v_data[c], cfg.qv, form) for c in range(C)]
        b_val = decode_code(self.b_data, cfg.qb, form)
        w1_rval = [self.w1_data[r] for r in range(R)]

        prod = []
        for lr in range(Lr):
            for lc in range(Lc):
                l = lr * Lc + lc
                if cfg.level2:
                    a2 = _pick(m, sr.pc, [v_val[p * Lc + lc] if p * Lc + lc < C else 0
                                          for p in range(Pc)], signed(a_w))
                    b2 = _pick(m, sr.pr, [w1_rval[p * Lr + lr] if p * Lr + lr < R else 0
                                          for p in range(Pr)], signed(w1w))
                else:
                    # (Without level 2 the lanes' results only count for level 1.)
                    a2, b2 = Const(0, signed(a_w)), Const(0, signed(w1w))
                if l < L1L:
                    a1 = _pick(m, sr.pc, [u_val[p * L1L + l] if p * L1L + l < R else 0
                                          for p in range(P1)], signed(a_w))
                    a_next, b_next = ((Mux(sr.l1, a1, a2), Mux(sr.l1, b_val, b2)) if cfg.level2
                                      else (a1, b_val))
                else:
                    a_next, b_next = a2, b2
                # Operands registered here and again in the multiplier (inside the DSP
                # block on ECP5), then the product. In fabric the 64 lanes cost
                # some 7,000 LUT4 more on an LFE5U-85F and congest its routing.
                a_op = Signal(signed(a_w), name=f"op_a_{l}")
                b_op = Signal(signed(w1w), name=f"op_b_{l}")
                m.d.sync += [a_op.eq(a_next), b_op.eq(b_next)]
                prod.append(registered_multiply(m, a_op, b_op, f"prod_{l}", platform))

        # Bypass: round-half add, shift, saturate.
        byp = [Signal(signed(w1w + 2), name=f"byp_{r}") for r in range(R)]
        byp_sh = [Signal(signed(w1w + 2), name=f"byp_sh_{r}") for r in range(R)]
        m.d.sync += [byp[r].eq(w1_q[r] + half_byp) for r in range(R)]
        m.d.sync += [byp_sh[r].eq(byp[r] >> ws_byp) for r in range(R)]

        # Lanes: accumulate, round-half add, shift, saturate.
        acc = [Signal(signed(acc_w), name=f"acc_{l}") for l in range(NL)]
        rnd = [Signal(signed(acc_w + 2), name=f"rnd_{l}") for l in range(NL)]
        rnd_sh = [Signal(signed(acc_w + 2), name=f"rnd_sh_{l}") for l in range(NL)]
        with m.If(v3):
            m.d.sync += [acc[l].eq(Mux(s3.first, 0, acc[l]) + prod[l]) for l in range(NL)]
        m.d.sync += [rnd[l].eq(acc[l] + half_acc) for l in range(NL)]
        m.d.sync += [rnd_sh[l].eq(rnd[l] >> ws_acc) for l in range(NL)]

        # Level 1 writes W1 straight from the accumulators (row r of a pass from lane
        # r % L1).
        wr = self.w1_wr
        m.d.comb += [wr.addr.eq(s4.wa), *[wr.data[r].eq(acc[r % L1L]) for r in range(R)]]
        with m.If(v4 & s4.l1 & s4.last):
            for p in range(P1):
                with m.If(s4.pc == p):
                    m.d.comb += wr.en.eq(sum(1 << r for r in range(p * L1L, min(R, (p + 1) * L1L))))

        # Saturation is registered: the tile writes start from registers.
        lane_w = Signal.like(self.o_lanes.payload.w, name="lane_w")
        byp_w = Signal.like(self.o_bypass.payload.w, name="byp_w")
        m.d.sync += [lane_w[l].eq(saturate(rnd_sh[l], cfg.w_bits)) for l in range(NL)]
        m.d.sync += [byp_w[r].eq(saturate(byp_sh[r], cfg.w_bits)) for r in range(R)]
        lanes, byps = self.o_lanes, self.o_bypass
        m.d.comb += [
            lanes.payload.w.eq(lane_w), byps.payload.w.eq(byp_w),
            lanes.valid.eq(v7 & s7.l2 & s7.last), lanes.payload.tag.eq(s7),
            self.o_lanes_next.valid.eq(v6 & s6.l2 & s6.last), self.o_lanes_next.payload.eq(s6),
            byps.valid.eq(v4 & s4.byp), byps.payload.tag.eq(s4),
            self.o_bypass_next.valid.eq(v3 & s3.byp), self.o_bypass_next.payload.eq(s3),
        ]
        return m
