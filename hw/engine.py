"""The systolic conv engine: activation memories, window feeder, array, accumulators, requant.

Dataflow (weight-stationary, see :mod:`hw.systolic`)::

    act banks --feeder--> SystolicArray --> accumulator half A/B --> Requantizer --> act banks
        \\--> PoolAccumulator -------------------------------------^
    weight vectors --> staging tile --transfer wave--> PE bank 0/1

* **Activation memories.** ``act_buffers`` buffers, each split into ``rows``
  banks by channel (channel ``c`` in bank ``c mod rows`` at
  ``(c // rows) * H * W + pixel``), so one vector of ``rows`` input channels is
  one read per bank. Each bank has one read and one write port.
* **Weights.** Tiles arrive as ``rows`` weight vectors each
  (:mod:`hw.interfaces` order) into the staging tile, then move into the PE
  bank the tile's activations will select. A bank is refilled as soon as the
  last vector of its previous tile has crossed the array, so weight tiles
  stream back to back without stalls while an output map has at least
  ``max(rows, cols)`` pixels (``rows``: one weight vector arrives per cycle).
* **Accumulators.** Two halves of ``max_h * max_w`` words of ``cols``
  accumulators. An output-channel tile accumulates into one half, one word per
  cycle (the read leaves two cycles early and its data is registered; the
  most recent sums are forwarded, or with ``compact`` a pixel's vectors are kept
  ``ACC_GAP`` cycles apart), while the other half is requantized and
  written back: the post-processing of a tile is hidden behind the compute of
  the next.
* **Timing.** Every block RAM output goes straight into a register (ECP5 block
  RAM is mapped without its output register and is slow to its output), and
  the feeder hands vectors over through a two-entry skid buffer, so that the
  issue decision does not reach the feeder's loop logic in the same cycle.
* **Post-processing.** ``gcd(rows, cols)`` requant lanes per cycle (one with
  ``compact``); lane channels are consecutive so their write-back banks never
  collide. The
  residual operand is read from its buffer in the same banked layout; if it
  shares the source buffer, the residual read wins the port and the feeder
  waits one cycle.
* **Pool.** A ``pool`` descriptor sums each group of ``rows`` channels over the
  map in :class:`~hw.postproc.PoolAccumulator` and requantizes the sums.

Interfaces
----------
``i_desc`` (:func:`hw.interfaces.descriptor_layout`) starts a layer; ``i_weights``
(:func:`hw.interfaces.weight_stream_signature`) delivers its weight vectors;
``i_chan`` (:func:`channel_layout`) its per-output-channel multiplier and bias,
in channel order (``co`` entries, ``ci`` for a pool). ``i_host``
(:func:`host_command_layout`) moves a ``[channels, pixels]`` tensor in CHW
order between a buffer and ``i_load`` / ``o_read`` (a command with no
channels or pixels, or naming a buffer past ``act_buffers``, is ignored); host
commands and descriptors are accepted while idle, on alternate cycles. Every
``ready`` of an input stream depends only on the engine's state, never on the
same cycle's ``valid``.

Descriptor fields ``has_l1``, ``has_l2``, ``bi``, ``bo`` and ``w_shift`` belong to
the generation unit and are ignored here (but for ``has_l2`` without ``level2``),
as are ``k``, ``stride``, ``pad`` and ``co`` of a pool. The engine rejects what it can check cheaply (kernel size,
stride, padding, channel and map limits, buffer numbers, a destination that is
also the source or the residual, a layer feature the config leaves out:
``pool``, ``residual`` or ``level2``); :func:`check_layer` also checks that the
tensors fit a buffer, which the hardware does not.

After a layer, ``done`` pulses and ``cycles``, ``mac_cycles`` (cycles a vector
entered the array), ``stall_weights`` (a vector waited for its PE weights),
``stall_output`` (a vector waited for an accumulator half, the pool adder or
the residual port) and ``macs`` (multiply-accumulates: rows of real input
channels times columns of real output channels per vector, padding taps
included as in ``LayerSpec.macs``; for a pool, one addition per channel and
pixel) hold the layer's counts. A config without ``layer_log`` also has
``ev_mac_cycles``, ``ev_stall_weights``, ``ev_stall_output`` and ``ev_macs``:
what each of those counts adds in the current cycle.
``error`` holds :data:`ERR_DESCRIPTOR` (the descriptor was rejected and the
layer skipped) and :data:`ERR_WEIGHTS` (a weight vector's ``last`` flag was
not where the layer's shape puts it).
"""

from __future__ import annotations


from amaranth.hdl import Array, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from gen.config import KERNEL_SIZES, AcceleratorConfig, clog2
from .feeder import WindowFeeder, bank_depth, feed_layout
from .interfaces import descriptor_layout, weight_stream_signature
from .memory import BlockMemory
from .postproc import PoolAccumulator, Requantizer
from .systolic import PE_MULTIPLIERS, SystolicArray, lut_multiply

__all__ = ["ConvEngine", "channel_layout", "host_command_layout", "check_layer",
           "ERR_DESCRIPTOR", "ERR_WEIGHTS", "bank_depth"]

ERR_DESCRIPTOR = 1
ERR_WEIGHTS = 2
# (compact) Cycles from a vector's issue to the first issue at which another vector may
# read the accumulator word it writes: its read leaves three stages before the
# accumulate stage, the sum is written the stage after, and a block RAM read must take
# its address after the write (hw.memory). Without compact the last four sums are
# forwarded instead.
ACC_GAP = 5


def _max_channels(config: AcceleratorConfig) -> int:
    return max(config.max_ci, config.max_co)


def channel_layout(config: AcceleratorConfig) -> data.StructLayout:
    """Per-output-channel requant constants: signed multiplier and bias (product domain)."""
    return data.StructLayout({"mult": signed(config.m_bits), "bias": signed(config.bias_bits)})


