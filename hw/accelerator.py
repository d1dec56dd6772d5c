"""The whole accelerator: host link, program and base memories, controller, generation unit, engine.

::

    i_rx --HostLink--> executor --+--> program memory (layer records)
    o_tx <-----------------'      +--> base store (packed B/U/V codes)
                                  +--> constants (per-channel mult/bias)
                                  +--> ConvEngine host port (activations)
                                  +--> RUN -> controller

    controller:  generation sequencer: record -> GenerationUnit.i_desc, codes -> i_codes
                 engine sequencer:     record -> ConvEngine.i_desc, constants -> i_chan
                 GenerationUnit.o_weights ---------------------> ConvEngine.i_weights

**Executor.** Runs one verified request of :mod:`host.protocol` at a time and
answers it; every argument is checked before anything is written, so a refused
request changes no state. Memory writes and reads (host read-back shares the
sequencers' memory ports), activation transfers and RUN are refused with
``ERR_BUSY`` while the controller runs; IDENTIFY, STATUS, COUNTERS, ABORT and
writes of streamed codes are served at any time.

**Controller.** ``RUN n`` executes layer records ``0 .. n-1`` without the host.
Two sequencers walk the records independently: the generation sequencer hands
each conv layer's descriptor and code bytes to the generation unit, the engine
sequencer hands every layer's descriptor and constants to the engine and waits
for it. Stream back-pressure keeps them in step, and the generation of a
layer's weights starts as soon as the generation unit is free, so it overlaps
the end of the previous layer. A layer's codes come from the base store, or,
for a record flagged ``streamed`` (the compiler's choice when the base store
is too small for the whole network), from the stream FIFO that the host fills
through ``REGION_STREAM`` writes during the run.
If the engine reports an error, the run stops in state ``error`` with the
engine's error bits and the layer index, and the generation unit and engine
are reset (activation memories keep their contents). ``ABORT`` does the same
from the host.

**Counters** (:data:`host.protocol.COUNTERS`, ``counter_bits`` wide, wrapping):
the run counters restart at RUN; the link counters count since reset. When a
layer ends, the run counters named in :data:`host.protocol.LOG_COUNTERS` are
written to that layer's entry of the layer log (``REGION_LOG``), the cycle after
the layer's end; a config without ``layer_log`` has no such region. The engine's
counts (:data:`ENGINE_COUNTS`) join the run counters when each layer ends, or,
without ``layer_log``, as they happen (then also the part of a layer that a fault
or an abort stops). A ``compact`` build without ``layer_log`` keeps all the
counters in a :class:`hw.counters.CounterBank` (one block RAM) that the events of
the engine, the generation unit and the link feed.
"""

from __future__ import annotations

from amaranth.hdl import (Array, Cat, ClockDomain, ClockSignal, Const, DomainRenamer, Module, Mux,
                          ResetSignal, Signal, Value)
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from host.protocol import (COUNTERS, LOG_COUNTERS, REGION_LOG, ERR_ADDRESS, ERR_ARGUMENT, ERR_BUSY, ERR_STATE, ERR_LENGTH, ERR_OPCODE,
                           OP_ABORT, OP_COUNTERS, OP_ERROR, OP_IDENTIFY, OP_LOAD_ACT, OP_READ,
                           OP_READ_ACT, OP_RUN, OP_STATUS, OP_WRITE, REGION_BASES, REGION_CONSTS,
                           REGION_PROGRAM, REGION_STREAM, RESPONSE, STATE_DONE, STATE_ERROR,
                           STATE_RUNNING, act_bytes, const_bytes, identity_bytes, record_bytes)

from .counters import CounterBank
from .engine import ConvEngine, channel_layout
from .interfaces import layer_record_layout
from .link import LINK_COUNTERS, HostLink
from .memory import BlockMemory
from .serialgen import generation_unit

__all__ = ["Accelerator", "ERR_ABORTED"]

# The run counters that add up the engine's counts of each layer.
ENGINE_COUNTS = ("mac_cycles", "macs", "stall_weights", "stall_output")

# Status error code of a run stopped by ABORT; engine errors use bits 0..1
# (hw.engine.ERR_DESCRIPTOR, hw.engine.ERR_WEIGHTS).
ERR_ABORTED = 0x40


class _NoFifo:
    """The code FIFO's signals in a build without code streaming: never ready, empty."""

    def __init__(self):
        self.w_data, self.r_data = Signal(8, name="no_fifo_w_data"), Signal(8, name="no_fifo_r_data")
        self.w_en, self.w_rdy = Signal(name="no_fifo_w_en"), Signal(name="no_fifo_w_rdy")
        self.r_en, self.r_rdy = Signal(name="no_fifo_r_en"), Signal(name="no_fifo_r_rdy")
        self.level = Const(0)


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


class _Seq(enum.Enum, shape=3):
    IDLE = 0
    FETCH = 1
    DESC = 2
    DATA = 3
    WAIT = 4
    NEXT = 5


def _stream_words(m, rp, start, count, go, out_valid, out_ready, host_load, host_addr, name):
    """Stream ``count`` words from read port ``rp`` starting at ``start`` after ``go``.

    ``rp`` is a :class:`hw.memory.BlockMemory` read port (data two cycles after the
    address); both of its stages hold while the output is stalled. ``out_valid`` is a
    register. ``host_load`` cancels the stream and points the port at ``host_addr``:
    host read-back uses the port through this one address register, so no address
    select sits in front of the block RAMs. Returns the signal that is high while
    words remain to be read.
    """
    addr = Signal.like(rp.addr, name=f"{name}_addr")
    left = Signal(len(count) + 1, name=f"{name}_left")
    p1, p2 = Signal(name=f"{name}_p1"), Signal(name=f"{name}_p2")
    en = Signal(name=f"{name}_en")
    m.d.comb += [en.eq(~p2 | out_ready), rp.addr.eq(addr), rp.en.eq(en), rp.out_en.eq(en),
                 out_valid.eq(p2)]
    with m.If(host_load):
        m.d.sync += [addr.eq(host_addr), left.eq(0), p1.eq(0), p2.eq(0)]
    with m.Elif(go):
        m.d.sync += [addr.eq(start), left.eq(count), p1.eq(0), p2.eq(0)]
    with m.Elif(en):
        m.d.sync += p2.eq(p1)
        with m.If(left != 0):
            m.d.sync += [addr.eq(addr + 1), left.eq(left - 1), p1.eq(1)]
        with m.Else():
            m.d.sync += p1.eq(0)
    return (left != 0) | p1 | p2


