"""The request executor: runs one verified request of :mod:`host.protocol` at a time.

:class:`Executor` takes a request from the host link once its frame is whole and
its CRC matched (``i_req``, the payload in the link's frame buffer, read through
``buf_addr`` -> ``buf_data``), and answers it (``o_resp``, then ``o_payload``).
Every argument is checked before anything is written, so a refused request
changes no state.

* ``WRITE`` of the program, the base store or the constants leaves on the
  memories' write ports, registered; ``WRITE`` of ``REGION_STREAM`` (codes that a
  running layer streams) goes to ``o_codes`` (the stream FIFO), held while the
  FIFO is full.
* ``READ`` streams the memories back through the sequencers' read ports
  (program: ``prog_host`` takes the engine sequencer's port; base store and
  constants: ``*_load`` points the sequencers' stream address registers at the
  byte read), ``REGION_LOG`` from the layer log (a config with ``layer_log``).
* ``LOAD_ACT`` / ``READ_ACT`` move activations through the engine's host port:
  one command on ``o_host``, then the elements on ``o_load`` or ``i_read``.
* ``RUN n`` pulses ``start`` with ``n_layers``; ``ABORT`` pulses ``abort``;
  ``STATUS`` answers ``status``; ``COUNTERS`` reads every counter through
  ``ctr_index`` -> ``ctr_data`` (waiting for ``ctr_valid``); ``IDENTIFY`` answers
  the identity record (a small ROM here).

Memory writes and reads, activation transfers and RUN are refused with
``ERR_BUSY`` while ``running``; IDENTIFY, STATUS, COUNTERS, ABORT and writes of
streamed codes are served at any time. ``READ_ACT`` is refused with
``ERR_NO_RESULT`` while the last run's state is ``STATE_ERROR`` (a run that
stopped on a fault or an ABORT left no result to read).

Timing: a request takes its argument bytes one a cycle, three registered steps
of checks (PRE, PRE2, PRE3), then CHECK decides; activation transfers first sum
their sizes channel by channel (TILES). A read-back byte takes seven registered
steps (the link drains far slower), so no block RAM output reaches a select or an
address adder in the same cycle.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from gen.contract import (ARG_BYTES, COUNTERS, COUNTER_BYTES, ERR_ADDRESS, ERR_ARGUMENT,
                          ERR_BUSY, ERR_LENGTH, ERR_NO_RESULT, ERR_OPCODE, ERR_STATE,
                          FIXED_LENGTH, STATE_ERROR,
                          LOG_COUNTERS, OP_ABORT, OP_COUNTERS, OP_ERROR, OP_IDENTIFY,
                          OP_LOAD_ACT, OP_READ, OP_READ_ACT, OP_RUN, OP_STATUS, OP_WRITE,
                          REGION_BASES, REGION_CONSTS, REGION_LOG, REGION_PROGRAM,
                          REGION_STREAM, RESPONSE, STATUS_BYTES, act_bytes, const_bytes,
                          identity_bytes, record_bytes, region_sizes, region_words)

from .engine_port import host_command_layout
from .feeder import bank_depth
from .link import header_layout

__all__ = ["Executor", "write_port_signature"]


class _Ex(enum.Enum, shape=4):
    IDLE = 0
    ARGS = 1
    CHECK = 2
    WRITE = 3
    RESPOND = 4
    STREAM = 5
    ACT_CMD = 6
    ACT_LOAD = 7
    ACT_WAIT = 8
    ERROR = 9
    TILES = 10
    PRE = 11
    PRE2 = 12
    PRE3 = 13
    TILES_END = 14


class _Rd(enum.Enum, shape=3):
    """Steps of a memory, status or counter read-back byte."""
    ADDR = 0
    CAPTURE = 1
    OFFER = 2
    PREP = 3
    HOLD = 4
    SELECT = 5
    WAIT = 6


# Payload sources of a streamed response (STREAM state); with ``compact`` also
# SRC_NONE, a response without payload.
(SRC_IDENT, SRC_PROG, SRC_BASES, SRC_CONSTS, SRC_STATUS, SRC_COUNTERS, SRC_ACT,
 SRC_ERROR, SRC_LOG, SRC_NONE) = range(10)
_SRC_OF_REGION = {REGION_PROGRAM: SRC_PROG, REGION_BASES: SRC_BASES, REGION_CONSTS: SRC_CONSTS,
                  REGION_LOG: SRC_LOG}


def write_port_signature(width: int, depth: int, lanes: int = 1) -> wiring.Signature:
    """A memory write port as its user sees it: ``data`` at ``addr`` where ``en`` (one
    bit per byte lane) is high."""
    return wiring.Signature({"addr": Out(range(depth)), "data": Out(width), "en": Out(lanes)})


class Executor(wiring.Component):
    """The request executor of one :class:`~gen.config.AcceleratorConfig` (module doc).

    Members
    -------
    i_req, buf_addr, buf_data, o_resp, o_payload: the host link's executor side
        (:class:`hw.link.HostLink`).
    prog_w, bases_w, consts_w: Out, the memories' write ports (registered).
    prog_host, prog_addr, prog_data: the program read-back on the engine sequencer's
        port (``prog_host`` selects it).
    bases_load, bases_addr, bases_data; consts_load, consts_addr, consts_data: the
        base store and constants read-back through the sequencers' ports.
    ctr_index, ctr_data, ctr_valid: the counters' read port (``hw.counters``).
    log_layer, log_word, log_data: the layer log's read port (``log_data`` is left at 0
        in a config without ``layer_log``: no request reads it).
    running, status: In, the run's state; status is the STATUS word (state, error,
        layer). start, abort: Out, one-cycle pulses. n_layers: Out, RUN's count.
    o_codes: Out, streamed code bytes.
    o_host, o_load, i_read, engine_busy: the engine's host port.
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        cfg = config
        self.record_bytes, self.const_bytes = record_bytes(cfg), const_bytes(cfg)
        self.act_bytes = act_bytes(cfg)
        rb, cb = self.record_bytes, self.const_bytes
        # The frame's lengths and the response's byte counts take ``fw`` and ``rw`` bits:
        # the link refuses a frame longer than max_payload, and a response is at most a
        # region, an activation tensor or a fixed record.
        max_resp = max(*self.region_sizes().values(), len(identity_bytes(cfg)),
                       COUNTER_BYTES * len(COUNTERS),
                       max(cfg.max_ci, cfg.max_co) * cfg.max_h * cfg.max_w * self.act_bytes)
        if cfg.compact:
            # The program memory a byte per word. Byte addresses, transfer lengths and
            # pixel counts as wide as the largest region, transfer and map need (``aw``,
            # ``ew``, ``pw`` bits), what lies beyond being refused from its high bits
            # alone, an OR instead of a carry chain (every address and sum below is
            # checked against those bounds first). Responses also without a payload
            # source (SRC_NONE).
            self.prog_width, self.prog_lanes = 8, 1
            self.aw = max(self.region_sizes().values()).bit_length()
            self.pw = (cfg.max_h * cfg.max_w).bit_length()
            self.ew = (max(cfg.max_ci, cfg.max_co) * cfg.max_h * cfg.max_w).bit_length()
            self.fw, self.rw = cfg.max_payload.bit_length(), max_resp.bit_length()
            self.rem_shape = range(max(cfg.max_ci, cfg.max_co) + 1)
            self.wq_bits, self.sources = self.aw, SRC_NONE + 1
        else:
            # The program memory a record per word; 32- and 40-bit arithmetic.
            self.prog_width, self.prog_lanes = 8 * rb, rb
            self.aw, self.pw, self.ew, self.fw, self.rw = 40, 32, 40, 17, 17
            self.rem_shape, self.wq_bits, self.sources = 17, 33, SRC_NONE
        prog_depth = cfg.max_layers * rb // self.prog_lanes
        self.bank_depth = bank_depth(cfg)
        super().__init__({
            "i_req": In(stream.Signature(header_layout())),
            "buf_addr": Out(range(cfg.max_payload)),
            "buf_data": In(8),
            "o_resp": Out(stream.Signature(header_layout())),
            "o_payload": Out(stream.Signature(8)),
            "prog_w": Out(write_port_signature(self.prog_width, prog_depth, self.prog_lanes)),
            "bases_w": Out(write_port_signature(8, cfg.base_store_bytes)),
            "consts_w": Out(write_port_signature(8 * cb, cfg.const_depth, cb)),
            "prog_host": Out(1),
            "prog_addr": Out(range(prog_depth)),
            "prog_data": In(self.prog_width),
            "bases_load": Out(1),
            "bases_addr": Out(range(cfg.base_store_bytes)),
            "bases_data": In(8),
            "consts_load": Out(1),
            "consts_addr": Out(range(cfg.const_depth)),
            "consts_data": In(8 * cb),
            "ctr_index": Out(range(len(COUNTERS))),
            "ctr_data": In(cfg.counter_bits),
            "ctr_valid": In(1),
            "log_layer": Out(range(cfg.max_layers)),
            "log_word": Out(range(len(LOG_COUNTERS))),
            "log_data": In(cfg.counter_bits),
            "running": In(1),
            "status": In(32),
            "start": Out(1),
            "abort": Out(1),
            "n_layers": Out(range(cfg.max_layers + 1)),
            "o_codes": Out(stream.Signature(8)),
            "o_host": Out(stream.Signature(host_command_layout(cfg))),
            "o_load": Out(stream.Signature(signed(cfg.a_bits))),
            "i_read": In(stream.Signature(signed(cfg.a_bits))),
            "engine_busy": In(1),
        })

    def region_sizes(self) -> dict:
        """Bytes of each memory region the config has."""
        return region_sizes(self.config)

    def elaborate(self, platform):
        m = Module()
        r = self._registers(m)
        self._requests(m, r)
        self._writes(m, r)
        self._read_back(m, r)
        self._activations(m, r)
        return m

    # ---- the registers every step shares -------------------------------------------

    def _registers(self, m):
        cfg, compact, fw, aw = self.config, self.config.compact, self.fw, self.aw
        r = SimpleNamespace()
        r.ex = Signal(_Ex)
        r.op = Signal(8)
        r.length = Signal(min(16, fw))
        r.args = args = Signal(8 * max(ARG_BYTES.values()))
        r.n_args = Signal(range(max(ARG_BYTES.values()) + 1))
        r.arg_i = Signal(range(9))
        r.arg_wr = Signal(range(8))
        r.arg_pending = Signal()
        r.err = Signal(8)
        r.region, r.addr, r.count = args[:8], args[8:40], args[40:56]
        r.abuf, r.achan, r.apix = args[:8], args[8:24], args[24:56]
        r.data_len = Signal(fw)
        r.resp_op = Signal(8)
        r.resp_len = Signal(min(16, self.rw))
        r.src_sel = Signal(range(self.sources))
        # Activation transfer checks, summed channel by channel (no multipliers for a
        # check that runs once per transfer): elements, and entries per bank.
        r.rem = Signal(self.rem_shape)
        r.elems = Signal(self.ew)
        r.need = Signal(self.ew)
        r.lane = Signal(range(cfg.rows))
        r.link_rd = Signal(range(cfg.max_payload))
        r.pre = {"mem_ok": {reg: Signal(name=f"pre_mem_ok_{reg}") for reg in self.region_sizes()},
                 "run_ok": Signal(name="pre_run_ok"), "act_ok": Signal(name="pre_act_ok")}
        r.pre_n = Signal(17)
        r.len_ok = Signal()
        # CHECK decides on registers: the opcode one-hot (from IDLE), the region one-hot
        # and the argument flags (from PRE).
        r.pre["op"] = {code: Signal(name=f"pre_op_{code:02x}") for code in
                       (OP_IDENTIFY, OP_STATUS, OP_COUNTERS, OP_ABORT, OP_RUN, OP_WRITE, OP_READ,
                        OP_LOAD_ACT, OP_READ_ACT)}
        r.pre["region"] = {reg: Signal(name=f"pre_region_{reg}") for reg in self.region_sizes()}
        r.pre["addr0"], r.pre["count0"], r.pre["abuf_bad"] = (
            Signal(name="pre_addr0"), Signal(name="pre_count0"), Signal(name="pre_abuf_bad"))
        # A request on the stream region, from a register (its data path and CHECK).
        r.to_stream = r.pre["stream"] = Signal(name="pre_stream")
        r.pre_end = Signal(aw + 1)
        # (compact) The address or the length has bits beyond the largest region.
        r.pre_wide = Signal(name="pre_wide") if compact else None
        # The read-back's byte address (PREP computes it).
        r.s_pos = Signal(aw)
        r.s_idx = Signal(self.rw)
        r.s_phase = Signal(_Rd)
        r.act_byte = Signal(range(max(2, self.act_bytes)))
        return r

    def _refuse(self, m, r, code):
        m.d.sync += [r.err.eq(code), r.ex.eq(_Ex.ERROR)]

    def _respond(self, m, r, rop, rlen, sel=None):
        if self.config.compact:
            # (rop and rlen are those that src_sel gives, see _requests.)
            m.d.sync += [r.src_sel.eq(SRC_NONE if sel is None else sel), r.ex.eq(_Ex.RESPOND)]
            return
        m.d.sync += [r.resp_op.eq(rop), r.resp_len.eq(rlen), r.ex.eq(_Ex.RESPOND)]
        if sel is not None:
            m.d.sync += r.src_sel.eq(sel)

    # ---- a request: arguments, checks, the response header ------------------------

    def _requests(self, m, r):
        cfg, compact = self.config, self.config.compact
        ex, op, args, pre = r.ex, r.op, r.args, r.pre
        ab_log = self.act_bytes.bit_length() - 1
        arg_byte = Signal(8)
        arg_place = Signal()
        arg_at = Signal.like(r.arg_wr)
        m.d.sync += [arg_byte.eq(self.buf_data), arg_place.eq(r.arg_pending & (ex == _Ex.ARGS)),
                     arg_at.eq(r.arg_wr)]
        with m.If(arg_place):
            m.d.sync += args.word_select(arg_at, 8).eq(arg_byte)
        # Their size checks, registered from the sums every cycle (read in TILES_END).
        tiles_deep, tiles_len_bad, tiles_long = Signal(), Signal(), Signal()
        m.d.sync += [tiles_deep.eq(r.need > self.bank_depth),
                     tiles_len_bad.eq(r.data_len != (r.elems << ab_log)),
                     tiles_long.eq((r.elems << ab_log) > 0xFFFF)]
        m.d.comb += self.buf_addr.eq(r.link_rd)
        if compact:
            # The response's opcode and length follow from its source and the request's
            # registers (which hold until the next request): no registers of their own.
            m.d.comb += r.resp_op.eq(Mux(r.src_sel == SRC_ERROR, OP_ERROR, op | RESPONSE))
            lengths = {SRC_IDENT: len(identity_bytes(cfg)), SRC_STATUS: STATUS_BYTES,
                       SRC_COUNTERS: COUNTER_BYTES * len(COUNTERS), SRC_ERROR: 2, SRC_PROG: r.count,
                       SRC_BASES: r.count, SRC_CONSTS: r.count, SRC_ACT: r.elems << ab_log,
                       **({SRC_LOG: r.count} if cfg.layer_log else {})}
            with m.Switch(r.src_sel):
                for sel, n in lengths.items():
                    with m.Case(sel):
                        m.d.comb += r.resp_len.eq(n)
        m.d.comb += self.i_req.ready.eq(ex == _Ex.IDLE)

        with m.Switch(ex):
            with m.Case(_Ex.IDLE):
                with m.If(self.i_req.valid):
                    rq = self.i_req.payload
                    m.d.sync += [flag.eq(rq.op == code) for code, flag in pre["op"].items()]
                    if not compact:
                        # (compact: no check reads an argument byte its request does
                        # not carry; the length check makes sure they all arrived.)
                        m.d.sync += args.eq(0)
                    m.d.sync += [op.eq(rq.op), r.length.eq(rq.len), r.arg_i.eq(0),
                                 r.link_rd.eq(0), r.arg_pending.eq(0), ex.eq(_Ex.ARGS)]
                    m.d.sync += r.n_args.eq(0)
                    with m.Switch(rq.op):
                        for code, n in ARG_BYTES.items():
                            with m.Case(code):
                                m.d.sync += r.n_args.eq(n)
                    # The length check, registered here and decided first in ARGS:
                    # nothing is acted on from a short payload.
                    ok_len = Signal()
                    with m.Switch(rq.op):
                        for code, n in FIXED_LENGTH.items():
                            with m.Case(code):
                                m.d.comb += ok_len.eq(rq.len == n)
                        for code in (OP_WRITE, OP_LOAD_ACT):
                            with m.Case(code):
                                m.d.comb += ok_len.eq(rq.len > ARG_BYTES[code])
                        with m.Default():
                            m.d.comb += ok_len.eq(1)
                    m.d.sync += r.len_ok.eq(ok_len)
            with m.Case(_Ex.ARGS):
                # Arguments are little endian: byte i lands at bits 8i. A byte read from
                # the frame buffer is registered before it is placed (block RAM outputs
                # are slow); the last one is placed as PRE begins.
                with m.If(~r.len_ok):
                    self._refuse(m, r, ERR_LENGTH)
                with m.Elif(r.arg_i < r.n_args):
                    m.d.sync += [r.link_rd.eq(r.link_rd + 1), r.arg_i.eq(r.arg_i + 1),
                                 r.arg_pending.eq(1), r.arg_wr.eq(r.arg_i)]
                with m.Else():
                    m.d.sync += r.arg_pending.eq(0)
                    with m.If(~r.arg_pending):
                        m.d.sync += [ex.eq(_Ex.PRE), r.data_len.eq(r.length - r.n_args)]
            # The argument checks take three registered steps before CHECK decides on
            # them: the transfer length, the end address, then the comparators (carry
            # chains on 16..40-bit values).
            with m.Case(_Ex.PRE):
                m.d.sync += [r.pre_n.eq(Mux(pre["op"][OP_WRITE], r.data_len, r.count)),
                             ex.eq(_Ex.PRE2),
                             r.to_stream.eq((r.region == REGION_STREAM) if cfg.stream else 0),
                             pre["addr0"].eq(r.addr == 0),
                             pre["count0"].eq(r.count == 0),
                             pre["abuf_bad"].eq(r.abuf >= cfg.act_buffers)]
                m.d.sync += [flag.eq(r.region == reg) for reg, flag in pre["region"].items()]
            with m.Case(_Ex.PRE2):
                if compact:
                    aw = self.aw
                    m.d.sync += [r.pre_end.eq(r.addr[:aw] + r.pre_n[:aw]),
                                 r.pre_wide.eq(r.addr[aw:].any() | r.pre_n[aw:].any())]
                else:
                    m.d.sync += r.pre_end.eq(r.addr + r.pre_n)
                m.d.sync += ex.eq(_Ex.PRE3)
            with m.Case(_Ex.PRE3):
                self._precheck(m, r)
                m.d.sync += ex.eq(_Ex.CHECK)
            with m.Case(_Ex.CHECK):
                self._check(m, r)
            with m.Case(_Ex.TILES):
                with m.If(r.rem != 0):
                    m.d.sync += [r.rem.eq(r.rem - 1), r.elems.eq(r.elems + r.apix[:self.pw]),
                                 r.lane.eq(Mux(r.lane == cfg.rows - 1, 0, r.lane + 1))]
                    with m.If(r.lane == 0):
                        m.d.sync += r.need.eq(r.need + r.apix[:self.pw])
                with m.Else():
                    m.d.sync += ex.eq(_Ex.TILES_END)
            with m.Case(_Ex.TILES_END):
                # The size checks of the finished sums are registered (a cycle after
                # the last sum), so their compares do not reach the state decision.
                with m.If(tiles_deep):
                    self._refuse(m, r, ERR_ARGUMENT)
                with m.Elif(pre["op"][OP_LOAD_ACT]):
                    with m.If(tiles_len_bad):
                        self._refuse(m, r, ERR_LENGTH)
                    with m.Else():
                        m.d.sync += ex.eq(_Ex.ACT_CMD)
                with m.Else():
                    with m.If(tiles_long):
                        self._refuse(m, r, ERR_ARGUMENT)
                    with m.Else():
                        m.d.sync += ex.eq(_Ex.ACT_CMD)
            with m.Case(_Ex.ERROR):
                self._respond(m, r, OP_ERROR, 2, SRC_ERROR)
            with m.Case(_Ex.RESPOND):
                resp = self.o_resp
                m.d.comb += [resp.valid.eq(1), resp.payload.op.eq(r.resp_op),
                             resp.payload.len.eq(r.resp_len)]
                with m.If(resp.ready):
                    if compact:
                        # (An empty response ends in STREAM's first step: the length,
                        # decoded from the source, reaches no state decision here.)
                        m.d.sync += ex.eq(_Ex.STREAM)
                    else:
                        m.d.sync += ex.eq(Mux(r.resp_len == 0, _Ex.IDLE, _Ex.STREAM))

    def _precheck(self, m, r):
        """Registered argument checks for CHECK: RUN's layer count, LOAD_ACT/READ_ACT's
        shape, and per memory region whether the transfer of ``n`` bytes (a WRITE's
        data, a READ's count) from ``addr`` to ``end`` is in range (and, for a WRITE,
        whole words). With ``compact``, ``end`` holds the low ``aw`` bits' sum and
        ``pre_wide`` whether ``addr`` or ``n`` has higher bits; pixel counts past ``pw``
        bits are refused the same way."""
        cfg, pre, wide = self.config, r.pre, r.pre_wide
        addr, n, end, apix = r.addr, r.pre_n, r.pre_end, r.apix
        words = region_words(cfg)
        if wide is not None:
            aw, pw = self.aw, self.pw
            addr, n, apix_ok = addr[:aw], n[:aw], ~apix[pw:].any()
            apix = apix[:pw]
        for reg, size in self.region_sizes().items():
            wb = words[reg]
            aligned = ((addr & (wb - 1)) == 0) & ((n & (wb - 1)) == 0)
            in_range = (addr < size) & (n <= size) & (end <= size)
            if wide is not None:
                in_range = ~wide & in_range
            m.d.sync += pre["mem_ok"][reg].eq(in_range & (~pre["op"][OP_WRITE] | aligned))
        layers = r.args[:16]
        m.d.sync += pre["run_ok"].eq((layers != 0) & (layers <= cfg.max_layers))
        max_ch = max(cfg.max_ci, cfg.max_co)
        act_ok = ((r.achan != 0) & (r.achan <= max_ch) & (apix != 0)
                  & (apix <= cfg.max_h * cfg.max_w))
        m.d.sync += pre["act_ok"].eq(act_ok if wide is None else act_ok & apix_ok)

    def _check(self, m, r):
        """CHECK: refuse the request, answer it, or start its transfer."""
        cfg, op, running = self.config, r.op, self.running
        is_op, is_reg, pre = r.pre["op"], r.pre["region"], r.pre
        is_write = is_op[OP_WRITE]

        def refuse(code):
            self._refuse(m, r, code)

        def respond(rlen, sel=None):
            self._respond(m, r, op | RESPONSE, rlen, sel)

        with m.If(is_op[OP_IDENTIFY]):
            respond(len(identity_bytes(cfg)), SRC_IDENT)
        with m.Elif(is_op[OP_STATUS]):
            respond(STATUS_BYTES, SRC_STATUS)
        with m.Elif(is_op[OP_COUNTERS]):
            respond(COUNTER_BYTES * len(COUNTERS), SRC_COUNTERS)
        with m.Elif(is_op[OP_ABORT]):
            m.d.comb += self.abort.eq(1)
            respond(0)
        with m.Elif(is_op[OP_RUN]):
            with m.If(running):
                refuse(ERR_BUSY)
            with m.Elif(~pre["run_ok"]):
                refuse(ERR_ARGUMENT)
            with m.Else():
                m.d.comb += self.start.eq(1)
                m.d.sync += self.n_layers.eq(r.args[:16])
                respond(0)
        with m.Elif(is_write | is_op[OP_READ]):
            with m.If(pre["stream"]):
                with m.If(~is_write | ~pre["addr0"]):
                    refuse(ERR_ADDRESS)
                with m.Elif(~running):
                    refuse(ERR_STATE)
                with m.Else():
                    m.d.sync += r.ex.eq(_Ex.WRITE)
            with m.Elif(running):
                refuse(ERR_BUSY)
            with m.Elif(~is_write & pre["count0"]):
                refuse(ERR_ARGUMENT)
            with m.Else():
                with m.If(~Cat(*is_reg.values()).any()):
                    refuse(ERR_ADDRESS)
                for reg in self.region_sizes():
                    with m.If(is_reg[reg]):
                        with m.If(~pre["mem_ok"][reg]):
                            refuse(ERR_ADDRESS)
                        with m.Elif(is_write & (reg == REGION_LOG)):
                            refuse(ERR_ADDRESS)
                        with m.Elif(is_write):
                            m.d.sync += r.ex.eq(_Ex.WRITE)
                        with m.Else():
                            respond(r.count, _SRC_OF_REGION[reg])
        with m.Elif(is_op[OP_LOAD_ACT] | is_op[OP_READ_ACT]):
            with m.If(running):
                refuse(ERR_BUSY)
            with m.Elif(is_op[OP_READ_ACT] & (self.status[:8] == STATE_ERROR)):
                refuse(ERR_NO_RESULT)
            with m.Elif(pre["abuf_bad"]):
                refuse(ERR_ADDRESS)
            with m.Elif(~pre["act_ok"]):
                refuse(ERR_ARGUMENT)
            with m.Else():
                m.d.sync += [r.ex.eq(_Ex.TILES), r.rem.eq(r.achan), r.elems.eq(0), r.need.eq(0),
                             r.lane.eq(0)]
        with m.Else():
            refuse(ERR_OPCODE)

    # ---- WRITE: payload bytes after the 5 argument bytes ---------------------------

    def _writes(self, m, r):
        ex, codes = r.ex, self.o_codes
        w_byte = Signal(self.fw)
        w_pending = Signal()
        wq_en = Signal()
        wq_pos = Signal(self.wq_bits)
        wq_data = Signal(8)
        m.d.sync += wq_en.eq(0)
        # A streamed byte waits for room in the FIFO; the frame buffer read then holds.
        w_stall = Signal()
        m.d.comb += w_stall.eq(r.to_stream & w_pending & ~codes.ready)
        m.d.comb += codes.payload.eq(self.buf_data)
        with m.If(w_stall):
            # The frame buffer read port is always enabled: re-read the pending byte.
            m.d.comb += self.buf_addr.eq(r.link_rd - 1)
        # Streamed bytes that still wait when the run has ended would wait forever.
        with m.If((ex == _Ex.WRITE) & w_stall & ~self.running):
            self._refuse(m, r, ERR_STATE)
        with m.If((ex == _Ex.WRITE) & ~w_stall):
            m.d.comb += self.buf_addr.eq(r.link_rd)
            with m.If(w_byte < r.data_len):
                m.d.sync += [r.link_rd.eq(r.link_rd + 1), w_byte.eq(w_byte + 1)]
            m.d.sync += w_pending.eq(w_byte < r.data_len)
            with m.If(w_pending):
                with m.If(r.to_stream):
                    m.d.comb += codes.valid.eq(1)
                with m.Else():
                    m.d.sync += [wq_en.eq(1), wq_pos.eq(r.addr + w_byte - 1),
                                 wq_data.eq(self.buf_data)]
            with m.If(~w_pending & (w_byte >= r.data_len)):
                self._respond(m, r, r.op | RESPONSE, 0)
        # Memory writes leave from registers two cycles after the frame buffer read (its
        # block RAM output has no time left for the write-enable decode and the memory's
        # data input in the same cycle); the response follows after the last one.
        # A second register stage holds each memory's decoded byte enables, so that the
        # region select and the byte-lane decode do not share a cycle with the write.
        prog_lg = self.prog_lanes.bit_length() - 1
        cb = self.const_bytes
        for wp, reg, lg, nb in ((self.bases_w, REGION_BASES, 0, 1),
                                (self.prog_w, REGION_PROGRAM, prog_lg, self.prog_lanes),
                                (self.consts_w, REGION_CONSTS, cb.bit_length() - 1, cb)):
            lanes = (1 << wq_pos[:lg]) if lg else 1
            m.d.sync += [wp.addr.eq(wq_pos >> lg), wp.data.eq(Cat(*([wq_data] * nb))),
                         wp.en.eq(Mux(wq_en & (r.region == reg), lanes, 0))]
        with m.If((ex == _Ex.CHECK) & r.pre["op"][OP_WRITE]):
            m.d.sync += [w_byte.eq(0), w_pending.eq(0), r.link_rd.eq(5)]

    # ---- streamed responses: identity, memory reads, status, counters, activations --

    def _read_back(self, m, r):
        cfg, compact = self.config, self.config.compact
        ex, src_sel, s_idx, s_phase, s_pos = r.ex, r.src_sel, r.s_idx, r.s_phase, r.s_pos
        cb_log = self.const_bytes.bit_length() - 1
        prog_lg = self.prog_lanes.bit_length() - 1
        m.submodules.ident = ident = Memory(
            shape=8, depth=len(identity_bytes(cfg)), init=list(identity_bytes(cfg)),
            # (compact: in a block RAM, of which small devices have more to spare than logic.)
            attrs={"ram_style": "block"} if compact else None)
        ident_rd = ident.read_port()
        s_sel_byte = Signal(8)
        sel_q = Signal(8)
        cap_ident, cap_bases = Signal(8), Signal(8)
        cap_prog, cap_consts = Signal(self.prog_width), Signal(8 * self.const_bytes)
        consts_byte = (lambda word: word.word_select(s_sel_byte[:max(1, cb_log)], 8)
                       if cb_log else word)
        cap_counter, cap_log = Signal(cfg.counter_bits), Signal(cfg.counter_bits)
        # The block RAM outputs land in plain registers every cycle (no enable, no
        # select in front), which HOLD copies; the base store and the constants have
        # such registers of their own (hw.memory).
        raw_ident, raw_prog = Signal(8), Signal(self.prog_width)
        raw_bases, raw_consts = self.bases_data, self.consts_data
        if not compact:
            m.d.sync += [raw_ident.eq(ident_rd.data), raw_prog.eq(self.prog_data)]
        # A log entry is LOG_COUNTERS words of 8 bytes: byte address = (layer, word, byte).
        log_shift = 3 + (len(LOG_COUNTERS) - 1).bit_length()
        has_log = cfg.layer_log
        # The read-back addresses come straight from registers: the identity's and the
        # log's read ports have no other user, and the program port, which the engine
        # sequencer addresses during a run, is handed to the host by a register that
        # is set while a program read-back streams (such reads are refused during a
        # run). These small memories are LUT RAM, read through their address.
        m.d.sync += self.prog_host.eq((ex == _Ex.STREAM) & (src_sel == SRC_PROG))
        m.d.comb += [ident_rd.addr.eq(s_idx), self.prog_addr.eq(s_pos >> prog_lg),
                     self.bases_addr.eq(s_pos), self.consts_addr.eq(s_pos >> cb_log)]
        m.d.comb += self.log_layer.eq(s_pos >> log_shift)
        # (Registers: PREP sets the load flags, ADDR loads the stream address from the
        # byte address s_pos.)
        m.d.sync += [self.bases_load.eq(0), self.consts_load.eq(0)]
        s_data = Signal(8)
        s_more = Signal()
        payload = self.o_payload
        s_byte = Signal(8)      # the byte offered, selected a cycle ahead
        m.d.comb += payload.payload.eq(s_byte)
        with m.If(ex == _Ex.STREAM):
            with m.If(src_sel == SRC_ACT):
                self._act_bytes(m, r)
            with m.Else():
                # One byte at a time, in seven registered steps, so that no block RAM
                # output reaches the payload mux in the same cycle and no address adder
                # reaches a block RAM address (the link drains far slower than a byte
                # every seven cycles): PREP computes byte s_idx's address, ADDR
                # addresses it (the base store and the constants through their stream
                # address registers, loaded in ADDR), CAPTURE has the memories' words
                # land in plain registers (and registers the counter and log words),
                # WAIT keeps the identity and program words while the base store and
                # constants' words reach their read registers, HOLD keeps those,
                # SELECT registers the byte, OFFER offers it until the link takes it.
                with m.Switch(s_phase):
                    with m.Case(_Rd.PREP):
                        m.d.sync += [s_pos.eq(r.addr + s_idx), s_more.eq(s_idx < r.resp_len),
                                     s_phase.eq(_Rd.ADDR)]
                        m.d.sync += [self.bases_load.eq(src_sel == SRC_BASES),
                                     self.consts_load.eq(src_sel == SRC_CONSTS)]
                    with m.Case(_Rd.ADDR):
                        with m.If(s_more):
                            m.d.sync += [sel_q.eq(s_idx), s_sel_byte.eq(s_pos[:8]),
                                         self.ctr_index.eq(s_idx >> 3),
                                         self.log_word.eq(s_pos[3:log_shift]),
                                         s_phase.eq(_Rd.CAPTURE)]
                        with m.Else():
                            m.d.sync += ex.eq(_Ex.IDLE)
                    with m.Case(_Rd.CAPTURE):
                        # A counter is captured once, for its first byte, when the
                        # counters offer it (registers at once; a bank flushes it within
                        # one pass over the bank).
                        first = (src_sel == SRC_COUNTERS) & (sel_q[:3] == 0)
                        with m.If(first & self.ctr_valid):
                            m.d.sync += cap_counter.eq(self.ctr_data)
                        with m.If(~first | self.ctr_valid):
                            m.d.sync += s_phase.eq(_Rd.WAIT)
                        m.d.sync += cap_log.eq(self.log_data)
                    with m.Case(_Rd.WAIT):
                        # (The identity and program ports read again from CAPTURE on:
                        # their words are taken here.)
                        m.d.sync += s_phase.eq(_Rd.HOLD)
                        if not compact:
                            m.d.sync += [cap_ident.eq(raw_ident), cap_prog.eq(raw_prog)]
                    with m.Case(_Rd.HOLD):
                        m.d.sync += s_phase.eq(_Rd.SELECT)
                        if not compact:
                            m.d.sync += [cap_bases.eq(raw_bases), cap_consts.eq(raw_consts)]
                    with m.Case(_Rd.SELECT):
                        m.d.sync += [s_byte.eq(s_data), s_phase.eq(_Rd.OFFER)]
                    with m.Case(_Rd.OFFER):
                        m.d.comb += payload.valid.eq(1)
                        with m.If(payload.ready):
                            m.d.sync += [s_idx.eq(s_idx + 1), s_phase.eq(_Rd.PREP)]
                if compact:
                    # (compact, for a slower clock: SELECT takes the memories' bytes from
                    # their read ports, which hold them from HOLD on.)
                    memory_bytes = {SRC_IDENT: ident_rd.data, SRC_BASES: raw_bases,
                                    SRC_PROG: self.prog_data, SRC_CONSTS: consts_byte(raw_consts)}
                else:
                    memory_bytes = {SRC_IDENT: cap_ident, SRC_BASES: cap_bases,
                                    SRC_PROG: (cap_prog.word_select(s_sel_byte[:max(1, prog_lg)], 8)
                                               if prog_lg else cap_prog),
                                    SRC_CONSTS: consts_byte(cap_consts)}
                pad = Const(0, 64 - cfg.counter_bits)
                with m.Switch(src_sel):
                    for sel, byte in memory_bytes.items():
                        with m.Case(sel):
                            m.d.comb += s_data.eq(byte)
                    with m.Case(SRC_ERROR):
                        m.d.comb += s_data.eq(Mux(sel_q == 0, r.err, r.op))
                    with m.Case(SRC_STATUS):
                        m.d.comb += s_data.eq(self.status.word_select(sel_q[:2], 8))
                    with m.Case(SRC_COUNTERS):
                        m.d.comb += s_data.eq(Cat(cap_counter, pad).word_select(sel_q[:3], 8))
                    if has_log:
                        with m.Case(SRC_LOG):
                            m.d.comb += s_data.eq(Cat(cap_log, pad).word_select(s_sel_byte[:3], 8))
        with m.If(ex == _Ex.RESPOND):
            m.d.sync += [s_idx.eq(0), s_phase.eq(_Rd.PREP), r.act_byte.eq(0)]

    def _act_bytes(self, m, r):
        """READ_ACT's payload: elements from the engine, ``act_bytes`` bytes each."""
        ab, payload, read = self.act_bytes, self.o_payload, self.i_read
        ext = Signal(8 * ab)
        m.d.comb += ext.eq(read.payload.as_signed())
        m.d.comb += [payload.valid.eq(read.valid),
                     payload.payload.eq(ext.word_select(r.act_byte, 8))]
        with m.If(payload.valid & payload.ready):
            m.d.sync += r.s_idx.eq(r.s_idx + 1)
            with m.If(r.act_byte == ab - 1):
                m.d.comb += read.ready.eq(1)
                m.d.sync += r.act_byte.eq(0)
            with m.Else():
                m.d.sync += r.act_byte.eq(r.act_byte + 1)
            with m.If(r.s_idx == r.resp_len - 1):
                m.d.sync += r.ex.eq(_Ex.IDLE)

    # ---- activation transfers: one engine host command, then the elements ---------

    def _activations(self, m, r):
        cfg, ab, ex = self.config, self.act_bytes, r.ex
        hc = self.o_host.payload
        m.d.comb += [hc.write.eq(r.pre["op"][OP_LOAD_ACT]), hc.buf.eq(r.abuf),
                     hc.channels.eq(r.achan), hc.pixels.eq(r.apix)]
        l_idx = Signal(self.fw)
        l_pending = Signal()
        l_byte = Signal(range(max(2, ab)))
        l_word = Signal(8 * ab)
        load = self.o_load
        with m.Switch(ex):
            with m.Case(_Ex.ACT_CMD):
                m.d.comb += self.o_host.valid.eq(1)
                with m.If(self.o_host.ready):
                    with m.If(r.pre["op"][OP_LOAD_ACT]):
                        m.d.sync += [ex.eq(_Ex.ACT_LOAD), l_idx.eq(0), l_pending.eq(0),
                                     l_byte.eq(0), r.link_rd.eq(7)]
                    with m.Else():
                        self._respond(m, r, r.op | RESPONSE,
                                      r.elems << (ab.bit_length() - 1), SRC_ACT)
            with m.Case(_Ex.ACT_LOAD):
                # Frame buffer bytes -> elements; the buffer read runs one byte ahead.
                full = Signal()
                m.d.comb += full.eq(l_pending & (l_byte == ab - 1) & ~load.ready)
                m.d.comb += self.buf_addr.eq(Mux(full, r.link_rd - 1, r.link_rd))
                word = Cat(l_word[8:], self.buf_data) if ab > 1 else self.buf_data
                m.d.comb += load.payload.eq(word[:cfg.a_bits])
                with m.If(l_pending & (l_byte == ab - 1)):
                    m.d.comb += load.valid.eq(1)
                with m.If(~full):
                    with m.If(l_pending):
                        m.d.sync += l_word.eq(word)
                        m.d.sync += l_byte.eq(Mux(l_byte == ab - 1, 0, l_byte + 1))
                    with m.If(l_idx < r.data_len):
                        m.d.sync += [r.link_rd.eq(r.link_rd + 1), l_idx.eq(l_idx + 1),
                                     l_pending.eq(1)]
                    with m.Else():
                        m.d.sync += l_pending.eq(0)
                        with m.If(~l_pending):
                            m.d.sync += ex.eq(_Ex.ACT_WAIT)
            with m.Case(_Ex.ACT_WAIT):
                with m.If(~self.engine_busy):
                    self._respond(m, r, r.op | RESPONSE, 0)
