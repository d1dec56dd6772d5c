"""The conv engine's host port: activation tensors in and out of the activation banks.

A host command (:func:`hw.engine.host_command_layout`) moves a ``[channels, pixels]``
tensor in CHW order between one activation buffer and the ``i_load`` / ``o_read``
streams. The buffer's ``rows`` banks hold channel ``c`` in bank ``c mod rows`` at
``(c // rows) * pixels + pixel`` (:mod:`hw.engine`), so the port walks the pixels
of a channel, then the next bank, and after the last bank the next group of
``rows`` channels.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig, clog2
from .feeder import bank_depth

__all__ = ["EngineHostPort"]


def host_command_layout(config: AcceleratorConfig) -> data.StructLayout:
    """A host transfer: ``write`` (1: load via ``i_load``, 0: read via ``o_read``),
    buffer ``buf``, and the tensor's ``channels`` and ``pixels`` (H * W)."""
    return data.StructLayout({
        "write": unsigned(1),
        "buf": unsigned(max(1, clog2(config.act_buffers))),
        "channels": unsigned(max(config.max_ci, config.max_co).bit_length()),
        "pixels": unsigned((config.max_h * config.max_w).bit_length()),
    })


class EngineHostPort(wiring.Component):
    """Host loads and read-backs of the activation banks.

    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig` (``rows``, ``act_buffers``,
        ``a_bits``, the map and channel limits).

    Ports
    -----
    accept, i_host:
        A command is taken in a cycle with ``accept`` (``i_host.ready`` is ``accept``),
        which comes only while not ``busy``; the offered payload is captured whatever
        its ``valid``. A command with no
        channels or pixels, or naming a buffer past ``act_buffers``, is ignored.
    busy:
        High from the cycle after a command is taken until its last element is written
        or its last value has been taken from ``o_read``.
    i_load:
        The elements of a load (``write``), in CHW order; ready throughout the load.
    o_read:
        The values of a read-back, in CHW order, under any back-pressure.
    rd_en, rd_addr, i_rd_data:
        While ``rd_en`` (a read-back) the banks read ``rd_addr``; ``i_rd_data`` is
        every bank's read register (``[buffer][bank]``), a word two cycles after its
        address.
    wr_en, wr_addr, wr_data:
        A load's write, a cycle after its element is taken, from registers: bank
        ``wr_en`` (one-hot, bit ``buffer * rows + bank``) writes ``wr_data`` at
        ``wr_addr``.

    Timing
    ------
    A read is issued only while the four-entry read-back FIFO has room for it and the
    reads in flight (bank read, read register, bank select), so the read pipeline
    never stalls; a read-back delivers at most a value a cycle.
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        R, NB = config.rows, config.act_buffers
        self.addr_shape = unsigned(max(1, (bank_depth(config) - 1).bit_length()))
        super().__init__({
            "accept": In(1),
            "i_host": In(stream.Signature(host_command_layout(config))),
            "busy": Out(1),
            "i_load": In(stream.Signature(signed(config.a_bits))),
            "o_read": Out(stream.Signature(signed(config.a_bits))),
            "rd_en": Out(1),
            "rd_addr": Out(self.addr_shape),
            "i_rd_data": In(data.ArrayLayout(data.ArrayLayout(signed(config.a_bits), R), NB)),
            "wr_en": Out(NB * R),
            "wr_addr": Out(self.addr_shape),
            "wr_data": Out(signed(config.a_bits)),
        })

    def elaborate(self, platform):
        cfg = self.config
        R, NB = cfg.rows, cfg.act_buffers
        m = Module()

        hp = self.i_host.payload
        write = Signal()
        buf = Signal.like(hp.buf)
        pixels = Signal.like(hp.pixels)
        ch = Signal.like(hp.channels)
        bank = Signal(range(R))
        base = Signal(self.addr_shape)
        pix = Signal(range(cfg.max_h * cfg.max_w + 1))
        more = Signal()
        addr = Signal(self.addr_shape)     # base + pix, kept up to date with them
        # The last pixel and channel indices, so that the end tests are equalities.
        pix_last = Signal.like(pixels)
        ch_last = Signal.like(ch)
        last = (pix == pix_last) & (ch == ch_last)

        m.d.comb += self.i_host.ready.eq(self.accept)

        def step():
            with m.If(pix != pix_last):
                m.d.sync += [pix.eq(pix + 1), addr.eq(addr + 1)]
            with m.Else():
                m.d.sync += [pix.eq(0), ch.eq(ch + 1)]
                with m.If(bank == R - 1):
                    m.d.sync += [bank.eq(0), base.eq(base + pixels), addr.eq(base + pixels)]
                with m.Else():
                    m.d.sync += [bank.eq(bank + 1), addr.eq(base)]

        # Reads: bank read into the bank's read register (hw.memory), then the bank
        # select into a small FIFO. (The banks keep reading meanwhile: the address only
        # moves when a read is issued, so the read register holds the same word.)
        m.submodules.rd_fifo = rd_fifo = SyncFIFOBuffered(width=cfg.a_bits, depth=4)
        rd_v1, rd_v2 = Signal(), Signal()
        rd_b1, rd_b2 = Signal(range(R)), Signal(range(R))
        rd_room = Signal()
        m.d.comb += rd_room.eq(rd_fifo.level + rd_v1 + rd_v2 < rd_fifo.depth)
        advance = Signal()
        m.d.comb += [self.rd_en.eq(self.busy & ~write), self.rd_addr.eq(addr),
                     advance.eq(self.rd_en & more & rd_room)]
        m.d.sync += [rd_v1.eq(advance), rd_b1.eq(bank), rd_v2.eq(rd_v1), rd_b2.eq(rd_b1)]
        # (Array selects, as elsewhere in the engine: a view's select by a signal leaves
        # undefined words past act_buffers, which the ECP5 synthesis does not map.)
        banks = Array([Array([self.i_rd_data[b][r] for r in range(R)]) for b in range(NB)])
        m.d.comb += [rd_fifo.w_en.eq(rd_v2), rd_fifo.w_data.eq(banks[buf][rd_b2]),
                     self.o_read.valid.eq(rd_fifo.r_rdy), self.o_read.payload.eq(rd_fifo.r_data),
                     rd_fifo.r_en.eq(self.o_read.ready)]

        # A write reaches its bank a cycle after its element is taken, from registers
        # (the element comes from the link's frame buffer, a block RAM output).
        wr_fire = self.busy & write & self.i_load.valid
        m.d.sync += [self.wr_addr.eq(addr), self.wr_data.eq(self.i_load.payload)]
        m.d.sync += [self.wr_en[b * R + r].eq(wr_fire & (buf == b) & (bank == r))
                     for b in range(NB) for r in range(R)]

        with m.If(self.busy):
            with m.If(write):
                m.d.comb += self.i_load.ready.eq(1)
                with m.If(self.i_load.valid):
                    step()
                    with m.If(last):
                        m.d.sync += self.busy.eq(0)
            with m.Elif(advance):
                step()
                with m.If(last):
                    m.d.sync += more.eq(0)
            # Idle once every value read has been taken: a value just written into the
            # FIFO is counted by its level a cycle before it shows on r_rdy.
            with m.Elif(~more & ~rd_v1 & ~rd_v2 & (rd_fifo.level == 0)):
                m.d.sync += self.busy.eq(0)

        # The offered command is captured whatever its valid, so that valid only moves
        # the state (a small fanout) and not every field. (Last, so that it takes
        # precedence over the transfer's updates, which it never meets as accept comes
        # only while idle: the zeros are then the registers' synchronous resets and the
        # updates their enables, no multiplexers.)
        with m.If(self.accept):
            m.d.sync += [write.eq(hp.write), buf.eq(hp.buf), pixels.eq(hp.pixels),
                         pix_last.eq(hp.pixels - 1), ch_last.eq(hp.channels - 1), ch.eq(0),
                         bank.eq(0), base.eq(0), pix.eq(0), addr.eq(0), more.eq(1)]
            with m.If(self.i_host.valid & (hp.channels != 0) & (hp.pixels != 0) & (hp.buf < NB)):
                m.d.sync += self.busy.eq(1)
        return m
