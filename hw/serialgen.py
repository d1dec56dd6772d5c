"""A generation unit for small devices: one weight at a time, no W1 buffer.

:class:`SerialGenerationUnit` has the interface and the output of
:class:`hw.generation.GenerationUnit` for configs without level 2
(``config.level2`` false): the same descriptors, code stream and weight vectors
(``hw.interfaces``), bit for bit. It is the unit of ``compact`` builds of such
configs (:func:`generation_unit`), where logic cells are what a device runs
out of first.

Instead of filling a W1 buffer with level 1 and then reading tiles out of it,
it computes each PE weight in the order the engine takes it, with one
multiply-accumulate::

    for co0, ci0, tap, r, c in weight-vector order (hw.interfaces):
        o, i = co0 + c, ci0 + r
        level 1:  w = round_w2(sum_j U[o, i, j] * B[o, j, tap])     (bi cycles)
        dense:    w = round_w2(D[o, i, tap])                         (1 cycle)

Without level 2 every weight is generated exactly once either way (``bo =
co``), so this costs the multiplies of a W1 pass and needs no buffer for its
results. A tile takes ``rows * cols * bi`` cycles with level 1 and ``rows *
cols`` for a dense layer; padding weights past ``co`` or ``ci`` take their
cycles too and come out as 0.

Memories: the B codes of level 1 (``[co, bi, k*k]``, raw) in a block RAM; the U
codes (``[co, ci, bi]``) or the codes of a dense layer (``[co, ci, k*k]``), raw,
in one single-port memory (a layer's codes are all written before its first weight
is read, and the next layer's codes only after its last read; on an iCE40 UP5K it
is the large single-port RAM). Each section is written at consecutive addresses
in stream order (:class:`hw.gen_loader.SerialCodeLoader`: the load phases and
descriptor handling it shares with the lane unit's loader, and a counter for the
address).

Pipeline (no stalls past the issue stage): issue (addresses from the loop
registers), two cycles of memory read, operands into the multiplier, product,
accumulate, then the rounding and the vector register. A vector is issued only
when the output FIFO has room for it and every vector already in flight.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.fifo import SyncFIFOBuffered

from gen.config import AcceleratorConfig
from gen.contract import SERIAL_OUT_VECTORS as OUT_VECTORS
from gen.contract import SERIAL_PIPE_STAGES as PIPE_STAGES
from hw.dsp import registered_multiply
from hw.gen_loader import SerialCodeLoader, decode_dense, register_write, serial_store_depths
from hw.gen_loader import w1_value_bits
from hw.generation import GenerationUnit, WeightRounder, generation_members
from hw.memory import BlockMemory
from hw.unpacker import decode_code

__all__ = ["SerialGenerationUnit", "generation_unit", "OUT_VECTORS", "PIPE_STAGES"]

def generation_unit(config: AcceleratorConfig, **kwargs):
    """The generation unit of an accelerator built for ``config``: the serial one in
    ``compact`` builds without level 2, else :class:`hw.generation.GenerationUnit`."""
    if config.serial_generation:
        return SerialGenerationUnit(config, **kwargs)
    return GenerationUnit(config, **kwargs)


class SerialGenerationUnit(wiring.Component):
    """PE weights from packed MLG codes, one multiply-accumulate a cycle (module doc).

    Parameters and members as :class:`hw.generation.GenerationUnit`; ``config.level2``
    must be false, and a descriptor's ``has_l2`` and ``bo`` are ignored (``bo = co``).
    The unit is the small-device one whatever ``config.compact`` says: its U store is
    single-port RAM and its unpacker the narrow byte-window kind.
    """

    def __init__(self, config: AcceleratorConfig, *, section_align: bool = True):
        members = generation_members(config)
        if config.level2:
            raise ValueError("SerialGenerationUnit: config.level2 must be false (the unit "
                             "has no level 2); use hw.generation.GenerationUnit")
        self.config = config
        self.section_align = bool(section_align)
        super().__init__(members)

    @property
    def memory_depths(self) -> dict[str, int]:
        """Words of the B memory and of the U (or dense code) memory."""
        return serial_store_depths(self.config)

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        form = cfg.decode
        kk_max = cfg.max_k * cfg.max_k
        inner_max = max(kk_max, cfg.max_bi)
        depth = self.memory_depths
        # Accumulator: a level-1 sum or a dense value (hw.generation's W1 entry width).
        acc_w = w1_value_bits(cfg)

        m.submodules.b_mem = b_mem = BlockMemory(unsigned(cfg.qb), 1, depth["B"], name="b_mem")
        m.submodules.u_mem = u_mem = BlockMemory(unsigned(SerialCodeLoader.code_bits_of(cfg)), 1,
                                                 depth["U"], single_port=True, name="u_mem")
        b_wp, b_rp = b_mem.write_port(), b_mem.read_port()
        u_wp, u_rp = u_mem.write_port(), u_mem.read_port()

        m.submodules.loader = loader = SerialCodeLoader(cfg, section_align=self.section_align)
        wiring.connect(m, wiring.flipped(self.i_desc), loader.i_desc)
        wiring.connect(m, wiring.flipped(self.i_codes), loader.i_codes)
        register_write(m, b_wp, loader.b_wr)
        register_write(m, u_wp, loader.u_wr)
        lay = loader.layer
        ci, co, bi, kk, inner, has_l1 = lay.ci, lay.co, lay.bi, lay.kk, lay.inner, lay.has_l1
        s_o, bikk = lay.s_o, lay.bikk

        # Issue: the loop registers of weight-vector order, one MAC a cycle -----------
        # Issuing from start to the layer's last weight, then draining the pipeline.
        issuing, draining = Signal(), Signal()
        j = Signal(range(cfg.max_bi + 1))
        c = Signal(range(C))
        r = Signal(range(R))
        tap = Signal(range(kk_max))
        co0 = Signal(range(cfg.max_co + C + 1))
        ci0 = Signal(range(cfg.max_ci + R + 1))
        co_c = Signal.like(co0)          # co0 + c
        ci_r = Signal.like(ci0)          # ci0 + r
        u_lim = (cfg.max_co + C) * cfg.max_ci * inner_max + (cfg.max_ci + R) * inner_max
        o_u0, o_u = Signal(range(u_lim)), Signal(range(u_lim))      # co0 * s_o, (co0 + c) * s_o
        i_u0, i_u = Signal(range(u_lim)), Signal(range(u_lim))      # ci0 * inner, (ci0 + r) * inner
        b_lim = (cfg.max_co + C) * cfg.max_bi * kk_max + cfg.max_bi * kk_max
        o_b0, o_b = Signal(range(b_lim)), Signal(range(b_lim))      # co0 * bikk, (co0 + c) * bikk
        jkk = Signal(range(b_lim))                                  # j * kk

        last_j = j == Mux(has_l1, bi - 1, 0)
        last_c, last_r, last_tap = c == C - 1, r == R - 1, tap == kk - 1
        last_ci = ci0 + R >= ci
        last_co = co0 + C >= co
        layer_last = last_j & last_c & last_r & last_tap & last_ci & last_co

        # Room for a new vector: FIFO entries free beyond those of the vectors in flight.
        fifo_w = C * cfg.w_bits + 1
        m.submodules.out_fifo = out_fifo = SyncFIFOBuffered(width=fifo_w, depth=OUT_VECTORS)
        # (claimed: vectors in flight plus those in the FIFO, kept as one count: a
        # vector start adds one, a vector leaving the FIFO takes one away)
        claimed = Signal(range(OUT_VECTORS + 2))
        vec_start = (j == 0) & (c == 0)
        room = claimed < OUT_VECTORS
        issue = Signal()
        m.d.comb += issue.eq(issuing & (~vec_start | room))

        m.d.comb += [u_rp.addr.eq(o_u + i_u + Mux(has_l1, j, tap)),
                     b_rp.addr.eq(o_b + jkk + tap)]

        with m.If(loader.start):
            m.d.sync += [issuing.eq(1),
                         j.eq(0), c.eq(0), r.eq(0), tap.eq(0), co0.eq(0), ci0.eq(0),
                         co_c.eq(0), ci_r.eq(0), o_u0.eq(0), o_u.eq(0), i_u0.eq(0),
                         i_u.eq(0), o_b0.eq(0), o_b.eq(0), jkk.eq(0)]
        with m.If(issue):
            with m.If(~last_j):
                m.d.sync += [j.eq(j + 1), jkk.eq(jkk + kk)]
            with m.Else():
                m.d.sync += [j.eq(0), jkk.eq(0)]
                with m.If(~last_c):
                    m.d.sync += [c.eq(c + 1), co_c.eq(co_c + 1), o_u.eq(o_u + s_o),
                                 o_b.eq(o_b + bikk)]
                with m.Else():
                    m.d.sync += [c.eq(0), co_c.eq(co0), o_u.eq(o_u0), o_b.eq(o_b0)]
                    with m.If(~last_r):
                        m.d.sync += [r.eq(r + 1), ci_r.eq(ci_r + 1), i_u.eq(i_u + inner)]
                    with m.Else():
                        m.d.sync += [r.eq(0), ci_r.eq(ci0), i_u.eq(i_u0)]
                        with m.If(~last_tap):
                            m.d.sync += tap.eq(tap + 1)
                        with m.Else():
                            m.d.sync += tap.eq(0)
                            with m.If(~last_ci):
                                # (r is rows - 1 here: i_u + inner is (ci0 + rows) * inner.)
                                m.d.sync += [ci0.eq(ci0 + R), ci_r.eq(ci0 + R),
                                             i_u0.eq(i_u + inner), i_u.eq(i_u + inner)]
                            with m.Else():
                                m.d.sync += [ci0.eq(0), ci_r.eq(0), i_u0.eq(0), i_u.eq(0)]
                                with m.If(~last_co):
                                    # (c is cols - 1 here: o_u + s_o is (co0 + cols) * s_o.)
                                    m.d.sync += [co0.eq(co0 + C), co_c.eq(co0 + C),
                                                 o_u0.eq(o_u + s_o), o_u.eq(o_u + s_o),
                                                 o_b0.eq(o_b + bikk), o_b.eq(o_b + bikk)]
                                with m.Else():
                                    m.d.sync += [issuing.eq(0), draining.eq(1)]

        # Pipeline tags: issue (0), memory read (1, 2), operands (3), product (4),
        # accumulator (5).
        tag_layout = data.StructLayout({"valid": 1, "first": 1, "last": 1, "keep": 1,
                                        "vec_end": 1, "layer_last": 1})
        tags = [Signal(tag_layout, name=f"tag{i}") for i in range(PIPE_STAGES + 1)]
        m.d.comb += [tags[0].valid.eq(issue), tags[0].first.eq(j == 0), tags[0].last.eq(last_j),
                     tags[0].keep.eq((co_c < co) & (ci_r < ci)),
                     tags[0].vec_end.eq(last_j & last_c), tags[0].layer_last.eq(layer_last)]
        m.d.sync += [tags[i + 1].eq(tags[i]) for i in range(PIPE_STAGES)]
        t5 = tags[PIPE_STAGES]
        started = tags[0].valid & vec_start
        pushed = t5.valid & t5.vec_end
        taken = out_fifo.r_rdy & out_fifo.r_en
        m.d.sync += claimed.eq(claimed + started - taken)

        with m.If(draining & ~Cat(t.valid for t in tags[1:]).any()):
            m.d.sync += draining.eq(0)
            m.d.comb += loader.done.eq(1)

        # Stage 2: codes from the memories' read registers, decoded into the multiplier's
        # operands (a dense value times one).
        raw_u = u_rp.data
        u_val = decode_code(raw_u, cfg.qu, form)
        d_val = decode_dense(cfg, raw_u, lay.dense_sel)
        b_val = decode_code(b_rp.data, cfg.qb, form)
        a_op = Signal(signed(max(cfg.u_value_bits, cfg.d_value_bits, cfg.b_value_bits,
                                 cfg.v_value_bits)))
        b_op = Signal(signed(max(cfg.b_value_bits, 2)))
        m.d.comb += [a_op.eq(Mux(has_l1, u_val, d_val)), b_op.eq(Mux(has_l1, b_val, 1))]
        prod = registered_multiply(m, a_op, b_op, "prod", platform)

        # Stage 4 -> 5: accumulate.
        t4 = tags[PIPE_STAGES - 1]
        acc = Signal(signed(acc_w))
        with m.If(t4.valid):
            m.d.sync += acc.eq(Mux(t4.first, 0, acc) + prod)

        # Stage 5: round, mask, and into the vector (the last weight completes it).
        m.submodules.rounder = rounder = WeightRounder(acc_w, cfg.w_bits, len(lay.w_shift),
                                                    held_shift=True)
        m.d.comb += [rounder.x.eq(acc), rounder.shift.eq(lay.w_shift)]
        w = Mux(t5.keep, rounder.y, 0)
        wb = cfg.w_bits
        prev = Signal(max(1, (C - 1) * wb))
        vec = Cat(prev, w) if C > 1 else w
        if C > 1:
            with m.If(t5.valid & t5.last):
                m.d.sync += prev.eq(Cat(prev[wb:], w)[:len(prev)])
        m.d.comb += [out_fifo.w_en.eq(pushed), out_fifo.w_data.eq(Cat(vec, t5.layer_last))]

        m.d.comb += [self.o_weights.valid.eq(out_fifo.r_rdy),
                     self.o_weights.payload.as_value().eq(out_fifo.r_data),
                     out_fifo.r_en.eq(self.o_weights.ready)]
        m.d.comb += self.idle.eq(loader.idle & (out_fifo.level == 0))
        return m