class Accelerator(wiring.Component):
    """The accelerator of one :class:`~gen.config.AcceleratorConfig` (see the module doc).

    Members
    -------
    i_rx, o_tx: the host link byte streams (a UART PHY on a board).
    running: a run is in progress. error: the last run ended in an error.
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        self.link = HostLink(config)
        self.gen = generation_unit(config)
        self.engine = ConvEngine(config)
        self.record_bytes = record_bytes(config)
        self.const_bytes = const_bytes(config)
        self.act_bytes = act_bytes(config)
        # Room for one whole WRITE frame of streamed codes.
        self.stream_depth = config.max_payload
        for what, n in (("record", self.record_bytes), ("constant", self.const_bytes)):
            if n & (n - 1):
                raise ValueError(f"{what} word of {n} bytes: must be a power of two")
        super().__init__({
            "i_rx": In(stream.Signature(8)),
            "o_tx": Out(stream.Signature(8)),
            "running": Out(1),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        RB, CB, AB = self.record_bytes, self.const_bytes, self.act_bytes
        rb_log, cb_log = RB.bit_length() - 1, CB.bit_length() - 1
        # The generation unit, the engine and the FIFOs around them run in the "unit"
        # domain: the sync clock, and a reset that is one register holding both the
        # domain reset and the soft reset (ABORT, an engine fault, RUN). Their
        # thousands of flip-flops then see a reset net driven by a flip-flop, not by
        # an OR of two resets spread over the die.
        m.domains.unit = ClockDomain("unit", local=True)
        unit_rst = Signal(init=1)
        m.d.comb += [ClockSignal("unit").eq(ClockSignal("sync")), ResetSignal("unit").eq(unit_rst)]
        in_unit = DomainRenamer("unit")
        m.submodules.link = link = self.link
        m.submodules.gen = in_unit(self.gen)
        if cfg.stream:
            m.submodules.code_fifo = code_fifo = in_unit(
                SyncFIFOBuffered(width=8, depth=self.stream_depth))
        else:
            # (No code streaming: a FIFO that is never ready; what drives its inputs
            # drives nothing.)
            code_fifo = _NoFifo()
        m.submodules.engine = in_unit(self.engine)
        gen, eng = self.gen, self.engine
        wiring.connect(m, wiring.flipped(self.i_rx), link.i_rx)
        wiring.connect(m, link.o_tx, wiring.flipped(self.o_tx))
        compact = cfg.compact
        # Weight vectors cross from the generation unit to the engine through a short
        # FIFO, so that neither side's handshake logic reaches into the other's (with
        # ``compact``, for a slower clock, directly).
        if compact:
            wiring.connect(m, gen.o_weights, eng.i_weights)
        else:
            m.submodules.weight_fifo = wfifo = in_unit(
                SyncFIFOBuffered(width=len(eng.i_weights.payload.as_value()), depth=4))
            m.d.comb += [wfifo.w_data.eq(gen.o_weights.payload), wfifo.w_en.eq(gen.o_weights.valid),
                         gen.o_weights.ready.eq(wfifo.w_rdy),
                         eng.i_weights.payload.eq(wfifo.r_data), eng.i_weights.valid.eq(wfifo.r_rdy),
                         wfifo.r_en.eq(eng.i_weights.ready)]

        rec_layout = layer_record_layout(cfg)
        # The program memory: a record per word, or with ``compact`` a byte per word (one
        # block RAM per read port; a record-wide memory is logic cells on an iCE40).
        prog_w, prog_lg, prog_nb = (8, 0, 1) if compact else (8 * RB, rb_log, RB)
        m.submodules.prog = prog = Memory(shape=prog_w, depth=cfg.max_layers * RB // prog_nb,
                                          init=[])
        # The base store and the constants: registered reads, the base store in slices
        # one block RAM deep (hw.memory).
        # (compact: in single-port RAM, which the UP5K has 4 x 32 KiB of; the base store
        # is written only while no run reads it.)
        m.submodules.bases = bases = BlockMemory(8, 1, cfg.base_store_bytes, name="bases",
                                                 single_port=compact)
        m.submodules.consts = consts = BlockMemory(8, CB, cfg.const_depth, granular=True,
                                                   name="consts")
        # (compact: in a block RAM, of which small devices have more to spare than logic.)
        m.submodules.ident = ident = Memory(shape=8, depth=len(identity_bytes(cfg)),
                                            init=list(identity_bytes(cfg)),
                                            attrs={"ram_style": "block"} if compact else None)
        # Host read-back shares the sequencers' read ports (it is refused while a run
        # uses them): every extra read port would be another copy of the memory.
        prog_wp, prog_rd_gen, prog_rd_eng = (
            prog.write_port(granularity=8), prog.read_port(), prog.read_port())
        if compact:
            # Each sequencer reads its record a byte at a time in FETCH, byte k into
            # bits 8k.. of the record register (the cycle after its address).
            g_k = Signal(range(RB + 1), name="g_k")
            e_k = Signal(range(RB + 1), name="e_k")
        bases_wp, bases_rd_gen = bases.write_port(), bases.read_port()
        consts_wp, consts_rd_eng = consts.write_port(), consts.read_port()
        prog_rd_host, bases_rd_host, consts_rd_host = prog_rd_eng, bases_rd_gen, consts_rd_eng
        ident_rd = ident.read_port()
        # Per-layer log (if the config keeps one): the run counters as they stood when
        # each layer ended, one small memory per counter so that a layer's entry is
        # written in one cycle.
        counter_bits = cfg.counter_bits
        log_wps, log_rds = [], []
        for name in LOG_COUNTERS if cfg.layer_log else ():
            mem = Memory(shape=counter_bits, depth=cfg.max_layers, init=[])
            m.submodules[f"log_{name}"] = mem
            log_wps.append(mem.write_port())
            log_rds.append(mem.read_port())

        # ---- controller ----------------------------------------------------------------
        running = Signal()
        state = Signal(range(4))
        status_err = Signal(8)
        n_layers = Signal(range(cfg.max_layers + 1))
        start = Signal()
        m.d.comb += [self.running.eq(running), self.error.eq(state == STATE_ERROR)]
        # The counters: registers, or (compact, no layer log) a block RAM bank that the
        # events feed (hw.counters).
        banked = cfg.counter_bank
        ctr = {} if banked else {name: Signal(counter_bits, name=f"ctr_{name}")
                                 for name in COUNTERS}
        ev = {}

        # Generation sequencer: conv records -> descriptor + code bytes.
        g_st = Signal(_Seq)
        g_idx = Signal(range(cfg.max_layers + 1))
        g_rec = Signal(rec_layout)
        g_go = Signal()
        b_valid, b_ready = Signal(), Signal()
        # Host read-back of the base store and the constants points the sequencers'
        # stream address registers at the byte it reads (see the read-back below).
        # (Registers: PREP sets the load flags, ADDR loads the stream address from the
        # byte address s_pos.)
        h_bases_load, h_consts_load = Signal(), Signal()
        # Byte addresses, transfer lengths and pixel counts: with ``compact`` as wide as
        # the largest region, transfer and map need (``aw``, ``ew``, ``pw`` bits), what
        # lies beyond being refused from its high bits alone, an OR instead of a carry
        # chain (every address and sum below is checked against those bounds first).
        if compact:
            aw = max(self._region_sizes().values()).bit_length()
            pw = (cfg.max_h * cfg.max_w).bit_length()
            ew = (max(cfg.max_ci, cfg.max_co) * cfg.max_h * cfg.max_w).bit_length()
        else:
            aw, pw, ew = 40, 32, 40
        # (And the frame's lengths and the response's byte counts, ``fw`` and ``rw`` bits:
        # the link refuses a frame longer than max_payload, and a response is at most a
        # region, an activation tensor or a fixed record.)
        max_resp = max(*self._region_sizes().values(), len(identity_bytes(cfg)),
                       8 * len(COUNTERS), max(cfg.max_ci, cfg.max_co) * cfg.max_h * cfg.max_w * AB)
        fw, rw = (cfg.max_payload.bit_length(), max_resp.bit_length()) if compact else (17, 17)
        s_pos = Signal(aw)
        m.d.sync += [h_bases_load.eq(0), h_consts_load.eq(0)]
        # The code stream starts the cycle after the unit takes the descriptor, from a
        # register: the unit's ready (its state) then stays inside the unit.
        g_go_q = Signal()
        m.d.sync += g_go_q.eq(g_go)
        # (Without code streaming the record's flag is taken as zero; the host refuses
        # to build a program that sets it for such a build, host.image.)
        streamed = g_rec.streamed if cfg.stream else Const(0)
        g_more = _stream_words(m, bases_rd_gen, g_rec.code_addr, g_rec.code_len,
                               g_go_q & ~streamed, b_valid, b_ready,
                               h_bases_load | unit_rst, s_pos, "gcode")
        s_left = Signal.like(g_rec.code_len)
        with m.If(g_go_q & streamed):
            m.d.sync += s_left.eq(g_rec.code_len)
        # Each source of code bytes (both are block RAM outputs, slow) writes its own
        # two-entry register FIFO, whose data inputs have no select in front of them;
        # the unit takes from the FIFO of the record's source. The sequencer leaves a
        # record only once its FIFO is empty, so bytes never cross between records.
        # (compact, for a slower clock: both sources feed the unit directly, see below.)
        if not compact:
            m.submodules.base_q = base_q = in_unit(SyncFIFO(width=8, depth=2))
            # (Streamed bytes arrive at the host link's pace: a FIFO that takes one every
            # other cycle, but keeps its items in registers, is enough.)
            m.submodules.stream_q = stream_q = in_unit(SyncFIFOBuffered(width=8, depth=2))
            m.d.comb += [base_q.w_en.eq(b_valid), base_q.w_data.eq(bases_rd_gen.data),
                         b_ready.eq(base_q.w_rdy),
                         stream_q.w_en.eq(streamed & code_fifo.r_rdy & (s_left != 0)),
                         stream_q.w_data.eq(code_fifo.r_data),
                         code_fifo.r_en.eq(streamed & stream_q.w_rdy & (s_left != 0))]
        with m.If(code_fifo.r_rdy & code_fifo.r_en):
            m.d.sync += s_left.eq(s_left - 1)
        # The unit reset (abort, fault, start) also ends both code sources' transfers:
        # nothing left over from a stopped run reaches the FIFOs after their reset.
        with m.If(unit_rst):
            m.d.sync += s_left.eq(0)
        if compact:
            stream_more = s_left != 0
            with m.If(streamed):
                m.d.comb += [gen.i_codes.valid.eq(code_fifo.r_rdy & stream_more),
                             gen.i_codes.payload.eq(code_fifo.r_data),
                             code_fifo.r_en.eq(gen.i_codes.ready & stream_more)]
            with m.Else():
                m.d.comb += [gen.i_codes.valid.eq(b_valid), gen.i_codes.payload.eq(bases_rd_gen.data),
                             b_ready.eq(gen.i_codes.ready)]
            codes_left = Const(0)
        else:
            with m.If(streamed):
                m.d.comb += [gen.i_codes.valid.eq(stream_q.r_rdy),
                             gen.i_codes.payload.eq(stream_q.r_data),
                             stream_q.r_en.eq(gen.i_codes.ready)]
            with m.Else():
                m.d.comb += [gen.i_codes.valid.eq(base_q.r_rdy),
                             gen.i_codes.payload.eq(base_q.r_data),
                             base_q.r_en.eq(gen.i_codes.ready)]
            codes_left = (base_q.level != 0) | (stream_q.level != 0)
        m.d.comb += [prog_rd_gen.addr.eq(Cat(g_k[:rb_log], g_idx) if compact else g_idx),
                     gen.i_desc.payload.eq(g_rec.desc)]
        if banked:
            ev["code_bytes"] = gen.i_codes.valid & gen.i_codes.ready
        else:
            with m.If(gen.i_codes.valid & gen.i_codes.ready):
                m.d.sync += ctr["code_bytes"].eq(ctr["code_bytes"] + 1)
        with m.Switch(g_st):
            with m.Case(_Seq.FETCH):
                if compact:
                    self._fetch_bytes(m, g_k, g_rec, prog_rd_gen.data, g_st, RB)
                else:
                    m.d.sync += g_st.eq(_Seq.DESC)
            with m.Case(_Seq.DESC):
                if compact:
                    fetched = g_rec
                else:
                    fetched = data.View(rec_layout, prog_rd_gen.data[:rec_layout.size])
                    m.d.sync += g_rec.eq(fetched)
                with m.If(fetched.desc.op):  # a pool has no weights
                    m.d.sync += g_st.eq(_Seq.NEXT)
                with m.Else():
                    m.d.sync += g_st.eq(_Seq.WAIT)
            with m.Case(_Seq.WAIT):
                m.d.comb += gen.i_desc.valid.eq(1)
                with m.If(gen.i_desc.ready):
                    m.d.comb += g_go.eq(1)
                    m.d.sync += g_st.eq(_Seq.DATA)
            with m.Case(_Seq.DATA):
                with m.If(~g_go_q & ~g_more & (s_left == 0) & ~codes_left):
                    m.d.sync += g_st.eq(_Seq.NEXT)
            with m.Case(_Seq.NEXT):
                with m.If(g_idx + 1 >= n_layers):
                    m.d.sync += g_st.eq(_Seq.IDLE)
                with m.Else():
                    m.d.sync += [g_idx.eq(g_idx + 1), g_st.eq(_Seq.FETCH)]

        # Engine sequencer: every record -> descriptor + constants, then wait for done.
        e_st = Signal(_Seq)
        e_idx = Signal(range(cfg.max_layers + 1))
        e_rec = Signal(rec_layout)
        e_go = Signal()
        n_out = Mux(e_rec.desc.op, e_rec.desc.ci, e_rec.desc.co)
        # The constants cross a two-word FIFO: the block RAM's output (slow out of the
        # block) lands in registers here, not in the engine's constant memories across
        # the die (with ``compact``, for a slower clock, the stream feeds the engine).
        const_w = channel_layout(cfg).size
        const_data = Value.cast(consts_rd_eng.data)[:const_w]
        if compact:
            _stream_words(m, consts_rd_eng, e_rec.const_addr, n_out, e_go, eng.i_chan.valid,
                          eng.i_chan.ready, h_consts_load | unit_rst, s_pos >> cb_log, "const")
            m.d.comb += eng.i_chan.payload.eq(const_data)
        else:
            m.submodules.const_fifo = cfifo = in_unit(SyncFIFOBuffered(width=const_w, depth=2))
            _stream_words(m, consts_rd_eng, e_rec.const_addr, n_out, e_go, cfifo.w_en,
                          cfifo.w_rdy, h_consts_load | unit_rst, s_pos >> cb_log, "const")
            m.d.comb += [cfifo.w_data.eq(const_data),
                         eng.i_chan.payload.eq(cfifo.r_data), eng.i_chan.valid.eq(cfifo.r_rdy),
                         cfifo.r_en.eq(eng.i_chan.ready)]
        m.d.comb += [prog_rd_eng.addr.eq(Cat(e_k[:rb_log], e_idx) if compact else e_idx),
                     eng.i_desc.payload.eq(e_rec.desc)]
        engine_fault = Signal()
        log_we = Signal()
        log_idx = Signal.like(e_idx)
        with m.Switch(e_st):
            with m.Case(_Seq.FETCH):
                if compact:
                    self._fetch_bytes(m, e_k, e_rec, prog_rd_eng.data, e_st, RB)
                else:
                    m.d.sync += e_st.eq(_Seq.DESC)
            with m.Case(_Seq.DESC):
                if not compact:
                    m.d.sync += e_rec.eq(prog_rd_eng.data)
                m.d.sync += e_st.eq(_Seq.WAIT)
            with m.Case(_Seq.WAIT):
                m.d.comb += eng.i_desc.valid.eq(1)
                with m.If(eng.i_desc.ready):
                    m.d.comb += e_go.eq(1)
                    m.d.sync += e_st.eq(_Seq.DATA)
            with m.Case(_Seq.DATA):
                with m.If(eng.done):
                    if cfg.layer_log:
                        for name in ENGINE_COUNTS:
                            m.d.sync += ctr[name].eq(ctr[name] + getattr(eng, name))
                    with m.If(eng.error != 0):
                        m.d.sync += [state.eq(STATE_ERROR), status_err.eq(eng.error),
                                     e_st.eq(_Seq.IDLE), g_st.eq(_Seq.IDLE), running.eq(0)]
                        m.d.comb += engine_fault.eq(1)
                    with m.Elif(e_idx + 1 >= n_layers):
                        m.d.sync += [state.eq(STATE_DONE), e_st.eq(_Seq.IDLE), running.eq(0)]
                    with m.Else():
                        m.d.sync += [e_idx.eq(e_idx + 1), e_st.eq(_Seq.FETCH)]
                    with m.If(eng.error == 0):
                        m.d.sync += [log_we.eq(1), log_idx.eq(e_idx)]
        # The layer's log entry is written the cycle after its done, when the counters
        # hold its counts (the sequencer goes on meanwhile).
        with m.If(log_we):
            m.d.sync += log_we.eq(0)
        for name, wp in zip(LOG_COUNTERS, log_wps):
            m.d.comb += [wp.addr.eq(log_idx), wp.en.eq(log_we), wp.data.eq(ctr[name])]

        if banked:
            ev.update({name: getattr(eng, f"ev_{name}") for name in ENGINE_COUNTS})
            ev.update({"cycles": running, "engine_busy": running & eng.busy,
                       "gen_busy": running & ~gen.idle})
            ev.update({name: getattr(link, f"ev_{name}") for name in LINK_COUNTERS})
            m.submodules.counters = bank = CounterBank(
                [cfg.rows * cfg.cols if name == "macs" else 1 for name in COUNTERS], counter_bits)
            m.d.comb += [bank.inc[i].eq(ev[name]) for i, name in enumerate(COUNTERS)]
        else:
            if not cfg.layer_log:
                # (No log needs a layer's counts: the engine's events are counted as they
                # come, also those of a layer that an abort or a fault stops.)
                for name in ENGINE_COUNTS:
                    m.d.sync += ctr[name].eq(ctr[name] + getattr(eng, f"ev_{name}"))
            with m.If(running):
                m.d.sync += ctr["cycles"].eq(ctr["cycles"] + 1)
                with m.If(eng.busy):
                    m.d.sync += ctr["engine_busy"].eq(ctr["engine_busy"] + 1)
                with m.If(~gen.idle):
                    m.d.sync += ctr["gen_busy"].eq(ctr["gen_busy"] + 1)
            m.d.comb += [ctr[name].eq(getattr(link, name)) for name in LINK_COUNTERS]

        # ---- executor ------------------------------------------------------------------
        ex = Signal(_Ex)
        op = Signal(8)
        length = Signal(min(16, fw))
        args = Signal(7 * 8)
        n_args = Signal(range(8))
        arg_i = Signal(range(9))
        arg_wr = Signal(range(8))
        arg_pending = Signal()
        abort = Signal()
        err = Signal(8)
        region, addr, count = args[:8], args[8:40], args[40:56]
        arg_byte = Signal(8)
        arg_place = Signal()
        arg_at = Signal.like(arg_wr)
        m.d.sync += [arg_byte.eq(link.buf_data), arg_place.eq(arg_pending & (ex == _Ex.ARGS)),
                     arg_at.eq(arg_wr)]
        with m.If(arg_place):
            m.d.sync += args.word_select(arg_at, 8).eq(arg_byte)
        abuf, achan, apix = args[:8], args[8:24], args[24:56]
        data_len = Signal(fw)
        resp_op = Signal(8)
        resp_len = Signal(min(16, rw))
        # Payload source of a streamed response (STREAM state); with ``compact`` also
        # SRC_NONE, a response without payload.
        src_sel = Signal(range(10 if compact else 9))
        (SRC_IDENT, SRC_PROG, SRC_BASES, SRC_CONSTS, SRC_STATUS, SRC_COUNTERS, SRC_ACT,
         SRC_ERROR, SRC_LOG, SRC_NONE) = range(10)
        # Activation transfer checks, summed channel by channel (no multipliers for a
        # check that runs once per transfer): elements, and entries per bank.
        rem = Signal(range(max(cfg.max_ci, cfg.max_co) + 1)) if compact else Signal(17)
        elems = Signal(ew)
        need = Signal(ew)
        lane = Signal(range(cfg.rows))
        ab_log = AB.bit_length() - 1
        # Their size checks, registered from the sums every cycle (read in TILES_END).
        tiles_deep, tiles_len_bad, tiles_long = Signal(), Signal(), Signal()
        m.d.sync += [tiles_deep.eq(need > self.engine.bank_depth),
                     tiles_len_bad.eq(data_len != (elems << ab_log)),
                     tiles_long.eq((elems << ab_log) > 0xFFFF)]
        link_rd = Signal(range(cfg.max_payload))
        m.d.comb += link.buf_addr.eq(link_rd)
        pre = {"mem_ok": {reg: Signal(name=f"pre_mem_ok_{reg}") for reg in self._region_sizes()},
               "run_ok": Signal(name="pre_run_ok"), "act_ok": Signal(name="pre_act_ok")}
        pre_n = Signal(17)
        len_ok = Signal()
        # CHECK decides on registers: the opcode one-hot (from IDLE), the region one-hot
        # and the argument flags (from PRE).
        pre["op"] = {code: Signal(name=f"pre_op_{code:02x}") for code in
                     (OP_IDENTIFY, OP_STATUS, OP_COUNTERS, OP_ABORT, OP_RUN, OP_WRITE, OP_READ,
                      OP_LOAD_ACT, OP_READ_ACT)}
        pre["region"] = {reg: Signal(name=f"pre_region_{reg}") for reg in self._region_sizes()}
        pre["addr0"], pre["count0"], pre["abuf_bad"] = (
            Signal(name="pre_addr0"), Signal(name="pre_count0"), Signal(name="pre_abuf_bad"))
        # A request on the stream region, from a register (its data path and CHECK).
        to_stream = pre["stream"] = Signal(name="pre_stream")
        pre_end = Signal(aw + 1)
        # (compact) The address or the length has bits beyond the largest region.
        pre_wide = Signal(name="pre_wide") if compact else None

        def refuse(code):
            m.d.sync += [err.eq(code), ex.eq(_Ex.ERROR)]

        if compact:
            # The response's opcode and length follow from its source and the request's
            # registers (which hold until the next request): no registers of their own.
            m.d.comb += resp_op.eq(Mux(src_sel == SRC_ERROR, OP_ERROR, op | RESPONSE))
            lengths = {SRC_IDENT: len(identity_bytes(cfg)), SRC_STATUS: 4,
                       SRC_COUNTERS: 8 * len(COUNTERS), SRC_ERROR: 2, SRC_PROG: count,
                       SRC_BASES: count, SRC_CONSTS: count, SRC_ACT: elems << ab_log,
                       **({SRC_LOG: count} if cfg.layer_log else {})}
            with m.Switch(src_sel):
                for sel, n in lengths.items():
                    with m.Case(sel):
                        m.d.comb += resp_len.eq(n)

        def respond(rop, rlen, sel=None):
            if compact:
                # (rop and rlen are those that src_sel gives, see above.)
                m.d.sync += [src_sel.eq(SRC_NONE if sel is None else sel), ex.eq(_Ex.RESPOND)]
                return
            m.d.sync += [resp_op.eq(rop), resp_len.eq(rlen), ex.eq(_Ex.RESPOND)]
            if sel is not None:
                m.d.sync += src_sel.eq(sel)

        m.d.comb += link.o_req.ready.eq(ex == _Ex.IDLE)
        bytes_of = {OP_WRITE: 5, OP_READ: 7, OP_RUN: 2, OP_LOAD_ACT: 7, OP_READ_ACT: 7}
        fixed_len = {OP_IDENTIFY: 0, OP_READ: 7, OP_RUN: 2, OP_STATUS: 0, OP_COUNTERS: 0,
                     OP_READ_ACT: 7, OP_ABORT: 0}

        with m.Switch(ex):
            with m.Case(_Ex.IDLE):
                with m.If(link.o_req.valid):
                    rq = link.o_req.payload
                    m.d.sync += [flag.eq(rq.op == code) for code, flag in pre["op"].items()]
                    if not compact:
                        # (compact: no check reads an argument byte its request does
                        # not carry; the length check makes sure they all arrived.)
                        m.d.sync += args.eq(0)
                    m.d.sync += [op.eq(rq.op), length.eq(rq.len), arg_i.eq(0),
                                 link_rd.eq(0), arg_pending.eq(0), ex.eq(_Ex.ARGS)]
                    m.d.sync += n_args.eq(0)
                    with m.Switch(rq.op):
                        for code, n in bytes_of.items():
                            with m.Case(code):
                                m.d.sync += n_args.eq(n)
                    # The length check, registered here and decided first in ARGS:
                    # nothing is acted on from a short payload.
                    ok_len = Signal()
                    with m.Switch(rq.op):
                        for code, n in fixed_len.items():
                            with m.Case(code):
                                m.d.comb += ok_len.eq(rq.len == n)
                        for code in (OP_WRITE, OP_LOAD_ACT):
                            with m.Case(code):
                                m.d.comb += ok_len.eq(rq.len > bytes_of[code])
                        with m.Default():
                            m.d.comb += ok_len.eq(1)
                    m.d.sync += len_ok.eq(ok_len)
            with m.Case(_Ex.ARGS):
                # Arguments are little endian: byte i lands at bits 8i. A byte read from
                # the frame buffer is registered before it is placed (block RAM outputs
                # are slow); the last one is placed as PRE begins.
                with m.If(~len_ok):
                    refuse(ERR_LENGTH)
                with m.Elif(arg_i < n_args):
                    m.d.sync += [link_rd.eq(link_rd + 1), arg_i.eq(arg_i + 1), arg_pending.eq(1),
                                 arg_wr.eq(arg_i)]
                with m.Else():
                    m.d.sync += arg_pending.eq(0)
                    with m.If(~arg_pending):
                        m.d.sync += [ex.eq(_Ex.PRE), data_len.eq(length - n_args)]
            # The argument checks take three registered steps before CHECK decides on
            # them: the transfer length, the end address, then the comparators (carry
            # chains on 16..40-bit values).
            with m.Case(_Ex.PRE):
                m.d.sync += [pre_n.eq(Mux(pre["op"][OP_WRITE], data_len, count)), ex.eq(_Ex.PRE2),
                             to_stream.eq((region == REGION_STREAM) if cfg.stream else 0),
                             pre["addr0"].eq(addr == 0),
                             pre["count0"].eq(count == 0),
                             pre["abuf_bad"].eq(abuf >= cfg.act_buffers)]
                m.d.sync += [flag.eq(region == reg) for reg, flag in pre["region"].items()]
            with m.Case(_Ex.PRE2):
                if compact:
                    m.d.sync += [pre_end.eq(addr[:aw] + pre_n[:aw]),
                                 pre_wide.eq(addr[aw:].any() | pre_n[aw:].any())]
                else:
                    m.d.sync += pre_end.eq(addr + pre_n)
                m.d.sync += ex.eq(_Ex.PRE3)
            with m.Case(_Ex.PRE3):
                self._precheck(m, cfg, addr, pre_n, pre_end, achan, apix, args, pre, pre_wide,
                               aw, pw)
                m.d.sync += ex.eq(_Ex.CHECK)
            with m.Case(_Ex.CHECK):
                self._check(m, cfg, op, count, achan, running, refuse, respond, ex, start,
                            abort, n_layers, args, (rem, elems, need, lane), pre,
                            (SRC_IDENT, SRC_PROG, SRC_BASES, SRC_CONSTS, SRC_STATUS, SRC_COUNTERS,
                             SRC_LOG))
            with m.Case(_Ex.TILES):
                with m.If(rem != 0):
                    m.d.sync += [rem.eq(rem - 1), elems.eq(elems + apix[:pw]),
                                 lane.eq(Mux(lane == cfg.rows - 1, 0, lane + 1))]
                    with m.If(lane == 0):
                        m.d.sync += need.eq(need + apix[:pw])
                with m.Else():
                    m.d.sync += ex.eq(_Ex.TILES_END)
            with m.Case(_Ex.TILES_END):
                # The size checks of the finished sums are registered (a cycle after
                # the last sum), so their compares do not reach the state decision.
                with m.If(tiles_deep):
                    refuse(ERR_ARGUMENT)
                with m.Elif(pre["op"][OP_LOAD_ACT]):
                    with m.If(tiles_len_bad):
                        refuse(ERR_LENGTH)
                    with m.Else():
                        m.d.sync += ex.eq(_Ex.ACT_CMD)
                with m.Else():
                    with m.If(tiles_long):
                        refuse(ERR_ARGUMENT)
                    with m.Else():
                        m.d.sync += ex.eq(_Ex.ACT_CMD)
            with m.Case(_Ex.ERROR):
                respond(OP_ERROR, 2, SRC_ERROR)
            with m.Case(_Ex.RESPOND):
                m.d.comb += [link.i_resp.valid.eq(1), link.i_resp.payload.op.eq(resp_op),
                             link.i_resp.payload.len.eq(resp_len)]
                with m.If(link.i_resp.ready):
                    if compact:
                        # (An empty response ends in STREAM's first step: the length,
                        # decoded from the source, reaches no state decision here.)
                        m.d.sync += ex.eq(_Ex.STREAM)
                    else:
                        m.d.sync += ex.eq(Mux(resp_len == 0, _Ex.IDLE, _Ex.STREAM))

        # WRITE: payload bytes after the 5 argument bytes, assembled into words.
        w_byte = Signal(fw)
        w_pending = Signal()
        wq_en = Signal()
        wq_pos = Signal(aw if compact else len(addr) + 1)
        wq_data = Signal(8)
        m.d.sync += wq_en.eq(0)
        # A streamed byte waits for room in the FIFO; the frame buffer read then holds.
        w_stall = Signal()
        m.d.comb += w_stall.eq(to_stream & w_pending & ~code_fifo.w_rdy)
        m.d.comb += code_fifo.w_data.eq(link.buf_data)
        with m.If(w_stall):
            # The frame buffer read port is always enabled: re-read the pending byte.
            m.d.comb += link.buf_addr.eq(link_rd - 1)
        # Streamed bytes that still wait when the run has ended would wait forever.
        with m.If((ex == _Ex.WRITE) & w_stall & ~running):
            refuse(ERR_STATE)
        with m.If((ex == _Ex.WRITE) & ~w_stall):
            m.d.comb += link.buf_addr.eq(link_rd)
            with m.If(w_byte < data_len):
                m.d.sync += [link_rd.eq(link_rd + 1), w_byte.eq(w_byte + 1)]
            m.d.sync += w_pending.eq(w_byte < data_len)
            with m.If(w_pending):
                with m.If(to_stream):
                    m.d.comb += code_fifo.w_en.eq(1)
                with m.Else():
                    m.d.sync += [wq_en.eq(1), wq_pos.eq(addr + w_byte - 1), wq_data.eq(link.buf_data)]
            with m.If(~w_pending & (w_byte >= data_len)):
                respond(op | RESPONSE, 0)
        # Memory writes leave from registers two cycles after the frame buffer read (its
        # block RAM output has no time left for the write-enable decode and the memory's
        # data input in the same cycle); the response follows after the last one.
        # A second register stage holds each memory's decoded byte enables, so that the
        # region select and the byte-lane decode do not share a cycle with the write.
        for wp, reg, lg, nb in ((bases_wp, REGION_BASES, 0, 1), (prog_wp, REGION_PROGRAM, prog_lg, prog_nb),
                                (consts_wp, REGION_CONSTS, cb_log, CB)):
            lanes = (1 << wq_pos[:lg]) if lg else 1
            m.d.sync += [wp.addr.eq(wq_pos >> lg), wp.data.eq(Cat(*([wq_data] * nb))),
                         wp.en.eq(Mux(wq_en & (region == reg), lanes, 0))]
        with m.If((ex == _Ex.CHECK) & pre["op"][OP_WRITE]):
            m.d.sync += [w_byte.eq(0), w_pending.eq(0), link_rd.eq(5)]

        # Streamed responses: identity, memory reads, status, counters, activations.
        s_idx = Signal(rw)
        s_phase = Signal(_Rd)
        s_sel_byte = Signal(8)
        sel_q = Signal(8)
        cidx = Signal(range(len(COUNTERS)))
        cap_ident, cap_bases = Signal(8), Signal(8)
        cap_prog, cap_consts = Signal(prog_w), Signal(8 * CB)
        consts_byte = (lambda word: word.word_select(s_sel_byte[:max(1, cb_log)], 8)
                       if cb_log else word)
        cap_counter, cap_log = Signal(counter_bits), Signal(counter_bits)
        # The block RAM outputs land in plain registers every cycle (no enable, no
        # select in front), which HOLD copies; the base store and the constants have
        # such registers of their own (hw.memory).
        raw_ident, raw_prog = Signal(8), Signal(prog_w)
        raw_bases, raw_consts = bases_rd_host.data, Value.cast(consts_rd_host.data)
        if not compact:
            m.d.sync += [raw_ident.eq(ident_rd.data), raw_prog.eq(prog_rd_host.data)]
        # A log entry is LOG_COUNTERS words of 8 bytes: byte address = (layer, word, byte).
        log_shift = 3 + (len(LOG_COUNTERS) - 1).bit_length()
        log_word = Signal(range(len(LOG_COUNTERS)))
        # The read-back addresses come straight from registers: the identity's and the
        # log's read ports have no other user, and the program port, which the engine
        # sequencer addresses during a run, is handed to the host by a register that
        # is set while a program read-back streams (such reads are refused during a
        # run). These small memories are LUT RAM, read through their address.
        prog_host = Signal()
        m.d.sync += prog_host.eq((ex == _Ex.STREAM) & (src_sel == SRC_PROG))
        m.d.comb += ident_rd.addr.eq(s_idx)
        for rp in log_rds:
            m.d.comb += rp.addr.eq(s_pos >> log_shift)
        with m.If(prog_host):
            m.d.comb += prog_rd_host.addr.eq(s_pos >> prog_lg)
        s_data = Signal(8)
        s_more = Signal()
        status_word = Cat(state, Const(0, 8 - len(state)), status_err,
                          e_idx, Const(0, 16 - len(e_idx)))
        counter_word = Signal(counter_bits)
        payload = link.i_payload
        s_byte = Signal(8)      # the byte offered, selected a cycle ahead
        m.d.comb += payload.payload.eq(s_byte)
        # Activation read-back: elements from the engine, AB bytes each.
        act_byte = Signal(range(max(2, AB)))
        with m.If(ex == _Ex.STREAM):
            with m.If(src_sel == SRC_ACT):
                elem = eng.o_read.payload.as_signed()
                ext = Signal(8 * AB)
                m.d.comb += ext.eq(elem)
                m.d.comb += [payload.valid.eq(eng.o_read.valid),
                             payload.payload.eq(ext.word_select(act_byte, 8))]
                with m.If(payload.valid & payload.ready):
                    m.d.sync += s_idx.eq(s_idx + 1)
                    with m.If(act_byte == AB - 1):
                        m.d.comb += eng.o_read.ready.eq(1)
                        m.d.sync += act_byte.eq(0)
                    with m.Else():
                        m.d.sync += act_byte.eq(act_byte + 1)
                    with m.If(s_idx == resp_len - 1):
                        m.d.sync += ex.eq(_Ex.IDLE)
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
                        m.d.sync += [s_pos.eq(addr + s_idx), s_more.eq(s_idx < resp_len),
                                     s_phase.eq(_Rd.ADDR)]
                        m.d.sync += [h_bases_load.eq(src_sel == SRC_BASES),
                                     h_consts_load.eq(src_sel == SRC_CONSTS)]
                    with m.Case(_Rd.ADDR):
                        with m.If(s_more):
                            m.d.sync += [sel_q.eq(s_idx), s_sel_byte.eq(s_pos[:8]),
                                         log_word.eq(s_pos[3:log_shift]),
                                         cidx.eq(s_idx >> 3), s_phase.eq(_Rd.CAPTURE)]
                        with m.Else():
                            m.d.sync += ex.eq(_Ex.IDLE)
                    with m.Case(_Rd.CAPTURE):
                        if banked:
                            # A counter is captured once, for its first byte, when the bank
                            # flushes it (a wait of up to one pass over the bank).
                            first = (src_sel == SRC_COUNTERS) & (sel_q[:3] == 0)
                            m.d.comb += bank.rd_index.eq(cidx)
                            with m.If(first & bank.rd_valid):
                                m.d.sync += cap_counter.eq(bank.rd_data)
                            with m.If(~first | bank.rd_valid):
                                m.d.sync += s_phase.eq(_Rd.WAIT)
                        else:
                            m.d.sync += [cap_counter.eq(counter_word), s_phase.eq(_Rd.WAIT)]
                        if log_rds:
                            m.d.sync += cap_log.eq(Array(rp.data for rp in log_rds)[log_word])
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
                                    SRC_PROG: prog_rd_host.data,
                                    SRC_CONSTS: consts_byte(raw_consts)}
                else:
                    memory_bytes = {SRC_IDENT: cap_ident, SRC_BASES: cap_bases,
                                    SRC_PROG: (cap_prog.word_select(s_sel_byte[:max(1, prog_lg)], 8)
                                               if prog_lg else cap_prog),
                                    SRC_CONSTS: consts_byte(cap_consts)}
                with m.Switch(src_sel):
                    for sel, byte in memory_bytes.items():
                        with m.Case(sel):
                            m.d.comb += s_data.eq(byte)
                    with m.Case(SRC_ERROR):
                        m.d.comb += s_data.eq(Mux(sel_q == 0, err, op))
                    with m.Case(SRC_STATUS):
                        m.d.comb += s_data.eq(status_word.word_select(sel_q[:2], 8))
                    with m.Case(SRC_COUNTERS):
                        m.d.comb += s_data.eq(Cat(cap_counter, Const(0, 64 - counter_bits))
                                              .word_select(sel_q[:3], 8))
                    if log_rds:
                        with m.Case(SRC_LOG):
                            m.d.comb += s_data.eq(Cat(cap_log, Const(0, 64 - counter_bits))
                                                  .word_select(s_sel_byte[:3], 8))
            if not banked:
                with m.Switch(cidx):
                    for i, name in enumerate(COUNTERS):
                        with m.Case(i):
                            m.d.comb += counter_word.eq(ctr[name])
        with m.If(ex == _Ex.RESPOND):
            m.d.sync += [s_idx.eq(0), s_phase.eq(_Rd.PREP), act_byte.eq(0)]

        # Activation transfers: one engine host command, then the elements.
        hc = eng.i_host.payload
        m.d.comb += [hc.write.eq(pre["op"][OP_LOAD_ACT]), hc.buf.eq(abuf), hc.channels.eq(achan),
                     hc.pixels.eq(apix)]
        l_idx = Signal(fw)
        l_pending = Signal()
        l_byte = Signal(range(max(2, AB)))
        l_word = Signal(8 * AB)
        with m.Switch(ex):
            with m.Case(_Ex.ACT_CMD):
                m.d.comb += eng.i_host.valid.eq(1)
                with m.If(eng.i_host.ready):
                    with m.If(pre["op"][OP_LOAD_ACT]):
                        m.d.sync += [ex.eq(_Ex.ACT_LOAD), l_idx.eq(0), l_pending.eq(0),
                                     l_byte.eq(0), link_rd.eq(7)]
                    with m.Else():
                        respond(op | RESPONSE, elems << ab_log, SRC_ACT)
            with m.Case(_Ex.ACT_LOAD):
                # Frame buffer bytes -> elements; the buffer read runs one byte ahead.
                full = Signal()
                m.d.comb += full.eq(l_pending & (l_byte == AB - 1) & ~eng.i_load.ready)
                m.d.comb += link.buf_addr.eq(Mux(full, link_rd - 1, link_rd))
                word = Cat(l_word[8:], link.buf_data) if AB > 1 else link.buf_data
                m.d.comb += eng.i_load.payload.eq(word[:cfg.a_bits])
                with m.If(l_pending & (l_byte == AB - 1)):
                    m.d.comb += eng.i_load.valid.eq(1)
                with m.If(~full):
                    with m.If(l_pending):
                        m.d.sync += l_word.eq(word)
                        m.d.sync += l_byte.eq(Mux(l_byte == AB - 1, 0, l_byte + 1))
                    with m.If(l_idx < data_len):
                        m.d.sync += [link_rd.eq(link_rd + 1), l_idx.eq(l_idx + 1), l_pending.eq(1)]
                    with m.Else():
                        m.d.sync += l_pending.eq(0)
                        with m.If(~l_pending):
                            m.d.sync += ex.eq(_Ex.ACT_WAIT)
            with m.Case(_Ex.ACT_WAIT):
                with m.If(~eng.busy):
                    respond(op | RESPONSE, 0)

        with m.If(g_st == _Seq.IDLE):
            m.d.sync += s_left.eq(0)
        if compact:
            # A fetch always starts at byte 0 (also after an abort stopped one).
            for k, st in ((g_k, g_st), (e_k, e_st)):
                with m.If(st != _Seq.FETCH):
                    m.d.sync += k.eq(0)
        # A run starts from a register a cycle after the RUN check: the check's decode
        # and the sequencers' state (spread over the controller) never share a cycle.
        start_q = Signal()
        m.d.sync += start_q.eq(start)
        with m.If(start_q):
            m.d.sync += [running.eq(1), state.eq(STATE_RUNNING), status_err.eq(0),
                         g_idx.eq(0), e_idx.eq(0), g_st.eq(_Seq.FETCH), e_st.eq(_Seq.FETCH)]
            run_counters = ("cycles", "engine_busy", "gen_busy", "mac_cycles", "macs",
                            "stall_weights", "stall_output", "code_bytes")
            if banked:
                m.d.comb += bank.clear.eq(sum(1 << COUNTERS.index(name) for name in run_counters))
            else:
                for name in run_counters:
                    m.d.sync += ctr[name].eq(0)
        # The unit reset leaves from a register, so that its wide net is not timed
        # behind the executor's decode logic. The units and the FIFOs are reset one
        # cycle after an abort or a fault, while both sequencers are idle, and one
        # cycle after a start, as the sequencers enter FETCH (two cycles before they
        # hand the units their first descriptors); and while the domain reset holds.
        m.d.sync += unit_rst.eq(abort | engine_fault | start)
        with m.If(abort):
            m.d.sync += [running.eq(0), g_st.eq(_Seq.IDLE), e_st.eq(_Seq.IDLE)]
            with m.If(running):
                m.d.sync += [state.eq(STATE_ERROR), status_err.eq(ERR_ABORTED)]
        return m

    @staticmethod
    def _fetch_bytes(m, k, rec, rdata, st, n_bytes):
        """One cycle of a byte-wide record fetch (``compact``): the read port addresses
        byte ``k`` of the record; byte ``k - 1``, read at the previous cycle, lands in
        the record register. DESC follows the last byte."""
        raw = Value.cast(rec)
        m.d.sync += k.eq(k + 1)
        for i in range(n_bytes):
            if 8 * i < len(raw):
                with m.If(k == i + 1):
                    m.d.sync += raw[8 * i:min(8 * i + 8, len(raw))].eq(rdata)
        with m.If(k == n_bytes):
            m.d.sync += st.eq(_Seq.DESC)

    def _region_sizes(self) -> dict:
        cfg = self.config
        sizes = {REGION_PROGRAM: cfg.max_layers * self.record_bytes,
                 REGION_BASES: cfg.base_store_bytes, REGION_CONSTS: cfg.const_depth * self.const_bytes}
        if cfg.layer_log:
            sizes[REGION_LOG] = cfg.max_layers * len(LOG_COUNTERS) * 8
        return sizes

    def _precheck(self, m, cfg, addr, n, end, achan, apix, args, pre, wide, aw, pw):
        """Registered argument checks for CHECK: RUN's layer count, LOAD_ACT/READ_ACT's
        shape, and per memory region whether the transfer of ``n`` bytes (a WRITE's
        data, a READ's count) from ``addr`` to ``end`` is in range (and, for a WRITE,
        whole words). With ``wide`` (compact), ``end`` holds the low ``aw`` bits' sum
        and ``wide`` whether ``addr`` or ``n`` has higher bits; pixel counts past ``pw``
        bits are refused the same way."""
        words = {REGION_PROGRAM: self.record_bytes, REGION_BASES: 1, REGION_CONSTS: self.const_bytes,
                 REGION_LOG: 1}
        if wide is not None:
            addr, n, apix_ok = addr[:aw], n[:aw], ~apix[pw:].any()
            apix = apix[:pw]
        for reg, size in self._region_sizes().items():
            wb = words[reg]
            aligned = ((addr & (wb - 1)) == 0) & ((n & (wb - 1)) == 0)
            in_range = (addr < size) & (n <= size) & (end <= size)
            if wide is not None:
                in_range = ~wide & in_range
            m.d.sync += pre["mem_ok"][reg].eq(in_range & (~pre["op"][OP_WRITE] | aligned))
        layers = args[:16]
        m.d.sync += pre["run_ok"].eq((layers != 0) & (layers <= cfg.max_layers))
        max_ch = max(cfg.max_ci, cfg.max_co)
        act_ok = ((achan != 0) & (achan <= max_ch) & (apix != 0)
                  & (apix <= cfg.max_h * cfg.max_w))
        m.d.sync += pre["act_ok"].eq(act_ok if wide is None else act_ok & apix_ok)

    def _check(self, m, cfg, op, count, achan, running, refuse, respond, ex, start, abort,
               n_layers, args, sums, pre, srcs):
        SRC_IDENT, SRC_PROG, SRC_BASES, SRC_CONSTS, SRC_STATUS, SRC_COUNTERS, SRC_LOG = srcs
        sizes = self._region_sizes()
        is_op, is_reg = pre["op"], pre["region"]
        is_write = is_op[OP_WRITE]
        with m.If(is_op[OP_IDENTIFY]):
            respond(op | RESPONSE, len(identity_bytes(cfg)), SRC_IDENT)
        with m.Elif(is_op[OP_STATUS]):
            respond(op | RESPONSE, 4, SRC_STATUS)
        with m.Elif(is_op[OP_COUNTERS]):
            respond(op | RESPONSE, 8 * len(COUNTERS), SRC_COUNTERS)
        with m.Elif(is_op[OP_ABORT]):
            m.d.comb += abort.eq(1)
            respond(op | RESPONSE, 0)
        with m.Elif(is_op[OP_RUN]):
            n = args[:16]
            with m.If(running):
                refuse(ERR_BUSY)
            with m.Elif(~pre["run_ok"]):
                refuse(ERR_ARGUMENT)
            with m.Else():
                m.d.comb += start.eq(1)
                m.d.sync += n_layers.eq(n)
                respond(op | RESPONSE, 0)
        with m.Elif(is_write | is_op[OP_READ]):
            with m.If(pre["stream"]):
                with m.If(~is_write | ~pre["addr0"]):
                    refuse(ERR_ADDRESS)
                with m.Elif(~running):
                    refuse(ERR_STATE)
                with m.Else():
                    m.d.sync += ex.eq(_Ex.WRITE)
            with m.Elif(running):
                refuse(ERR_BUSY)
            with m.Elif(~is_write & pre["count0"]):
                refuse(ERR_ARGUMENT)
            with m.Else():
                with m.If(~Cat(*is_reg.values()).any()):
                    refuse(ERR_ADDRESS)
                for reg in sizes:
                    with m.If(is_reg[reg]):
                        with m.If(~pre["mem_ok"][reg]):
                            refuse(ERR_ADDRESS)
                        with m.Elif(is_write & (reg == REGION_LOG)):
                            refuse(ERR_ADDRESS)
                        with m.Elif(is_write):
                            m.d.sync += ex.eq(_Ex.WRITE)
                        with m.Else():
                            respond(op | RESPONSE, count,
                                    {REGION_PROGRAM: SRC_PROG, REGION_BASES: SRC_BASES,
                                     REGION_CONSTS: SRC_CONSTS, REGION_LOG: SRC_LOG}[reg])
        with m.Elif(is_op[OP_LOAD_ACT] | is_op[OP_READ_ACT]):
            with m.If(running):
                refuse(ERR_BUSY)
            with m.Elif(pre["abuf_bad"]):
                refuse(ERR_ADDRESS)
            with m.Elif(~pre["act_ok"]):
                refuse(ERR_ARGUMENT)
            with m.Else():
                rem, elems, need, lane = sums
                m.d.sync += [ex.eq(_Ex.TILES), rem.eq(achan), elems.eq(0), need.eq(0),
                             lane.eq(0)]
        with m.Else():
            refuse(ERR_OPCODE)

