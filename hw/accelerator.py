"""The whole accelerator: host link, executor, memories, controller, generation unit, engine.

::

    i_rx -> HostLink --o_req-------------> Executor --writes-> program memory, base store, constants
    o_tx <- HostLink <-o_resp, o_payload--  | | | |
                                            | | | +--o_codes--------> code FIFO (REGION_STREAM)
                                            | | +----o_host, o_load-> ConvEngine.i_host, i_load
                                            | +------start, abort---> GenerationSequencer, EngineSequencer
                                            +<-------read-back------- memories, counters, layer log, status

    GenerationSequencer: program + base store | code FIFO -> GenerationUnit.i_desc, i_codes
    EngineSequencer:     program + constants -> ConvEngine.i_desc, i_chan; done -> run state
    GenerationUnit.o_weights --(weight FIFO)--> ConvEngine.i_weights

    events of the run, units, link -> CounterRegisters | CounterBank -> Executor
    EngineSequencer.ended + run counters -> LayerLog -> Executor

**Executor** (:class:`hw.executor.Executor`). Runs one verified request of
:mod:`host.protocol` at a time and answers it; every argument is checked before
anything is written, so a refused request changes no state. Host read-back
shares the sequencers' memory ports.

**Controller** (:mod:`hw.sequencer`). ``RUN n`` executes layer records ``0 .. n-1``
without the host: the generation sequencer hands each conv layer's descriptor
and code bytes to the generation unit, the engine sequencer hands every layer's
descriptor and constants to the engine and waits for it. A layer's codes come
from the base store, or, for a record flagged ``streamed`` (the compiler's choice
when the base store is too small for the whole network), from the code FIFO that
the host fills through ``REGION_STREAM`` writes during the run. If the engine
reports an error, the run stops in state ``error`` with the engine's error bits
and the layer index, and the generation unit and engine are reset (activation
memories keep their contents). ``ABORT`` does the same from the host.

**Counters** (:data:`host.protocol.COUNTERS`, ``counter_bits`` wide, wrapping,
:mod:`hw.counters`): the run counters restart at RUN; the link counters count
since reset. When a layer ends, the run counters named in
:data:`host.protocol.LOG_COUNTERS` are written to that layer's entry of the
layer log (``REGION_LOG``, :class:`hw.layer_log.LayerLog`), the cycle after the
layer's end; a config without ``layer_log`` has no such region. The engine's
counts (:data:`ENGINE_COUNTS`) join the run counters when each layer ends, or,
without ``layer_log``, as they happen (then also the part of a layer that a fault
or an abort stops). A ``compact`` build without ``layer_log`` keeps all the
counters in a :class:`hw.counters.CounterBank` (one block RAM).
"""

from __future__ import annotations

from amaranth.hdl import (Cat, ClockDomain, ClockSignal, Const, DomainRenamer, Module, Mux,
                          ResetSignal, Signal)
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from gen.contract import (COUNTERS, ENGINE_COUNTS, ERR_ABORTED, LINK_COUNTERS, LOG_COUNTERS,
                          STATE_ERROR, act_bytes, const_bytes, record_bytes)

from .counters import CounterBank, CounterRegisters
from .engine import ConvEngine
from .executor import Executor
from .layer_log import LayerLog
from .link import HostLink
from .memory import BlockMemory
from .sequencer import EngineSequencer, GenerationSequencer
from .serialgen import generation_unit

__all__ = ["Accelerator", "ERR_ABORTED", "ENGINE_COUNTS"]

# The counters that restart at RUN.
RUN_COUNTERS = COUNTERS[:COUNTERS.index(LINK_COUNTERS[0])]


