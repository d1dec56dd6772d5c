"""Event counters kept in one block RAM, for builds where logic cells are scarce.

A bank of ``n`` counters ``width`` bits wide costs ``n * width`` flip-flops and as
many adder cells when each counter is a register. :class:`CounterBank` keeps the
counters in a memory instead and, per counter, only a small pre-counter that adds
the events as they come. One counter a cycle, in turn, is flushed: its stored value
is read, its pre-counter added, the sum written back, and the pre-counter restarts
from that cycle's events. No event is lost or counted twice, and a counter's value
is its stored value plus its pre-counter at every moment.

Reading: :attr:`rd_index` names a counter; :attr:`rd_valid` is high in the cycle its
flush writes back, and :attr:`rd_data` is then the counter's value as of the end of
the previous cycle (as a counter register read at that edge would show it). A read
therefore waits up to ``n`` cycles.

Clearing: the counters set in :attr:`clear` read as zero from the next cycle on and
count again from there (the stored value is dropped at their next flush). Every
counter is cleared by the domain's reset.

It is used by ``compact`` builds without a layer log
(``AcceleratorConfig.counter_bank``); with a
layer log every counter must be copied in the same cycle, which a memory cannot do.
"""

from __future__ import annotations

from amaranth.hdl import Array, Elaboratable, Module, Mux, Signal
from amaranth.lib.memory import Memory


__all__ = ["CounterBank"]


class CounterBank(Elaboratable):
    """``len(inc_max)`` counters of ``width`` bits in a block RAM (see the module doc).

    Parameters
    ----------
    inc_max:
        The largest count each counter's :attr:`inc` adds in one cycle (at least 1).
    width:
        Bits of every counter; counters wrap at ``2**width``.

    Members
    -------
    inc: list of Signal, In
        Events of each counter in this cycle.
    clear: Signal(n), In
        Counters to restart from zero.
    rd_index: Signal(range(n)), In
    rd_data: Signal(width), Out
    rd_valid: Signal, Out
    """

    def __init__(self, inc_max: list[int], width: int):
        if len(inc_max) < 2:
            raise ValueError(f"a counter bank holds at least 2 counters, not {len(inc_max)}")
        if any(int(x) < 1 for x in inc_max):
            raise ValueError(f"largest increments {inc_max}: each must be at least 1")
        if width < 2:
            raise ValueError(f"counter width {width}: accepted at least 2 bits")
        self.n = len(inc_max)
        self.width = width
        self.inc_max = [int(x) for x in inc_max]
        self.inc = [Signal(range(x + 1), name=f"inc_{i}") for i, x in enumerate(self.inc_max)]
        self.clear = Signal(self.n)
        self.rd_index = Signal(range(self.n))
        self.rd_data = Signal(width)
        self.rd_valid = Signal()

    def elaborate(self, platform):
        m = Module()
        n, width = self.n, self.width
        m.submodules.mem = mem = Memory(shape=width, depth=n, init=[])
        wp = mem.write_port()
        rp = mem.read_port(transparent_for=())
        # A pre-counter gains at most n increments between two of its flushes (it
        # restarts from the flush cycle's events and is flushed again n cycles later).
        pre = [Signal(range(n * x + 1), name=f"pre_{i}") for i, x in enumerate(self.inc_max)]
        # Cleared and not yet flushed: the stored value no longer counts.
        stale = Signal(n, init=(1 << n) - 1)
        idx = Signal(range(n))         # the counter read this cycle
        f = Signal(range(n))           # the counter flushed this cycle (read last cycle)
        m.d.sync += [idx.eq(Mux(idx == n - 1, 0, idx + 1)), f.eq(idx)]
        m.d.comb += rp.addr.eq(idx)

        stored = Mux(stale.bit_select(f, 1), 0, rp.data)
        value = Signal(width)
        m.d.comb += [value.eq(stored + Array(pre)[f]),
                     wp.addr.eq(f), wp.data.eq(value), wp.en.eq(1),
                     self.rd_data.eq(value), self.rd_valid.eq(f == self.rd_index)]
        for i in range(n):
            with m.If(self.clear[i]):
                m.d.sync += [pre[i].eq(0), stale[i].eq(1)]
            with m.Elif(f == i):
                m.d.sync += [pre[i].eq(self.inc[i]), stale[i].eq(0)]
            with m.Else():
                m.d.sync += pre[i].eq(pre[i] + self.inc[i])
        return m
