"""The tile buffers of the generation unit: rounded weights in, PE weight vectors out.

:class:`WeightTiler` places the weights the lanes (``hw.gen_lanes``) produce at
their positions of a ``rows x cols`` weight tile and streams complete tiles out on
``o_weights`` as ``rows`` weight vectors each, in the order of ``hw.interfaces``;
``last`` marks the final vector of a layer. Weights of channels past ``co`` / ``ci``
(the tag's ``cmask`` / ``rmask``) are written as 0.

Results are written into one of two *work* tiles (slots), which successive tiles
use in turn. A complete work tile moves in one cycle to the *output* tile once that
is empty; the output tile shifts its vectors out. A slot is *busy* from the issue of
its tile's first read (``tile_start``) until it is copied out, and the sequencer
issues a tile only into a free slot (``slot_free``), so a result never waits.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig, lane_plan
from hw.gen_lanes import result_signature
from hw.gen_sequencer import tag_signature
from hw.interfaces import weight_stream_signature

__all__ = ["WeightTiler"]


class WeightTiler(wiring.Component):
    """Two work tiles filled in turn, one output tile shifted out (see the module doc).

    Timing: a result on ``i_lanes`` / ``i_bypass`` is in its work tile at the next edge;
    the tags on ``i_lanes_next`` / ``i_bypass_next`` must announce each result one
    cycle before it (they are decoded into the tile writes' enables). A tile whose last
    result is written is copied to the output tile in the next cycle in which that is
    empty, and its first vector is valid on ``o_weights`` in the cycle after the copy.
    ``o_weights.valid`` and ``last`` are registers.

    Members
    -------
    i_lanes: In(hw.gen_lanes.result_signature(config, lanes))
        A level-2 lane group's weights, at group ``(pr, pc)`` of its tag.
    i_lanes_next: In(hw.gen_sequencer.tag_signature(config))
    i_bypass: In(hw.gen_lanes.result_signature(config, rows))
        A tile column (``pc`` of its tag) without level 2.
    i_bypass_next: In(hw.gen_sequencer.tag_signature(config))
    slot: Out(1)
        The slot the next tile issued goes to.
    slot_free: Out(1)
        That slot is free.
    tile_start, tile_end: In(1)
        A tile's first read is issued (its slot becomes busy); its last read is issued
        (the next tile goes to the other slot).
    o_weights: Out(hw.interfaces.weight_stream_signature(config))
    empty: Out(1)
        No slot busy and no vector left to send.
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        self.plan = lane_plan(config)
        super().__init__({
            "i_lanes": In(result_signature(config, self.plan["lanes"])),
            "i_lanes_next": In(tag_signature(config)),
            "i_bypass": In(result_signature(config, config.rows)),
            "i_bypass_next": In(tag_signature(config)),
            "slot": Out(1),
            "slot_free": Out(1),
            "tile_start": In(1),
            "tile_end": In(1),
            "o_weights": Out(weight_stream_signature(config)),
            "empty": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        Lc, Lr, Pc, Pr = (self.plan[k] for k in ("Lc", "Lr", "Pc", "Pr"))
        w_shape = signed(cfg.w_bits)
        work = [[[Signal(w_shape, name=f"work{t}_{r}_{c}") for c in range(C)] for r in range(R)]
                for t in range(2)]
        busy = Signal(2)       # a tile has been issued into the slot and not yet copied out
        full = Signal(2)       # the slot's tile is complete
        work_last = Signal(2)
        cur_slot = Signal()    # slot of the tile being issued
        rd_slot = Signal()     # slot copied out next
        out = [[Signal(w_shape, name=f"out_{r}_{c}") for c in range(C)] for r in range(R)]
        out_cnt = Signal(range(R + 1))
        out_last = Signal()
        m.d.comb += [self.slot.eq(cur_slot), self.slot_free.eq(~busy.bit_select(cur_slot, 1)),
                     self.empty.eq((busy == 0) & (out_cnt == 0))]
        with m.If(self.tile_start):
            m.d.sync += busy.bit_select(cur_slot, 1).eq(1)
        with m.If(self.tile_end):
            m.d.sync += cur_slot.eq(~cur_slot)

        # Writeback into the work tile of the result's slot ----------------------------
        lanes, byps = self.i_lanes, self.i_bypass
        l2, bp = lanes.payload.tag, byps.payload.tag
        wb_l2 = lanes.valid
        wb_slot = Mux(wb_l2, l2.slot, bp.slot)
        with m.If((wb_l2 | byps.valid) & Mux(wb_l2, l2.tile_done, bp.tile_done)):
            m.d.sync += [full.bit_select(wb_slot, 1).eq(1),
                         work_last.bit_select(wb_slot, 1).eq(Mux(wb_l2, l2.layer_last,
                                                                  bp.layer_last))]
        # The tile writes' enables are decoded a cycle ahead, into registers: a lane
        # group's, a bypass column's, per slot.
        l2_en = [[[Signal(name=f"l2_en_{t}_{p}_{q}") for q in range(Pc)] for p in range(Pr)]
                 for t in range(2)]
        byp_en = [[Signal(name=f"byp_en_{t}_{c}") for c in range(C)] for t in range(2)]
        nl, nb = self.i_lanes_next, self.i_bypass_next
        for t in range(2):
            for p in range(Pr):
                for q in range(Pc):
                    m.d.sync += l2_en[t][p][q].eq(nl.valid & (nl.payload.slot == t)
                                                  & (nl.payload.pr == p) & (nl.payload.pc == q))
            for c in range(C):
                m.d.sync += byp_en[t][c].eq(nb.valid & (nb.payload.slot == t)
                                            & (nb.payload.pc == c))
        for t in range(2):
            for r in range(R):
                for c in range(C):
                    l = (r % Lr) * Lc + (c % Lc)
                    with m.If(l2_en[t][r // Lr][c // Lc]):
                        keep = l2.rmask[r] & l2.cmask[c]
                        m.d.sync += work[t][r][c].eq(Mux(keep, lanes.payload.w[l], 0))
            for c in range(C):
                with m.If(byp_en[t][c]):
                    for r in range(R):
                        keep = bp.rmask[r] & bp.cmask[c]
                        m.d.sync += work[t][r][c].eq(Mux(keep, byps.payload.w[r], 0))

        # Output tile: takes a complete work tile when empty, shifts its vectors out ----
        # Valid and the last flag are registers (out_cnt != 0, out_last & out_cnt == 1),
        # so that the handshake, which enables every output tile register, is one gate
        # of two registers and the consumer's ready.
        o_valid, o_last = Signal(), Signal()
        handshake = self.o_weights.valid & self.o_weights.ready
        copy = Signal()
        m.d.comb += copy.eq(full.bit_select(rd_slot, 1) & ~o_valid)
        m.d.comb += [self.o_weights.valid.eq(o_valid), self.o_weights.payload.last.eq(o_last)]
        m.d.comb += [self.o_weights.payload.w[c].eq(out[0][c]) for c in range(C)]
        with m.If(handshake):
            m.d.sync += [out_cnt.eq(out_cnt - 1), o_valid.eq(out_cnt != 1),
                         o_last.eq(out_last & (out_cnt == 2))]
            for r in range(R - 1):
                m.d.sync += [out[r][c].eq(out[r + 1][c]) for c in range(C)]
        with m.If(copy):
            last = work_last.bit_select(rd_slot, 1)
            m.d.sync += [out_cnt.eq(R), out_last.eq(last),
                         o_valid.eq(1), o_last.eq(last if R == 1 else 0),
                         full.bit_select(rd_slot, 1).eq(0), busy.bit_select(rd_slot, 1).eq(0),
                         rd_slot.eq(~rd_slot)]
            for t in range(2):
                with m.If(rd_slot == t):
                    m.d.sync += [out[r][c].eq(work[t][r][c]) for r in range(R) for c in range(C)]
        return m
