"""The conv engine's post reader: accumulated results through the requantizer into the banks.

Once an output-channel tile's sums are complete in an accumulator half (or a
pooled channel tile's sums in the pool adder), the post reader reads them out in
groups of ``lanes`` channels, every pixel of a group in turn, with each channel's
constants (``i_chan``: :func:`hw.engine.channel_layout`) and, for a residual
layer, the residual operand from its activation buffer. The requantizer
(:mod:`hw.postproc`) turns them into activations, which the post reader writes
into the destination buffer's banks. It also keeps the bookkeeping of which
accumulator half (and the pool sums) the issue stage may start filling.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from gen.contract import channel_layout
from .feeder import bank_depth
from .interfaces import descriptor_layout
from .memory import BlockMemory
from .postproc import requantizer_class

__all__ = ["PostReader", "requant_tag_layout"]


def requant_tag_layout(config: AcceleratorConfig) -> data.StructLayout:
    """What travels with a result through the requantizer: its bank address and the
    lane group ``gi`` (bank ``gi * lanes + lane`` of the destination buffer)."""
    return data.StructLayout({
        "addr": unsigned(max(1, (bank_depth(config) - 1).bit_length())),
        "gi": range(max(2, config.rows // config.requant_lanes)),
    })


class PostReader(wiring.Component):
    """Drains accumulator halves and pool sums through a requantizer into the banks.

    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig`.
    requantizer:
        The requantizer class (:func:`hw.postproc.requantizer_class` by default),
        instantiated with ``config.requant_lanes`` lanes.

    Ports
    -----
    start, in_layer, desc:
        ``start`` resets the layer state; ``desc`` (``op``, ``ci``, ``co``, ``has_res``,
        ``res``, ``dst`` and the requant fields) is held from ``start`` to the layer's
        end; constants are taken and results read only while ``in_layer``.
    i_pixels:
        The layer's output pixel count (the feeder's ``p``), stable from the cycle
        after ``start``.
    i_chan:
        The layer's per-output-channel constants, in channel order.
    claim, claim_half, pool_claim, half_busy, pool_free:
        The issue stage claims an accumulator half (``claim``) or the pool sums
        (``pool_claim``) with the first vector of a tile; the post reader frees the half
        (``half_busy``) or the sums (``pool_free``) once it has read them.
    i_full, i_full_half, i_pool_done:
        A tile's sums are complete in an accumulator half, or in the pool adder.
    acc_rd_en, acc_rd_half, acc_rd_addr, i_acc_data:
        The accumulator read (:class:`~hw.accumulator.Accumulators`), and both halves'
        read registers two cycles later.
    i_pool_sum:
        The pool adder's sums.
    res_read, res_rd_en, res_rd_addr, i_rd_data:
        ``res_read`` pulses the cycle the residual reads of a pixel group leave: bank
        ``res_rd_en`` (one-hot, bit ``buffer * rows + bank``) reads ``res_rd_addr``;
        ``i_rd_data`` is every bank's read register (``[buffer][bank]``).
    wb_en, wb_addr, wb_data:
        The results' writes: bank ``b * rows + r`` writes ``wb_data[r]`` at ``wb_addr``
        when bit ``b * rows + r`` of ``wb_en`` is set.
    done:
        High once the last result of the layer is written.

    Timing
    ------
    P0: a registered read decision, the block RAM addresses; P1: the block RAM read;
    P2: the memories' read registers and the lane select; then the requantizer's
    latency to the writes. The group-end decisions come from registers: a group end is
    followed by a cycle without a read, in which they catch up.
    """

    def __init__(self, config: AcceleratorConfig, requantizer: type | None = None):
        self.config = config
        R, C, NB = config.rows, config.cols, config.act_buffers
        self.lanes = config.requant_lanes
        self.tag_layout = requant_tag_layout(config)
        self.requant = (requantizer or requantizer_class(config))(config, self.lanes,
                                                                  self.tag_layout)
        self.const_depth = -(-max(config.max_ci, config.max_co) // self.lanes)
        max_p = config.max_h * config.max_w
        acc_words = data.ArrayLayout(signed(config.acc_bits), C)
        acts = data.ArrayLayout(signed(config.a_bits), R)
        super().__init__({
            "start": In(1),
            "in_layer": In(1),
            "desc": In(descriptor_layout(config)),
            "i_pixels": In(range(max_p + 1)),
            "i_chan": In(stream.Signature(channel_layout(config))),
            "claim": In(1),
            "claim_half": In(1),
            "pool_claim": In(1),
            "half_busy": Out(2),
            "pool_free": Out(1),
            "i_full": In(1),
            "i_full_half": In(1),
            "i_pool_done": In(1),
            "acc_rd_en": Out(1),
            "acc_rd_half": Out(1),
            "acc_rd_addr": Out(range(max_p + 1)),
            "i_acc_data": In(data.ArrayLayout(acc_words, 2)),
            "i_pool_sum": In(data.ArrayLayout(signed(config.acc_bits), R)),
            "res_read": Out(1),
            "res_rd_en": Out(NB * R),
            "res_rd_addr": Out(self.tag_layout["addr"].shape),
            "i_rd_data": In(data.ArrayLayout(acts, NB)),
            "wb_en": Out(NB * R),
            "wb_addr": Out(self.tag_layout["addr"].shape),
            "wb_data": Out(acts),
            "done": Out(1),
        })

    def elaborate(self, platform):
        cfg = self.config
        R, C, G, NB = cfg.rows, cfg.cols, self.lanes, cfg.act_buffers
        max_ch = max(cfg.max_ci, cfg.max_co)
        groups_r, groups_c = R // G, C // G
        d = self.desc
        is_pool = d.op
        n_out = Mux(is_pool, d.ci, d.co)
        m = Module()
        m.submodules.requant = rq = self.requant

        cg = Signal(range(self.const_depth + 2))    # the group's constants' address
        cg_q = Signal.like(cg)
        chan_cnt, const_q = self._constants(m, n_out, cg_q)

        # The halves and the pool sums: claimed by the issue stage, filled, then freed
        # here (the frees come after the claims and fills, so that they take precedence).
        half_full, pool_ready = Signal(2), Signal()
        with m.If(self.claim):
            m.d.sync += self.half_busy.bit_select(self.claim_half, 1).eq(1)
        with m.If(self.pool_claim):
            m.d.sync += self.pool_free.eq(0)
        with m.If(self.i_pool_done):
            m.d.sync += pool_ready.eq(1)
        with m.If(self.i_full):
            m.d.sync += half_full.bit_select(self.i_full_half, 1).eq(1)

        active, done = Signal(), Signal()
        base = Signal(range(max_ch + 2 * G + 1))
        gi = Signal(range(max(2, groups_r)))
        cbhw = Signal(self.tag_layout["addr"].shape)
        j = Signal(range(max(2, groups_r, groups_c)))
        p = Signal(range(cfg.max_h * cfg.max_w + 1))
        half = Signal()
        group_moved = Signal()
        # The pixel count and its last index, from registers (fixed during a layer; the
        # bubble after the reset covers the update).
        p_out, p_last = Signal.like(self.i_pixels), Signal.like(self.i_pixels)
        m.d.sync += [p_out.eq(Mux(is_pool, 1, self.i_pixels)),
                     p_last.eq(Mux(is_pool, 1, self.i_pixels) - 1)]
        tile_avail = Mux(is_pool, pool_ready, Mux(half, half_full[1], half_full[0]))
        # Whether a group's constants have arrived is checked on last cycle's values (off
        # the critical path): chan_cnt only grows, and base only moves when a group ends,
        # after which one bubble lets the check catch up.
        chan_ok = Signal()
        m.d.sync += chan_ok.eq((chan_cnt >= base + G) | (chan_cnt == n_out))
        fire = Signal()
        m.d.comb += fire.eq(self.in_layer & active & tile_avail & chan_ok & ~group_moved)
        # The reads (accumulators, constants, residuals) leave a cycle after the
        # decision, from registers: the decision logic then never reaches the activation
        # banks' shared read address.
        m.d.sync += self.res_read.eq(fire & d.has_res)
        p_q = Signal.like(p)
        m.d.sync += [p_q.eq(p), cg_q.eq(cg)]

        # Groups of G channels, every pixel. The group-end decisions come from registers:
        # base and j move only when a group ends (or a layer starts), and a bubble
        # (group_moved) follows every move.
        groups_m1 = Mux(is_pool, groups_r - 1, groups_c - 1)
        last_group, j_last = Signal(), Signal()
        m.d.sync += [last_group.eq(base + G >= n_out), j_last.eq(j == groups_m1)]
        lane_en = Signal(G)
        m.d.comb += [lane_en[g].eq(base + g < n_out) for g in range(G)]
        m.d.sync += group_moved.eq(0)
        with m.If(fire):
            with m.If(p != p_last):
                m.d.sync += p.eq(p + 1)
            with m.Else():
                m.d.sync += [p.eq(0), base.eq(base + G), cg.eq(cg + 1), group_moved.eq(1)]
                with m.If(gi == groups_r - 1):
                    m.d.sync += [gi.eq(0), cbhw.eq(cbhw + p_out)]
                with m.Else():
                    m.d.sync += gi.eq(gi + 1)
                with m.If(j_last | last_group):
                    m.d.sync += j.eq(0)
                    with m.If(is_pool):
                        m.d.sync += [pool_ready.eq(0), self.pool_free.eq(1)]
                    with m.Else():
                        m.d.sync += [half_full.bit_select(half, 1).eq(0),
                                     self.half_busy.bit_select(half, 1).eq(0), half.eq(~half)]
                with m.Else():
                    m.d.sync += j.eq(j + 1)
                with m.If(last_group):
                    m.d.sync += [active.eq(0), done.eq(1)]

        post_layout = data.StructLayout({"valid": 1, "pool": 1, "half": 1, "j": j.shape(),
                                         "gi": gi.shape(), "lanes": G, "tag": self.tag_layout})
        p0, p1, p2 = Signal(post_layout), Signal(post_layout), Signal(post_layout)
        m.d.comb += [self.acc_rd_en.eq(p0.valid & ~p0.pool), self.acc_rd_half.eq(p0.half),
                     self.acc_rd_addr.eq(p_q)]
        m.d.sync += [p0.valid.eq(fire), p0.pool.eq(is_pool), p0.half.eq(half), p0.j.eq(j),
                     p0.gi.eq(gi), p0.lanes.eq(lane_en), p0.tag.addr.eq(cbhw + p),
                     p0.tag.gi.eq(gi), p1.eq(p0), p2.eq(p1)]
        m.d.sync += [self.res_rd_en[b * R + r].eq(fire & d.has_res & (d.res == b) & (gi == r // G))
                     for b in range(NB) for r in range(R)]
        m.d.comb += self.res_rd_addr.eq(p0.tag.addr)
        res_q = [Array([self.i_rd_data[b][r] for b in range(NB)])[d.res] for r in range(R)]
        acc_q = self.i_acc_data
        for g in range(G):
            conv_acc = Array([Mux(p2.half, acc_q[1][jj * G + g], acc_q[0][jj * G + g])
                              for jj in range(groups_c)])[p2.j]
            pool_acc = Array([self.i_pool_sum[jj * G + g] for jj in range(groups_r)])[p2.j]
            m.d.comb += [
                rq.i_acc[g].eq(Mux(p2.pool, pool_acc, conv_acc)),
                rq.i_mult[g].eq(const_q[g].mult),
                rq.i_bias[g].eq(const_q[g].bias),
                rq.i_res[g].eq(Array([res_q[k * G + g] for k in range(groups_r)])[p2.gi]),
            ]
        m.d.comb += [rq.i_valid.eq(p2.valid), rq.i_lanes.eq(p2.lanes), rq.i_tag.eq(p2.tag)]
        # The layer's requant settings, from registers next to the requantizer: the
        # descriptor is fixed from the first check cycle, two cycles before the layer.
        m.d.sync += [rq.shift.eq(d.shift), rq.relu.eq(d.relu), rq.has_res.eq(d.has_res),
                     rq.m_res.eq(d.m_res)]
        m.d.comb += self.done.eq(done & ~p0.valid & ~p1.valid & ~p2.valid & ~rq.busy)

        # Write-back: lane g of group gi is bank gi * G + g of the destination buffer.
        m.d.comb += [self.wb_addr.eq(rq.o_tag.addr),
                     *(self.wb_data[r].eq(rq.o_y[r % G]) for r in range(R)),
                     *(self.wb_en[b * R + r].eq(rq.o_valid & rq.o_lanes[r % G]
                                                & (rq.o_tag.gi == r // G) & (d.dst == b))
                       for b in range(NB) for r in range(R))]

        with m.If(self.start):
            m.d.sync += [self.half_busy.eq(0), half_full.eq(0), self.pool_free.eq(1),
                         pool_ready.eq(0), active.eq(1), done.eq(0), base.eq(0), cg.eq(0),
                         gi.eq(0), cbhw.eq(0), j.eq(0), p.eq(0), half.eq(0), group_moved.eq(1)]
        return m

    def _constants(self, m, n_out, rd_addr):
        """The per-channel constants: ``i_chan`` into ``lanes`` memories (channel
        ``c`` in memory ``c mod lanes`` at ``c // lanes``), read at ``rd_addr``.
        Returns the count of constants taken and the memories' read registers."""
        cfg = self.config
        G = self.lanes
        max_ch = max(cfg.max_ci, cfg.max_co)
        chan_cnt = Signal(range(max_ch + 1))
        chan_open = Signal()
        n_out_m1 = Signal(range(max_ch + 1))
        lane = Signal(range(max(2, G)))
        addr = Signal(range(self.const_depth + 1))
        # Ready is two registers ANDed: whether more constants are due is decided a
        # cycle ahead against the registered channel count of the layer.
        m.d.comb += self.i_chan.ready.eq(self.in_layer & chan_open)
        fire = self.i_chan.valid & self.i_chan.ready
        # The writes leave from registers (the memories sit across the die); the read
        # decision checks the channel count a cycle late, so it never reads ahead.
        # (compact, for a slower clock: straight from the stream.)
        wr = m.d.comb if cfg.compact else m.d.sync
        data_q = []
        for g in range(G):
            mem = BlockMemory(channel_layout(cfg), 1, self.const_depth, name=f"const_{g}")
            m.submodules[f"const_{g}"] = mem
            wp, rp = mem.write_port(), mem.read_port()
            wr += [wp.en.eq(fire & (lane == g)), wp.addr.eq(addr), wp.data.eq(self.i_chan.payload)]
            m.d.comb += rp.addr.eq(rd_addr)
            data_q.append(rp.data)
        with m.If(fire):
            m.d.sync += [chan_cnt.eq(chan_cnt + 1), chan_open.eq(chan_cnt != n_out_m1)]
            with m.If(lane == G - 1):
                m.d.sync += [lane.eq(0), addr.eq(addr + 1)]
            with m.Else():
                m.d.sync += lane.eq(lane + 1)
        with m.If(self.start):
            m.d.sync += [chan_cnt.eq(0), chan_open.eq(1), n_out_m1.eq(n_out - 1), lane.eq(0),
                         addr.eq(0)]
        return chan_cnt, data_q
