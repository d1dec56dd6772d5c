"""The systolic conv engine: activation memories, window feeder, array, accumulators, requant.

Dataflow (weight-stationary, see :mod:`hw.systolic`)::

    act banks --feeder--> SystolicArray --> accumulator half A/B --> Requantizer --> act banks
        \\--> PoolAccumulator -------------------------------------^
    weight vectors --> staging tile --transfer wave--> PE bank 0/1

The parts, each a component of its own, and what :class:`ConvEngine` wires
between them::

    i_host, i_load, o_read <-> EngineHostPort (hw.engine_port) <-> act banks
    i_desc, i_weights --> IssueStage (hw.issue) <-> WindowFeeder (hw.feeder)
                          IssueStage: stage/transfer, vectors --> SystolicArray (hw.systolic)
                          IssueStage: vectors --> PoolAccumulator (hw.postproc)
    act banks --> IssueStage
    SystolicArray --> Accumulators (hw.accumulator) --> PostReader (hw.post_reader)
    PoolAccumulator --> PostReader;  i_chan --> PostReader
    PostReader --> Requantizer or CompactRequantizer (hw.postproc) --> PostReader --> act banks
    PostReader --> IssueStage: which accumulator half / pool sums are free, residual reads

The engine itself holds the activation banks and their port arbitration, and
offers host commands and descriptors on alternate idle cycles.

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


from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from gen.config import KERNEL_SIZES, AcceleratorConfig
from gen.contract import ERR_DESCRIPTOR, ERR_WEIGHTS, channel_layout
from .accumulator import Accumulators
from .engine_port import EngineHostPort, host_command_layout
from .feeder import WindowFeeder, bank_depth
from .interfaces import descriptor_layout, weight_stream_signature
from .memory import BlockMemory
from .issue import IssueStage
from .post_reader import PostReader
from .postproc import PoolAccumulator, requantizer_class
from .systolic import PE_MULTIPLIERS, SystolicArray

__all__ = ["ConvEngine", "channel_layout", "host_command_layout", "check_layer",
           "ERR_DESCRIPTOR", "ERR_WEIGHTS", "bank_depth"]

# The issue stage's counts, as the engine's ports of the same names.
_COUNTERS = ("cycles", "mac_cycles", "stall_weights", "stall_output", "macs",
             "ev_mac_cycles", "ev_stall_weights", "ev_stall_output", "ev_macs")
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
        self.host = EngineHostPort(config)
        self.feeder = WindowFeeder(config)
        self.array = SystolicArray(config, pe_mult=pe_mult)
        # Without compact the accumulators forward the sums still on their way into the
        # block RAM; compact builds space a pixel's vectors ACC_GAP cycles apart instead.
        self.acc = Accumulators(config, latency=self.array.latency,
                                forward=not config.compact)
        self.issue = IssueStage(config, issue_gap=self.acc.issue_gap)
        self.pool = PoolAccumulator(config)
        self.post = PostReader(config, requantizer_class(config))
        self.requant = self.post.requant
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
        m = Module()
        m.submodules.host = host = self.host
        m.submodules.issue = issue = self.issue
        m.submodules.feeder = feeder = self.feeder
        m.submodules.array = array = self.array
        m.submodules.acc = acc = self.acc
        m.submodules.pool = pool = self.pool
        m.submodules.post = post = self.post

        # Host commands and descriptors are offered on alternate idle cycles, so that a
        # ready never depends on the other stream's valid.
        turn = Signal()
        busy = host.busy | issue.busy
        with m.If(~busy):
            m.d.sync += turn.eq(~turn)
        m.d.comb += [host.accept.eq(~busy & ~turn), issue.accept.eq(~busy & turn),
                     self.busy.eq(busy)]
        wiring.connect(m, wiring.flipped(self.i_host), host.i_host)
        wiring.connect(m, wiring.flipped(self.i_load), host.i_load)
        wiring.connect(m, wiring.flipped(self.o_read), host.o_read)
        wiring.connect(m, wiring.flipped(self.i_desc), issue.i_desc)
        wiring.connect(m, wiring.flipped(self.i_weights), issue.i_weights)
        wiring.connect(m, wiring.flipped(self.i_chan), post.i_chan)
        for name in ("done", "error", *_COUNTERS):
            if name in self.signature.members:
                m.d.comb += getattr(self, name).eq(getattr(issue, name))

        # Issue stage -> feeder -> issue stage -> array / pool adder -> accumulators.
        wiring.connect(m, feeder.o_vec, issue.i_vec)
        m.d.comb += [feeder.start.eq(issue.o_feed_start), feeder.desc.eq(issue.desc),
                     issue.i_pixels.eq(feeder.p)]
        m.d.comb += [array.stage_en.eq(issue.stage_en), array.stage_row.eq(issue.stage_row),
                     array.stage_w.eq(issue.stage_w), array.xfer.eq(issue.xfer),
                     array.xfer_bank.eq(issue.xfer_bank)]
        vec = issue.o_vec
        m.d.comb += [array.i_act.eq(issue.o_act), array.i_sel.eq(vec.sel),
                     array.i_valid.eq(issue.o_array_valid),
                     pool.i_act.eq(issue.o_act), pool.i_valid.eq(issue.o_pool_valid),
                     pool.i_first.eq(vec.pool_first), pool.i_last.eq(vec.pool_last),
                     acc.i_valid.eq(issue.o_array_valid), acc.i_pix.eq(vec.pix),
                     acc.i_first.eq(vec.first), acc.i_last.eq(vec.cotile_last),
                     acc.i_half.eq(vec.half), acc.i_sum.eq(array.o_sum)]

        # Accumulators and pool sums -> post reader (-> requantizer) -> activation banks.
        m.d.comb += [post.start.eq(issue.start), post.in_layer.eq(issue.in_layer),
                     post.desc.eq(issue.desc), post.i_pixels.eq(feeder.p),
                     post.claim.eq(issue.claim), post.claim_half.eq(issue.claim_half),
                     post.pool_claim.eq(issue.pool_claim),
                     issue.half_busy.eq(post.half_busy), issue.pool_free.eq(post.pool_free),
                     issue.res_read.eq(post.res_read), issue.layer_end.eq(post.done),
                     post.i_full.eq(acc.o_full), post.i_full_half.eq(acc.o_full_half),
                     post.i_pool_done.eq(pool.o_done), post.i_pool_sum.eq(pool.o_sum),
                     acc.rd_en.eq(post.acc_rd_en), acc.rd_half.eq(post.acc_rd_half),
                     acc.rd_addr.eq(post.acc_rd_addr), post.i_acc_data.eq(acc.o_rd_data)]
        self._activation_banks(m)
        return m

    def _activation_banks(self, m):
        """``act_buffers`` buffers of ``rows`` banks, one read and one write port each.
        Reads: a host read-back, else a residual read, else the issue stage's vector
        (a residual read in the source buffer holds the issue stage). Writes: a host
        load or a result; they never overlap (the engine is in a host command or in a
        layer)."""
        cfg = self.config
        R, NB = cfg.rows, cfg.act_buffers
        host, issue, post = self.host, self.issue, self.post
        for b in range(NB):
            for r in range(R):
                mem = BlockMemory(signed(cfg.a_bits), 1, self.bank_depth, name=f"act_{b}_{r}")
                m.submodules[f"act_{b}_{r}"] = mem
                rp, wp = mem.read_port(), mem.write_port()
                i = b * R + r
                m.d.comb += rp.en.eq(1)
                with m.If(host.rd_en):
                    m.d.comb += rp.addr.eq(host.rd_addr)
                with m.Elif(post.res_rd_en[i]):
                    m.d.comb += rp.addr.eq(post.res_rd_addr)
                with m.Else():
                    m.d.comb += rp.addr.eq(issue.rd_addr)
                m.d.comb += [
                    host.i_rd_data[b][r].eq(rp.data), issue.i_rd_data[b][r].eq(rp.data),
                    post.i_rd_data[b][r].eq(rp.data),
                    wp.en.eq(post.wb_en[i] | host.wr_en[i]),
                    wp.addr.eq(Mux(host.wr_en[i], host.wr_addr, post.wb_addr)),
                    wp.data.eq(Mux(host.wr_en[i], host.wr_data, post.wb_data[r])),
                ]
