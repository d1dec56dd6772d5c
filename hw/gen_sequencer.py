"""The issue stage of the generation unit: the loops of level 1 and of the weight tiles.

:class:`TileSequencer` walks, one step per cycle, the operand reads of a layer whose
codes are stored (``hw.gen_loader.CodeLoader``) and issues each as the read
addresses of the stores plus a tag (:func:`tag_layout`) that travels with the read
data down the lanes' pipeline (``hw.gen_lanes.GenerationLanes``):

1. with level 1, ``W1[o, c, t] = sum_j U[o, c, j] * B[o, j, t]``: for each ``o``,
   ci tile ``c``, tap ``t`` and lane pass, ``bi`` reads of a U word and a B code;
   then a drain until the pipeline is empty (W1 is read next);
2. the weight tiles in the order of ``hw.interfaces`` (co tile, ci tile, tap): with
   level 2, for each lane group of the tile, ``bo`` reads of a V word and a W1 word;
   without, one W1 word (a column of the tile) per cycle. Then a drain, after which
   ``done`` is high for one cycle.

A tile's first read is issued only when the tile slot it goes to is free
(``slot_free``, from ``hw.gen_tiling.WeightTiler``), so a result never waits at the
end of the pipeline and nothing past the issue stage needs a stall.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig, lane_plan
from hw.gen_loader import address_limit, layer_layout, store_depths

__all__ = ["TileSequencer", "tag_layout", "tag_signature"]


def tag_layout(config: AcceleratorConfig) -> data.StructLayout:
    """What travels with a read down the lanes' pipeline: its mode (``l1`` level 1,
    ``l2`` level 2, ``byp`` a W1 column without level 2), ``first``/``last`` of a sum,
    the lane group (``pr``, ``pc``) or level-1 pass (``pc``), the W1 address of a
    level-1 result (``wa``), the channels that exist (``rmask``/``cmask``), the last of
    a tile (``tile_done``) and of the layer (``layer_last``), and the tile ``slot``."""
    plan = lane_plan(config)
    R, C = config.rows, config.cols
    return data.StructLayout({
        "l1": 1, "l2": 1, "byp": 1, "first": 1, "last": 1,
        "pr": range(plan["Pr"]), "pc": range(max(plan["Pc"], plan["P1"], C)),
        "wa": range(address_limit(config)),
        "rmask": R, "cmask": C, "tile_done": 1, "layer_last": 1, "slot": 1,
    })


def tag_signature(config: AcceleratorConfig) -> stream.Signature:
    """Issued tags: a stream without backpressure (the pipeline never stalls)."""
    return stream.Signature(tag_layout(config), always_ready=True)


class _Issue(enum.Enum, shape=3):
    IDLE = 0
    ISSUE_L1 = 1
    DRAIN_L1 = 2
    ISSUE_MAIN = 3
    DRAIN_MAIN = 4


class TileSequencer(wiring.Component):
    """Issues a layer's operand reads, one a cycle, in level-1 and weight-tile order.

    Timing: ``start`` (the layer's codes are stored, ``layer`` valid) in one cycle, the
    first read in the next. ``o_tag`` is valid in the cycle of the read addresses; the
    stores deliver the data two cycles later. After the last read of a phase the
    sequencer waits for ``pipe_empty``; ``done`` is high in the cycle that ends the
    layer's drain.

    Members
    -------
    layer: In(hw.gen_loader.layer_layout(config))
    start: In(1)
    done: Out(1)
    pipe_empty: In(1)
        No read in flight in the lanes.
    slot: In(1)
        The tile slot a tile issued now goes to.
    slot_free: In(1)
        That slot may take a new tile.
    tile_start, tile_end: Out(1)
        The first and the last read of a weight tile are issued.
    o_tag: Out(tag_signature(config))
    b_addr, u_addr, v_addr, w1_addr: Out(range(depth))
        Read addresses of the stores (:func:`hw.gen_loader.store_depths`).
    """

    def __init__(self, config: AcceleratorConfig):
        depth = store_depths(config)
        self.config = config
        super().__init__({
            "layer": In(layer_layout(config)),
            "start": In(1),
            "done": Out(1),
            "pipe_empty": In(1),
            "slot": In(1),
            "slot_free": In(1),
            "tile_start": Out(1),
            "tile_end": Out(1),
            "o_tag": Out(tag_signature(config)),
            **{f"{s.lower()}_addr": Out(range(depth[s])) for s in ("B", "U", "V", "W1")},
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        plan = lane_plan(cfg)
        Pc, Pr, P1 = plan["Pc"], plan["Pr"], plan["P1"]
        kk_max = cfg.max_k * cfg.max_k
        bo_cap = max(cfg.max_bo, cfg.max_co)
        addr_lim = address_limit(cfg)
        lay = self.layer

        # Loop counters and addresses ------------------------------------------------
        l0 = Signal(range(bo_cap + cfg.max_co + C + 1))   # o (level 1) or co0
        ci0 = Signal(range(cfg.max_ci + R + 1))
        tap = Signal(range(kk_max))
        pr = Signal(range(Pr))
        pc = Signal(range(max(Pc, P1, C)))
        n = Signal(range(max(cfg.max_bi, bo_cap) + 1))
        ub, bb, bt, nk, wa, vb, toff, wo, ob, cob = (
            Signal(range(addr_lim), name=name)
            for name in ("ub", "bb", "bt", "nk", "wa", "vb", "toff", "wo", "ob", "cob"))
        obt = Signal(len(ob) + 1)    # ob + toff, kept up to date with them

        def reset_issue():
            return [x.eq(0) for x in (l0, ci0, tap, pr, pc, n, ub, bb, bt, nk, wa, vb,
                                      toff, wo, ob, cob, obt)]

        state = Signal(_Issue)
        issue_l1 = state == _Issue.ISSUE_L1
        issue_main = state == _Issue.ISSUE_MAIN

        # The loop ends of the issue mode (level 1, level 2 or bypass) are registers,
        # set in the one cycle before each issue phase (start, DRAIN_L1): the loop
        # conditions then start from registers, not from the state decode.
        n_lim, pc_lim, pr_lim, l0_lim = (Signal.like(x) for x in (n, pc, pr, l0))
        mode_l1 = Signal()
        # n == n_lim and n == 0, kept as registers with n (n is 0 before each phase).
        n_last, n_zero = Signal(), Signal()

        def issue_limits(l1):
            lim = Mux(l1, lay.bi_m1, Mux(lay.has_l2, lay.bo_m1, 0))
            return [mode_l1.eq(l1), n_lim.eq(lim), n_last.eq(lim == 0), n_zero.eq(1),
                    pc_lim.eq(Mux(l1, P1 - 1, Mux(lay.has_l2, Pc - 1, C - 1))),
                    pr_lim.eq(Mux(~l1 & lay.has_l2, Pr - 1, 0)),
                    l0_lim.eq(Mux(l1, lay.bo_m1, lay.co_last))]

        with m.If(self.start):
            m.d.sync += [state.eq(Mux(lay.has_l1, _Issue.ISSUE_L1, _Issue.ISSUE_MAIN)),
                         *reset_issue(), *issue_limits(lay.has_l1)]
        with m.If(state == _Issue.DRAIN_L1):
            m.d.sync += issue_limits(0)
        with m.If((state == _Issue.DRAIN_L1) & self.pipe_empty):
            m.d.sync += [state.eq(_Issue.ISSUE_MAIN), *reset_issue()]
        with m.If(state == _Issue.DRAIN_MAIN):
            with m.If(self.pipe_empty):
                m.d.sync += state.eq(_Issue.IDLE)
                m.d.comb += self.done.eq(1)

        last4 = n_last
        last3 = (pc == pc_lim) & (pr == pr_lim)
        last2 = tap == lay.kk_m1
        last1 = ci0 == lay.ci_last
        last0 = l0 == l0_lim

        tile_first = n_zero & (pc == 0) & (pr == 0)
        blocked = issue_main & tile_first & ~self.slot_free
        tag, valid = self.o_tag.payload, self.o_tag.valid
        m.d.comb += [
            valid.eq((issue_l1 | issue_main) & ~blocked),
            tag.slot.eq(self.slot),
            tag.l1.eq(issue_l1),
            tag.l2.eq(issue_main & lay.has_l2),
            tag.byp.eq(issue_main & ~lay.has_l2),
            tag.first.eq(n_zero),
            tag.last.eq(last4),
            tag.pr.eq(pr), tag.pc.eq(pc), tag.wa.eq(wa),
            tag.rmask.eq(Cat(ci0 + r < lay.ci for r in range(R))),
            tag.cmask.eq(Cat(l0 + c < lay.co for c in range(C))),
            tag.tile_done.eq(last3 & last4),
            tag.layer_last.eq(last4 & last3 & last2 & last1 & last0),
            self.u_addr.eq(ub + n),
            self.b_addr.eq(bt + nk),
            self.v_addr.eq(vb + n),
            self.w1_addr.eq(Mux(lay.has_l2, wo, obt)),
            self.tile_start.eq(valid & issue_main & tile_first),
            self.tile_end.eq(valid & issue_main & last3 & last4),
        ]

        stride, bi, bo, kk = lay.stride, lay.bi, lay.bo, lay.kk
        with m.If(valid):
            with m.If(~last4):
                m.d.sync += [n.eq(n + 1), nk.eq(nk + kk), wo.eq(wo + stride),
                             n_last.eq(n + 1 == n_lim), n_zero.eq(0)]
            with m.Else():
                m.d.sync += [n.eq(0), nk.eq(0), n_last.eq(n_lim == 0), n_zero.eq(1)]
                with m.If(~last3):
                    with m.If(pc != pc_lim):
                        m.d.sync += pc.eq(pc + 1)
                    with m.Else():
                        m.d.sync += [pc.eq(0), pr.eq(pr + 1)]
                    m.d.sync += [wo.eq(toff), ob.eq(ob + stride), obt.eq(obt + stride)]
                with m.Else():
                    m.d.sync += [pc.eq(0), pr.eq(0)]
                    with m.If(~last2 | ~last1):
                        m.d.sync += [
                            tap.eq(Mux(last2, 0, tap + 1)),
                            ci0.eq(Mux(last2, ci0 + R, ci0)),
                            toff.eq(toff + 1), wo.eq(toff + 1), ob.eq(cob), wa.eq(wa + 1),
                            obt.eq(cob + toff + 1),
                            bt.eq(Mux(last2, bb, bt + 1)),
                            ub.eq(Mux(last2, ub + bi, ub)),
                        ]
                    with m.Else():
                        m.d.sync += [tap.eq(0), ci0.eq(0)]
                        with m.If(~last0):
                            with m.If(mode_l1):
                                m.d.sync += [l0.eq(l0 + 1), wa.eq(wa + 1), ub.eq(ub + bi),
                                             bb.eq(bb + lay.bikk), bt.eq(bb + lay.bikk)]
                            with m.Else():
                                m.d.sync += [l0.eq(l0 + C), vb.eq(vb + bo), toff.eq(0), wo.eq(0),
                                             cob.eq(ob + stride), ob.eq(ob + stride),
                                             obt.eq(ob + stride)]
                        with m.Else():
                            m.d.sync += state.eq(Mux(issue_l1, _Issue.DRAIN_L1,
                                                     _Issue.DRAIN_MAIN))
        return m
