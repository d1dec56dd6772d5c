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
in one memory that a ``compact`` build puts in single-port RAM (a layer's codes
are all written before its first weight is read, and the next layer's codes
only after its last read). Each section is written at consecutive addresses
in stream order, so the loader is a counter.

Pipeline (no stalls past the issue stage): issue (addresses from the loop
registers), two cycles of memory read, operands into the multiplier, product,
accumulate, then the rounding and the vector register. A vector is issued only
when the output FIFO has room for it and every vector already in flight.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, wiring
from amaranth.lib.fifo import SyncFIFOBuffered

from gen.config import KERNEL_SIZES, AcceleratorConfig
from hw.dsp import registered_multiply
from hw.generation import GenerationUnit, WeightRounder, generation_members
from hw.interfaces import descriptor_layout
from hw.memory import BlockMemory
from hw.unpacker import CodeUnpacker, decode_code

__all__ = ["SerialGenerationUnit", "generation_unit", "OUT_VECTORS", "PIPE_STAGES"]

# Weight vectors the output FIFO holds.
OUT_VECTORS = 2
# Cycles from a weight's issue to its result at the accumulator (hw pipeline depth).
PIPE_STAGES = 5


class _State(enum.Enum, shape=3):
    IDLE = 0
    SETUP = 1
    LOAD_B = 2
    LOAD_U = 3
    ALIGN = 4
    ISSUE = 5
    DRAIN = 6


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
        c = self.config
        kk = c.max_k * c.max_k
        return {"B": c.max_co * c.max_bi * kk,
                "U": c.max_co * c.max_ci * max(kk, c.max_bi)}

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        form = cfg.decode
        kk_max = cfg.max_k * cfg.max_k
        inner_max = max(kk_max, cfg.max_bi)
        depth = self.memory_depths
        code_bits = max(cfg.qb, cfg.qu, cfg.qd, cfg.qv)
        # Accumulator: a level-1 sum or a dense value (hw.generation's W1 entry width).
        acc_w = max(cfg.w1_bits, cfg.b_value_bits, cfg.d_value_bits, cfg.v_value_bits)

        m.submodules.b_mem = b_mem = BlockMemory(unsigned(cfg.qb), 1, depth["B"], name="b_mem")
        m.submodules.u_mem = u_mem = BlockMemory(unsigned(code_bits), 1, depth["U"],
                                                 single_port=cfg.compact, name="u_mem")
        b_wp, b_rp = b_mem.write_port(), b_mem.read_port()
        u_wp, u_rp = u_mem.write_port(), u_mem.read_port()

        m.submodules.unpacker = unpacker = CodeUnpacker(8, code_bits, byte_window=cfg.compact)
        wiring.connect(m, wiring.flipped(self.i_codes), unpacker.i_stream)
        code = unpacker.o_stream

        # Layer registers -----------------------------------------------------------
        desc = descriptor_layout(cfg)
        ci = Signal(desc["ci"].shape)
        co = Signal(desc["co"].shape)
        bi = Signal(desc["bi"].shape)
        has_l1 = Signal()
        dense_sel = Signal(2)        # a dense layer's code width: 0 qd, 1 qb, 2 qv
        w_shift = Signal(desc["w_shift"].shape)
        kk = Signal(range(kk_max + 1))
        inner = Signal(range(inner_max + 1))            # bi (level 1) or k*k (dense)
        s_o = Signal(range(cfg.max_ci * inner_max + 1))  # U/dense words per o: ci * inner
        bikk = Signal(range(cfg.max_bi * kk_max + 1))    # B words per o: bi * k*k

        state = Signal(_State)
        pend = Signal(_State)        # where ALIGN goes next
        # (The loader's last indices: its compares take them from registers.)
        xb_last, xs_last, co_m1 = Signal.like(bikk), Signal.like(s_o), Signal.like(co)

        d = self.i_desc.payload
        m.d.comb += self.i_desc.ready.eq(state == _State.IDLE)
        n = Signal(range(max(cfg.max_ci, cfg.max_bi) + 1))
        with m.If(self.i_desc.valid & self.i_desc.ready):
            m.d.sync += [ci.eq(d.ci), co.eq(d.co), co_m1.eq(d.co - 1), bi.eq(d.bi),
                         has_l1.eq(d.has_l1),
                         dense_sel.eq(d.dense_bits), w_shift.eq(d.w_shift),
                         s_o.eq(0), bikk.eq(0), n.eq(0), state.eq(_State.SETUP)]
            with m.Switch(d.k):
                for size in KERNEL_SIZES:
                    if size <= cfg.max_k:
                        with m.Case(size):
                            m.d.sync += kk.eq(size * size)
        m.d.comb += inner.eq(Mux(has_l1, bi, kk))

        # SETUP: s_o = ci * inner and bikk = bi * kk by repeated addition, then the
        # loader's last indices.
        with m.If(state == _State.SETUP):
            m.d.sync += n.eq(n + 1)
            with m.If(n < ci):
                m.d.sync += s_o.eq(s_o + inner)
            with m.If(n < bi):
                m.d.sync += bikk.eq(bikk + kk)
            with m.If((n >= ci) & (n >= bi)):
                m.d.sync += [state.eq(_State.LOAD_B), xb_last.eq(bikk - 1), xs_last.eq(s_o - 1)]

        # Loader: a section is co runs of x codes, written at consecutive addresses.
        in_b, in_u = state == _State.LOAD_B, state == _State.LOAD_U
        lx = Signal(range(max(cfg.max_ci * inner_max, cfg.max_bi * kk_max) + 1))
        lo = Signal(range(cfg.max_co + 1))
        la = Signal(range(max(depth["B"], depth["U"]) + 1))
        x_last = Mux(in_b & has_l1, xb_last, xs_last)
        dense_w = Mux(dense_sel == 1, cfg.qb, Mux(dense_sel == 2, cfg.qv, cfg.qd))
        m.d.comb += [unpacker.width.eq(Mux(in_u, cfg.qu, Mux(has_l1, cfg.qb, dense_w))),
                     code.ready.eq(in_b | in_u),
                     unpacker.align.eq(state == _State.ALIGN)]
        # Writes leave from registers, a cycle after the code is taken.
        m.d.sync += [b_wp.en.eq(0), u_wp.en.eq(0), b_wp.addr.eq(la), u_wp.addr.eq(la),
                     b_wp.data.eq(code.payload), u_wp.data.eq(code.payload)]
        with m.If(code.valid & code.ready):
            m.d.sync += [b_wp.en.eq(in_b & has_l1), u_wp.en.eq(in_u | (in_b & ~has_l1)),
                         la.eq(la + 1), lx.eq(lx + 1)]
            with m.If(lx == x_last):
                m.d.sync += [lx.eq(0), lo.eq(lo + 1)]
                with m.If(lo == co_m1):
                    nxt = Mux(in_b & has_l1, _State.LOAD_U, _State.ISSUE)
                    m.d.sync += [lo.eq(0), la.eq(0)]
                    if self.section_align:
                        m.d.sync += [state.eq(_State.ALIGN), pend.eq(nxt)]
                    else:
                        with m.If(nxt == _State.ISSUE):
                            m.d.sync += [state.eq(_State.ALIGN), pend.eq(nxt)]
                        with m.Else():
                            m.d.sync += state.eq(nxt)
        with m.If(state == _State.ALIGN):
            m.d.sync += state.eq(pend)

        # Issue: the loop registers of weight-vector order, one MAC a cycle -----------
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
        m.d.comb += issue.eq((state == _State.ISSUE) & (~vec_start | room))

        m.d.comb += [u_rp.addr.eq(o_u + i_u + Mux(has_l1, j, tap)),
                     b_rp.addr.eq(o_b + jkk + tap)]

        with m.If(state == _State.ALIGN):
            m.d.sync += [j.eq(0), c.eq(0), r.eq(0), tap.eq(0), co0.eq(0), ci0.eq(0),
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
                                    m.d.sync += state.eq(_State.DRAIN)

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

        with m.If((state == _State.DRAIN) & ~Cat(t.valid for t in tags[1:]).any()):
            m.d.sync += state.eq(_State.IDLE)

        # Stage 2: codes from the memories' read registers, decoded into the multiplier's
        # operands (a dense value times one).
        raw_u = u_rp.data
        u_val = decode_code(raw_u, cfg.qu, form)
        d_val = Mux(dense_sel == 1, decode_code(raw_u, cfg.qb, form),
                    Mux(dense_sel == 2, decode_code(raw_u, cfg.qv, form),
                        decode_code(raw_u, cfg.qd, form)))
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
        m.submodules.rounder = rounder = WeightRounder(acc_w, cfg.w_bits, len(w_shift),
                                                    held_shift=True)
        m.d.comb += [rounder.x.eq(acc), rounder.shift.eq(w_shift)]
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
        m.d.comb += self.idle.eq((state == _State.IDLE) & (out_fifo.level == 0))
        return m
