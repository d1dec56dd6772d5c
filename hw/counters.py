"""The accelerator's event counters: registers, or one block RAM where logic cells are scarce.

Both kinds count the same events and are read the same way, so the accelerator
builds one or the other (``AcceleratorConfig.counter_bank``) and wires it alike:

* ``inc`` holds, per counter, the count it adds in this cycle (at most its
  ``inc_max``); ``clear`` restarts the counters whose bits are set from zero,
  from the next cycle on (and a cleared counter adds nothing in that cycle);
* ``rd_index`` names a counter; ``rd_data`` is its value in the cycles where
  ``rd_valid`` is high. Every counter is ``width`` bits wide and wraps.

:class:`CounterRegisters` keeps every counter in a register: ``rd_valid`` is
always high and ``rd_data`` the register. It also offers what only registers
can: ``values``, every counter at once (the layer log copies several in one
cycle), ``add``, one enable bit per counter (a counter whose whole count arrives
in one cycle, such as an engine layer's totals), and ``kept``, counters that are
kept elsewhere (the host link's in such builds) and read through.

:class:`CounterBank` costs a block RAM instead of ``n * width`` flip-flops and as
many adder cells. It keeps the counters in a memory and, per counter, only a
small pre-counter that adds the events as they come. One counter a cycle, in
turn, is flushed: its stored value is read, its pre-counter added, the sum
written back, and the pre-counter restarts from that cycle's events. No event is
lost or counted twice, and a counter's value is its stored value plus its
pre-counter at every moment. ``rd_valid`` is high in the cycle the named
counter's flush writes back, and ``rd_data`` is then its value as of the end of
the previous cycle (as a counter register read at that edge would show it); a
read therefore waits up to ``n`` cycles. Every counter is cleared by the
domain's reset. It is used by ``compact`` builds without a layer log: with a
layer log every counter must be copied in the same cycle, which a memory cannot do.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out


__all__ = ["CounterBank", "CounterRegisters", "counter_signature"]


def _check(inc_max, width):
    inc_max = {str(name): int(x) for name, x in dict(inc_max).items()}
    if len(inc_max) < 2:
        raise ValueError(f"a counter bank holds at least 2 counters, not {len(inc_max)}")
    bad = {name: x for name, x in inc_max.items() if x < 1}
    if bad:
        raise ValueError(f"largest increments {bad}: each must be at least 1")
    if width < 2:
        raise ValueError(f"counter width {width}: accepted at least 2 bits")
    return inc_max


def counter_signature(inc_max: dict, width: int) -> dict:
    """The members both kinds of counters share, for counters named and bounded by
    ``inc_max`` (``{name: largest increment in one cycle}``, in reading order)."""
    return {
        "inc": In(data.StructLayout({name: range(x + 1) for name, x in inc_max.items()})),
        "clear": In(len(inc_max)),
        "rd_index": In(range(len(inc_max))),
        "rd_data": Out(width),
        "rd_valid": Out(1),
    }


class CounterRegisters(wiring.Component):
    """Counters in registers (see the module doc).

    Parameters
    ----------
    inc_max:
        ``{name: largest increment}`` of the counted counters, in reading order.
    width:
        Bits of every counter.
    kept:
        Names of counters kept elsewhere, read through from ``kept`` (they follow
        the counted ones in reading order).

    Members
    -------
    inc, clear, rd_index, rd_data, rd_valid: as :class:`CounterBank`.
    add: In, one bit per counted counter (high unless driven): a counter adds its
        ``inc`` only in cycles where its bit is high.
    kept: In, the values of the kept counters.
    values: Out, every counter (counted and kept) by name.
    """

    def __init__(self, inc_max: dict, width: int, *, kept=()):
        checked = _check({**inc_max, **dict.fromkeys(kept, 1)}, width)
        self.inc_max = {name: x for name, x in checked.items() if name not in kept}
        self.kept_names = tuple(kept)
        self.names = (*self.inc_max, *self.kept_names)
        self.width = width
        sig = counter_signature(self.inc_max, width)
        sig["clear"] = In(len(self.names))
        sig["rd_index"] = In(range(len(self.names)))
        super().__init__({
            **sig,
            "add": In(data.StructLayout({name: 1 for name in self.inc_max}),
                      init={name: 1 for name in self.inc_max}),
            "kept": In(data.StructLayout({name: width for name in self.kept_names})),
            "values": Out(data.StructLayout({name: width for name in self.names})),
        })

    def elaborate(self, platform):
        m = Module()
        for i, name in enumerate(self.names):
            value = self.values[name]
            if name in self.kept_names:
                m.d.comb += value.eq(self.kept[name])
                continue
            ctr = Signal(self.width, name=f"ctr_{name}")
            m.d.comb += value.eq(ctr)
            inc = self.inc[name]
            with m.If(self.clear[i]):
                m.d.sync += ctr.eq(0)
            if len(inc) == 1:
                with m.Elif(self.add[name] & inc):
                    m.d.sync += ctr.eq(ctr + 1)
            else:
                with m.Elif(self.add[name]):
                    m.d.sync += ctr.eq(ctr + inc)
        m.d.comb += [self.rd_data.eq(Array(self.values[name] for name in self.names)[self.rd_index]),
                     self.rd_valid.eq(1)]
        return m


class CounterBank(wiring.Component):
    """Counters in a block RAM (see the module doc).

    Parameters
    ----------
    inc_max:
        ``{name: largest increment in one cycle}`` (at least 1), in reading order;
        a list gives counters named ``c0``, ``c1``, ...
    width:
        Bits of every counter; counters wrap at ``2**width``.
    """

    def __init__(self, inc_max, width: int):
        if not isinstance(inc_max, dict):
            inc_max = {f"c{i}": x for i, x in enumerate(inc_max)}
        self.inc_max = _check(inc_max, width)
        self.names = tuple(self.inc_max)
        self.n = len(self.names)
        self.width = width
        super().__init__(counter_signature(self.inc_max, width))

    def elaborate(self, platform):
        m = Module()
        n, width = self.n, self.width
        m.submodules.mem = mem = Memory(shape=width, depth=n, init=[])
        wp = mem.write_port()
        rp = mem.read_port(transparent_for=())
        # A pre-counter gains at most n increments between two of its flushes (it
        # restarts from the flush cycle's events and is flushed again n cycles later).
        pre = [Signal(range(n * x + 1), name=f"pre_{i}") for i, x in enumerate(self.inc_max.values())]
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
        for i, name in enumerate(self.names):
            with m.If(self.clear[i]):
                m.d.sync += [pre[i].eq(0), stale[i].eq(1)]
            with m.Elif(f == i):
                m.d.sync += [pre[i].eq(self.inc[name]), stale[i].eq(0)]
            with m.Else():
                m.d.sync += pre[i].eq(pre[i] + self.inc[name])
        return m
