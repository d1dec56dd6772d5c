"""A two-entry register slice for a valid/ready stream.

:class:`SkidBuffer` passes a ``lib.stream`` through registers without losing
throughput: ``o.valid``, ``o.payload`` and ``i.ready`` are all flip-flops, so
neither side's combinational logic reaches the other's, and an item is accepted
every cycle while the consumer keeps up. When the consumer stalls, the item in
flight parks in the second entry (the skid) and ``i.ready`` drops a cycle later.

A ``SyncFIFOBuffered`` of depth 2 is also register-only but takes an item only
every other cycle; deeper ones keep their items in a memory (LUT RAM or block
RAM on an FPGA), whose write data is another path to time.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["SkidBuffer"]


class SkidBuffer(wiring.Component):
    """Registered stream slice: ``i`` -> ``o`` one cycle later, two items of room.

    Parameters
    ----------
    shape:
        The payload shape.
    """

    def __init__(self, shape):
        self.shape = shape
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform):
        m = Module()
        skid = Signal(self.shape)
        skid_valid = Signal()
        m.d.comb += self.i.ready.eq(~skid_valid)
        take = self.i.valid & self.i.ready
        with m.If(~self.o.valid | self.o.ready):
            # The output register is free this cycle: refill it from the skid first.
            with m.If(skid_valid):
                m.d.sync += [self.o.payload.eq(skid), skid_valid.eq(0)]
            with m.Elif(take):
                m.d.sync += [self.o.payload.eq(self.i.payload), self.o.valid.eq(1)]
            with m.Else():
                m.d.sync += self.o.valid.eq(0)
        with m.Elif(take):
            m.d.sync += [skid.eq(self.i.payload), skid_valid.eq(1)]
        return m
