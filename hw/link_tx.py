"""The transmit side of the host link: responses and error frames framed onto the byte stream.

:class:`FrameTransmitter` sends one :mod:`host.protocol` frame at a time: SYNC,
opcode, the 16-bit length (little-endian), the tag, the payload and the CRC
(high byte first). The frame is either the executor's response (a header on
``i_resp``, then its ``len`` payload bytes on ``i_payload``) or the link's own
error frame (``OP_ERROR``, payload ``err_code``, ``err_op``), sent while
``error`` is high. Either carries ``tag``, the tag of the request it answers.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import crc, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from gen.contract import OP_ERROR, SYNC

from .link_rx import header_layout

__all__ = ["FrameTransmitter"]


class _Tx(enum.Enum, shape=4):
    IDLE = 0
    SYNC = 1
    OP = 2
    LEN0 = 3
    LEN1 = 4
    PAYLOAD = 5
    CRC_HI = 6
    CRC_LO = 7
    TAG = 8


class FrameTransmitter(wiring.Component):
    """Response framing with CRC (see the module doc).

    Members
    -------
    o_tx: the line's bytes, one frame at a time. SYNC is offered the cycle
        after the frame starts; header and CRC bytes are offered at once, a
        response's payload bytes as they come out of a two-byte FIFO.
    i_resp: a response header; taken only while idle, ``accept`` high and
        ``error`` low. Its frame starts the cycle after it is taken.
    i_payload: the response's ``len`` payload bytes, taken into the FIFO
        while the payload is being sent.
    accept: the executor may answer (the receiver holds a request taken).
    tag: the tag of the frame being answered; taken when the frame starts.
    error, err_code, err_op: send the error frame ``OP_ERROR`` with payload
        ``err_code``, ``err_op``. Seen only while idle, where it takes
        precedence over ``i_resp``; the frame starts the next cycle. ``error``
        must fall in the cycle after ``done``, or the frame is sent again.
    done: high in the cycle the frame's last byte (the CRC's low byte) is
        taken; the transmitter is idle from the next cycle on.
    """

    def __init__(self):
        super().__init__({
            "o_tx": Out(stream.Signature(8)),
            "i_resp": In(stream.Signature(header_layout())),
            "i_payload": In(stream.Signature(8)),
            "accept": In(1),
            "tag": In(8),
            "error": In(1),
            "err_code": In(8),
            "err_op": In(8),
            "done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.tx_crc = tx_crc = crc.catalog.CRC16_CCITT_FALSE(data_width=8).create()

        state = Signal(_Tx)
        t_op = Signal(8)
        t_len = Signal(16)
        t_tag = Signal(8)
        t_count = Signal(16)
        own = Signal()     # the link's own error frame (payload err_code, err_op)
        out = self.o_tx
        fire = out.valid & out.ready
        m.d.comb += [tx_crc.start.eq(state == _Tx.SYNC), tx_crc.data.eq(out.payload),
                     tx_crc.valid.eq(fire & ~Cat(state == _Tx.SYNC, state == _Tx.CRC_HI,
                                                 state == _Tx.CRC_LO).any())]

        # The executor's payload bytes land in a two-byte FIFO before framing and the
        # CRC: their sources (block RAM outputs, read-back muxes) are slow enough
        # already, and the executor's ready is then a function of the FIFO's registers,
        # not of the line side's ready.
        m.submodules.p_fifo = p_fifo = SyncFIFOBuffered(width=8, depth=2)
        in_payload = (state == _Tx.PAYLOAD) & ~own
        m.d.comb += [self.i_payload.ready.eq(in_payload & p_fifo.w_rdy),
                     p_fifo.w_en.eq(self.i_payload.valid & in_payload),
                     p_fifo.w_data.eq(self.i_payload.payload),
                     p_fifo.r_en.eq(in_payload & out.ready)]
        p_valid, p_data = p_fifo.r_rdy, p_fifo.r_data

        m.d.comb += self.i_resp.ready.eq((state == _Tx.IDLE) & self.accept & ~self.error)
        with m.Switch(state):
            with m.Case(_Tx.IDLE):
                m.d.sync += t_tag.eq(self.tag)
                with m.If(self.error):
                    m.d.sync += [t_op.eq(OP_ERROR), t_len.eq(2), own.eq(1), state.eq(_Tx.SYNC)]
                with m.Elif(self.i_resp.valid & self.i_resp.ready):
                    m.d.sync += [t_op.eq(self.i_resp.payload.op), t_len.eq(self.i_resp.payload.len),
                                 own.eq(0), state.eq(_Tx.SYNC)]
            with m.Case(_Tx.SYNC):
                m.d.comb += [out.valid.eq(1), out.payload.eq(SYNC)]
                with m.If(out.ready):
                    m.d.sync += state.eq(_Tx.OP)
            with m.Case(_Tx.OP):
                m.d.comb += [out.valid.eq(1), out.payload.eq(t_op)]
                with m.If(out.ready):
                    m.d.sync += state.eq(_Tx.LEN0)
            with m.Case(_Tx.LEN0):
                m.d.comb += [out.valid.eq(1), out.payload.eq(t_len[:8])]
                with m.If(out.ready):
                    m.d.sync += state.eq(_Tx.LEN1)
            with m.Case(_Tx.LEN1):
                m.d.comb += [out.valid.eq(1), out.payload.eq(t_len[8:])]
                with m.If(out.ready):
                    m.d.sync += state.eq(_Tx.TAG)
            with m.Case(_Tx.TAG):
                m.d.comb += [out.valid.eq(1), out.payload.eq(t_tag)]
                with m.If(out.ready):
                    m.d.sync += [t_count.eq(0),
                                 state.eq(Mux(t_len == 0, _Tx.CRC_HI, _Tx.PAYLOAD))]
            with m.Case(_Tx.PAYLOAD):
                with m.If(own):
                    m.d.comb += [out.valid.eq(1),
                                 out.payload.eq(Mux(t_count == 0, self.err_code, self.err_op))]
                with m.Else():
                    m.d.comb += [out.valid.eq(p_valid), out.payload.eq(p_data)]
                with m.If(fire):
                    m.d.sync += t_count.eq(t_count + 1)
                    with m.If(t_count == t_len - 1):
                        m.d.sync += state.eq(_Tx.CRC_HI)
            with m.Case(_Tx.CRC_HI):
                m.d.comb += [out.valid.eq(1), out.payload.eq(tx_crc.crc[8:])]
                with m.If(out.ready):
                    m.d.sync += state.eq(_Tx.CRC_LO)
            with m.Case(_Tx.CRC_LO):
                m.d.comb += [out.valid.eq(1), out.payload.eq(tx_crc.crc[:8])]
                with m.If(out.ready):
                    m.d.sync += state.eq(_Tx.IDLE)
                    m.d.comb += self.done.eq(1)
        return m
