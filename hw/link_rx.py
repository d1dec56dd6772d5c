"""The receive side of the host link: frames parsed from the byte stream, CRC checked.

:class:`FrameReceiver` hunts for SYNC, takes the opcode, the 16-bit length
(little-endian), the payload and the CRC of a :mod:`host.protocol` frame, and
writes the payload bytes to the frame buffer through a write port it drives
(``buf_we``, ``buf_waddr``, ``buf_wdata``; the buffer itself belongs to
:class:`hw.link.HostLink`). Only a frame whose CRC matched becomes a request on
``o_req``; a frame it refuses (bad CRC, a length above ``max_payload``, bytes
stopping mid-frame for ``link_timeout`` cycles) raises ``error`` with its
error code instead. Either way it takes no byte until ``i_done`` says the
answer (the executor's response or the error frame) has been sent.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal, unsigned
from amaranth.lib import crc, data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from gen.contract import CRC_BYTES, ERR_CRC, ERR_LENGTH, ERR_TIMEOUT, SYNC

__all__ = ["FrameReceiver", "header_layout", "RX_TAKES", "RX_INSIDE"]


def header_layout() -> data.StructLayout:
    """A request or response header as the executor sees it: opcode and payload length
    (the link keeps the frame's tag itself and echoes it in the answer)."""
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
    TAG = 10     # the length checks act from registers, when the tag is taken


# The receive states that take line bytes, and those inside a frame.
RX_TAKES = (_Rx.HUNT, _Rx.OP, _Rx.LEN0, _Rx.LEN1, _Rx.TAG, _Rx.PAYLOAD, _Rx.CRC)
RX_INSIDE = (_Rx.OP, _Rx.LEN0, _Rx.LEN1, _Rx.TAG, _Rx.PAYLOAD, _Rx.CRC)


class FrameReceiver(wiring.Component):
    """Frame parser with CRC check and mid-frame timeout (see the module doc).

    Parameters
    ----------
    config:
        ``max_payload`` (the frame buffer's depth) and ``link_timeout`` (cycles
        without a byte inside a frame before it is dropped).

    Members
    -------
    i_rx: the line's bytes. ``ready`` is a flip-flop: high while hunting and
        inside a frame, low from the CRC's last byte until ``i_done``.
    o_req: the header of a frame whose CRC matched; ``valid`` rises 3 cycles
        after the CRC's last byte (SETTLE, CHECK) and falls when taken. The
        payload is in the frame buffer by then.
    buf_we, buf_waddr, buf_wdata: the frame buffer's write port: payload byte
        ``i`` goes to address ``i`` in the cycle the line hands it over.
    waiting: the request was taken; the receiver waits for the response
        (an executor may answer only now).
    tag: the frame's tag byte, held until ``i_done`` (the answer echoes it).
    error, err_code, err_op: the frame was refused with ``err_code``
        (``ERR_CRC``, ``ERR_LENGTH``, ``ERR_TIMEOUT``); ``err_op`` is its opcode.
        ``error`` stays high until ``i_done``. It rises 3 cycles after the CRC's
        last byte for a CRC or a length (an oversized frame's declared last byte),
        ``link_timeout + 1`` cycles after the last byte for a timeout or a drop
        ended by a gap.
    i_done: the answer is sent: hunt for the next frame.
    ev_frame: high in the cycle a request is accepted (``o_req.valid`` rises next).
    ev_refused: high in the cycle after a frame was refused (a registered pulse).
    """

    def __init__(self, config):
        self.config = config
        self.depth = config.max_payload
        super().__init__({
            "i_rx": In(stream.Signature(8)),
            "o_req": Out(stream.Signature(header_layout())),
            "buf_we": Out(1),
            "buf_waddr": Out(range(self.depth)),
            "buf_wdata": Out(8),
            "waiting": Out(1),
            "tag": Out(8),
            "error": Out(1),
            "err_code": Out(8),
            "err_op": Out(8),
            "i_done": In(1),
            "ev_frame": Out(1),
            "ev_refused": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        m.submodules.rx_crc = rx_crc = crc.catalog.CRC16_CCITT_FALSE(data_width=8).create()

        state = Signal(_Rx)
        op = Signal(8)
        tag = Signal(8)
        length = Signal(16)
        count = Signal(16)
        crc_count = Signal(range(CRC_BYTES + 1))
        idle = Signal(range(cfg.link_timeout + 1))
        err_code = Signal(8)
        len_over = Signal()                       # the length checks, registered
        len_zero = Signal()
        drop = Signal()                           # the frame is refused for its length
        pay_last = Signal()                       # count == length - 1, registered
        byte = self.i_rx.payload
        fire = self.i_rx.valid & self.i_rx.ready

        # Whether the state takes line bytes, and whether it is inside a frame: flags
        # kept with the state (every change of state goes through ``goto``), so the
        # handshake and the timeout start from flip-flops, not from a state decode.
        takes = Signal(init=1)
        inside = Signal()

        def goto(st):
            return [state.eq(st), takes.eq(int(st in RX_TAKES)), inside.eq(int(st in RX_INSIDE))]

        m.d.comb += self.i_rx.ready.eq(takes)
        m.d.comb += [rx_crc.data.eq(byte),
                     rx_crc.valid.eq(fire & (state != _Rx.HUNT)),
                     rx_crc.start.eq(fire & (state == _Rx.HUNT))]

        # A frame whose bytes stop arriving is dropped, so a truncated frame cannot
        # hold the link forever.
        # The timeout compare is registered: ``timed_out`` holds exactly when ``idle``
        # is link_timeout - 1.
        timed_out = Signal()
        with m.If(~inside | fire):
            m.d.sync += [idle.eq(0), timed_out.eq(0)]
        with m.Else():
            m.d.sync += [idle.eq(idle + 1), timed_out.eq(idle == cfg.link_timeout - 2)]

        # The 32-bit residue compare is registered: the frame verdict (state, error
        # code, counters) starts from one flip-flop.
        crc_match = Signal()
        m.d.sync += crc_match.eq(rx_crc.match_detected)

        # The refusal event follows a cycle later, from a register: the refusal
        # conditions then enable two registers, not a counter.
        refused = Signal()
        m.d.sync += refused.eq(0)
        m.d.comb += self.ev_refused.eq(refused)

        def refuse(code):
            m.d.sync += [err_code.eq(code), *goto(_Rx.ERROR), refused.eq(1)]

        m.d.comb += [self.buf_waddr.eq(count), self.buf_wdata.eq(byte)]
        with m.Switch(state):
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
                                 *goto(_Rx.TAG)]
            with m.Case(_Rx.TAG):
                # An oversized frame's declared rest is taken as a payload and a CRC
                # that go nowhere (``drop``): nothing inside it can start a frame.
                m.d.sync += pay_last.eq(length == 1)
                with m.If(fire):
                    m.d.sync += [tag.eq(byte), drop.eq(len_over)]
                    with m.If(len_zero):
                        m.d.sync += goto(_Rx.CRC)
                    with m.Else():
                        m.d.sync += goto(_Rx.PAYLOAD)
            with m.Case(_Rx.PAYLOAD):
                m.d.comb += self.buf_we.eq(fire & ~drop)
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
                with m.If(drop):
                    refuse(ERR_LENGTH)
                with m.Elif(crc_match):
                    m.d.sync += goto(_Rx.EXEC)
                with m.Else():
                    refuse(ERR_CRC)
        with m.If(inside & timed_out & ~fire):
            with m.If(drop):
                refuse(ERR_LENGTH)
            with m.Else():
                refuse(ERR_TIMEOUT)

        # The request, held until the executor takes it.
        pending = Signal()
        accept = (state == _Rx.CHECK) & crc_match & ~drop
        m.d.comb += [self.ev_frame.eq(accept),
                     self.o_req.valid.eq(pending),
                     self.o_req.payload.op.eq(op), self.o_req.payload.len.eq(length)]
        with m.If(accept):
            m.d.sync += pending.eq(1)
        with m.If(self.o_req.valid & self.o_req.ready):
            m.d.sync += pending.eq(0)

        m.d.comb += [self.waiting.eq((state == _Rx.EXEC) & ~pending),
                     self.error.eq(state == _Rx.ERROR),
                     self.err_code.eq(err_code), self.err_op.eq(op), self.tag.eq(tag)]
        # The frame is answered: take the next one.
        with m.If(self.i_done):
            m.d.sync += [*goto(_Rx.HUNT), drop.eq(0)]
        return m
