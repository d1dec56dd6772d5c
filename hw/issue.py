"""The conv engine's issue stage: layer control, weight loading and vector issue.

It takes a layer descriptor, checks it, starts the window feeder
(:class:`~hw.feeder.WindowFeeder`) and issues its activation vectors into the
systolic array (:class:`~hw.systolic.SystolicArray`) or the pool adder, each once
the PE bank it multiplies with holds its weight tile and its accumulator half (or
the pool sums) is free. Alongside, it moves the weight vectors of ``i_weights``
into the array's staging tile and on into a free PE bank.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from gen.config import KERNEL_SIZES, AcceleratorConfig
from gen.contract import ERR_DESCRIPTOR, ERR_WEIGHTS
from .feeder import feed_layout
from .interfaces import descriptor_layout, weight_stream_signature
from .systolic import lut_multiply

__all__ = ["IssueStage"]


class IssueStage(wiring.Component):
    """Descriptor check, weight loader and vector issue of the conv engine.

    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig`.
    issue_gap:
        Cycles from a vector's issue to the first issue of a vector of the same pixel,
        as the accumulators need (:attr:`hw.accumulator.Accumulators.issue_gap`).

    Ports
    -----
    accept, i_desc:
        A descriptor is taken in a cycle with ``accept`` (``i_desc.ready``); the
        offered payload is captured whatever its ``valid``.
    busy, in_layer, start, desc:
        ``busy`` from the cycle after a descriptor is taken until the layer is done;
        ``start`` pulses in its first cycle (the layer state everywhere resets), and
        two cycles later ``in_layer`` rises if ``desc``, the captured descriptor (held
        until the next one), passed the check.
    done, error, cycles, mac_cycles, stall_weights, stall_output, macs, ev_*:
        As :class:`hw.engine.ConvEngine`'s ports of those names.
    o_feed_start, i_vec, i_pixels:
        The feeder's ``start``, ``o_vec`` and output pixel count ``p``.
    i_weights, stage_en, stage_row, stage_w, xfer, xfer_bank:
        The weight stream, into the array's staging and transfer ports.
    rd_addr, i_rd_data:
        The activation banks' address for the vector being issued, and every bank's
        read register (``[buffer][bank]``) two cycles later.
    o_array_valid, o_pool_valid, o_vec, o_act:
        The vector entering the array (or the pool adder) and its activations (zero
        in masked rows), two cycles after its issue.
    half_busy, pool_free, claim, claim_half, pool_claim:
        The post reader's view of the accumulator halves and the pool sums: a vector
        that starts an output-channel tile waits for its half to be free and claims it
        (``claim``), one that starts a pooled channel tile waits for ``pool_free`` and
        claims the sums (``pool_claim``).
    res_read, layer_end:
        From the post reader: a residual read leaves for the banks this cycle (it takes
        the read port of a residual that is also the source, so the issue waits); the
        post reader has written the layer's last result.

    Timing
    ------
    A vector issues on a PE bank loaded in an earlier cycle, and enters the array two
    cycles after its issue (bank read, read register). Weight tiles stream back to
    back: a bank is refilled as soon as the last vector of its previous tile has
    crossed the array.
    """

    def __init__(self, config: AcceleratorConfig, *, issue_gap: int = 1):
        if not isinstance(issue_gap, int) or issue_gap < 1:
            raise ValueError(f"IssueStage issue_gap must be a positive integer, got {issue_gap!r}")
        self.config = config
        self.issue_gap = issue_gap
        R, C, NB = config.rows, config.cols, config.act_buffers
        counter = unsigned(config.counter_bits)
        vec = feed_layout(config)
        super().__init__({
            "accept": In(1),
            "i_desc": In(stream.Signature(descriptor_layout(config))),
            "busy": Out(1),
            "in_layer": Out(1),
            "start": Out(1),
            "desc": Out(descriptor_layout(config)),
            "done": Out(1),
            "error": Out(2),
            **{name: Out(counter) for name in ("cycles", "mac_cycles", "stall_weights",
                                               "stall_output", "macs")},
            "ev_mac_cycles": Out(1), "ev_stall_weights": Out(1), "ev_stall_output": Out(1),
            "ev_macs": Out(range(R * C + 1)),
            "o_feed_start": Out(1),
            "i_vec": In(stream.Signature(vec)),
            "i_pixels": In(range(config.max_h * config.max_w + 1)),
            "i_weights": In(weight_stream_signature(config)),
            "stage_en": Out(1),
            "stage_row": Out(range(R)),
            "stage_w": Out(data.ArrayLayout(signed(config.w_bits), C)),
            "xfer": Out(1),
            "xfer_bank": Out(1),
            "rd_addr": Out(vec["addr"].shape),
            "i_rd_data": In(data.ArrayLayout(data.ArrayLayout(signed(config.a_bits), R), NB)),
            "o_array_valid": Out(1),
            "o_pool_valid": Out(1),
            "o_vec": Out(vec),
            "o_act": Out(data.ArrayLayout(signed(config.a_bits), R)),
            "half_busy": In(2),
            "pool_free": In(1),
            "claim": Out(1),
            "claim_half": Out(1),
            "pool_claim": Out(1),
            "res_read": In(1),
            "layer_end": In(1),
        })

    def elaborate(self, platform):
        cfg = self.config
        m = Module()
        d = self.desc
        reset = self._control(m)
        loaded, release, release_bank = self._weights(m, reset)
        issue, vec = self._issue(m, reset, loaded)
        m.d.comb += [release.eq(issue & ~vec.pool & vec.tile_last), release_bank.eq(vec.sel)]
        m.d.comb += [self.claim.eq(issue & vec.cotile_first), self.claim_half.eq(vec.half),
                     self.pool_claim.eq(issue & vec.pool_first)]

        # Stages 1-2: bank read, registered data (hw.memory) -> array / pool adder. The
        # buffer select follows the read registers.
        s1, s2 = Signal(feed_layout(cfg)), Signal(feed_layout(cfg))
        s1_valid, s2_valid = Signal(), Signal()
        m.d.sync += [s1.eq(vec), s1_valid.eq(issue), s2.eq(s1), s2_valid.eq(s1_valid)]
        for r in range(cfg.rows):
            src = Array([self.i_rd_data[b][r] for b in range(cfg.act_buffers)])[d.src]
            m.d.comb += self.o_act[r].eq(Mux(s2.mask[r], src, 0))
        m.d.comb += [self.o_vec.eq(s2), self.o_array_valid.eq(s2_valid & ~s2.pool),
                     self.o_pool_valid.eq(s2_valid & s2.pool)]
        macs_inc = Signal(range(cfg.rows * cfg.cols + 1))
        m.d.sync += macs_inc.eq(Mux(s2_valid, lut_multiply(s2.rows_v, s2.cols_v), 0))
        with m.If(self.in_layer):
            m.d.sync += self.macs.eq(self.macs + macs_inc)
        m.d.comb += self.ev_macs.eq(Mux(self.in_layer, macs_inc, 0))
        with m.If(reset):
            m.d.sync += self.macs.eq(0)
        return m

    def _control(self, m):
        """Descriptor capture and check, and the layer's states; returns the layer
        reset (the first check cycle, from a register of its own)."""
        cfg = self.config
        NB = cfg.act_buffers
        d = self.desc
        conv_ok = (Cat(*[d.k == kk for kk in KERNEL_SIZES if kk <= cfg.max_k]).any()
                   & ((d.stride == 1) | (d.stride == 2)) & (d.pad <= (d.k >> 1))
                   & (d.co >= 1) & (d.co <= cfg.max_co)
                   & (d.h + (d.pad << 1) >= d.k) & (d.w + (d.pad << 1) >= d.k))
        desc_ok = ((d.ci >= 1) & (d.ci <= cfg.max_ci) & (d.h >= 1) & (d.h <= cfg.max_h)
                   & (d.w >= 1) & (d.w <= cfg.max_w)
                   & (d.src < NB) & (d.dst < NB) & (d.src != d.dst)
                   & (~d.has_res | ((d.res < NB) & (d.res != d.dst)))
                   & (d.op | conv_ok))
        # Layer features the config leaves out: the descriptor's fields for them are
        # taken as zero (their logic is then constant), and a descriptor that sets one
        # is refused.
        lacks = [fld for name, fld in (("pool", "op"), ("residual", "has_res"), ("level2", "has_l2"))
                 if not getattr(cfg, name)]
        lacking = Signal()
        desc_ok_r = Signal()
        reset = Signal()
        m.d.sync += [desc_ok_r.eq(desc_ok & ~lacking), reset.eq(0), self.done.eq(0),
                     self.o_feed_start.eq(0)]
        m.d.comb += [self.start.eq(reset), self.i_desc.ready.eq(self.accept)]

        IDLE, CHECK, LAYER = range(3)
        st = Signal(range(3))
        m.d.comb += self.busy.eq(st != IDLE)
        with m.Switch(st):
            with m.Case(IDLE):
                # The offered descriptor is captured whatever its valid, so that valid only
                # moves the state (a small fanout) and not every field.
                with m.If(self.accept):
                    m.d.sync += d.eq(self.i_desc.payload)
                    fields = [getattr(self.i_desc.payload, fld) for fld in lacks]
                    m.d.sync += [lacking.eq(Cat(*fields).any()), *(getattr(d, fld).eq(0) for fld in lacks)]
                    with m.If(self.i_desc.valid):
                        m.d.sync += [st.eq(CHECK), reset.eq(1)]
            with m.Case(CHECK):
                m.d.sync += self.cycles.eq(self.cycles + 1)
                # The first check cycle resets the layer state, the second acts on the
                # registered descriptor check: its comparisons and the wide reset never
                # share a cycle.
                with m.If(~reset):
                    with m.If(desc_ok_r):
                        m.d.sync += [st.eq(LAYER), self.in_layer.eq(1), self.o_feed_start.eq(1)]
                    with m.Else():
                        m.d.sync += [self.error.eq(self.error | ERR_DESCRIPTOR), self.done.eq(1),
                                     st.eq(IDLE)]
            with m.Case(LAYER):
                m.d.sync += self.cycles.eq(self.cycles + 1)
                with m.If(self.layer_end):
                    m.d.sync += [self.done.eq(1), st.eq(IDLE), self.in_layer.eq(0)]
        return reset

    def _weights(self, m, reset):
        """The weight loader: stream -> staging tile -> PE bank. Returns the banks'
        ``loaded`` flags, and ``release`` and ``release_bank`` to drive: the vector just
        issued was the last of its tile on that bank."""
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        d = self.desc
        chan_shape = unsigned(max(cfg.max_ci, cfg.max_co).bit_length())
        active = Signal()
        stg_count = Signal(range(R + 1))
        w_tap = Signal(range(cfg.max_k * cfg.max_k))
        kk_m1 = Signal(range(cfg.max_k * cfg.max_k))
        rows_left = Signal(chan_shape)
        cols_left = Signal(chan_shape)
        xp = Signal()
        loaded = Signal(2)
        drain = [Signal(range(C + 3), name=f"drain_{b}") for b in range(2)]
        release, rel_bank = Signal(), Signal()

        bank_free = [~loaded[b] & (drain[b] == 0) for b in range(2)]
        xfer_now = Signal()
        # stg_count reaches R only while a layer stages weights (the reset clears it), so
        # the transfer needs no in_layer term: that register fans out across the engine.
        m.d.comb += xfer_now.eq((stg_count == R) & Mux(xp, bank_free[1], bank_free[0]))
        w_ready = self.in_layer & active & ((stg_count < R) | xfer_now)
        m.d.comb += self.i_weights.ready.eq(w_ready)
        w_fire = self.i_weights.valid & w_ready
        w_row = Mux(xfer_now, 0, stg_count)
        final_tile = (w_tap == kk_m1) & (rows_left <= R) & (cols_left <= C)
        # The staging writes and the transfer reach the array one cycle after they are
        # decided, from registers: the row decode and the weights fan out to all
        # rows x cols PEs, the transfer to every bank. Both move by the same cycle, so
        # their order is kept; the bank bookkeeping below stays on the decision cycle,
        # which only makes it a cycle more cautious.
        m.d.sync += [self.stage_en.eq(w_fire), self.stage_row.eq(w_row),
                     self.stage_w.eq(self.i_weights.payload.w),
                     self.xfer.eq(xfer_now), self.xfer_bank.eq(xp)]
        m.d.sync += stg_count.eq(w_row + w_fire)
        for b in range(2):
            with m.If(drain[b] != 0):
                m.d.sync += drain[b].eq(drain[b] - 1)
        with m.If(w_fire):
            with m.If(self.i_weights.payload.last != (final_tile & (w_row == R - 1))):
                m.d.sync += self.error.eq(self.error | ERR_WEIGHTS)
            with m.If(w_row == R - 1):
                with m.If(w_tap != kk_m1):
                    m.d.sync += w_tap.eq(w_tap + 1)
                with m.Else():
                    m.d.sync += w_tap.eq(0)
                    with m.If(rows_left > R):
                        m.d.sync += rows_left.eq(rows_left - R)
                    with m.Else():
                        m.d.sync += [rows_left.eq(d.ci), cols_left.eq(cols_left - C)]
                        with m.If(cols_left <= C):
                            m.d.sync += active.eq(0)
        with m.If(xfer_now):
            m.d.sync += [loaded.bit_select(xp, 1).eq(1), xp.eq(~xp)]
        with m.If(release):
            # Issued at T, this vector enters the array at T + 2 and reads PE[r][cols-1] at
            # T + r + cols + 2; a transfer at X writes row r at the end of X + r. The bank
            # may be refilled from X = T + 2 + cols: drain counts cols + 1 cycles.
            m.d.sync += loaded.bit_select(rel_bank, 1).eq(0)
            for b in range(2):
                with m.If(rel_bank == b):
                    m.d.sync += drain[b].eq(C + 1)
        with m.If(reset):
            m.d.sync += [active.eq(~d.op), stg_count.eq(0), xp.eq(0), loaded.eq(0),
                         drain[0].eq(0), drain[1].eq(0), w_tap.eq(0), rows_left.eq(d.ci),
                         cols_left.eq(d.co)]
            with m.Switch(d.k):
                for kk in KERNEL_SIZES:
                    if kk <= cfg.max_k:
                        with m.Case(kk):
                            m.d.sync += kk_m1.eq(kk * kk - 1)
        return loaded, release, rel_bank

    def _issue(self, m, reset, loaded):
        """A skid buffer after the feeder, then the issue decision; returns the issue
        strobe and the vector issued."""
        cfg = self.config
        d = self.desc
        in_layer = self.in_layer
        # Two entries make the feeder's ready a register, so the issue decision never
        # reaches the feeder's loop logic in the same cycle.
        vec = Signal(feed_layout(cfg))
        vec_valid = Signal()
        skid = Signal(feed_layout(cfg))
        skid_valid = Signal()
        m.d.comb += self.rd_addr.eq(vec.addr)
        res_is_src = Signal()
        # A vector issues on a bank loaded in an earlier cycle: the transfer decision
        # (staging count, drain counters) and the issue decision never share a cycle.
        # Issued at X + 1 after a transfer decided at X (which writes row r at the end
        # of X + 1 + r), a vector reads row r at X + r + 3 at the earliest. This costs
        # cycles only where the array waits for weights.
        w_ok = Mux(vec.pool, 1, Mux(vec.sel, loaded[1], loaded[0]))
        acc_ok = Mux(vec.pool, ~vec.pool_first | self.pool_free,
                     ~vec.cotile_first | ~Mux(vec.half, self.half_busy[1], self.half_busy[0]))
        # A residual read in the source buffer takes the banks' read port this cycle.
        res_block = self.res_read & res_is_src
        go = in_layer & w_ok & acc_ok & ~res_block
        issue = Signal()
        if self.issue_gap > 1:
            # (Accumulators without forwarding) a vector reads its accumulator word only
            # once every vector before it has written it back. The vectors of a tile take
            # its pixels in order, each once, so a pixel comes back no sooner than the
            # map's pixel count of cycles later; after each tile, idle cycles make up the
            # rest on small maps.
            gap = Signal(range(self.issue_gap))
            with m.If(gap != 0):
                m.d.sync += gap.eq(gap - 1)
            go = go & (gap == 0)
            with m.If(issue & ~vec.pool & vec.tile_last & (self.i_pixels < self.issue_gap)):
                m.d.sync += gap.eq(self.issue_gap - self.i_pixels)
        m.d.comb += issue.eq(vec_valid & go)

        m.d.comb += self.i_vec.ready.eq(in_layer & ~skid_valid)
        feed = self.i_vec.valid & self.i_vec.ready
        with m.If(issue):
            with m.If(skid_valid):
                m.d.sync += [vec.eq(skid), skid_valid.eq(0)]
            with m.Elif(feed):
                m.d.sync += vec.eq(self.i_vec.payload)
            with m.Else():
                m.d.sync += vec_valid.eq(0)
        with m.Elif(feed):
            with m.If(vec_valid):
                m.d.sync += [skid.eq(self.i_vec.payload), skid_valid.eq(1)]
            with m.Else():
                m.d.sync += [vec.eq(self.i_vec.payload), vec_valid.eq(1)]

        # The counters add registered events: one cycle late, off the issue path.
        ev_stall_w, ev_stall_o, ev_mac = Signal(), Signal(), Signal()
        m.d.sync += [ev_stall_w.eq(in_layer & vec_valid & ~w_ok),
                     ev_stall_o.eq(in_layer & vec_valid & w_ok & (~acc_ok | res_block)),
                     ev_mac.eq(issue & ~vec.pool)]
        with m.If(in_layer):
            m.d.sync += [self.stall_weights.eq(self.stall_weights + ev_stall_w),
                         self.stall_output.eq(self.stall_output + ev_stall_o),
                         self.mac_cycles.eq(self.mac_cycles + ev_mac)]
        m.d.comb += [self.ev_mac_cycles.eq(in_layer & ev_mac),
                     self.ev_stall_weights.eq(in_layer & ev_stall_w),
                     self.ev_stall_output.eq(in_layer & ev_stall_o)]
        with m.If(reset):
            # The counters restart (this cycle counts) and the error clears.
            m.d.sync += [self.mac_cycles.eq(0), self.stall_weights.eq(0), self.stall_output.eq(0),
                         self.cycles.eq(1), self.error.eq(0)]
            m.d.sync += [vec_valid.eq(0), skid_valid.eq(0),
                         res_is_src.eq(d.has_res & (d.res == d.src))]
        return issue, vec