class Accelerator(wiring.Component):
    """The accelerator of one :class:`~gen.config.AcceleratorConfig` (see the module doc).

    ``link``, ``gen`` and ``engine`` are built with it and may be replaced before
    elaboration by units of the same signature (the formal checks do).

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
        m.submodules.executor = ex = Executor(cfg)
        m.submodules.gen_seq = gseq = GenerationSequencer(cfg, fifo_domain="unit")
        m.submodules.eng_seq = eseq = EngineSequencer(cfg, fifo_domain="unit")
        m.submodules.gen = in_unit(self.gen)
        m.submodules.engine = in_unit(self.engine)
        gen, eng = self.gen, self.engine

        # Host link <-> executor.
        wiring.connect(m, wiring.flipped(self.i_rx), link.i_rx)
        wiring.connect(m, link.o_tx, wiring.flipped(self.o_tx))
        wiring.connect(m, link.o_req, ex.i_req)
        wiring.connect(m, ex.o_resp, link.i_resp)
        wiring.connect(m, ex.o_payload, link.i_payload)
        m.d.comb += [link.buf_addr.eq(ex.buf_addr), ex.buf_data.eq(link.buf_data)]

        self._memories(m, ex, gseq, eseq)

        # Controller: the sequencers and the units.
        # A run starts from a register a cycle after the RUN check: the check's decode
        # and the sequencers' state (spread over the controller) never share a cycle.
        start_q = Signal()
        m.d.sync += start_q.eq(ex.start)
        # The unit reset leaves from a register, so that its wide net is not timed
        # behind the executor's decode logic. The units and the FIFOs are reset one
        # cycle after an abort or a fault, while both sequencers are idle, and one
        # cycle after a start, as the sequencers enter FETCH (two cycles before they
        # hand the units their first descriptors); and while the domain reset holds.
        m.d.sync += unit_rst.eq(ex.abort | eseq.fault | ex.start)
        m.d.comb += [gseq.start.eq(start_q), gseq.stop.eq(ex.abort | eseq.fault),
                     gseq.n_layers.eq(ex.n_layers), gseq.flush.eq(unit_rst),
                     gseq.host_load.eq(ex.bases_load), gseq.host_addr.eq(ex.bases_addr),
                     eseq.start.eq(start_q), eseq.abort.eq(ex.abort),
                     eseq.n_layers.eq(ex.n_layers), eseq.flush.eq(unit_rst),
                     eseq.host_load.eq(ex.consts_load), eseq.host_addr.eq(ex.consts_addr),
                     eseq.done.eq(eng.done), eseq.error.eq(eng.error)]
        wiring.connect(m, gseq.o_desc, gen.i_desc)
        wiring.connect(m, gseq.o_codes, gen.i_codes)
        wiring.connect(m, eseq.o_desc, eng.i_desc)
        wiring.connect(m, eseq.o_chan, eng.i_chan)
        if cfg.stream:
            m.submodules.code_fifo = code_fifo = in_unit(
                SyncFIFOBuffered(width=8, depth=self.stream_depth))
            wiring.connect(m, ex.o_codes, code_fifo.w_stream)
            wiring.connect(m, code_fifo.r_stream, gseq.i_stream)
        # Weight vectors cross from the generation unit to the engine through a short
        # FIFO, so that neither side's handshake logic reaches into the other's (with
        # ``compact``, for a slower clock, directly).
        if cfg.compact:
            wiring.connect(m, gen.o_weights, eng.i_weights)
        else:
            m.submodules.weight_fifo = wfifo = in_unit(
                SyncFIFOBuffered(width=len(eng.i_weights.payload.as_value()), depth=4))
            m.d.comb += [wfifo.w_data.eq(gen.o_weights.payload), wfifo.w_en.eq(gen.o_weights.valid),
                         gen.o_weights.ready.eq(wfifo.w_rdy),
                         eng.i_weights.payload.eq(wfifo.r_data),
                         eng.i_weights.valid.eq(wfifo.r_rdy),
                         wfifo.r_en.eq(eng.i_weights.ready)]

        # Executor <-> engine host port, run state.
        wiring.connect(m, ex.o_host, eng.i_host)
        wiring.connect(m, ex.o_load, eng.i_load)
        wiring.connect(m, eng.o_read, ex.i_read)
        layer = eseq.layer
        m.d.comb += [ex.engine_busy.eq(eng.busy), ex.running.eq(eseq.running),
                     ex.status.eq(Cat(eseq.state, Const(0, 8 - len(eseq.state)), eseq.status_err,
                                      layer, Const(0, 16 - len(layer)))),
                     self.running.eq(eseq.running), self.error.eq(eseq.state == STATE_ERROR)]

        self._counters(m, ex, eseq, start_q)
        return m

    def _memories(self, m, ex, gseq, eseq):
        """The program memory, the base store and the constants: the executor writes
        them; each sequencer reads through its own port, which host read-back shares
        (it is refused while a run uses them): every extra read port would be another
        copy of the memory."""
        cfg = self.config
        # The program memory: a record per word, or with ``compact`` a byte per word (one
        # block RAM per read port; a record-wide memory is logic cells on an iCE40).
        m.submodules.prog = prog = Memory(shape=ex.prog_width,
                                          depth=cfg.max_layers * self.record_bytes // ex.prog_lanes,
                                          init=[])
        # The base store and the constants: registered reads, the base store in slices
        # one block RAM deep (hw.memory).
        # (compact: in single-port RAM, which the UP5K has 4 x 32 KiB of; the base store
        # is written only while no run reads it.)
        m.submodules.bases = bases = BlockMemory(8, 1, cfg.base_store_bytes, name="bases",
                                                 single_port=cfg.compact)
        m.submodules.consts = consts = BlockMemory(8, self.const_bytes, cfg.const_depth,
                                                   granular=True, name="consts")
        for wp, w in ((prog.write_port(granularity=8), ex.prog_w), (bases.write_port(), ex.bases_w),
                      (consts.write_port(), ex.consts_w)):
            m.d.comb += [wp.addr.eq(w.addr), wp.data.eq(w.data), wp.en.eq(w.en)]
        prog_gen, prog_eng = prog.read_port(), prog.read_port()
        m.d.comb += [prog_gen.addr.eq(gseq.prog.addr), gseq.prog.data.eq(prog_gen.data),
                     prog_eng.addr.eq(Mux(ex.prog_host, ex.prog_addr, eseq.prog.addr)),
                     eseq.prog.data.eq(prog_eng.data), ex.prog_data.eq(prog_eng.data)]
        for rp, port, data in ((bases.read_port(), gseq.bases, ex.bases_data),
                               (consts.read_port(), eseq.consts, ex.consts_data)):
            m.d.comb += [rp.addr.eq(port.addr), rp.en.eq(port.en), rp.out_en.eq(port.out_en),
                         port.data.eq(rp.data), data.eq(rp.data)]

    def _counters(self, m, ex, eseq, start_q):
        """The counters (registers, or a block RAM bank), fed by the events of the run,
        the units and the link; the layer log, with ``layer_log``."""
        cfg, gen, eng, link = self.config, self.gen, self.engine, self.link
        running = eseq.running
        events = {"cycles": running, "engine_busy": running & eng.busy,
                  "gen_busy": running & ~gen.idle,
                  "code_bytes": gen.i_codes.valid & gen.i_codes.ready}
        inc_max = {name: 1 for name in RUN_COUNTERS}
        if cfg.layer_log:
            # A layer's engine counts arrive whole, at its end.
            events.update({name: getattr(eng, name) for name in ENGINE_COUNTS})
            inc_max.update({name: (1 << len(getattr(eng, name))) - 1 for name in ENGINE_COUNTS})
        else:
            events.update({name: getattr(eng, f"ev_{name}") for name in ENGINE_COUNTS})
            inc_max["macs"] = cfg.rows * cfg.cols
        if cfg.counter_bank:
            events.update({name: getattr(link, f"ev_{name}") for name in LINK_COUNTERS})
            ctr = CounterBank({**inc_max, **dict.fromkeys(LINK_COUNTERS, 1)}, cfg.counter_bits)
        else:
            ctr = CounterRegisters(inc_max, cfg.counter_bits, kept=LINK_COUNTERS)
            m.d.comb += [ctr.kept[name].eq(getattr(link, name)) for name in LINK_COUNTERS]
        m.submodules.counters = ctr
        assert ctr.names == COUNTERS
        m.d.comb += [ctr.inc[name].eq(value) for name, value in events.items()]
        restart = sum(1 << COUNTERS.index(name) for name in RUN_COUNTERS)
        m.d.comb += [ctr.clear.eq(Mux(start_q, restart, 0)),
                     ctr.rd_index.eq(ex.ctr_index), ex.ctr_data.eq(ctr.rd_data),
                     ex.ctr_valid.eq(ctr.rd_valid)]
        if cfg.layer_log:
            m.d.comb += [ctr.add[name].eq(eseq.layer_done) for name in ENGINE_COUNTS]
            m.submodules.layer_log = log = LayerLog(cfg)
            m.d.comb += [log.we.eq(eseq.ended), log.layer.eq(eseq.ended_layer),
                         log.rd_layer.eq(ex.log_layer), log.rd_word.eq(ex.log_word),
                         ex.log_data.eq(log.rd_data)]
            m.d.comb += [log.counts[name].eq(ctr.values[name]) for name in LOG_COUNTERS]