def host_command_layout(config: AcceleratorConfig) -> data.StructLayout:
    """A host transfer: ``write`` (1: load via ``i_load``, 0: read via ``o_read``),
    buffer ``buf``, and the tensor's ``channels`` and ``pixels`` (H * W)."""
    return data.StructLayout({
        "write": unsigned(1),
        "buf": unsigned(max(1, clog2(config.act_buffers))),
        "channels": unsigned(_max_channels(config).bit_length()),
        "pixels": unsigned((config.max_h * config.max_w).bit_length()),
    })


def check_layer(config: AcceleratorConfig, *, op: str, ci: int, co: int, h: int, w: int,
                k: int = 1, stride: int = 1, pad: int = 0, src: int = 0, dst: int = 1,
                res: int | None = None, name: str = "layer") -> None:
    """Raise ``ValueError`` naming the field if the engine cannot run this layer.

    Checks what the hardware rejects (:data:`ERR_DESCRIPTOR`) and what it cannot
    detect: that the input, output and residual tensors fit a buffer's banks.
    """
    def bad(field, value, accepted):
        raise ValueError(f"{name}: {field} = {value!r} unsupported; accepted: {accepted}")

    if op not in ("conv", "pool"):
        bad("op", op, "conv, pool")
    for name in config.lacks(op=op, has_l2=False, has_res=res is not None):
        bad("op" if name == "pool" else "res", op if name == "pool" else res,
            f"a layer without {name} ({name} = false in the config)")
    for field, value, hi in (("ci", ci, config.max_ci), ("h", h, config.max_h), ("w", w, config.max_w)):
        if not 1 <= value <= hi:
            bad(field, value, f"1..{hi}")
    for field, value in (("src", src), ("dst", dst)) + ((("res", res),) if res is not None else ()):
        if not 0 <= value < config.act_buffers:
            bad(field, value, f"0..{config.act_buffers - 1}")
    if dst == src or (res is not None and dst == res):
        bad("dst", dst, "a buffer other than src and res")
    if op == "conv":
        if not 1 <= co <= config.max_co:
            bad("co", co, f"1..{config.max_co}")
        if k not in KERNEL_SIZES or k > config.max_k:
            bad("k", k, ", ".join(str(x) for x in KERNEL_SIZES if x <= config.max_k))
        if stride not in (1, 2):
            bad("stride", stride, "1, 2")
        if not 0 <= pad <= k // 2:
            bad("pad", pad, f"0..{k // 2}")
        if h + 2 * pad < k or w + 2 * pad < k:
            bad("k", k, f"at most the padded map {h + 2 * pad}x{w + 2 * pad}")
        ho, wo, cout = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, co
    else:
        ho, wo, cout = 1, 1, ci
    depth = bank_depth(config)
    for what, ch, pix in (("input", ci, h * w), ("output", cout, ho * wo)):
        need = -(-ch // config.rows) * pix
        if need > depth:
            raise ValueError(f"{name}: {what} tensor {ch}x{pix} needs {need} entries per bank, "
                             f"a bank holds {depth} (raise act_depth)")


class ConvEngine(wiring.Component):
    """The conv engine of one :class:`~gen.config.AcceleratorConfig` (see the module doc).

    Parameters
    ----------
    config:
        Elaboration parameters; layer shapes are run-time descriptor fields.
    pe_mult:
        PE multiplier style, passed to :class:`~hw.systolic.SystolicArray`.

    Raises
    ------
    ValueError
        If ``pe_mult`` is not one of :data:`hw.systolic.PE_MULTIPLIERS`.
    """

    def __init__(self, config: AcceleratorConfig, *, pe_mult: str = "infer"):
        if pe_mult not in PE_MULTIPLIERS:
            raise ValueError(f"pe_mult {pe_mult!r} unsupported; accepted: {', '.join(PE_MULTIPLIERS)}")
        self.config = config
        self.pe_mult = pe_mult
        self.lanes = config.requant_lanes
        self.bank_depth = bank_depth(config)
        self.feeder = WindowFeeder(config)
        self.array = SystolicArray(config, pe_mult=pe_mult)
        groups_r = config.rows // self.lanes
        self.requant = Requantizer(config, self.lanes, data.StructLayout({
            "addr": unsigned(max(1, (self.bank_depth - 1).bit_length())),
            "gi": range(max(2, groups_r)),
        }))
        self.pool = PoolAccumulator(config)
        counter = unsigned(config.counter_bits)
        super().__init__({
            "i_desc": In(stream.Signature(descriptor_layout(config))),
            "i_weights": In(weight_stream_signature(config)),
            "i_chan": In(stream.Signature(channel_layout(config))),
            "i_host": In(stream.Signature(host_command_layout(config))),
            "i_load": In(stream.Signature(signed(config.a_bits))),
            "o_read": Out(stream.Signature(signed(config.a_bits))),
            "busy": Out(1),
            "done": Out(1),
            "error": Out(2),
            "cycles": Out(counter),
            "mac_cycles": Out(counter),
            "stall_weights": Out(counter),
            "stall_output": Out(counter),
            "macs": Out(counter),
            # Without a layer log nothing needs a layer's counts: the events themselves,
            # for counters that add them as they come (hw.accelerator).
            **({} if config.layer_log else {
                "ev_mac_cycles": Out(1), "ev_stall_weights": Out(1), "ev_stall_output": Out(1),
                "ev_macs": Out(range(config.rows * config.cols + 1))}),
        })

    def elaborate(self, platform):
        cfg = self.config
        R, C, G, A = cfg.rows, cfg.cols, self.lanes, cfg.a_bits
        NB = cfg.act_buffers
        max_p = cfg.max_h * cfg.max_w
        max_ch = _max_channels(cfg)
        addr_shape = unsigned(max(1, (self.bank_depth - 1).bit_length()))
        chan_shape = unsigned(max_ch.bit_length())
        groups_r, groups_c = R // G, C // G
        m = Module()

        m.submodules.feeder = feeder = self.feeder
        m.submodules.array = array = self.array
        m.submodules.requant = rq = self.requant
        m.submodules.pool = pool = self.pool
        tag_layout = rq.tag_shape

        # ---- memories ------------------------------------------------------------------
        act_rp, act_wp = [], []
        for b in range(NB):
            rps, wps = [], []
            for r in range(R):
                mem = BlockMemory(signed(A), 1, self.bank_depth, name=f"act_{b}_{r}")
                m.submodules[f"act_{b}_{r}"] = mem
                wps.append(mem.write_port())
                rps.append(mem.read_port())
            act_rp.append(rps)
            act_wp.append(wps)

        # Accumulators, two halves: a half is either accumulated into (read-modify-write)
        # or drained by the post reader, never both at once (the issue stage starts a
        # co tile in a half only once the post reader has left it), so one read port
        # per half serves both.
        acc_rp, acc_wp = [], []
        for h in range(2):
            mem = BlockMemory(signed(cfg.acc_bits), C, max_p, name=f"acc_{h}")
            m.submodules[f"acc_{h}"] = mem
            wp = mem.write_port()
            acc_wp.append(wp)
            acc_rp.append(mem.read_port())

        const_depth = -(-max_ch // G)
        const_rp, const_wp = [], []
        for g in range(G):
            mem = BlockMemory(channel_layout(cfg), 1, const_depth, name=f"const_{g}")
            m.submodules[f"const_{g}"] = mem
            const_wp.append(mem.write_port())
            const_rp.append(mem.read_port())

        # ---- top-level state -----------------------------------------------------------
        IDLE, HOST, CHECK, LAYER = range(4)
        st = Signal(range(4))
        turn = Signal()
        desc = Signal(descriptor_layout(cfg))
        d = desc
        is_pool = d.op
        n_out = Mux(is_pool, d.ci, d.co)
        in_layer = Signal()
        error = Signal(2)
        m.d.comb += [self.error.eq(error), self.busy.eq(st != IDLE)]
        m.d.sync += self.done.eq(0)

        # ---- host transfers ------------------------------------------------------------
        h_write = Signal()
        h_buf = Signal.like(self.i_host.payload.buf)
        h_pixels = Signal.like(self.i_host.payload.pixels)
        h_ch = Signal.like(self.i_host.payload.channels)
        h_bank = Signal(range(R))
        h_base = Signal(addr_shape)
        h_pix = Signal(range(max_p + 1))
        h_more = Signal()
        h_addr = Signal(addr_shape)     # h_base + h_pix, kept up to date with them
        # The last pixel and channel indices, so that the end tests are equalities.
        h_pix_last = Signal.like(h_pixels)
        h_ch_last = Signal.like(h_ch)
        # Host reads: bank read into the bank's read register (hw.memory), then the bank
        # select into a small FIFO. A read is issued only while the FIFO
        # has room for it and the reads in flight, so the pipeline never stalls.
        m.submodules.rd_fifo = rd_fifo = SyncFIFOBuffered(width=A, depth=4)
        rd_v1, rd_v2 = Signal(), Signal()
        rd_b1, rd_b2 = Signal(range(R)), Signal(range(R))
        rd_room = Signal()
        m.d.comb += rd_room.eq(rd_fifo.level + rd_v1 + rd_v2 < rd_fifo.depth)
        h_last = (h_pix == h_pix_last) & (h_ch == h_ch_last)
        host_rd = (st == HOST) & ~h_write
        host_adv = Signal()
        m.d.comb += host_adv.eq(host_rd & h_more & rd_room)
        m.d.sync += [rd_v1.eq(host_adv), rd_b1.eq(h_bank), rd_v2.eq(rd_v1), rd_b2.eq(rd_b1)]
        host_wr_fire = (st == HOST) & h_write & self.i_load.valid

        def host_step():
            with m.If(h_pix != h_pix_last):
                m.d.sync += [h_pix.eq(h_pix + 1), h_addr.eq(h_addr + 1)]
            with m.Else():
                m.d.sync += [h_pix.eq(0), h_ch.eq(h_ch + 1)]
                with m.If(h_bank == R - 1):
                    m.d.sync += [h_bank.eq(0), h_base.eq(h_base + h_pixels),
                                 h_addr.eq(h_base + h_pixels)]
                with m.Else():
                    m.d.sync += [h_bank.eq(h_bank + 1), h_addr.eq(h_base)]

        # ---- descriptor check ----------------------------------------------------------
        conv_ok = (Cat(*[d.k == kk for kk in KERNEL_SIZES if kk <= cfg.max_k]).any()
                   & ((d.stride == 1) | (d.stride == 2)) & (d.pad <= (d.k >> 1))
                   & (d.co >= 1) & (d.co <= cfg.max_co)
                   & (d.h + (d.pad << 1) >= d.k) & (d.w + (d.pad << 1) >= d.k))
        desc_ok = ((d.ci >= 1) & (d.ci <= cfg.max_ci) & (d.h >= 1) & (d.h <= cfg.max_h)
                   & (d.w >= 1) & (d.w <= cfg.max_w)
                   & (d.src < NB) & (d.dst < NB) & (d.src != d.dst)
                   & (~d.has_res | ((d.res < NB) & (d.res != d.dst)))
                   & (is_pool | conv_ok))
        # Layer features the config leaves out: the descriptor's fields for them are
        # taken as zero (their logic is then constant), and a descriptor that sets one
        # is refused.
        lacks = [(name, fld) for name, fld in (("pool", "op"), ("residual", "has_res"),
                                                 ("level2", "has_l2"))
                 if not getattr(cfg, name)]
        if lacks:
            lacking = Signal()
            desc_ok = desc_ok & ~lacking

        feed_start = Signal()
        m.d.sync += feed_start.eq(0)
        m.d.comb += feeder.start.eq(feed_start)
        desc_ok_r = Signal()
        layer_reset = Signal()      # the first cycle of CHECK
        m.d.sync += layer_reset.eq(0)
        m.d.sync += desc_ok_r.eq(desc_ok)

        # ---- layer state ---------------------------------------------------------------
        wl_active = Signal()
        stg_count = Signal(range(R + 1))
        w_tap = Signal(range(cfg.max_k * cfg.max_k))
        kk_m1 = Signal(range(cfg.max_k * cfg.max_k))
        w_rows_left = Signal(chan_shape)
        w_cols_left = Signal(chan_shape)
        xp = Signal()
        loaded = Signal(2)
        drain = [Signal(range(C + 3), name=f"drain_{b}") for b in range(2)]

        half_busy = Signal(2)
        half_full = Signal(2)
        pool_free = Signal()
        pool_ready = Signal()

        pr_active = Signal()
        pr_done = Signal()
        pr_base = Signal(range(max_ch + 2 * G + 1))
        pr_cg = Signal(range(const_depth + 2))
        pr_gi = Signal(range(max(2, groups_r)))
        pr_cbhw = Signal(addr_shape)
        pr_j = Signal(range(max(2, groups_r, groups_c)))
        pr_p = Signal(range(max_p + 1))
        pr_half = Signal()

        chan_cnt = Signal(range(max_ch + 1))
        chan_open = Signal()
        n_out_m1 = Signal(range(max_ch + 1))
        c_lane = Signal(range(max(2, G)))
        c_addr = Signal(range(const_depth + 1))

        m.d.comb += feeder.desc.eq(desc)

        layer_end = Signal()

        # ---- per-channel constants -----------------------------------------------------
        # Ready is two registers ANDed: whether more constants are due is decided a
        # cycle ahead against the registered channel count of the layer.
        m.d.comb += self.i_chan.ready.eq(in_layer & chan_open)
        chan_fire = self.i_chan.valid & self.i_chan.ready
        # The constant writes leave from registers (the memories sit across the die); the
        # post reader checks the channel count a cycle late, so it never reads ahead.
        # (compact, for a slower clock: straight from the stream.)
        const_wr = m.d.comb if cfg.compact else m.d.sync
        for g in range(G):
            const_wr += [const_wp[g].en.eq(chan_fire & (c_lane == g)), const_wp[g].addr.eq(c_addr),
                         const_wp[g].data.eq(self.i_chan.payload)]
        with m.If(chan_fire):
            m.d.sync += [chan_cnt.eq(chan_cnt + 1), chan_open.eq(chan_cnt != n_out_m1)]
            with m.If(c_lane == G - 1):
                m.d.sync += [c_lane.eq(0), c_addr.eq(c_addr + 1)]
            with m.Else():
                m.d.sync += c_lane.eq(c_lane + 1)

        # ---- weight loader: stream -> staging tile -> PE bank --------------------------
        bank_free = [~loaded[b] & (drain[b] == 0) for b in range(2)]
        xfer_now = Signal()
        # stg_count reaches R only while a layer stages weights (CHECK clears it), so the
        # transfer needs no in_layer term: that register fans out across the engine.
        m.d.comb += xfer_now.eq((stg_count == R) & Mux(xp, bank_free[1], bank_free[0]))
        w_ready = in_layer & wl_active & ((stg_count < R) | xfer_now)
        m.d.comb += self.i_weights.ready.eq(w_ready)
        w_fire = self.i_weights.valid & w_ready
        w_row = Mux(xfer_now, 0, stg_count)
        final_tile = (w_tap == kk_m1) & (w_rows_left <= R) & (w_cols_left <= C)
        # The staging writes and the transfer reach the array one cycle after they are
        # decided, from registers: the row decode and the weights fan out to all
        # rows x cols PEs, the transfer to every bank. Both move by the same cycle, so
        # their order is kept; the bank bookkeeping below stays on the decision cycle,
        # which only makes it a cycle more cautious.
        m.d.sync += [array.stage_en.eq(w_fire), array.stage_row.eq(w_row),
                     array.stage_w.eq(self.i_weights.payload.w),
                     array.xfer.eq(xfer_now), array.xfer_bank.eq(xp)]
        m.d.sync += stg_count.eq(w_row + w_fire)
        for b in range(2):
            with m.If(drain[b] != 0):
                m.d.sync += drain[b].eq(drain[b] - 1)
        with m.If(w_fire):
            with m.If(self.i_weights.payload.last != (final_tile & (w_row == R - 1))):
                m.d.sync += error.eq(error | ERR_WEIGHTS)
            with m.If(w_row == R - 1):
                with m.If(w_tap != kk_m1):
                    m.d.sync += w_tap.eq(w_tap + 1)
                with m.Else():
                    m.d.sync += w_tap.eq(0)
                    with m.If(w_rows_left > R):
                        m.d.sync += w_rows_left.eq(w_rows_left - R)
                    with m.Else():
                        m.d.sync += [w_rows_left.eq(d.ci), w_cols_left.eq(w_cols_left - C)]
                        with m.If(w_cols_left <= C):
                            m.d.sync += wl_active.eq(0)

        # ---- post reader state used by the issue stage ---------------------------------
        # The post reader's pixel count and its last index, from registers (fixed during
        # a layer; the bubble after the post reader's reset covers the update).
        p_out, p_last = Signal.like(feeder.p), Signal.like(feeder.p)
        m.d.sync += [p_out.eq(Mux(is_pool, 1, feeder.p)), p_last.eq(Mux(is_pool, 1, feeder.p) - 1)]
        tile_avail = Mux(is_pool, pool_ready, Mux(pr_half, half_full[1], half_full[0]))
        # Whether a group's constants have arrived is checked on last cycle's values (off
        # the critical path): chan_cnt only grows, and pr_base only moves when a group
        # ends, after which one bubble lets the check catch up.
        chan_ok = Signal()
        group_moved = Signal()
        res_is_src = Signal()
        m.d.sync += chan_ok.eq((chan_cnt >= pr_base + G) | (chan_cnt == n_out))
        pr_fire = Signal()
        m.d.comb += pr_fire.eq(in_layer & pr_active & tile_avail & chan_ok & ~group_moved)
        # The post reader's reads (accumulators, constants, residuals) leave a cycle after
        # its decision, from registers: the decision logic then never reaches the
        # activation banks' shared read address. A residual read in the source buffer
        # holds the issue stage that cycle.
        res_read_q = Signal()
        m.d.sync += res_read_q.eq(pr_fire & d.has_res)

        # ---- issue: a skid buffer after the feeder, then the bank read -----------------
        # Two entries make the feeder's ready a register, so the issue decision never
        # reaches the feeder's loop logic in the same cycle.
        vec = Signal(feed_layout(cfg))
        vec_valid = Signal()
        skid = Signal(feed_layout(cfg))
        skid_valid = Signal()
        # A vector issues on a bank loaded in an earlier cycle: the transfer decision
        # (staging count, drain counters) and the issue decision never share a cycle.
        # Issued at X + 1 after a transfer decided at X (which writes row r at the end
        # of X + 1 + r), a vector reads row r at X + r + 3 at the earliest. This costs
        # cycles only where the array waits for weights.
        w_ok = Mux(vec.pool, 1, Mux(vec.sel, loaded[1], loaded[0]))
        acc_ok = Mux(vec.pool, ~vec.pool_first | pool_free,
                     ~vec.cotile_first | ~Mux(vec.half, half_busy[1], half_busy[0]))
        res_block = res_read_q & res_is_src
        go = in_layer & w_ok & acc_ok & ~res_block
        if cfg.compact:
            # (compact) No forwarding into the accumulators: a vector reads its
            # accumulator word only once every vector before it has written it back. The
            # vectors of a tile take its pixels in order, each once, so a pixel comes back
            # no sooner than p_out cycles later; after each tile, ACC_GAP - p_out idle
            # cycles (on maps of fewer than ACC_GAP pixels) make up the rest.
            gap = Signal(range(ACC_GAP))
            with m.If(gap != 0):
                m.d.sync += gap.eq(gap - 1)
            go = go & (gap == 0)
        issue = vec_valid & go
        m.d.comb += feeder.o_vec.ready.eq(in_layer & ~skid_valid)
        feed = feeder.o_vec.valid & feeder.o_vec.ready
        with m.If(issue):
            with m.If(skid_valid):
                m.d.sync += [vec.eq(skid), skid_valid.eq(0)]
            with m.Elif(feed):
                m.d.sync += vec.eq(feeder.o_vec.payload)
            with m.Else():
                m.d.sync += vec_valid.eq(0)
        with m.Elif(feed):
            with m.If(vec_valid):
                m.d.sync += [skid.eq(feeder.o_vec.payload), skid_valid.eq(1)]
            with m.Else():
                m.d.sync += [vec.eq(feeder.o_vec.payload), vec_valid.eq(1)]
        # The counters add registered events: one cycle late, off the issue path.
        ev_stall_w, ev_stall_o, ev_mac = Signal(), Signal(), Signal()
        m.d.sync += [ev_stall_w.eq(in_layer & vec_valid & ~w_ok),
                     ev_stall_o.eq(in_layer & vec_valid & w_ok & (~acc_ok | res_block)),
                     ev_mac.eq(issue & ~vec.pool)]
        with m.If(in_layer):
            m.d.sync += [self.stall_weights.eq(self.stall_weights + ev_stall_w),
                         self.stall_output.eq(self.stall_output + ev_stall_o),
                         self.mac_cycles.eq(self.mac_cycles + ev_mac)]
        with m.If(xfer_now):
            m.d.sync += [loaded.bit_select(xp, 1).eq(1), xp.eq(~xp)]
        if cfg.compact:
            with m.If(issue & ~vec.pool & vec.tile_last & (p_out < ACC_GAP)):
                m.d.sync += gap.eq(ACC_GAP - p_out)
        with m.If(issue & ~vec.pool & vec.tile_last):
            # Issued at T, this vector enters the array at T + 2 and reads PE[r][cols-1] at
            # T + r + cols + 2; a transfer at X writes row r at the end of X + r. The bank
            # may be refilled from X = T + 2 + cols: drain counts cols + 1 cycles.
            m.d.sync += loaded.bit_select(vec.sel, 1).eq(0)
            for b in range(2):
                with m.If(vec.sel == b):
                    m.d.sync += drain[b].eq(C + 1)
        with m.If(issue & vec.cotile_first):
            m.d.sync += half_busy.bit_select(vec.half, 1).eq(1)
        with m.If(issue & vec.pool_first):
            m.d.sync += pool_free.eq(0)

        # ---- stages 1-2: bank data, registered, -> array / pool adder ------------------
        s1 = Signal(feed_layout(cfg))
        s1_valid = Signal()
        s2 = Signal(feed_layout(cfg))
        s2_valid = Signal()
        m.d.sync += [s1.eq(vec), s1_valid.eq(issue), s2.eq(s1), s2_valid.eq(s1_valid)]
        # The banks' registered read data (hw.memory); the buffer select follows them.
        act_q = [[act_rp[b][r].data for r in range(R)] for b in range(NB)]
        act = Signal(data.ArrayLayout(signed(A), R))
        for r in range(R):
            src_data = Array([act_q[b][r] for b in range(NB)])[d.src]
            m.d.comb += act[r].eq(Mux(s2.mask[r], src_data, 0))
        m.d.comb += [array.i_act.eq(act), array.i_sel.eq(s2.sel),
                     array.i_valid.eq(s2_valid & ~s2.pool),
                     pool.i_act.eq(act), pool.i_valid.eq(s2_valid & s2.pool),
                     pool.i_first.eq(s2.pool_first), pool.i_last.eq(s2.pool_last)]
        with m.If(pool.o_done):
            m.d.sync += pool_ready.eq(1)
        macs_inc = Signal(range(R * C + 1))
        m.d.sync += macs_inc.eq(Mux(s2_valid, lut_multiply(s2.rows_v, s2.cols_v), 0))
        with m.If(in_layer):
            m.d.sync += self.macs.eq(self.macs + macs_inc)
        if not cfg.layer_log:
            m.d.comb += [self.ev_mac_cycles.eq(in_layer & ev_mac),
                         self.ev_stall_weights.eq(in_layer & ev_stall_w),
                         self.ev_stall_output.eq(in_layer & ev_stall_o),
                         self.ev_macs.eq(Mux(in_layer, macs_inc, 0))]

        # ---- accumulate: read two cycles ahead, registered data, two-deep forwarding ---
        meta_layout = data.StructLayout({"valid": 1, "pix": feed_layout(cfg)["pix"].shape,
                                         "first": 1, "last": 1, "half": 1})
        line = [Signal(meta_layout, name="meta_0")]
        m.d.comb += [line[0].valid.eq(s2_valid & ~s2.pool), line[0].pix.eq(s2.pix),
                     line[0].first.eq(s2.first), line[0].last.eq(s2.cotile_last),
                     line[0].half.eq(s2.half)]
        L = array.latency
        assert L >= 3, "the accumulator read leaves three stages before the array's output"
        # (compact: without forwarding, the line ends at the write stage.)
        for i in range(1, L + 2 if cfg.compact else L + 4):
            nxt = Signal(meta_layout, name=f"meta_{i}")
            m.d.sync += nxt.eq(line[-1])
            line.append(nxt)
        pre, acc = line[L - 3], line[L]

        def same(a, b):
            return a.valid & b.valid & (a.half == b.half) & (a.pix == b.pix)

        # The read for the vector at the accumulate stage left three cycles earlier (the
        # block RAM, its output register, then the half select into a register by the
        # adders), and a sum is written a cycle after it is computed (from registers, to
        # the blocks across the die), so the read misses the sums of the four vectors
        # before it: forward those instead, the most recent first.
        # (compact: no forwarding, see ACC_GAP.)
        if not cfg.compact:
            hit1, hit2, hit3, hit4 = Signal(), Signal(), Signal(), Signal()
            m.d.sync += [hit1.eq(same(line[L - 1], line[L])),
                         hit2.eq(same(line[L - 1], line[L + 1])),
                         hit3.eq(same(line[L - 1], line[L + 2])),
                         hit4.eq(same(line[L - 1], line[L + 3]))]
            sum1 = Signal(data.ArrayLayout(signed(cfg.acc_bits), C))
            sum2 = Signal.like(sum1)
            sum3 = Signal.like(sum1)
            sum4 = Signal.like(sum1)
            m.d.sync += [sum2.eq(sum1), sum3.eq(sum2), sum4.eq(sum3)]
        wr = line[L + 1]
        acc_raw = [acc_rp[h].data for h in range(2)]
        acc_q = Signal(data.ArrayLayout(signed(cfg.acc_bits), C), name="acc_q")
        m.d.sync += acc_q.eq(Mux(line[L - 1].half, acc_raw[1], acc_raw[0]))
        post_q = [acc_rp[h].data for h in range(2)]
        pr_p_q = Signal.like(pr_p)
        pr_cg_q = Signal.like(pr_cg)
        m.d.sync += [pr_p_q.eq(pr_p), pr_cg_q.eq(pr_cg)]
        for h in range(2):
            m.d.comb += [
                acc_wp[h].addr.eq(wr.pix),
                acc_wp[h].en.eq(wr.valid & (wr.half == h)),
            ]
        for c in range(C):
            if cfg.compact:
                old = acc_q[c]
            else:
                old = Mux(hit1, sum1[c], Mux(hit2, sum2[c], Mux(hit3, sum3[c],
                                                                Mux(hit4, sum4[c], acc_q[c]))))
            total = Signal(signed(cfg.acc_bits), name=f"acc_sum_{c}")
            m.d.comb += total.eq(Mux(acc.first, 0, old) + array.o_sum[c])
            # One register per half for the write data (each half is many blocks).
            if cfg.compact:
                m.d.sync += [acc_wp[0].data[c].eq(total), acc_wp[1].data[c].eq(total)]
            else:
                m.d.sync += [sum1[c].eq(total), acc_wp[0].data[c].eq(total),
                             acc_wp[1].data[c].eq(total)]
        with m.If(wr.valid & wr.last):
            m.d.sync += half_full.bit_select(wr.half, 1).eq(1)

        # ---- post reader: groups of G channels, every pixel ----------------------------
        groups_m1 = Mux(is_pool, groups_r - 1, groups_c - 1)
        # The group-end decisions come from registers: pr_base and pr_j move only when a
        # group ends (or a layer starts), and a bubble (group_moved) follows every move,
        # so the registers have caught up before the post reader fires again.
        last_group, j_last = Signal(), Signal()
        m.d.sync += [last_group.eq(pr_base + G >= n_out), j_last.eq(pr_j == groups_m1)]
        lane_en = Signal(G)
        m.d.comb += [lane_en[g].eq(pr_base + g < n_out) for g in range(G)]
        for g in range(G):
            m.d.comb += const_rp[g].addr.eq(pr_cg_q)
        m.d.sync += group_moved.eq(0)
        with m.If(pr_fire):
            with m.If(pr_p != p_last):
                m.d.sync += pr_p.eq(pr_p + 1)
            with m.Else():
                m.d.sync += [pr_p.eq(0), pr_base.eq(pr_base + G), pr_cg.eq(pr_cg + 1),
                             group_moved.eq(1)]
                with m.If(pr_gi == groups_r - 1):
                    m.d.sync += [pr_gi.eq(0), pr_cbhw.eq(pr_cbhw + p_out)]
                with m.Else():
                    m.d.sync += pr_gi.eq(pr_gi + 1)
                with m.If(j_last | last_group):
                    m.d.sync += pr_j.eq(0)
                    with m.If(is_pool):
                        m.d.sync += [pool_ready.eq(0), pool_free.eq(1)]
                    with m.Else():
                        m.d.sync += [half_full.bit_select(pr_half, 1).eq(0),
                                     half_busy.bit_select(pr_half, 1).eq(0), pr_half.eq(~pr_half)]
                with m.Else():
                    m.d.sync += pr_j.eq(pr_j + 1)
                with m.If(last_group):
                    m.d.sync += [pr_active.eq(0), pr_done.eq(1)]

        # P0: registered decision, block RAM addresses; P1: block RAM read; P2: the
        # memories' read registers (accumulators in post_q, residuals in act_q,
        # constants in const_q) and the lane select; P3: the requantizer's inputs.
        post_layout = data.StructLayout({"valid": 1, "pool": 1, "half": 1, "j": pr_j.shape(),
                                         "gi": pr_gi.shape(), "lanes": G, "tag": tag_layout})
        p0, p1, p2 = Signal(post_layout), Signal(post_layout), Signal(post_layout)
        # A half's read port: the post reader's address while it drains the half, else
        # the read-modify-write's.
        for h in range(2):
            m.d.comb += acc_rp[h].addr.eq(Mux(p0.valid & ~p0.pool & (p0.half == h), pr_p_q, pre.pix))
        m.d.sync += [p0.valid.eq(pr_fire), p0.pool.eq(is_pool), p0.half.eq(pr_half), p0.j.eq(pr_j),
                     p0.gi.eq(pr_gi), p0.lanes.eq(lane_en), p0.tag.addr.eq(pr_cbhw + pr_p),
                     p0.tag.gi.eq(pr_gi), p1.eq(p0), p2.eq(p1)]
        const_q = [const_rp[g].data for g in range(G)]
        res_q = [Array([act_q[b][r] for b in range(NB)])[d.res] for r in range(R)]
        for g in range(G):
            conv_acc = Array([Mux(p2.half, post_q[1][j * G + g], post_q[0][j * G + g])
                              for j in range(groups_c)])[p2.j]
            pool_acc = Array([pool.o_sum[j * G + g] for j in range(groups_r)])[p2.j]
            # P3: the selected operands in registers by the requantizer's multipliers
            # (the memories' read registers sit across the die from them). (compact, for
            # a slower clock: the requantizer's operand registers are those of P3.)
            p3 = m.d.comb if cfg.compact else m.d.sync
            p3 += [
                rq.i_acc[g].eq(Mux(p2.pool, pool_acc, conv_acc)),
                rq.i_mult[g].eq(const_q[g].mult),
                rq.i_bias[g].eq(const_q[g].bias),
                rq.i_res[g].eq(Array([res_q[gi * G + g] for gi in range(groups_r)])[p2.gi]),
            ]
        p3 += [rq.i_valid.eq(p2.valid), rq.i_lanes.eq(p2.lanes), rq.i_tag.eq(p2.tag)]
        # The layer's requant settings, from registers next to the requantizer: the
        # descriptor is fixed from the first check cycle, two cycles before the layer.
        m.d.sync += [rq.shift.eq(d.shift), rq.relu.eq(d.relu), rq.has_res.eq(d.has_res),
                     rq.m_res.eq(d.m_res)]
        m.d.comb += layer_end.eq(pr_done & ~p0.valid & ~p1.valid & ~p2.valid & ~rq.i_valid
                                 & ~rq.busy)

        # ---- activation memory ports ---------------------------------------------------
        # A host write reaches its bank a cycle after it is taken, from registers (the
        # element comes from the link's frame buffer, a block RAM output). Host writes
        # and layer results never overlap: the engine is in HOST or in a layer.
        h_addr_q = Signal.like(h_addr)
        h_data_q = Signal.like(self.i_load.payload)
        m.d.sync += [h_addr_q.eq(h_addr), h_data_q.eq(self.i_load.payload)]
        for b in range(NB):
            for r in range(R):
                rp, wp = act_rp[b][r], act_wp[b][r]
                res_hit = Signal(name=f"res_hit_{b}_{r}")
                m.d.sync += res_hit.eq(pr_fire & d.has_res & (d.res == b) & (pr_gi == r // G))
                # (Host reads keep the bank reading: the address only moves when a read
                # is issued, so the read register holds the same word meanwhile.)
                with m.If(host_rd):
                    m.d.comb += [rp.addr.eq(h_addr), rp.en.eq(1)]
                with m.Elif(res_hit):
                    m.d.comb += [rp.addr.eq(p0.tag.addr), rp.en.eq(1)]
                with m.Else():
                    m.d.comb += [rp.addr.eq(vec.addr), rp.en.eq(1)]
                wb = rq.o_valid & rq.o_lanes[r % G] & (rq.o_tag.gi == r // G) & (d.dst == b)
                hw_ = Signal(name=f"host_we_{b}_{r}")
                m.d.sync += hw_.eq(host_wr_fire & (h_buf == b) & (h_bank == r))
                m.d.comb += [
                    wp.en.eq(wb | hw_),
                    wp.addr.eq(Mux(hw_, h_addr_q, rq.o_tag.addr)),
                    wp.data.eq(Mux(hw_, h_data_q, rq.o_y[r % G])),
                ]
        host_data = Array([Array([act_q[b][r] for r in range(R)]) for b in range(NB)])
        m.d.comb += [rd_fifo.w_en.eq(rd_v2), rd_fifo.w_data.eq(host_data[h_buf][rd_b2]),
                     self.o_read.valid.eq(rd_fifo.r_rdy), self.o_read.payload.eq(rd_fifo.r_data),
                     rd_fifo.r_en.eq(self.o_read.ready)]

        # ---- top-level FSM (last, so that its resets take precedence) -----------------
        counters = [self.cycles, self.mac_cycles, self.stall_weights, self.stall_output, self.macs]
        with m.Switch(st):
            with m.Case(IDLE):
                m.d.sync += turn.eq(~turn)
                # Descriptors and host commands are offered on alternate cycles, so a
                # ready never depends on the other stream's valid.
                m.d.comb += [self.i_desc.ready.eq(turn), self.i_host.ready.eq(~turn)]
                # The offered descriptor or command is captured whatever its valid, so
                # that valid only moves the state (a small fanout) and not every field.
                hp = self.i_host.payload
                with m.If(turn):
                    m.d.sync += desc.eq(self.i_desc.payload)
                    if lacks:
                        fields = [getattr(self.i_desc.payload, fld) for _, fld in lacks]
                        m.d.sync += [lacking.eq(Cat(*fields).any()),
                                     *(getattr(desc, fld).eq(0) for _, fld in lacks)]
                with m.Else():
                    m.d.sync += [h_write.eq(hp.write), h_buf.eq(hp.buf),
                                 h_pixels.eq(hp.pixels), h_pix_last.eq(hp.pixels - 1),
                                 h_ch_last.eq(hp.channels - 1), h_ch.eq(0), h_bank.eq(0), h_base.eq(0),
                                 h_pix.eq(0), h_addr.eq(0), h_more.eq(1)]
                with m.If(self.i_desc.valid & turn):
                    m.d.sync += [st.eq(CHECK), layer_reset.eq(1)]
                with m.If(self.i_host.valid & ~turn):
                    with m.If((hp.channels != 0) & (hp.pixels != 0) & (hp.buf < NB)):
                        m.d.sync += st.eq(HOST)
            with m.Case(HOST):
                with m.If(h_write):
                    m.d.comb += self.i_load.ready.eq(1)
                    with m.If(self.i_load.valid):
                        host_step()
                        with m.If(h_last):
                            m.d.sync += st.eq(IDLE)
                with m.Elif(host_adv):
                    host_step()
                    with m.If(h_last):
                        m.d.sync += h_more.eq(0)
                # Idle once every value read has been taken: a value just written into the
                # FIFO is counted by its level a cycle before it shows on r_rdy.
                with m.Elif(~h_more & ~rd_v1 & ~rd_v2 & (rd_fifo.level == 0)):
                    m.d.sync += st.eq(IDLE)
            with m.Case(CHECK):
                m.d.sync += self.cycles.eq(self.cycles + 1)
                # The first check cycle resets the layer state (below), the second acts
                # on the registered descriptor check: its comparisons and the wide reset
                # never share a cycle.
                with m.If(~layer_reset):
                    with m.If(desc_ok_r):
                        m.d.sync += [st.eq(LAYER), in_layer.eq(1), feed_start.eq(1)]
                    with m.Else():
                        m.d.sync += [error.eq(error | ERR_DESCRIPTOR), self.done.eq(1),
                                     st.eq(IDLE)]
            with m.Case(LAYER):
                m.d.sync += self.cycles.eq(self.cycles + 1)
                with m.If(layer_end):
                    m.d.sync += [self.done.eq(1), st.eq(IDLE), in_layer.eq(0)]
        # The layer reset: the first check cycle, from a register of its own (st fans out
        # to the state logic only), after the state machine so that it takes precedence.
        with m.If(layer_reset):
            # The counters restart (this cycle counts) and the error clears.
            m.d.sync += [c.eq(0) for c in counters[1:]]
            m.d.sync += [self.cycles.eq(1), error.eq(0)]
            m.d.sync += [
                wl_active.eq(~is_pool), stg_count.eq(0),
                xp.eq(0),
                loaded.eq(0), drain[0].eq(0), drain[1].eq(0), w_tap.eq(0),
                w_rows_left.eq(d.ci), w_cols_left.eq(d.co),
                half_busy.eq(0), half_full.eq(0), pool_free.eq(1), pool_ready.eq(0),
                pr_active.eq(1), pr_done.eq(0), pr_base.eq(0), pr_cg.eq(0), pr_gi.eq(0),
                pr_cbhw.eq(0), pr_j.eq(0), pr_p.eq(0), pr_half.eq(0), group_moved.eq(1),
                chan_cnt.eq(0), chan_open.eq(1), n_out_m1.eq(n_out - 1),
                c_lane.eq(0), c_addr.eq(0), vec_valid.eq(0),
                skid_valid.eq(0), res_is_src.eq(d.has_res & (d.res == d.src)),
            ]
            with m.Switch(d.k):
                for kk in KERNEL_SIZES:
                    if kk <= cfg.max_k:
                        with m.Case(kk):
                            m.d.sync += kk_m1.eq(kk * kk - 1)
        return m
