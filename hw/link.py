"""The device side of the host link: frames in, verified requests out, responses framed.

:class:`HostLink` implements the framing of :mod:`host.protocol` on a byte
stream (the UART PHY on a board, the simulator's byte bridge otherwise). It
hands a request to the accelerator only after the whole frame is in its frame
buffer and its CRC matched, so a corrupt or truncated frame can never change
state. Errors it can see itself (bad CRC, length above ``max_payload``, bytes
stopping mid-frame for ``link_timeout`` cycles) it answers itself; everything
else is the executor's (:class:`hw.executor.Executor`). A frame refused for its
length is still taken to its declared end and dropped, so nothing inside it is
parsed as a frame. Every answer, error frames included, carries the tag of the
request it answers (the link keeps it; the executor never sees it).

Parts: :class:`hw.link_rx.FrameReceiver` parses and checks the frames and writes
their payload to the frame buffer, :class:`hw.link_tx.FrameTransmitter` frames
the responses and the link's own error frames; :class:`HostLink` holds the
frame buffer and the counters and wires the two together.

Executor interface
------------------
* ``o_req`` (op, len): a verified request; the payload is in the frame buffer,
  read through ``buf_addr`` -> ``buf_data`` (one cycle of latency).
* ``i_resp`` (op, len): the response header; then ``len`` bytes on ``i_payload``.
  The link accepts no new frame until the response is sent: the protocol is
  request/response, and the frame buffer still belongs to the executor.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from gen.contract import LINK_COUNTERS

from .link_rx import FrameReceiver, header_layout
from .link_tx import FrameTransmitter

__all__ = ["HostLink", "header_layout", "LINK_COUNTERS"]



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

    Timing: ``buf_data`` is the byte at ``buf_addr`` one cycle later. A request is
    on ``o_req`` 3 cycles after its CRC's last byte; the response's SYNC is offered
    the cycle after its header is taken (``i_resp.ready`` rises the cycle after the
    request is taken), an error frame's SYNC 4 cycles after a bad CRC's last byte
    or an oversized frame's declared last byte.
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
        m.submodules.rx = rx = FrameReceiver(self.config)
        m.submodules.tx = tx = FrameTransmitter()
        m.submodules.buf = buf = Memory(shape=8, depth=self.depth, init=[])
        wp = buf.write_port()
        rp = buf.read_port()
        # (The write enable is kept as a net of its own: the formal checks observe it.)
        buf_we = Signal(attrs={"keep": 1})
        m.d.comb += [buf_we.eq(rx.buf_we), wp.en.eq(buf_we)]
        m.d.comb += [wp.addr.eq(rx.buf_waddr), wp.data.eq(rx.buf_wdata),
                     rp.addr.eq(self.buf_addr), self.buf_data.eq(rp.data)]

        wiring.connect(m, wiring.flipped(self.i_rx), rx.i_rx)
        wiring.connect(m, rx.o_req, wiring.flipped(self.o_req))
        wiring.connect(m, wiring.flipped(self.i_resp), tx.i_resp)
        wiring.connect(m, wiring.flipped(self.i_payload), tx.i_payload)
        wiring.connect(m, tx.o_tx, wiring.flipped(self.o_tx))
        # The transmitter answers the receiver's frame: the executor's response once
        # the request is taken, or the error frame of a refused one; the receiver
        # takes the next frame once the answer is sent.
        m.d.comb += [tx.accept.eq(rx.waiting), tx.error.eq(rx.error), tx.tag.eq(rx.tag),
                     tx.err_code.eq(rx.err_code), tx.err_op.eq(rx.err_op),
                     rx.i_done.eq(tx.done)]

        events = {"bytes_in": self.i_rx.valid & self.i_rx.ready,
                  "bytes_out": self.o_tx.valid & self.o_tx.ready,
                  "frames": rx.ev_frame, "frame_errors": rx.ev_refused}
        for name, event in events.items():
            if self.events:
                m.d.comb += getattr(self, f"ev_{name}").eq(event)
            else:
                counter = getattr(self, name)
                with m.If(event):
                    m.d.sync += counter.eq(counter + 1)
        return m
