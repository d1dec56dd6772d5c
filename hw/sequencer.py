"""The controller's two sequencers: they walk the layer records of a run without the host.

``RUN n`` executes the records ``0 .. n-1`` of the program memory. Two
sequencers walk them independently, each with its own read port of the program
memory, and stream back-pressure keeps them in step:

* :class:`GenerationSequencer` hands each conv layer's descriptor and its code
  bytes to the generation unit (a pool has no weights and is skipped). The codes
  come from the base store, or, for a record flagged ``streamed``, from the
  stream FIFO that the host fills during the run. The generation of a layer's
  weights starts as soon as the generation unit takes the descriptor, so it
  overlaps the end of the previous layer.
* :class:`EngineSequencer` hands every layer's descriptor and constants to the
  engine and waits for its ``done``. It keeps the run's state (``running``, the
  status ``state``, the error code, the layer index): the run ends after the last
  layer, or on an engine error (state ``error`` with the engine's error bits) or
  an ``abort`` (error :data:`ERR_ABORTED`).

Per record each walks ``FETCH`` (the record is read from the program memory: a
cycle, or with ``compact`` a byte a cycle from a byte-wide memory), ``DESC``,
``WAIT`` (the descriptor is offered until taken), ``DATA`` (codes or constants
stream, or the engine computes) and ``NEXT``. Both start at ``start`` (a
register: the cycle after the RUN check) and, two cycles later, offer their
first descriptors. The base store's and the constants' read ports are shared
with the host's read-back through the sequencers' stream address registers:
``host_load`` points the register at ``host_addr`` (and ends a transfer), so no
address select sits in front of the block RAMs; ``flush`` (the units' reset)
also ends a transfer.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, DomainRenamer, Module, Mux, Signal, Value, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from gen.contract import (ERR_ABORTED, STATE_DONE, STATE_ERROR, STATE_RUNNING, channel_layout,
                          const_bytes, record_bytes)

from .interfaces import descriptor_layout, layer_record_layout

__all__ = ["GenerationSequencer", "EngineSequencer", "ERR_ABORTED", "read_port_signature"]


class _Seq(enum.Enum, shape=3):
    IDLE = 0
    FETCH = 1
    DESC = 2
    DATA = 3
    WAIT = 4
    NEXT = 5


def read_port_signature(shape, depth: int) -> wiring.Signature:
    """A :class:`hw.memory.BlockMemory` read port as its user sees it: ``data`` is
    registered twice after ``addr``; ``en`` and ``out_en`` hold the two stages."""
    return wiring.Signature({"addr": Out(range(depth)), "en": Out(1, init=1),
                             "out_en": Out(1, init=1), "data": In(shape)})


def program_port_signature(config: AcceleratorConfig) -> wiring.Signature:
    """A read port of the program memory (a record per word; with ``compact`` a byte
    per word), data the cycle after the address."""
    rb = record_bytes(config)
    width, depth = (8, config.max_layers * rb) if config.compact else (8 * rb, config.max_layers)
    return wiring.Signature({"addr": Out(range(depth)), "data": In(width)})


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


def _fetch_record(m, config, st, idx, rec, port, name):
    """FETCH and the record register of a sequencer in state ``st`` at record ``idx``.

    A record-wide program memory is read in one cycle and lands in ``rec`` in DESC.
    With ``compact`` the memory is byte-wide: FETCH addresses byte ``k`` of the
    record each cycle, byte ``k - 1`` (read at the previous cycle) lands in bits
    ``8(k - 1)..`` of ``rec``, and DESC follows the last byte. Returns the record
    as DESC sees it."""
    rb = record_bytes(config)
    if not config.compact:
        m.d.comb += port.addr.eq(idx)
        with m.If(st == _Seq.FETCH):
            m.d.sync += st.eq(_Seq.DESC)
        fetched = data.View(rec.shape(), port.data[:rec.shape().size])
        with m.If(st == _Seq.DESC):
            m.d.sync += rec.eq(fetched)
        return fetched
    k = Signal(range(rb + 1), name=f"{name}_k")
    m.d.comb += port.addr.eq(Cat(k[:rb.bit_length() - 1], idx))
    raw = Value.cast(rec)
    with m.If(st == _Seq.FETCH):
        m.d.sync += k.eq(k + 1)
        for i in range(rb):
            if 8 * i < len(raw):
                with m.If(k == i + 1):
                    m.d.sync += raw[8 * i:min(8 * i + 8, len(raw))].eq(port.data)
        with m.If(k == rb):
            m.d.sync += st.eq(_Seq.DESC)
    with m.Else():
        # A fetch always starts at byte 0 (also after an abort stopped one).
        m.d.sync += k.eq(0)
    return rec


class GenerationSequencer(wiring.Component):
    """Conv records -> generation unit descriptors and code bytes (see the module doc).

    Parameters
    ----------
    config:
        The accelerator's config.
    fifo_domain:
        The domain of the small FIFOs in front of the unit (the accelerator puts them
        in the unit's domain, whose reset clears them with the unit).

    Members
    -------
    start, stop, n_layers: In; ``start`` walks records ``0 .. n_layers-1`` from the
        next cycle on, ``stop`` (an abort or an engine fault) returns to idle.
    flush: In, the generation unit's reset: ends the code transfer.
    host_load, host_addr: In, the base store read-back (see the module doc).
    prog: the program memory read port. bases: the base store read port.
    i_stream: In, streamed code bytes (the stream FIFO). o_desc, o_codes: Out, to the
        generation unit.
    """

    def __init__(self, config: AcceleratorConfig, *, fifo_domain: str = "sync"):
        self.config = config
        self.fifo_domain = fifo_domain
        super().__init__({
            "start": In(1),
            "stop": In(1),
            "n_layers": In(range(config.max_layers + 1)),
            "flush": In(1),
            "host_load": In(1),
            "host_addr": In(range(config.base_store_bytes)),
            "prog": Out(program_port_signature(config)),
            "bases": Out(read_port_signature(8, config.base_store_bytes)),
            "i_stream": In(stream.Signature(8)),
            "o_desc": Out(stream.Signature(descriptor_layout(config))),
            "o_codes": Out(stream.Signature(unsigned(8))),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        st = Signal(_Seq)
        idx = Signal(range(cfg.max_layers + 1))
        rec = Signal(layer_record_layout(cfg))
        go, go_q = Signal(), Signal()
        b_valid, b_ready = Signal(), Signal()
        fetched = _fetch_record(m, cfg, st, idx, rec, self.prog, "g")
        # The code stream starts the cycle after the unit takes the descriptor, from a
        # register: the unit's ready (its state) then stays inside the unit.
        m.d.sync += go_q.eq(go)
        # (Without code streaming the record's flag is taken as zero; the host refuses
        # to build a program that sets it for such a build, host.image.)
        streamed = rec.streamed if cfg.stream else Const(0)
        more = _stream_words(m, self.bases, rec.code_addr, rec.code_len, go_q & ~streamed,
                             b_valid, b_ready, self.host_load | self.flush, self.host_addr,
                             "gcode")
        # Streamed bytes still to take from the stream FIFO.
        s_left = Signal.like(rec.code_len)
        with m.If(go_q & streamed):
            m.d.sync += s_left.eq(rec.code_len)
        with m.If(self.i_stream.valid & self.i_stream.ready):
            m.d.sync += s_left.eq(s_left - 1)
        # The unit reset (abort, fault, start) also ends both code sources' transfers:
        # nothing left over from a stopped run reaches the FIFOs after their reset.
        with m.If(self.flush | (st == _Seq.IDLE)):
            m.d.sync += s_left.eq(0)
        codes_left = self._code_sources(m, streamed, b_valid, b_ready, s_left != 0)
        m.d.comb += self.o_desc.payload.eq(rec.desc)

        with m.Switch(st):
            with m.Case(_Seq.DESC):
                with m.If(fetched.desc.op):  # a pool has no weights
                    m.d.sync += st.eq(_Seq.NEXT)
                with m.Else():
                    m.d.sync += st.eq(_Seq.WAIT)
            with m.Case(_Seq.WAIT):
                m.d.comb += self.o_desc.valid.eq(1)
                with m.If(self.o_desc.ready):
                    m.d.comb += go.eq(1)
                    m.d.sync += st.eq(_Seq.DATA)
            with m.Case(_Seq.DATA):
                with m.If(~go_q & ~more & (s_left == 0) & ~codes_left):
                    m.d.sync += st.eq(_Seq.NEXT)
            with m.Case(_Seq.NEXT):
                with m.If(idx + 1 >= self.n_layers):
                    m.d.sync += st.eq(_Seq.IDLE)
                with m.Else():
                    m.d.sync += [idx.eq(idx + 1), st.eq(_Seq.FETCH)]
        with m.If(self.start):
            m.d.sync += [idx.eq(0), st.eq(_Seq.FETCH)]
        with m.If(self.stop):
            m.d.sync += st.eq(_Seq.IDLE)
        return m

    def _code_sources(self, m, streamed, b_valid, b_ready, stream_more):
        """The unit takes its code bytes from the base store or the stream FIFO (by the
        record's flag); returns the signal that is high while bytes wait between them."""
        bases, fifo, codes = self.bases, self.i_stream, self.o_codes
        if self.config.compact:
            # (compact, for a slower clock: both sources feed the unit directly.)
            with m.If(streamed):
                m.d.comb += [codes.valid.eq(fifo.valid & stream_more),
                             codes.payload.eq(fifo.payload),
                             fifo.ready.eq(codes.ready & stream_more)]
            with m.Else():
                m.d.comb += [codes.valid.eq(b_valid), codes.payload.eq(bases.data),
                             b_ready.eq(codes.ready)]
            return Const(0)
        # Each source of code bytes (both are block RAM outputs, slow) writes its own
        # two-entry register FIFO, whose data inputs have no select in front of them;
        # the unit takes from the FIFO of the record's source. The sequencer leaves a
        # record only once its FIFO is empty, so bytes never cross between records.
        # (Streamed bytes arrive at the host link's pace: a FIFO that takes one every
        # other cycle, but keeps its items in registers, is enough.)
        in_fifo_domain = DomainRenamer(self.fifo_domain)
        m.submodules.base_q = base_q = in_fifo_domain(SyncFIFO(width=8, depth=2))
        m.submodules.stream_q = stream_q = in_fifo_domain(SyncFIFOBuffered(width=8, depth=2))
        m.d.comb += [base_q.w_en.eq(b_valid), base_q.w_data.eq(bases.data),
                     b_ready.eq(base_q.w_rdy),
                     stream_q.w_en.eq(streamed & fifo.valid & stream_more),
                     stream_q.w_data.eq(fifo.payload),
                     fifo.ready.eq(streamed & stream_q.w_rdy & stream_more)]
        with m.If(streamed):
            m.d.comb += [codes.valid.eq(stream_q.r_rdy), codes.payload.eq(stream_q.r_data),
                         stream_q.r_en.eq(codes.ready)]
        with m.Else():
            m.d.comb += [codes.valid.eq(base_q.r_rdy), codes.payload.eq(base_q.r_data),
                         base_q.r_en.eq(codes.ready)]
        return (base_q.level != 0) | (stream_q.level != 0)


class EngineSequencer(wiring.Component):
    """Every record -> engine descriptor and constants, then the wait for the engine's
    ``done``; the run's state (see the module doc).

    Parameters
    ----------
    config:
        The accelerator's config.
    fifo_domain:
        As :class:`GenerationSequencer`, for the constants' FIFO.

    Members
    -------
    start, abort, n_layers: In; ``start`` begins a run of records ``0 .. n_layers-1``
        from the next cycle on, ``abort`` stops it.
    flush, host_load, host_addr: In, as :class:`GenerationSequencer` (for the constants).
    prog: the program memory read port. consts: the constants read port.
    o_desc, o_chan: Out, to the engine. done, error: In, the engine's.
    running, state, status_err, layer: Out, the run's state (``host.protocol``
        ``STATE_*``), its error code and the record it is at.
    fault: Out, high in the cycle an engine error ends the run.
    layer_done: Out, high in the cycle the engine reports a layer's end.
    ended, ended_layer: Out, high the cycle after a layer ended without error (the
        counters then hold its counts), and that layer's index.
    """

    def __init__(self, config: AcceleratorConfig, *, fifo_domain: str = "sync"):
        self.config = config
        self.fifo_domain = fifo_domain
        layers = range(config.max_layers + 1)
        super().__init__({
            "start": In(1),
            "abort": In(1),
            "n_layers": In(layers),
            "flush": In(1),
            "host_load": In(1),
            "host_addr": In(range(config.const_depth)),
            "prog": Out(program_port_signature(config)),
            "consts": Out(read_port_signature(8 * const_bytes(config),
                                              config.const_depth)),
            "o_desc": Out(stream.Signature(descriptor_layout(config))),
            "o_chan": Out(stream.Signature(channel_layout(config))),
            "done": In(1),
            "error": In(2),
            "running": Out(1),
            "state": Out(range(4)),
            "status_err": Out(8),
            "layer": Out(layers),
            "fault": Out(1),
            "layer_done": Out(1),
            "ended": Out(1),
            "ended_layer": Out(layers),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        st = Signal(_Seq)
        idx = self.layer
        rec = Signal(layer_record_layout(cfg))
        go = Signal()
        _fetch_record(m, cfg, st, idx, rec, self.prog, "e")
        self._constants(m, rec, go)
        m.d.comb += self.o_desc.payload.eq(rec.desc)
        running, state, status_err = self.running, self.state, self.status_err
        with m.Switch(st):
            with m.Case(_Seq.DESC):
                m.d.sync += st.eq(_Seq.WAIT)
            with m.Case(_Seq.WAIT):
                m.d.comb += self.o_desc.valid.eq(1)
                with m.If(self.o_desc.ready):
                    m.d.comb += go.eq(1)
                    m.d.sync += st.eq(_Seq.DATA)
            with m.Case(_Seq.DATA):
                with m.If(self.done):
                    m.d.comb += self.layer_done.eq(1)
                    with m.If(self.error != 0):
                        m.d.sync += [state.eq(STATE_ERROR), status_err.eq(self.error),
                                     st.eq(_Seq.IDLE), running.eq(0)]
                        m.d.comb += self.fault.eq(1)
                    with m.Elif(idx + 1 >= self.n_layers):
                        m.d.sync += [state.eq(STATE_DONE), st.eq(_Seq.IDLE), running.eq(0)]
                    with m.Else():
                        m.d.sync += [idx.eq(idx + 1), st.eq(_Seq.FETCH)]
                    with m.If(self.error == 0):
                        m.d.sync += [self.ended.eq(1), self.ended_layer.eq(idx)]
        # The layer's log entry is written the cycle after its done, when the counters
        # hold its counts (the sequencer goes on meanwhile).
        with m.If(self.ended):
            m.d.sync += self.ended.eq(0)
        with m.If(self.start):
            m.d.sync += [running.eq(1), state.eq(STATE_RUNNING), status_err.eq(0),
                         idx.eq(0), st.eq(_Seq.FETCH)]
        with m.If(self.abort):
            m.d.sync += [running.eq(0), st.eq(_Seq.IDLE)]
            with m.If(running):
                m.d.sync += [state.eq(STATE_ERROR), status_err.eq(ERR_ABORTED)]
        return m

    def _constants(self, m, rec, go):
        """The layer's constants (``co`` words, ``ci`` for a pool) from ``const_addr`` on."""
        n_out = Mux(rec.desc.op, rec.desc.ci, rec.desc.co)
        chan = self.o_chan
        const_w = channel_layout(self.config).size
        const_data = Value.cast(self.consts.data)[:const_w]
        stop = self.host_load | self.flush
        if self.config.compact:
            # (compact, for a slower clock: the stream feeds the engine.)
            _stream_words(m, self.consts, rec.const_addr, n_out, go, chan.valid, chan.ready,
                          stop, self.host_addr, "const")
            m.d.comb += chan.payload.eq(const_data)
            return
        # The constants cross a two-word FIFO: the block RAM's output (slow out of the
        # block) lands in registers here, not in the engine's constant memories across
        # the die.
        m.submodules.const_fifo = cfifo = DomainRenamer(self.fifo_domain)(
            SyncFIFOBuffered(width=const_w, depth=2))
        _stream_words(m, self.consts, rec.const_addr, n_out, go, cfifo.w_en, cfifo.w_rdy,
                      stop, self.host_addr, "const")
        m.d.comb += [cfifo.w_data.eq(const_data),
                     chan.payload.eq(cfifo.r_data), chan.valid.eq(cfifo.r_rdy),
                     cfifo.r_en.eq(chan.ready)]
