"""The device side of the host link: frames in, verified requests out, responses framed.

:class:`HostLink` implements the framing of :mod:`host.protocol` on a byte
stream (the UART PHY on a board, the simulator's byte bridge otherwise). It
hands a request to the accelerator only after the whole frame is in its frame
buffer and its CRC matched, so a corrupt or truncated frame can never change
state. Errors it can see itself (bad CRC, length above ``max_payload``, bytes
stopping mid-frame for ``link_timeout`` cycles) it answers itself; everything
else is the executor's (:class:`hw.accelerator.Accelerator`).

Executor interface
------------------
* ``o_req`` (op, len): a verified request; the payload is in the frame buffer,
  read through ``buf_addr`` -> ``buf_data`` (one cycle of latency).
* ``i_resp`` (op, len): the response header; then ``len`` bytes on ``i_payload``.
  The link accepts no new frame until the response is sent: the protocol is
  request/response, and the frame buffer still belongs to the executor.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import crc, data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from host.protocol import (CRC_BYTES, ERR_CRC, ERR_LENGTH, ERR_TIMEOUT, OP_ERROR, SYNC)


__all__ = ["HostLink", "header_layout", "LINK_COUNTERS"]

# The link's counters, in the order of host.protocol.COUNTERS.
LINK_COUNTERS = ("bytes_in", "bytes_out", "frames", "frame_errors")

def _any(view, *members):
    return Cat(*(view == mbr for mbr in members)).any()


def header_layout() -> data.StructLayout:
    return data.StructLayout({"op": unsigned(8), "len": unsigned(16)})


class _Rx(enum.Enum, shape=4):
    HUNT = 0
    OP = 1
    LEN0 = 2
    LEN1 = 3
    PAYLOAD = 4
    CRC = 5
    CHECK = 6
    EXEC = 7
    ERROR = 8
    SETTLE = 9   # the CRC register holds the whole frame; its check is registered
    LENCHK = 10  # the length checks act from registers, not from the line's byte


# The receive states that take line bytes, and those inside a frame.
RX_TAKES = (_Rx.HUNT, _Rx.OP, _Rx.LEN0, _Rx.LEN1, _Rx.PAYLOAD, _Rx.CRC)
RX_INSIDE = (_Rx.OP, _Rx.LEN0, _Rx.LEN1, _Rx.LENCHK, _Rx.PAYLOAD, _Rx.CRC)


class _Tx(enum.Enum, shape=3):
    IDLE = 0
    SYNC = 1
    OP = 2
    LEN0 = 3
    LEN1 = 4
    PAYLOAD = 5
    CRC_HI = 6
    CRC_LO = 7


class HostLink(wiring.Component):
    """Framing, CRC and frame buffer of the host link (see the module doc).

    Parameters
    ----------
    config:
        ``max_payload`` sizes the frame buffer, ``link_timeout`` the mid-frame timeout.

    Members
    -------
    i_rx, o_tx: byte streams from and to the host.
    o_req, buf_addr, buf_data: the verified request and its payload.
    i_resp, i_payload: the executor's response.
    bytes_in, bytes_out, frames, frame_errors: counters since reset (``frames``
    counts requests handed to the executor, ``frame_errors`` the ones the link
    refused). Where the accelerator keeps its counters in a
    :class:`hw.counters.CounterBank`, the link has instead ``ev_bytes_in``,
    ``ev_bytes_out``, ``ev_frames`` and ``ev_frame_errors``: each high in a cycle
    in which its counter would count.
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        self.depth = config.max_payload
        self.events = config.counter_bank
        cnt = unsigned(config.counter_bits)
        counts = ({f"ev_{name}": Out(1) for name in LINK_COUNTERS} if self.events else
                  {name: Out(cnt) for name in LINK_COUNTERS})
        super().__init__({
            "i_rx": In(stream.Signature(8)),
            "o_tx": Out(stream.Signature(8)),
            "o_req": Out(stream.Signature(header_layout())),
            "buf_addr": In(range(self.depth)),
            "buf_data": Out(8),
            "i_resp": In(stream.Signature(header_layout())),
            "i_payload": In(stream.Signature(8)),
            **counts,
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        algo = crc.catalog.CRC16_CCITT_FALSE(data_width=8)
        m.submodules.rx_crc = rx_crc = algo.create()
        m.submodules.tx_crc = tx_crc = algo.create()
        m.submodules.buf = buf = Memory(shape=8, depth=self.depth, init=[])
        wp = buf.write_port()
        rp = buf.read_port()
        m.d.comb += [rp.addr.eq(self.buf_addr), self.buf_data.eq(rp.data)]

        rx = Signal(_Rx)
        op = Signal(8)
        length = Signal(16)
        count = Signal(16)
        crc_count = Signal(range(CRC_BYTES + 1))
        idle = Signal(range(cfg.link_timeout + 1))
        err_code = Signal(8)
        len_over, len_zero = Signal(), Signal()   # the length checks, registered
        pay_last = Signal()                       # count == length - 1, registered
        byte = self.i_rx.payload
        fire = self.i_rx.valid & self.i_rx.ready

        # Whether the state takes line bytes, and whether it is inside a frame: flags
        # kept with the state (every change of state goes through ``goto``), so the
        # handshake and the timeout start from flip-flops, not from a state decode.
        rx_takes = Signal(init=1)
        rx_inside = Signal()

        def goto(st):
            return [rx.eq(st), rx_takes.eq(int(st in RX_TAKES)), rx_inside.eq(int(st in RX_INSIDE))]

        m.d.comb += self.i_rx.ready.eq(rx_takes)
        if self.events:
            m.d.comb += self.ev_bytes_in.eq(fire)
        else:
            with m.If(fire):
                m.d.sync += self.bytes_in.eq(self.bytes_in + 1)
        m.d.comb += [rx_crc.data.eq(byte),
                     rx_crc.valid.eq(fire & (rx != _Rx.HUNT)),
                     rx_crc.start.eq(fire & (rx == _Rx.HUNT))]

        # A frame whose bytes stop arriving is dropped, so a truncated frame cannot
        # hold the link forever.
        # The timeout compare is registered: ``timed_out`` holds exactly when ``idle``
        # is link_timeout - 1 (link_timeout >= 16).
        mid_frame = rx_inside
        timed_out = Signal()
        with m.If(~mid_frame | fire):
            m.d.sync += [idle.eq(0), timed_out.eq(0)]
        with m.Else():
            m.d.sync += [idle.eq(idle + 1), timed_out.eq(idle == cfg.link_timeout - 2)]

        # The 32-bit residue compare is registered: the frame verdict (state, error
        # code, counters) starts from one flip-flop.
        crc_match = Signal()
        m.d.sync += crc_match.eq(rx_crc.match_detected)

        # The refusal count follows a cycle later, from a register: the refusal
        # conditions then enable two registers, not a 48-bit counter.
        refused = Signal()
        m.d.sync += refused.eq(0)
        if self.events:
            m.d.comb += self.ev_frame_errors.eq(refused)
        else:
            with m.If(refused):
                m.d.sync += self.frame_errors.eq(self.frame_errors + 1)

        def refuse(code):
            m.d.sync += [err_code.eq(code), *goto(_Rx.ERROR), refused.eq(1)]

        m.d.comb += [wp.addr.eq(count), wp.data.eq(byte)]
        with m.Switch(rx):
            with m.Case(_Rx.HUNT):
                with m.If(fire & (byte == SYNC)):
                    m.d.sync += goto(_Rx.OP)
            with m.Case(_Rx.OP):
                with m.If(fire):
                    m.d.sync += [op.eq(byte), *goto(_Rx.LEN0)]
            with m.Case(_Rx.LEN0):
                with m.If(fire):
                    m.d.sync += [length[:8].eq(byte), *goto(_Rx.LEN1)]
            with m.Case(_Rx.LEN1):
                with m.If(fire):
                    new_len = Cat(length[:8], byte)
                    m.d.sync += [length[8:].eq(byte), count.eq(0), crc_count.eq(0),
                                 len_over.eq(new_len > self.depth), len_zero.eq(new_len == 0),
                                 *goto(_Rx.LENCHK)]
            with m.Case(_Rx.LENCHK):
                m.d.sync += pay_last.eq(length == 1)
                with m.If(len_over):
                    refuse(ERR_LENGTH)
                with m.Elif(len_zero):
                    m.d.sync += goto(_Rx.CRC)
                with m.Else():
                    m.d.sync += goto(_Rx.PAYLOAD)
            with m.Case(_Rx.PAYLOAD):
                m.d.comb += wp.en.eq(fire)
                with m.If(fire):
                    m.d.sync += [count.eq(count + 1), pay_last.eq(count + 2 == length)]
                    with m.If(pay_last):
                        m.d.sync += goto(_Rx.CRC)
            with m.Case(_Rx.CRC):
                with m.If(fire):
                    m.d.sync += crc_count.eq(crc_count + 1)
                    with m.If(crc_count == CRC_BYTES - 1):
                        m.d.sync += goto(_Rx.SETTLE)
            with m.Case(_Rx.SETTLE):
                m.d.sync += goto(_Rx.CHECK)
            with m.Case(_Rx.CHECK):
                with m.If(crc_match):
                    m.d.sync += goto(_Rx.EXEC)
                    if self.events:
                        m.d.comb += self.ev_frames.eq(1)
                    else:
                        m.d.sync += self.frames.eq(self.frames + 1)
                with m.Else():
                    refuse(ERR_CRC)
        with m.If(mid_frame & timed_out & ~fire):
            refuse(ERR_TIMEOUT)

        # ---- request to the executor, response framing ---------------------------------
        req_pending = Signal()
        m.d.comb += [self.o_req.valid.eq(req_pending),
                     self.o_req.payload.op.eq(op), self.o_req.payload.len.eq(length)]
        with m.If((rx == _Rx.CHECK) & crc_match):
            m.d.sync += req_pending.eq(1)
        with m.If(self.o_req.valid & self.o_req.ready):
            m.d.sync += req_pending.eq(0)

        tx = Signal(_Tx)
        t_op = Signal(8)
        t_len = Signal(16)
        t_count = Signal(16)
        t_own = Signal()     # the link's own error frame (payload err_code, op)
        out = self.o_tx
        tx_fire = out.valid & out.ready
        if self.events:
            m.d.comb += self.ev_bytes_out.eq(tx_fire)
        else:
            with m.If(tx_fire):
                m.d.sync += self.bytes_out.eq(self.bytes_out + 1)
        m.d.comb += [tx_crc.start.eq(tx == _Tx.SYNC), tx_crc.data.eq(out.payload),
                     tx_crc.valid.eq(tx_fire & ~_any(tx, _Tx.SYNC, _Tx.CRC_HI, _Tx.CRC_LO))]

        # The executor's payload bytes land in a two-byte FIFO before framing and the
        # CRC: their sources (block RAM outputs, read-back muxes) are slow enough
        # already, and the executor's ready is then a function of the FIFO's registers,
        # not of the line side's ready.
        m.submodules.p_fifo = p_fifo = SyncFIFOBuffered(width=8, depth=2)
        in_payload = (tx == _Tx.PAYLOAD) & ~t_own
        m.d.comb += [self.i_payload.ready.eq(in_payload & p_fifo.w_rdy),
                     p_fifo.w_en.eq(self.i_payload.valid & in_payload),
                     p_fifo.w_data.eq(self.i_payload.payload),
                     p_fifo.r_en.eq(in_payload & out.ready)]
        p_valid, p_data = p_fifo.r_rdy, p_fifo.r_data

        m.d.comb += self.i_resp.ready.eq((tx == _Tx.IDLE) & (rx == _Rx.EXEC) & ~req_pending)
        with m.Switch(tx):
            with m.Case(_Tx.IDLE):
                with m.If(rx == _Rx.ERROR):
                    m.d.sync += [t_op.eq(OP_ERROR), t_len.eq(2), t_own.eq(1), tx.eq(_Tx.SYNC)]
                with m.Elif(self.i_resp.valid & self.i_resp.ready):
                    m.d.sync += [t_op.eq(self.i_resp.payload.op), t_len.eq(self.i_resp.payload.len),
                                 t_own.eq(0), tx.eq(_Tx.SYNC)]
            with m.Case(_Tx.SYNC):
                m.d.comb += [out.valid.eq(1), out.payload.eq(SYNC)]
                with m.If(out.ready):
                    m.d.sync += tx.eq(_Tx.OP)
            with m.Case(_Tx.OP):
                m.d.comb += [out.valid.eq(1), out.payload.eq(t_op)]
                with m.If(out.ready):
                    m.d.sync += tx.eq(_Tx.LEN0)
            with m.Case(_Tx.LEN0):
                m.d.comb += [out.valid.eq(1), out.payload.eq(t_len[:8])]
                with m.If(out.ready):
                    m.d.sync += tx.eq(_Tx.LEN1)
            with m.Case(_Tx.LEN1):
                m.d.comb += [out.valid.eq(1), out.payload.eq(t_len[8:])]
                with m.If(out.ready):
                    m.d.sync += [t_count.eq(0), tx.eq(Mux(t_len == 0, _Tx.CRC_HI, _Tx.PAYLOAD))]
            with m.Case(_Tx.PAYLOAD):
                with m.If(t_own):
                    m.d.comb += [out.valid.eq(1), out.payload.eq(Mux(t_count == 0, err_code, op))]
                with m.Else():
                    m.d.comb += [out.valid.eq(p_valid), out.payload.eq(p_data)]
                with m.If(tx_fire):
                    m.d.sync += t_count.eq(t_count + 1)
                    with m.If(t_count == t_len - 1):
                        m.d.sync += tx.eq(_Tx.CRC_HI)
            with m.Case(_Tx.CRC_HI):
                m.d.comb += [out.valid.eq(1), out.payload.eq(tx_crc.crc[8:])]
                with m.If(out.ready):
                    m.d.sync += tx.eq(_Tx.CRC_LO)
            with m.Case(_Tx.CRC_LO):
                m.d.comb += [out.valid.eq(1), out.payload.eq(tx_crc.crc[:8])]
                with m.If(out.ready):
                    m.d.sync += tx.eq(_Tx.IDLE)
                    # The frame is answered: the link takes the next one.
                    m.d.sync += goto(_Rx.HUNT)
        return m
